"""proxy-config's short tables: one row per route with its match and where it goes (a
split names each share, a mirror is marked); every run bounded by --timeout with a
one-line error; a workload's view; the agent's certificates (`secret`)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest
from prometheus_client import CollectorRegistry

from nodeagent import admin
from nodeagent.cli import main
from nodeagent.xds import resources as rt
from nodeagent.xds.cache import SnapshotCache
from nodeagent.xds.client import XdsClientError, fetch
from nodeagent.xds.proxyconfig import render, render_secrets
from nodeagent.xds.server import AdsServer
from nodeagent.xds.snapshot import Snapshot
from nodeagent.xds.workloadview import narrow, pods_of
from test_xds_snapshot import SPLIT
from waypoint_world import ALLOW_GET, VS
from xds_world import REVIEWS, translation


def test_routes_show_each_share_of_a_split_and_the_mirror():
    routes = {rt.name_of(m): m for m in translation(SPLIT).messages() if rt.type_of(m) == rt.ROUTE}
    lines = render("routes", {f"{REVIEWS}:9080": routes[f"{REVIEWS}:9080"]}, "short").splitlines()
    assert lines[0].split() == ["TABLE", "ROUTE", "MATCH", "TO"]
    assert lines[1].split("  /  ")[1].strip() == (
        f"outbound|9080|v1|{REVIEWS} 90%, outbound|9080|v2|{REVIEWS} 10%, "
        "outbound|8080||ratings.shop.svc.cluster.local (mirror)")


# --- issue 14: bounded, clean errors, a workload's view, the agent's certificates ---------

# What these runs catch is a hang (one sat > 10 min past its --timeout), or waiting out a
# timeout where the answer is known at once: bounds far from both, never a latency.
HANG = 30.0


def bounded(call, timeout: float) -> tuple[str, float]:
    """(the XdsClientError's text, seconds it took)."""
    started = time.monotonic()
    with pytest.raises(XdsClientError) as caught:
        call()
    return str(caught.value), time.monotonic() - started


def test_a_missing_socket_fails_at_once(tmp_path):
    text, took = bounded(lambda: fetch(str(tmp_path / "xds.sock"), "node1", timeout=600), 600)
    assert text.startswith(f"no xDS server at {tmp_path / 'xds.sock'}: the socket does not exist") and took < HANG


def test_a_socket_that_never_answers_is_given_up_on_at_the_timeout(tmp_path):
    path = str(tmp_path / "xds.sock")
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(path)
    silent.listen(8)  # accepts (the kernel's backlog) and never speaks HTTP/2
    try:
        for _ in range(3):  # the hang was 2 runs in 40: each run ends at its timeout
            text, took = bounded(lambda: fetch(path, "node1", timeout=1.0), 1.0)
            assert took < HANG, took
            assert "Rendezvous" not in text and "\n" not in text, text
            assert text.startswith((f"cannot connect to the xDS server at {path} within the timeout",
                                    f"the xDS server at {path} sent nothing")), text
    finally:
        silent.close()


@pytest.fixture
def served(tmp_path):
    cache = SnapshotCache()
    server = AdsServer(cache, CollectorRegistry(), debounce=0.05, max_delay=1.0).start(unix_path=str(tmp_path / "x.sock"))
    try:
        yield cache, str(tmp_path / "x.sock")
    finally:
        server.stop()


def world_snapshot() -> Snapshot:
    result = translation(VS + ALLOW_GET)
    return Snapshot.build("1", result.messages(), result.dataplane)


def test_another_node_id_gets_a_clean_error_naming_it(served, capsys):
    cache, path = served
    cache.set_snapshot("node1", world_snapshot())
    text, took = bounded(lambda: fetch(path, "node9", timeout=1.0), 1.0)
    assert text == (f"the xDS server at {path} sent nothing for node id 'node9' within 1s (it answers only for the "
                    "node its agent serves: give that node's name with --node)") and took < HANG
    assert main(["proxy-config", "routes", "--xds-socket", path, "--node", "node9", "--timeout", "1"]) == 1
    assert capsys.readouterr().err == f"nodeagent: error: {text}\n"


def status_of(pods: list[tuple[str, str]]) -> dict:
    return {"pods": [{"namespace": ns, "name": name, "ip": "-"} for ns, name in pods]}


def test_a_workloads_view_keeps_the_outbound_side_and_its_own_inbound_chains(served, capsys, monkeypatch):
    cache, path = served
    cache.set_snapshot("node1", world_snapshot())
    resources = fetch(path, "node1")
    ratings = narrow(resources, [("shop", "ratings")])
    inbound = [c.name for c in ratings[rt.LISTENER]["inbound"].filter_chains]
    assert inbound == ["inbound|shop/ratings|9000", "inbound|shop/ratings|9090"]
    assert sorted(ratings[rt.ROUTE]) == sorted(resources[rt.ROUTE])  # both sides reach every table here
    productpage = narrow(resources, [("shop", "productpage")])
    assert "inbound" not in productpage[rt.LISTENER] and "outbound" in productpage[rt.LISTENER]
    assert sorted(productpage[rt.ROUTE]) == [f"{REVIEWS}:9080"]
    assert not any(name.startswith("inbound|") for name in productpage[rt.CLUSTER])
    assert pods_of("shop/reviews", [("shop", "reviews-v1"), ("shop", "reviews-v2"), ("other", "reviews-v3"),
                                    ("shop", "reviewsx")]) == [("shop", "reviews-v1"), ("shop", "reviews-v2")]
    monkeypatch.setattr(admin, "fetch_status", lambda socket_path, timeout=5.0: status_of([("shop", "productpage")]))
    assert main(["proxy-config", "routes", "shop/productpage", "--xds-socket", path, "--node", "node1",
                 "--admin-socket", "/run/x.sock"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == [f"{REVIEWS}:9080"]
    assert main(["proxy-config", "routes", "shop/ratings", "--xds-socket", path, "--node", "node1",
                 "--admin-socket", "/run/x.sock"]) == 1
    assert capsys.readouterr().err == (
        "nodeagent: error: shop/ratings: no pod of this workload is enrolled on node node1, so none of its traffic "
        "goes through this waypoint (give the node it runs on with --node (see nodeagent lab status, or kubectl "
        "get pods -o wide))\n")


IDENTITY = {"enabled": True, "trust_domain": "cluster.local", "identities": [
    {"identity": "spiffe://cluster.local/ns/shop/sa/web", "valid": True, "serial": "1f2e", "not_before": 1767225600,
     "not_after": 1767312000, "refresh_at": 1767268800, "failures": 0, "error": None},
    {"identity": "spiffe://cluster.local/ns/shop/sa/db", "valid": False, "serial": None, "not_before": None,
     "not_after": None, "refresh_at": None, "failures": 2, "error": "CA unavailable"}],
    "roots": [{"subject": "O=cluster.local", "serial": "a1", "not_before": 1767225600, "not_after": 2082758400}]}


def test_secret_shows_each_certificate_as_istioctl_does(capsys, monkeypatch):
    lines = render_secrets(IDENTITY, "short", now=1767230000).splitlines()
    assert [re.split(r"  +", line) for line in lines] == [
        ["RESOURCE NAME", "TYPE", "STATUS", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"],
        ["spiffe://cluster.local/ns/shop/sa/web", "Cert Chain", "ACTIVE", "1f2e", "2026-01-02T00:00:00Z",
         "2026-01-01T00:00:00Z"],
        ["spiffe://cluster.local/ns/shop/sa/db", "Cert Chain", "WAITING (CA unavailable)", "-", "-", "-"],
        ["ROOTCA", "CA", "ACTIVE", "a1", "2036-01-01T00:00:00Z", "2026-01-01T00:00:00Z"]]
    assert render_secrets({"enabled": False, "identities": []}, "short", now=0) == (
        "mTLS is off on this agent (no --ca-address): it holds no certificate\n")
    asked = []
    monkeypatch.setattr(admin, "fetch_status", lambda socket_path, timeout=5.0: asked.append(
        (socket_path, timeout)) or {"identity": IDENTITY})
    assert main(["proxy-config", "secret", "-o", "json", "--admin-socket", "/run/a.sock", "--timeout", "3"]) == 0
    assert asked == [("/run/a.sock", 3.0)] and '"serial": "1f2e"' in capsys.readouterr().out


def test_the_command_as_a_process_prints_everything_and_ends_with_its_code(served):
    """The process ends without gRPC's shutdown (os._exit, which flushes nothing): a
    piped table must still arrive whole, and an error keep its line and exit code."""
    cache, path = served
    cache.set_snapshot("node1", world_snapshot())
    expected = render("routes", fetch(path, "node1")[rt.ROUTE], "short")
    for _ in range(3):
        run = subprocess.run([sys.executable, "-m", "nodeagent", "proxy-config", "routes", "--xds-socket", path,
                              "--node", "node1", "--timeout", "10"], capture_output=True, text=True, timeout=HANG * 2)
        assert (run.returncode, run.stdout, run.stderr) == (0, expected, ""), run
    wrong = subprocess.run([sys.executable, "-m", "nodeagent", "proxy-config", "routes", "--xds-socket", path,
                            "--node", "node9", "--timeout", "1"], capture_output=True, text=True, timeout=HANG * 2)
    assert (wrong.returncode, wrong.stdout) == (1, "") and wrong.stderr.startswith(
        f"nodeagent: error: the xDS server at {path} sent nothing for node id 'node9' within 1s"), wrong
