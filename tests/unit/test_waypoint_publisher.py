"""The waypoint's Publisher with no sockets, threads or Envoy: a model → a snapshot in the
cache (last good configuration kept, problems reported, digests of what is in force);
Envoy's ACK (the server's `accepted`, then `steer`) → the steering and the configuration
in force; make before break (dropped clusters carried until an ACK, then collected); and
Envoy's NACK (`rejected`) → the resources to blame held out, the rest published again.
The same over gRPC and with the real Envoy: test_waypoint_nack.py."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from prometheus_client import CollectorRegistry

from nodeagent.agent.waypoint.publisher import Publisher, at_once
from nodeagent.agent.waypoint.waypoint import WaypointMetrics
from nodeagent.xds import resources as rt
from nodeagent.xds.cache import SnapshotCache
from nodeagent.xds.dataplane import DataPlane, Sockets
from nodeagent.xds.snapshot import Snapshot
from waypoint_world import ALLOW_GET, DR, NEW_POD, POISON, RATINGS_OK, RATINGS_POISONED, VS, digest
from xds_world import RATINGS, doc, model

NODE = "node1"
BAD_VS = doc("VirtualService", "reviews", """
hosts: [reviews]
http:
- route: [{destination: {host: reviews}, weight: -5}]
""")
DANGLING = doc("VirtualService", "ratings", """
hosts: [ratings]
http:
- route: [{destination: {host: nowhere}}]
""")
SUBSETS = doc("DestinationRule", "reviews", """
host: reviews
subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
""") + doc("VirtualService", "reviews", """
hosts: [reviews]
http:
- route: [{destination: {host: reviews, subset: v1}, weight: 90}, {destination: {host: reviews, subset: v2}, weight: 10}]
""")
V1 = "outbound|9080|v1|reviews.shop.svc.cluster.local"
REVIEWS = "VirtualService shop/reviews"


class Server:
    """The xDS server's answers (publisher.Acks) as the test sets them."""

    def __init__(self, cache: SnapshotCache):
        self.cache = cache
        self.acked: Snapshot | None = None

    def accepted(self, node: str) -> Snapshot | None:
        return self.acked

    def in_sync(self, node: str) -> bool:
        return self.acked is not None and self.acked is self.cache.get(node)


@dataclass
class World:
    publisher: Publisher
    server: Server
    registry: CollectorRegistry
    told: list[DataPlane] = field(default_factory=list)  # the steering on_steering was told of

    def current(self) -> Snapshot:
        return self.publisher.cache.get(NODE)

    def ack(self, snapshot: Snapshot | None = None) -> Snapshot:
        """Envoy ACKed `snapshot` (the current one): the server has it, the loop steers by it."""
        snapshot = snapshot or self.current()
        self.server.acked = snapshot
        self.publisher.steer(snapshot)
        return snapshot

    def errors(self, reason: str) -> float:
        return self.registry.get_sample_value("nodeagent_waypoint_errors_total", {"reason": reason}) or 0


def make(tmp_path: Path, jwks_files=dict, defer=at_once) -> World:
    cache, registry, told = SnapshotCache(), CollectorRegistry(), []
    server = Server(cache)
    publisher = Publisher(NODE, Sockets(str(tmp_path / "wp")), cache=cache, acks=server,
                          errors=WaypointMetrics(registry).errors, log=logging.getLogger("t"),
                          root_namespace="istio-system", jwks_files=jwks_files,
                          on_steering=lambda: told.append(publisher.dataplane()), defer=defer)
    return World(publisher, server, registry, told)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make(tmp_path)


def test_each_model_publishes_a_snapshot_and_the_digests_in_force_once_acked(world):
    world.publisher.update(model(VS + ALLOW_GET))
    snapshot = world.current()
    assert snapshot.version == "1"
    assert snapshot.dataplane.outbound == {("10.96.1.10", 9080)}
    assert set(snapshot.dataplane.inbound) == {("10.244.1.8", 9000), ("10.244.1.8", 9090)}  # ratings' HTTP/gRPC
    digests = snapshot.dataplane.inbound
    assert all(re.fullmatch("[0-9a-f]{16}", d) for d in digests.values()) and len(set(digests.values())) == 2
    status = world.publisher.describe()
    assert status["xds"] == {"version": "1", "accepted": None, "in_sync": False}
    assert status["resources"] == {} and status["dataplane"] == {"outbound": [], "inbound": [], "enforced": {}}
    world.ack()
    status = world.publisher.describe()
    assert status["xds"] == {"version": "1", "accepted": "1", "in_sync": True}
    assert status["resources"] == {REVIEWS: digest(VS), "AuthorizationPolicy shop/ratings": digest(ALLOW_GET)}
    # ratings' policy is not the reviews route's to enforce (reviews' pods have none)
    assert status["dataplane"] == {"outbound": ["10.96.1.10:9080"], "inbound": ["10.244.1.8:9000", "10.244.1.8:9090"],
                                   "enforced": {}}
    assert status["errors"] == [] and status["warnings"] == [] and world.publisher.snapshot_error is None


def test_the_acked_configuration_is_in_force_after_its_config_step(tmp_path):
    """The relays steer by an ACK at once; its configuration is taken in by the config
    thread (`defer`), and status is in sync only from then on."""
    steps: list = []
    world = make(tmp_path, defer=lambda fn, *args: steps.append((fn, args)))
    world.publisher.update(model(VS))
    snapshot = world.ack()
    assert world.publisher.dataplane() is snapshot.dataplane and len(steps) == 1
    status = world.publisher.describe()
    assert status["xds"] == {"version": "1", "accepted": "1", "in_sync": False} and status["resources"] == {}
    fn, args = steps.pop()
    fn(*args)
    status = world.publisher.describe()
    assert status["xds"]["in_sync"] is True and status["resources"] == {REVIEWS: digest(VS)}


def test_on_steering_is_told_only_when_what_goes_through_envoy_changed(world):
    world.publisher.update(model(VS + ALLOW_GET))
    first = world.ack()
    assert world.told == [first.dataplane]
    world.publisher.update(model(VS + ALLOW_GET))  # a new version, the same steering: nothing to re-check
    assert world.ack().version == "2" and len(world.told) == 1
    # The same ports with another rule: their filter chains changed, held connections must go.
    world.publisher.update(model(VS + ALLOW_GET.replace("methods: [GET]", "methods: [POST]")))
    world.ack()
    assert len(world.told) == 2 and set(world.told[1].inbound) == set(world.told[0].inbound)
    assert all(world.told[1].inbound[dst] != world.told[0].inbound[dst] for dst in world.told[0].inbound)
    world.publisher.update(model(VS))  # ratings' policy gone: its ports leave the server side
    world.ack()
    assert [sorted(d.inbound) for d in world.told] == [[("10.244.1.8", 9000), ("10.244.1.8", 9090)]] * 2 + [[]]


def test_an_invalid_resource_keeps_its_last_good_version_and_is_reported(world):
    world.publisher.update(model(VS))
    world.ack()
    good = {REVIEWS: digest(VS)}
    assert world.publisher.describe()["resources"] == good
    world.publisher.update(model(BAD_VS))
    world.ack()
    status = world.publisher.describe()
    assert status["resources"] == good  # still the valid spec's digest
    assert len(status["errors"]) == 1 and REVIEWS in status["errors"][0] and "weight" in status["errors"][0]
    assert world.current().dataplane.outbound == {("10.96.1.10", 9080)}  # routing kept
    world.publisher.update(model(VS))
    assert world.publisher.describe()["errors"] == []


def test_dangling_references_are_warnings(world):
    world.publisher.update(model(VS + DANGLING))
    warnings = world.publisher.describe()["warnings"]
    assert any("nowhere" in w for w in warnings), warnings


def test_jwks_files_are_asked_for_at_each_build(tmp_path):
    calls = []
    world = make(tmp_path, jwks_files=lambda: calls.append(1) or {})
    world.publisher.update(model(VS))
    world.publisher.update()  # keys changed: rebuilt from the last model
    assert len(calls) == 2 and world.current().version == "2"


def test_dropped_clusters_stay_until_envoy_acked_the_routes_without_them(world):
    world.publisher.update(model(SUBSETS))
    first = world.ack()
    assert V1 in first.names(rt.CLUSTER) and V1 in first.names(rt.ENDPOINT)
    world.publisher.update(model(VS))  # the subsets are gone from the new routes
    carrying = world.current()
    assert carrying.version == "2" and V1 in carrying.names(rt.CLUSTER) and V1 in carrying.names(rt.ENDPOINT)
    assert not any(V1 in str(r) for r in carrying.resources(rt.ROUTE).values())
    assert world.publisher.collect() is False  # Envoy has not ACKed it yet
    world.ack(carrying)  # the ACK lets them go (steer defers collect)
    clean = world.current()
    assert clean.version == "3" and V1 not in clean.names(rt.CLUSTER) and V1 not in clean.names(rt.ENDPOINT)
    assert set(clean.names(rt.ROUTE)) == set(carrying.names(rt.ROUTE))
    assert world.publisher.collect() is False  # nothing more to drop
    world.ack(clean)  # the clean snapshot carries the same configuration
    assert world.publisher.describe()["xds"] == {"version": "3", "accepted": "3", "in_sync": True}
    assert world.publisher.describe()["resources"] == {REVIEWS: digest(VS)}


def test_when_the_last_l7_resource_goes_the_internal_listener_stays_with_the_carried_clusters(world):
    """`lab delete` of the last VirtualService and DestinationRule: the new snapshot has no
    internal listener, so carrying the dropped clusters alone made it inconsistent and the
    old configuration stayed in force (status still listed the deleted resources)."""
    world.publisher.update(model(SUBSETS))
    first = world.ack()
    internal = [n for n, l in first.resources(rt.LISTENER).items() if l.HasField("internal_listener")]
    assert internal and V1 in first.names(rt.CLUSTER)
    world.publisher.update(model(""))
    carrying = world.current()
    assert world.publisher.snapshot_error is None
    assert carrying.version == "2" and V1 in carrying.names(rt.CLUSTER)
    assert set(internal) <= set(carrying.names(rt.LISTENER))
    world.ack(carrying)
    assert world.publisher.describe()["resources"] == {}
    assert world.publisher.collect() is False  # the ACK did it
    clean = world.current()
    assert V1 not in clean.names(rt.CLUSTER) and not set(internal) & set(clean.names(rt.LISTENER))


def test_one_refused_resource_among_several_changes_is_found_by_bisection(world):
    world.publisher.update(model(VS + RATINGS_OK))
    world.ack()
    # Two changes at once, one refused: a trial applies the first half (the DestinationRule)
    # and holds the ratings edit at its accepted version; Envoy ACKs it, so the rest is to blame.
    world.publisher.update(model(VS + RATINGS_POISONED + DR))
    world.publisher.rejected(world.current(), rt.ROUTE, "refused: route table")
    trial = world.current()
    assert trial.version == "3" and world.publisher.refusals.search.trial == ("DestinationRule shop/reviews",)
    assert POISON.encode() not in b"".join(trial.serialized[rt.ROUTE].values())
    assert world.errors("envoy_refused") == 0 and world.publisher.describe()["errors"] == []
    world.ack(trial)
    held = world.current()
    assert held.version == "4" and world.publisher.refusals.search is None
    assert POISON.encode() not in b"".join(held.serialized[rt.ROUTE].values())
    assert world.errors("envoy_refused") == 1
    (error,) = world.publisher.describe()["errors"]
    assert "(VirtualService shop/ratings): Envoy refused it: refused: route table (fix it; its last accepted " \
           "version stays in force until its spec changes)" in error
    world.ack(held)
    assert world.publisher.describe()["resources"] == {REVIEWS: digest(VS), "DestinationRule shop/reviews": digest(DR),
                                                       "VirtualService shop/ratings": digest(RATINGS_OK)}
    # Fixed (its spec changed), it is tried again and goes in.
    world.publisher.update(model(VS + RATINGS_OK.replace('"1"', '"2"') + DR))
    world.ack()
    assert world.publisher.describe()["errors"] == [] and world.errors("envoy_refused") == 1


def test_a_nack_of_an_older_snapshot_refuses_a_newer_one_with_the_same_content(world):
    """The server never sends refused content again, so a newer snapshot carrying it
    (here: a new pod's endpoints besides) would wait forever: it is refused at once."""
    world.publisher.update(model(VS))
    world.ack()
    world.publisher.update(model(VS + RATINGS_POISONED))
    poisoned = world.current()
    world.publisher.update(model(VS + RATINGS_POISONED + NEW_POD))
    newer = world.current()
    assert newer.version_of(rt.ROUTE) == poisoned.version_of(rt.ROUTE)
    assert newer.version_of(rt.ENDPOINT) != poisoned.version_of(rt.ENDPOINT)
    world.publisher.rejected(poisoned, rt.ROUTE, "refused: route table")
    clean = world.current()
    assert clean.version == "4" and clean.version_of(rt.ENDPOINT) == newer.version_of(rt.ENDPOINT)
    assert POISON.encode() not in b"".join(clean.serialized[rt.ROUTE].values())
    assert f"{RATINGS}:8080" not in clean.names(rt.ROUTE)
    (error,) = world.publisher.describe()["errors"]
    assert "(VirtualService shop/ratings): Envoy refused it: refused: route table (fix it; it is left out " \
           "until its spec changes)" in error
    world.ack(clean)
    assert world.publisher.describe()["resources"] == {REVIEWS: digest(VS)}


def test_a_refusal_no_changed_resource_explains_keeps_the_accepted_snapshot(world):
    """Nothing changed since the snapshot Envoy accepted (a translation bug): nothing is
    held out or published again, and status says so."""
    world.publisher.update(model(VS))
    accepted = world.ack()
    world.publisher.update(model(VS + NEW_POD))  # new endpoints, the same Istio resources
    refused = world.current()
    world.publisher.rejected(refused, rt.ENDPOINT, "refused: endpoints")
    assert world.current() is refused and world.publisher.dataplane() is accepted.dataplane
    assert world.publisher.snapshot_error == "Envoy refused snapshot 2: refused: endpoints"
    assert world.errors("snapshot_refused") == 1 and world.errors("envoy_refused") == 0
    assert world.publisher.describe()["errors"] == []


def test_a_resource_the_translation_fails_on_is_held_out_alone_and_the_rest_published(world, monkeypatch):
    """A value validation let through and the translation cannot express (found by review:
    a keepalive past 32 bits, a request principal only the translation read) kept the
    previous snapshot for every later change. Now the changed resource to blame is held out
    as one Envoy refused: its last accepted version stays, everything else goes in."""
    from nodeagent.agent.waypoint import publisher as publisher_module
    translate = publisher_module.translate

    def choking(model_, node, config, options):
        if any(vs.name == "ratings" and vs.http[0].timeout for vs in config.virtual_services):
            raise ValueError("Value out of range: 7200000000")
        return translate(model_, node, config, options)

    monkeypatch.setattr(publisher_module, "translate", choking)
    world.publisher.update(model(VS + RATINGS_OK))
    accepted = world.ack()
    choked = RATINGS_OK.replace("    route: [{destination: {host: ratings}}]\n  - route",
                                "    route: [{destination: {host: ratings}}]\n    timeout: 3s\n  - route")
    assert choked != RATINGS_OK
    world.publisher.update(model(VS + choked + DR))  # two changes, one the translation fails on
    published = world.current()
    assert published.version != accepted.version and world.publisher.snapshot_error is None
    reviews = published.resources(rt.CLUSTER)["outbound|9080||reviews.shop.svc.cluster.local"]
    assert reviews.lb_policy == Cluster.RANDOM  # the DestinationRule went in
    assert world.errors("untranslatable") == 1
    (error,) = world.publisher.describe()["errors"]
    assert error.endswith("(VirtualService shop/ratings): nodeagent cannot translate it: ValueError: Value out of "
                          "range: 7200000000 (fix it; its last accepted version stays in force until its spec "
                          "changes)"), error
    world.ack(published)
    assert world.publisher.describe()["resources"]["VirtualService shop/ratings"] == digest(RATINGS_OK)


def test_the_resource_to_blame_is_found_among_many_changed_ones_and_two_are_found_in_turn(world, monkeypatch):
    """On a fresh agent every resource has changed: the culprit sorting after 80 others is
    found by bisection (a cap on the suspects left the waypoint without any snapshot)."""
    from nodeagent.agent.waypoint import publisher as publisher_module
    translate = publisher_module.translate
    choked = {"ratings", "reviews"}

    def choking(model_, node, config, options):
        if choked & {vs.name for vs in config.virtual_services}:
            raise ValueError("cannot express it")
        return translate(model_, node, config, options)

    monkeypatch.setattr(publisher_module, "translate", choking)
    rules = "".join(doc("DestinationRule", f"d{i:02}", "host: db") for i in range(80))
    world.publisher.update(model(rules + VS + RATINGS_OK))
    assert world.current() is not None and world.publisher.snapshot_error is None
    assert world.errors("untranslatable") == 2
    assert sorted(e.split(" (")[1].split(")")[0] for e in world.publisher.describe()["errors"]) == [
        "VirtualService shop/ratings", "VirtualService shop/reviews"]
    assert len(world.publisher.describe()["resources"]) == 0  # nothing accepted yet: those two are left out


def test_status_lists_kinds_the_mesh_does_not_implement_and_gateway_only_routes(world):
    """nodeagent status shows these under WAYPOINT CONFIG PROBLEMS (issue 14)."""
    gateway = doc("Gateway", "ingress", "selector: {istio: ingressgateway}\nservers: []")
    bound = doc("VirtualService", "external", "hosts: [x.example.com]\ngateways: [ingress]\n"
                                              "http: [{route: [{destination: {host: reviews}}]}]")
    world.publisher.update(model(VS + gateway + bound))
    world.ack()
    status = world.publisher.describe()
    assert [e.split(":")[0] for e in status["errors"]] == ["test.yaml#13 (Gateway shop/ingress) kind"]
    assert "not supported in ambient mode: nodeagent runs no ingress or egress gateway" in status["errors"][0]
    assert [w.split(":")[0] for w in status["warnings"]] == ["test.yaml#14 (VirtualService shop/external) spec.gateways"]
    assert status["resources"] == {REVIEWS: digest(VS)}
