"""admission: one decision for arriving inbound connections (deny, waypoint, deliver),
and the re-check of delivered ones when policies or the waypoint's steering change."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from nodeagent.agent.proxy.admission import (DELIVER, DENY, NO_ALLOW_MATCH, STRICT_POLICY, WAYPOINT, Admission,
                                       InboundConnections, admit, describe)
from nodeagent.agent.proxy.steering import NoWaypoint
from nodeagent.policy import PolicySet
from nodeagent.xds.dataplane import DataPlane, Sockets
from policy_world import connection, document, valid

LOG = logging.getLogger("test.admission")
STRICT = document("PeerAuthentication", "foo", "strict", "mtls: {mode: STRICT}")
ALLOW_SLEEP = document("AuthorizationPolicy", "foo", "allow-sleep", """
selector: {matchLabels: {app: httpbin}}
action: ALLOW
rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]
""")
DENY_8000 = document("AuthorizationPolicy", "foo", "deny-8000", """
action: DENY
rules: [{to: [{operation: {ports: ["8000"]}}]}]
""")
HTTPBIN = "foo/httpbin"  # 10.244.1.10


class Steering:
    """A stand-in Waypoint: what it has ACKed for the server side, each (pod IP, port)
    served by a filter chain of digest `chain`."""

    def __init__(self, *inbound: tuple[str, int], chain: str = "chain-1"):
        self.inbound = {dst: chain for dst in inbound}

    def acks(self, *inbound: tuple[str, int], chain: str = "chain-1") -> None:
        """Envoy ACKed another steering."""
        self.inbound = {dst: chain for dst in inbound}

    def dataplane(self) -> DataPlane:
        return DataPlane(Sockets("/nonexistent"), inbound=self.inbound)


def test_admit_checks_strict_then_the_waypoint_then_authorization():
    none, strict = valid(""), valid(STRICT + ALLOW_SLEEP)
    plain, sleep, other = (connection(HTTPBIN, 8000, None), connection(HTTPBIN, 8000),
                           connection(HTTPBIN, 8000, "bar/finance", "10.244.2.11"))
    behind = Steering(("10.244.1.10", 8000))
    assert admit(none, NoWaypoint(), plain, plaintext=True) == Admission(DELIVER)
    # STRICT is the agent's even for a port behind the waypoint: Envoy never sees plaintext.
    assert admit(strict, behind, plain, plaintext=True) == Admission(
        DENY, STRICT_POLICY, "PeerAuthentication STRICT on port 8000: plaintext refused")
    assert admit(strict, behind, other, plaintext=False) == Admission(WAYPOINT, chain="chain-1")  # Envoy's
    assert admit(strict, NoWaypoint(), sleep, plaintext=False) == Admission(DELIVER)
    refused = admit(strict, NoWaypoint(), other, plaintext=False)
    assert (refused.route, refused.policy) == (DENY, NO_ALLOW_MATCH)
    assert admit(strict, Steering(("10.244.1.10", 9000)), other, plaintext=False).route == DENY  # other port


class World:
    """InboundConnections over a policy set the test swaps, with aborts recorded."""

    def __init__(self, policies: PolicySet, pod_at=lambda ip: None):
        self.policies = policies
        self.registry = CollectorRegistry()
        self.waypoint = Steering()  # nothing behind the waypoint until a test has Envoy ACK something
        self.connections = InboundConnections(lambda: self.policies, pod_at, self.waypoint, self.registry, LOG)

    def revoked(self, reason: str) -> float:
        return self.registry.get_sample_value("nodeagent_inbound_connections_revoked_total", {"reason": reason}) or 0


def test_kubelets_probe_is_delivered_around_strict_authorization_and_the_waypoint_and_stays_so():
    """admit's `probe` (plaintext from the node's address to a port the pod's probes name,
    inbound.py decides): delivered whatever STRICT, a DENY or the waypoint say, and a
    re-check leaves it; without `probe` the same connection is refused."""
    strict = valid(STRICT + DENY_8000 + ALLOW_SLEEP)
    kubelet = connection(HTTPBIN, 8000, None, "10.0.0.7")
    behind = Steering(("10.244.1.10", 8000))
    assert admit(strict, behind, kubelet, plaintext=True, probe=True) == Admission(DELIVER)
    assert admit(strict, behind, kubelet, plaintext=True).route == DENY
    assert admit(strict, behind, kubelet, plaintext=False, probe=True).route == WAYPOINT  # only plaintext is one
    world = World(strict)
    with world.connections.delivering(kubelet, ("10.0.0.7", 40000), plaintext=True, probe=True) as probe:
        assert world.connections.recheck() == 0 and not probe.abort.requested


def test_recheck_resets_exactly_the_connections_the_new_state_would_not_deliver():
    world = World(valid(""))
    c = world.connections
    with c.delivering(connection(HTTPBIN, 8000), ("10.244.1.20", 40000), plaintext=False) as sleep_8000, \
            c.delivering(connection(HTTPBIN, 9000), ("10.244.1.20", 40001), plaintext=False) as sleep_9000, \
            c.delivering(connection(HTTPBIN, 9000, None), ("10.244.2.11", 40002), plaintext=True) as plain, \
            c.delivering(connection(HTTPBIN, 9000, "bar/finance"), ("10.244.2.11", 40003), False) as finance:
        entries = (sleep_8000, sleep_9000, plain, finance)
        assert (len(c), c.recheck()) == (4, 0)  # nothing changed: nothing ends
        world.policies = valid(DENY_8000)
        assert c.recheck() == 1 and [e.abort.requested for e in entries] == [True, False, False, False]
        assert (sleep_8000.revoked.route, sleep_8000.revoked.policy) == (DENY, "foo/deny-8000")
        world.policies = valid(DENY_8000 + STRICT + ALLOW_SLEEP)
        assert c.recheck() == 2 and [e.abort.requested for e in entries] == [True, False, True, True]
        assert (plain.revoked.policy, finance.revoked.policy) == (STRICT_POLICY, NO_ALLOW_MATCH)
        assert c.recheck() == 0  # a revoked connection is ended once
        assert (world.revoked("deny"), world.revoked("waypoint")) == (3, 0)
    assert len(c) == 0  # a connection is forgotten when its relay ends


def test_a_port_moving_behind_the_waypoint_resets_its_delivered_connections():
    world = World(valid(""))
    c = world.connections
    with c.delivering(connection(HTTPBIN, 8000), ("10.244.1.20", 40000), plaintext=False) as http, \
            c.delivering(connection(HTTPBIN, 9000), ("10.244.1.20", 40001), plaintext=False) as tcp:
        world.waypoint.acks(("10.244.1.10", 8000))
        assert c.recheck() == 1 and (http.abort.requested, tcp.abort.requested) == (True, False)
        assert http.revoked == Admission(WAYPOINT, chain="chain-1") and world.revoked("waypoint") == 1
        assert describe(http.revoked, http).startswith("the port is now behind the waypoint")


def through(c: InboundConnections, port: int, src_port: int, plaintext: bool = False, chain: str = "chain-1"):
    """Track a connection sent through the waypoint's filter chain `chain` for HTTPBIN:port."""
    principal = None if plaintext else "default/sleep"
    return c.delivering(connection(HTTPBIN, port, principal), ("10.244.1.20", src_port), plaintext,
                        Admission(WAYPOINT, chain=chain))


def test_a_connection_through_the_waypoint_lives_while_its_filter_chain_stays():
    world = World(valid(""))
    c = world.connections
    world.waypoint.acks(("10.244.1.10", 8000), ("10.244.1.10", 8080))
    with through(c, 8000, 40000) as held, through(c, 8080, 40001) as other:
        assert (len(c), c.recheck()) == (2, 0)
        # Another pod port's chain changes: only the connections on that chain end.
        world.waypoint.acks(("10.244.1.10", 8000), chain="chain-1")
        world.waypoint.inbound[("10.244.1.10", 8080)] = "chain-2"
        assert c.recheck() == 1 and (held.abort.requested, other.abort.requested) == (False, True)
        assert other.revoked == Admission(WAYPOINT, chain="chain-2") and world.revoked("waypoint") == 1
        assert describe(other.revoked, other) == \
            "the port's server-side L7 policy changed; the client reconnects under the new one"


def test_a_withdrawn_server_side_policy_resets_the_connections_held_through_the_waypoint():
    """Envoy would keep a held connection on the removed chain (its JWT rule, its rate
    limit) until the chain's drain ends: the agent resets it once Envoy ACKed the removal."""
    world = World(valid(""))
    c = world.connections
    world.waypoint.acks(("10.244.1.10", 8000))
    with through(c, 8000, 40000) as held, c.delivering(connection(HTTPBIN, 9000), ("10.244.1.20", 40001),
                                                       plaintext=False) as tcp:
        world.waypoint.acks()
        assert c.recheck() == 1 and (held.abort.requested, tcp.abort.requested) == (True, False)
        assert held.revoked == Admission(DELIVER) and world.revoked("deliver") == 1
        assert describe(held.revoked, held) == \
            "the port's server-side L7 policy was withdrawn; the client reconnects without the waypoint"


def test_strict_resets_plaintext_held_through_the_waypoint():
    world = World(valid(""))
    c = world.connections
    world.waypoint.acks(("10.244.1.10", 8000))
    with through(c, 8000, 40000, plaintext=True) as plain, through(c, 8000, 40001) as mtls:
        world.policies = valid(STRICT)
        assert c.recheck() == 1 and (plain.abort.requested, mtls.abort.requested) == (True, False)
        assert (plain.revoked.route, plain.revoked.policy) == (DENY, STRICT_POLICY)


def test_recheck_reads_the_pod_as_enrolled_now():
    """A label change can take a pod out of a policy's selector: the pod the relays know
    now (pod_at) decides, not the one the connection met."""
    finance = connection(HTTPBIN, 8000, "bar/finance")
    ctx = SimpleNamespace(pod=replace(finance.destination, labels={"app": "other"}))
    world = World(valid(ALLOW_SLEEP), pod_at=lambda ip: ctx if ip == finance.destination_ip else None)
    with world.connections.delivering(finance, ("10.244.2.11", 40000), plaintext=False) as entry:
        assert world.connections.recheck() == 0 and not entry.abort.requested
