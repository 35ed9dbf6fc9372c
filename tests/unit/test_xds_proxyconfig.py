"""proxy-config's short tables: one row per route with its match and where it goes (a
split names each share, a mirror is marked)."""

from __future__ import annotations

from nodeagent.xds import resources as rt
from nodeagent.xds.proxyconfig import render
from test_xds_snapshot import SPLIT
from xds_world import REVIEWS, translation


def test_routes_show_each_share_of_a_split_and_the_mirror():
    routes = {rt.name_of(m): m for m in translation(SPLIT).messages() if rt.type_of(m) == rt.ROUTE}
    lines = render("routes", {f"{REVIEWS}:9080": routes[f"{REVIEWS}:9080"]}, "short").splitlines()
    assert lines[0].split() == ["TABLE", "ROUTE", "MATCH", "TO"]
    assert lines[1].split("  /  ")[1].strip() == (
        f"outbound|9080|v1|{REVIEWS} 90%, outbound|9080|v2|{REVIEWS} 10%, "
        "outbound|8080||ratings.shop.svc.cluster.local (mirror)")
