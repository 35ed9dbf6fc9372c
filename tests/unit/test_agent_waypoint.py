"""The agent's side of the waypoint without running Envoy: configuration rebuilt per
model (last good kept, problems reported, digests of what is in force), steering only
by what Envoy ACKed, PROXY v2 headers read exactly, connections to Envoy's listeners
and their failures. (Envoy itself: tests/unit/test_xds_envoy_acceptance.py, the lab:
tests/e2e/test_waypoint.py.)"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from nodeagent.agent import config as agent_config
from nodeagent.agent.proxy.admission import waypoint_chain
from nodeagent.agent.proxy.policies import spec_digest
from nodeagent.agent.waypoint.waypoint import Waypoint, WaypointUnavailable, read_header
from nodeagent.xds import dataplane, resources as rt
from nodeagent.xds.dataplane import DataPlane, ProxyHeader
from xds_world import doc, model

VS = doc("VirtualService", "reviews", """
hosts: [reviews]
http:
- route: [{destination: {host: reviews}}]
""")
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
AUTHZ = doc("AuthorizationPolicy", "ratings", """
selector: {matchLabels: {app: ratings}}
rules: [{to: [{operation: {methods: [GET]}}]}]
""", api="security.istio.io/v1")


@pytest.fixture
def waypoint(tmp_path: Path):
    (tmp_path / "cluster").mkdir()
    cfg = agent_config.load({"node": "node1", "source": f"files:{tmp_path / 'cluster'}", "cgroup": str(tmp_path),
                             "waypoint_dir": str(tmp_path / "wp")}, {})
    seen: list = []

    async def handler(sock, header):
        seen.append((sock.recv(100), header))
        sock.close()

    registry = CollectorRegistry()
    wp = Waypoint(cfg, registry=registry, log=logging.getLogger("t"), on_upstream=handler, on_deliver=handler)
    wp.seen, wp.registry = seen, registry
    return wp


def spec_of(text: str) -> dict:
    return yaml.safe_load(text.split("---")[0])["spec"]


def test_each_model_publishes_a_snapshot_and_the_digests_in_force(waypoint):
    waypoint.update(model(VS + AUTHZ))
    snapshot = waypoint.cache.get("node1")
    assert snapshot.version == "1"
    assert snapshot.dataplane.outbound == {("10.96.1.10", 9080)}
    assert set(snapshot.dataplane.inbound) == {("10.244.1.8", 9000), ("10.244.1.8", 9090)}  # ratings' HTTP/gRPC
    digests = snapshot.dataplane.inbound
    assert all(re.fullmatch("[0-9a-f]{16}", d) for d in digests.values()) and len(set(digests.values())) == 2
    assert waypoint.describe()["resources"] == {}  # in force only once Envoy ACKed it
    waypoint.steer(snapshot)
    assert waypoint.describe()["resources"] == {"VirtualService shop/reviews": spec_digest(spec_of(VS)),
                                               "AuthorizationPolicy shop/ratings": spec_digest(spec_of(AUTHZ))}
    assert waypoint.describe()["errors"] == [] and waypoint.describe()["warnings"] == []


def test_nothing_is_steered_before_envoy_acked(waypoint):
    waypoint.update(model(VS))
    assert waypoint.dataplane() == DataPlane(waypoint.sockets)
    assert waypoint_chain(waypoint, ("10.244.1.8", 9000)) is None
    assert waypoint_chain(None, ("10.244.1.8", 9000)) is None
    status = waypoint.describe()
    assert status["xds"] == {"version": "1", "accepted": None, "in_sync": False, "connected": False, "nacks": 0,
                             "snapshot_error": None}
    assert status["dataplane"] == {"outbound": [], "inbound": []}
    assert status["envoy"]["running"] is False and status["envoy"]["pid"] is None


def test_an_ack_steers_on_the_agents_loop_and_tells_only_of_changed_steering(waypoint):
    told: list[DataPlane] = []
    waypoint.on_steering = lambda: told.append(waypoint.dataplane())

    async def acked(snapshot, node: str = "node1") -> None:
        """As the xDS server does: from one of its threads, then the loop runs the hand-over."""
        thread = threading.Thread(target=waypoint._acked, args=(node, snapshot))
        thread.start()
        thread.join()
        await asyncio.sleep(0.01)

    async def go():
        waypoint._loop = asyncio.get_running_loop()
        waypoint.update(model(VS + AUTHZ))
        first = waypoint.cache.get("node1")
        await acked(first, node="node2")  # another node's proxy steers nothing here
        assert (waypoint.dataplane(), told) == (DataPlane(waypoint.sockets), [])
        await acked(first)
        assert waypoint.dataplane() is first.dataplane and told == [first.dataplane]
        waypoint.update(model(VS + AUTHZ))  # a new version, the same steering: nothing to re-check
        await acked(waypoint.cache.get("node1"))
        assert waypoint.cache.get("node1").version == "2" and len(told) == 1
        # The same ports with another rule: their filter chains changed, held connections must go.
        waypoint.update(model(VS + AUTHZ.replace("methods: [GET]", "methods: [POST]")))
        await acked(waypoint.cache.get("node1"))
        assert len(told) == 2 and set(told[1].inbound) == set(told[0].inbound)
        assert all(told[1].inbound[dst] != told[0].inbound[dst] for dst in told[0].inbound)
        waypoint.update(model(VS))  # ratings' policy gone: its ports leave the server side
        await acked(waypoint.cache.get("node1"))
        assert [sorted(d.inbound) for d in told] == [[("10.244.1.8", 9000), ("10.244.1.8", 9090)]] * 2 + [[]]
    asyncio.run(go())


def test_an_invalid_resource_keeps_its_last_good_version_and_is_reported(waypoint):
    waypoint.update(model(VS))
    waypoint.steer(waypoint.cache.get("node1"))
    good = waypoint.describe()["resources"]
    assert good == {"VirtualService shop/reviews": spec_digest(spec_of(VS))}
    waypoint.update(model(BAD_VS))
    waypoint.steer(waypoint.cache.get("node1"))
    status = waypoint.describe()
    assert status["resources"] == good  # still the valid spec's digest
    assert len(status["errors"]) == 1 and "VirtualService shop/reviews" in status["errors"][0]
    assert "weight" in status["errors"][0]
    assert waypoint.cache.get("node1").dataplane.outbound == {("10.96.1.10", 9080)}  # routing kept
    waypoint.update(model(VS))
    assert waypoint.describe()["errors"] == []


def test_dangling_references_are_warnings(waypoint):
    waypoint.update(model(VS + DANGLING))
    warnings = waypoint.describe()["warnings"]
    assert any("nowhere" in w for w in warnings), warnings


def test_jwks_files_are_asked_for_at_each_build(waypoint):
    calls = []
    waypoint.jwks_files = lambda: calls.append(1) or {}
    waypoint.update(model(VS))
    waypoint.update()  # keys changed: rebuilt from the last model
    assert len(calls) == 2 and waypoint.cache.get("node1").version == "2"


def run(coro):
    return asyncio.run(coro)


def test_read_header_reads_exactly_the_header():
    async def go():
        a, b = socket.socketpair()
        a.setblocking(False)
        header = ProxyHeader(("10.244.1.2", 40000), ("10.96.0.10", 8080),
                             ((dataplane.TLV_ENDPOINT, b"10.244.2.3:8080"),))
        b.sendall(header.encode() + b"GET / HTTP/1.1\r\n")
        got = await read_header(a)
        rest = a.recv(100)
        a.close(), b.close()
        return got, rest
    got, rest = run(go())
    assert got == ProxyHeader(("10.244.1.2", 40000), ("10.96.0.10", 8080), ((0xE2, b"10.244.2.3:8080"),))
    assert rest == b"GET / HTTP/1.1\r\n"


@pytest.mark.parametrize("data,why", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a PROXY protocol v2 header"),
    (dataplane.SIGNATURE + b"\x21\x11\xff\xff", "PROXY v2 header of 65535 bytes"),
    (dataplane.SIGNATURE + b"\x21\x11\x00\x0c\x0a", "closed inside the PROXY header"),
])
def test_bad_headers_are_refused_by_name(data, why):
    async def go():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        try:
            await read_header(a)
        finally:
            a.close(), b.close()
    with pytest.raises(ValueError, match=why):
        run(go())


def test_envoy_connections_are_handed_over_after_their_header(waypoint):
    async def go():
        a, b = socket.socketpair()
        a.setblocking(False)
        header = ProxyHeader(("10.244.1.2", 1234), ("10.244.1.8", 9000), ((dataplane.TLV_PRINCIPAL, b"spiffe://x"),))
        b.sendall(header.encode() + b"payload")
        await waypoint._accepted("deliver", a)
        garbage_a, garbage_b = socket.socketpair()
        garbage_a.setblocking(False)
        garbage_b.sendall(b"x" * 16)
        await waypoint._accepted("upstream", garbage_a)
        b.close(), garbage_b.close()
        return header
    header = run(go())
    assert waypoint.seen == [(b"payload", header)]  # the garbage one was closed, never handed over
    assert waypoint.registry.get_sample_value("nodeagent_waypoint_errors_total", {"reason": "bad_proxy_header"}) == 1


def test_open_writes_the_header_or_says_envoy_is_unavailable(waypoint, tmp_path):
    async def go():
        Path(waypoint.directory).mkdir()
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(waypoint.sockets.outbound)
        listener.listen()
        header = ProxyHeader(("10.244.1.2", 1), ("10.96.1.10", 9080), ((dataplane.TLV_SOURCE_WORKLOAD, b"shop/pp"),))
        sock = await waypoint.open("outbound", header)
        conn, _ = listener.accept()
        got = dataplane.read_header(conn)
        sock.close(), conn.close(), listener.close()
        with pytest.raises(WaypointUnavailable, match="waypoint inbound listener"):
            await waypoint.open("inbound", header)
        return header, got
    header, got = run(go())
    assert got == header
    assert waypoint.describe()["connections"] == {"outbound": 1, "inbound": 0}


SUBSETS = doc("DestinationRule", "reviews", """
host: reviews
subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
""") + doc("VirtualService", "reviews", """
hosts: [reviews]
http:
- route: [{destination: {host: reviews, subset: v1}, weight: 90}, {destination: {host: reviews, subset: v2}, weight: 10}]
""")
V1 = "outbound|9080|v1|reviews.shop.svc.cluster.local"


def test_dropped_clusters_stay_until_envoy_acked_the_routes_without_them(waypoint):
    waypoint.update(model(SUBSETS))
    first = waypoint.cache.get("node1")
    assert V1 in first.names(rt.CLUSTER) and V1 in first.names(rt.ENDPOINT)
    waypoint.update(model(VS))  # the subsets are gone from the new routes
    carrying = waypoint.cache.get("node1")
    assert V1 in carrying.names(rt.CLUSTER) and V1 in carrying.names(rt.ENDPOINT)
    assert not any(V1 in str(r) for r in carrying.resources(rt.ROUTE).values())
    assert waypoint.collect() is False  # Envoy has not ACKed it yet
    waypoint.server.accepted = lambda node: waypoint.cache.get(node)  # now it has
    assert waypoint.collect() is True
    clean = waypoint.cache.get("node1")
    assert clean.version == "3" and V1 not in clean.names(rt.CLUSTER) and V1 not in clean.names(rt.ENDPOINT)
    assert set(clean.names(rt.ROUTE)) == set(carrying.names(rt.ROUTE))
    assert waypoint.collect() is False  # nothing more to drop
