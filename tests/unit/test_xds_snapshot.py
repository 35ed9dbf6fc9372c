"""Snapshots: the consistency check catches each kind of dangling reference (naming it),
versions follow content per type, a published snapshot cannot be changed, and the cache
tells its watchers."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster

from nodeagent.xds import resources as rt
from nodeagent.xds.cache import SnapshotCache
from nodeagent.xds.snapshot import InconsistentSnapshot, Snapshot
from xds_world import REVIEWS, doc, translation

SPLIT = (doc("DestinationRule", "reviews", "host: reviews\nsubsets:\n- {name: v1, labels: {version: v1}}\n"
                                           "- {name: v2, labels: {version: v2}}") +
         doc("VirtualService", "reviews", """
hosts: [reviews]
http:
- route:
  - {destination: {host: reviews, subset: v1}, weight: 90}
  - {destination: {host: reviews, subset: v2}, weight: 10}
  mirror: {host: ratings, port: {number: 8080}}
""") + doc("VirtualService", "db", "hosts: [db]\ntcp: [{route: [{destination: {host: db}}]}]"))


def messages():
    return translation(SPLIT).messages()


def without(kind: str, name: str):
    return [m for m in messages() if not (rt.type_of(m) == kind and rt.name_of(m) == name)]


def dangling(found) -> tuple:
    with pytest.raises(InconsistentSnapshot) as caught:
        Snapshot.build("1", found)
    return caught.value.dangling[0], str(caught.value)


def test_a_complete_translation_is_consistent():
    snapshot = Snapshot.build("7", messages())
    assert snapshot.version == "7"
    assert f"outbound|9080|v1|{REVIEWS}" in snapshot.names(rt.ENDPOINT)


def test_a_listener_naming_a_missing_route_table():
    ref, message = dangling(without(rt.ROUTE, f"{REVIEWS}:9080"))
    assert ref == ("listener", "outbound", "route table", f"{REVIEWS}:9080")
    assert message.startswith(f"listener 'outbound' references route table '{REVIEWS}:9080', which the snapshot")


@pytest.mark.parametrize("cluster", [f"outbound|9080|v2|{REVIEWS}",  # a weighted destination
                                     "outbound|8080||ratings.shop.svc.cluster.local"])  # the mirror
def test_a_route_naming_a_missing_cluster(cluster):
    found = [m for m in without(rt.CLUSTER, cluster) if not (rt.type_of(m) == rt.ENDPOINT and rt.name_of(m) == cluster)]
    assert dangling(found)[0] == ("route table", f"{REVIEWS}:9080", "cluster", cluster)


def test_a_tcp_proxy_naming_a_missing_cluster():
    name = "outbound|5432||db.shop.svc.cluster.local"
    found = [m for m in without(rt.CLUSTER, name) if rt.name_of(m) != name]
    assert dangling(found)[0] == ("listener", "outbound", "cluster", name)


def test_an_eds_cluster_without_endpoints():
    name = f"outbound|9080|v1|{REVIEWS}"
    assert dangling(without(rt.ENDPOINT, name))[0] == ("cluster", name, "endpoints", name)


def test_an_endpoint_naming_a_missing_internal_listener():
    ref, _ = dangling(without(rt.LISTENER, "nodeagent_upstream"))
    assert ref[2:] == ("internal listener", "nodeagent_upstream")


def test_all_dangling_references_are_listed():
    with pytest.raises(InconsistentSnapshot) as caught:
        Snapshot.build("1", [m for m in messages() if rt.type_of(m) != rt.CLUSTER])
    assert len(caught.value.dangling) == 5 and "(and 4 more)" in str(caught.value)


def test_names_must_be_unique():
    with pytest.raises(ValueError, match="given twice"):
        Snapshot.build("1", [Cluster(name="a", type=Cluster.DiscoveryType.STATIC)] * 2)


def test_versions_follow_content_per_type():
    one, two = Snapshot.build("1", messages()), Snapshot.build("2", messages())
    assert one.versions == two.versions
    changed = [m for m in messages() if rt.type_of(m) != rt.ROUTE or rt.name_of(m) != f"{REVIEWS}:9080"]
    table = next(m for m in messages() if rt.type_of(m) == rt.ROUTE)
    table.virtual_hosts[0].routes[0].route.ClearField("timeout")
    three = Snapshot.build("3", changed + [table])
    assert [t for t in rt.PUSH_ORDER if three.version_of(t) != one.version_of(t)] == [rt.ROUTE]


def test_a_published_snapshot_cannot_change():
    snapshot = Snapshot.build("1", messages())
    copy = snapshot.resources(rt.CLUSTER)
    copy[f"outbound|9080|v1|{REVIEWS}"].name = "renamed"
    assert f"outbound|9080|v1|{REVIEWS}" in snapshot.resources(rt.CLUSTER)
    with pytest.raises(TypeError):
        snapshot.serialized[rt.CLUSTER]["x"] = b""  # type: ignore[index]


def test_the_cache_keeps_the_last_snapshot_per_node_and_tells_watchers():
    cache, seen = SnapshotCache(), []
    stop = cache.watch(seen.append)
    first, second = Snapshot.build("1", messages()), Snapshot.build("2", messages())
    cache.set_snapshot("node1", first)
    cache.set_snapshot("node1", second)
    cache.set_snapshot("node2", first)
    assert (cache.get("node1"), cache.get("node2"), cache.get("node3")) == (second, first, None)
    assert seen == ["node1", "node1", "node2"] and cache.nodes() == ["node1", "node2"]
    stop()
    cache.set_snapshot("node1", first)
    assert len(seen) == 3
