"""The static-configuration check of envoy_validate.py: the real Envoy accepts what the
translator produces for every feature (the configuration the real-Envoy acceptance test
serves over ADS, here as static resources, for both nodes) and rejects a broken resource
with its own message, so a passing check means something. The bootstrap it builds holds
the translated messages themselves: EDS clusters made STATIC with their endpoints, route
tables inlined, nothing translated left out."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.route.v3.route_components_pb2 import HeaderMatcher
from envoy.type.matcher.v3.regex_pb2 import RegexMatcher
from envoy.type.matcher.v3.string_pb2 import StringMatcher

from envoy_validate import static_bootstrap, validate
from nodeagent.xds import resources as rt
from nodeagent.xds.bootstrap import XDS_CLUSTER
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.translate.build import translate
from nodeagent.xds.translate.listeners import HCM
from xds_world import OPTIONS, REVIEWS, doc, translation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))  # the helpers e2e/test_waypoint shares
from xds_waypoint import Signer, model  # noqa: E402

ROUTED = doc("VirtualService", "reviews", "hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews}}]")
CLUSTER = f"outbound|9080||{REVIEWS}"


def routed():
    return translation(ROUTED)


def replaced(result, message):
    """`result` with `message` in place of the translated resource of the same name."""
    type_url = rt.type_of(message)
    kept = tuple(m for m in result.resources[type_url] if rt.name_of(m) != rt.name_of(message))
    return dataclasses.replace(result, resources={**result.resources, type_url: (*kept, message)})


def route_table(result):
    (table,) = [m for m in result.resources[rt.ROUTE] if rt.name_of(m) == f"{REVIEWS}:9080"]
    return rt.MESSAGE[rt.ROUTE].FromString(rt.serialize(table))  # a copy to break


@pytest.mark.parametrize("node", ["node1", "node2"])
def test_every_translated_feature_is_accepted(node, tmp_path):
    world = model(Signer())
    config = IstioConfig.build(world)
    assert config.errors == (), [str(e) for e in config.errors]
    check = validate(static_bootstrap(translate(world, node, config, OPTIONS), node, OPTIONS.sockets), tmp_path)
    assert (check.returncode, "OK" in check.output) == (0, True), check.output


def test_the_bootstrap_holds_the_translated_resources_as_static_ones():
    result = routed()
    static = static_bootstrap(result, "node1", OPTIONS.sockets).static_resources
    clusters = {c.name: c for c in static.clusters}
    assert sorted(clusters) == sorted([XDS_CLUSTER, *(rt.name_of(c) for c in result.resources[rt.CLUSTER])])
    assert clusters[CLUSTER].type == Cluster.DiscoveryType.STATIC
    assert not clusters[CLUSTER].HasField("eds_cluster_config")
    (assignment,) = [a for a in result.resources[rt.ENDPOINT] if a.cluster_name == CLUSTER]
    assert clusters[CLUSTER].load_assignment == assignment
    outbound = next(x for x in static.listeners if x.name == "outbound")
    managers = [rt.unpack(f.typed_config) for c in outbound.filter_chains for f in c.filters if f.name == HCM]
    assert [(m.WhichOneof("route_specifier"), m.route_config.name) for m in managers] == [
        ("route_config", f"{REVIEWS}:9080")]
    assert sorted(x.name for x in static.listeners) == sorted(rt.name_of(x) for x in result.resources[rt.LISTENER])


def test_a_route_to_a_cluster_that_was_not_translated_is_refused_by_envoy(tmp_path):
    result = routed()
    table = route_table(result)
    table.virtual_hosts[0].routes[0].route.cluster = "outbound|9080|v9|reviews.shop.svc.cluster.local"
    check = validate(static_bootstrap(replaced(result, table), "node1", OPTIONS.sockets), tmp_path)
    assert check.returncode == 1
    assert "route: unknown cluster 'outbound|9080|v9|reviews.shop.svc.cluster.local'" in check.output


def test_a_header_regex_re2_cannot_compile_is_refused_by_envoy(tmp_path):
    result = routed()
    table = route_table(result)
    headers = table.virtual_hosts[0].routes[0].match.headers
    del headers[:]
    headers.append(HeaderMatcher(name="end-user", string_match=StringMatcher(safe_regex=RegexMatcher(regex="(jason"))))
    check = validate(static_bootstrap(replaced(result, table), "node1", OPTIONS.sockets), tmp_path)
    assert check.returncode == 1 and "missing ): (jason" in check.output, check.output


def test_a_route_table_no_listener_uses_is_not_silently_left_out():
    result = routed()
    table = route_table(result)
    table.name = "nobody-uses-this"
    extra = dataclasses.replace(result, resources={**result.resources,
                                                   rt.ROUTE: (*result.resources[rt.ROUTE], table)})
    with pytest.raises(AssertionError, match=r"'route tables': \['nobody-uses-this'\]"):
        static_bootstrap(extra, "node1", OPTIONS.sockets)
