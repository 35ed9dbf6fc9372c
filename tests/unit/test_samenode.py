"""The same-node fast path (agent/proxy/samenode.py, issue 11) on the loopback node of
relay_world.py: an outbound connection from the meshed client pod to the meshed server
pod of the same node is admitted as the HBONE server would admit it, delivered as the
client and joined with no HBONE, reported by both ends exactly as over HBONE (plus
`same_node` in the flow lines); a DENY is refused as a 403 would be; a policy change
revokes it; a port behind the waypoint, and the setting off, go over HBONE. Every case
runs on the Python and the native engine."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import types

import pytest

from engines import engine_fixture
from identity_fixtures import run, until
from nodeagent.agent import config
from nodeagent.agent.proxy import delivery
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.proxy.outbound import OutboundRelay, Passthrough
from nodeagent.agent.proxy.samenode import SameNodeRoute
from policy_world import document
from relay_world import (CLIENT, DELIVERY_MARK, LOG, MARK, SERVER, SERVICE, TIMEOUT, World, ended, listening, principal,
                         sleep_to_httpbin)

SLEEP, HTTPBIN = principal("mesh", "sleep"), principal("mesh", "httpbin")
PAYLOAD = os.urandom((1 << 20) + 7)  # both ways: the app echoes it after its greeting line
DENY_SLEEP = document("AuthorizationPolicy", "mesh", "deny-sleep", """
action: DENY
rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/sleep]}}]}]
""")

engine = engine_fixture(("python", "native"))


@pytest.fixture
def node(tmp_path, monkeypatch, engine):
    """node(body) runs `async body(world, route)` on a World whose client pod's outbound
    listener goes to an OutboundRelay with the same-node fast path (`route`), as
    datapath.DataPath wires it with same_node_fast_path on."""
    def on_node(body, fast_path: bool = True):
        async def main():
            async with World(tmp_path, monkeypatch, engine=engine) as world:
                route = fast(world) if fast_path else None
                await body(world, route)
        run(main())
    return on_node


def fast(w: World) -> SameNodeRoute:
    inputs = ProxyInputs(model=lambda: w.model, pod_at=w.enrolled.get, policies=w.policies, identities=w.identities,
                         telemetry=w.telemetry, connections=w.connections, waypoint=w.envoy, metrics=w.metrics,
                         agent_ports=w.agent_ports, splicer=w.splicer, memory=w.memory)
    route = SameNodeRoute(inputs, w.delivery, w.registry, LOG)
    relay = OutboundRelay(inputs, w.capture, LOG, passthrough=Passthrough(MARK, TIMEOUT), hbone=w.hbone,
                          same_node=route)
    w.outbound_listener = listening("127.0.0.1", avoid={w.app.address[1]})  # dial_out connects here from now on
    w._listen(w.outbound_listener, w.enrolled[CLIENT], "outbound", relay.handle)
    return route


async def certificates(w: World) -> None:
    """Both pods' certificates at hand, as the agent's prefetch has them before traffic."""
    for ip in (CLIENT, SERVER):
        await w.identities.ready(w.identities.of(w.model.pod_by_ip(ip)))


async def round_trip(w: World, payload: bytes) -> tuple[str, bytes]:
    """Through the fast path to the app: `payload` sent and half-closed; the app's
    greeting line and everything it sent back until its FIN."""
    reader, writer = await w.dial_out(SERVICE)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    greeting = (await reader.readline()).decode().strip()
    back = await reader.read()  # to EOF: the app's FIN came through
    writer.close()
    return greeting, back


def test_an_allowed_connection_is_joined_with_no_hbone_and_reported_by_both_ends(node):
    async def body(w: World, route: SameNodeRoute):
        await w.app.start()
        await certificates(w)
        greeting, back = await round_trip(w, PAYLOAD)
        assert greeting.startswith(CLIENT + ":")  # the app saw the client pod's address
        assert hashlib.sha256(back).digest() == hashlib.sha256(PAYLOAD).digest() and len(back) == len(PAYLOAD)
        await w.settled(flows=2)
        assert route.counts == {"relayed": 1, "denied": 0, "failed": 0, "waypoint": 0}
        assert w.value("nodeagent_same_node_connections_total", outcome="relayed") == 1
        # into the server pod as the client, no HBONE: the delivery's socket, then those made ahead
        assert w.sockets.asked == [("transparent", w.enrolled[SERVER].netns_fd, DELIVERY_MARK, CLIENT)] * 9
        assert w.value("nodeagent_hbone_streams_opened_total", direction="outbound") == 0
        assert w.failures() == {}
        assert (w.value("nodeagent_outbound_connections_total"), w.value("nodeagent_inbound_connections_total"),
                w.value("nodeagent_passthrough_connections_total")) == (1, 1, 0)
        sent = len(greeting) + 1 + len(PAYLOAD)  # back to the client: the greeting line, then the echo
        for direction in ("outbound", "inbound"):
            assert w.value("nodeagent_relayed_bytes_total", direction=direction, flow="sent") == len(PAYLOAD)
            assert w.value("nodeagent_relayed_bytes_total", direction=direction, flow="received") == sent
        for reporter in ("source", "destination"):
            istio = sleep_to_httpbin(reporter)
            assert (w.value("istio_tcp_connections_opened_total", **istio),
                    w.value("istio_tcp_connections_closed_total", **istio),
                    w.value("istio_tcp_received_bytes_total", **istio),
                    w.value("istio_tcp_sent_bytes_total", **istio)) == (1, 1, len(PAYLOAD), sent), reporter
        app = f"{SERVER}:{w.app.address[1]}"
        flows = {f["reporter"]: f for f in w.flows()}
        assert {r: (f["src"]["principal"], f["dst"]["principal"], f["security"], f["bytes_received"],
                    f["bytes_sent"], f["verdict"], f["upstream"], f.get("same_node")) for r, f in flows.items()} == {
            r: (SLEEP, HTTPBIN, "mutual_tls", len(PAYLOAD), sent, "allowed", app, True)
            for r in ("source", "destination")}
        assert (flows["source"]["dst"]["addr"], flows["destination"]["dst"]["addr"]) == ("10.96.0.10:80", app)
    node(body)


def test_later_connections_take_the_delivery_socket_made_ahead(node):
    """The first connection of a pair makes its delivery socket on its path, then
    AHEAD_PER_PAIR are made ahead; the next takes one (the app sees its port)."""
    async def body(w: World, route: SameNodeRoute):
        await w.app.start()
        await certificates(w)
        ahead = w.delivery.ahead
        await round_trip(w, b"first")
        await w.settled(flows=2)
        key = (w.enrolled[SERVER].cookie, CLIENT)
        assert (ahead.held(), ahead.taken, ahead.made, ahead.failures) == (8, 0, 8, 0)
        made = [sock.getsockname() for _, sock in ahead._pairs[key]]
        assert all(w.delivery.is_ours(address) for address in made)  # a loop through one is known
        greeting, back = await round_trip(w, PAYLOAD)
        assert greeting.startswith(f"{CLIENT}:{made[0][1]}") and back == PAYLOAD
        await w.settled(flows=4)
        assert (ahead.held(), ahead.taken, ahead.made, len(w.sockets.asked)) == (7, 1, 8, 9)
        assert [sock.getsockname() for _, sock in ahead._pairs[key]] == made[1:]
        assert w.delivery.is_ours(made[1]) and not w.delivery.is_ours(made[0])  # that connection ended
        assert route.describe()["sockets_ahead"] == {"held": 7, "taken": 1, "made": 8, "failed": 0}
        ahead.forget(w.enrolled[SERVER].cookie)  # the server pod left
        assert ahead.held() == 0 and not any(w.delivery.is_ours(a) for a in made)
        assert w.delivery._ours == {}
    node(body)


def test_sockets_made_ahead_are_closed_unused_after_a_while(node, monkeypatch):
    monkeypatch.setattr(delivery, "AHEAD_SECONDS", 0.2)

    async def body(w: World, route: SameNodeRoute):
        await w.app.start()
        await certificates(w)
        await round_trip(w, b"one")
        await w.settled(flows=2)
        assert w.delivery.ahead.held() == 8
        await until(lambda: w.delivery.ahead.held() == 0, what="the unused sockets closed")
        assert w.delivery._ours == {}
        greeting, back = await round_trip(w, b"two")  # made on its path again
        assert back == b"two" and w.delivery.ahead.taken == 0
    node(body)


class Made:
    """Stand-in for Delivery's side of Ahead: loopback sockets bound as asked; what was
    released; ESTALE while `stale` (the pod's netns descriptor reused)."""

    def __init__(self):
        self.released, self.stale, self.asked = [], False, []

    def unconnected(self, ctx, src, count):
        self.asked.append(count)
        if self.stale:
            raise OSError(errno.ESTALE, "descriptor 9 is no longer the netns of pod mesh/httpbin")
        socks = []
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return socks

    def release(self, local):
        self.released.append(local)


def test_ahead_makes_several_at_once_when_low(monkeypatch):
    monkeypatch.setattr(delivery, "AHEAD_PER_PAIR", 4)
    monkeypatch.setattr(delivery, "AHEAD_LOW", 1)

    async def main():
        made, pod = Made(), types.SimpleNamespace(cookie=7)
        ahead = delivery.Ahead(made)
        assert ahead.take(pod, ("127.0.0.1", 1000)) is None
        await asyncio.sleep(0)
        socks = [ahead.take(pod, ("127.0.0.1", 1000)) for _ in range(2)]
        await asyncio.sleep(0)
        assert (made.asked, ahead.held()) == ([4], 2)  # two left: none made
        socks.append(ahead.take(pod, ("127.0.0.1", 1000)))
        await asyncio.sleep(0)
        assert (made.asked, ahead.held(), ahead.taken) == ([4, 3], 4, 3)  # one left: made up to four at once
        for sock in socks:
            sock.close()
        ahead.clear()
        assert ahead.held() == 0 and len(made.released) == 4
    run(main())


def test_ahead_skips_the_clients_own_port_keeps_a_bound_and_survives_a_stale_netns(monkeypatch):
    monkeypatch.setattr(delivery, "AHEAD_MAX", 3)
    monkeypatch.setattr(delivery, "AHEAD_PER_PAIR", 2)
    monkeypatch.setattr(delivery, "AHEAD_LOW", 1)

    async def main():
        made = Made()
        ahead = delivery.Ahead(made)
        pod_a, pod_b = types.SimpleNamespace(cookie=7), types.SimpleNamespace(cookie=8)
        assert ahead.take(pod_a, ("127.0.0.1", 1000)) is None
        await asyncio.sleep(0)
        first, second = (sock.getsockname() for _, sock in ahead._pairs[(7, "127.0.0.1")])
        taken = ahead.take(pod_a, ("127.0.0.1", first[1]))  # the client's own port: not that one
        assert taken.getsockname() == second and made.released == [first]
        taken.close()
        await asyncio.sleep(0)
        assert ahead.held() == 2
        assert ahead.take(pod_b, ("127.0.0.1", 1000)) is None
        await asyncio.sleep(0)  # 4 made would pass AHEAD_MAX: the least recently used pair gives up its own
        assert ahead.held() == 2 and list(ahead._pairs) == [(8, "127.0.0.1")] and len(made.released) == 3
        made.stale = True
        ahead.forget(8)
        assert ahead.take(pod_b, ("127.0.0.1", 1000)) is None
        await asyncio.sleep(0)
        assert (ahead.held(), ahead.failures) == (0, 1)  # nothing made in another pod's netns
        ahead.clear()
    run(main())


def test_a_denied_connection_is_refused_as_a_403_and_counted_once(node):
    async def body(w: World, route: SameNodeRoute):
        await w.app.start()
        await certificates(w)
        w.apply(DENY_SLEEP)
        reader, writer = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"
        writer.close()
        await w.settled(flows=2)
        assert w.app.peers == [] and route.counts["denied"] == 1
        assert w.value("nodeagent_policy_denials_total", policy="mesh/deny-sleep") == 1
        assert w.failures() == {("outbound", "hbone_status_403"): 1}  # as over HBONE
        assert w.value("nodeagent_hbone_streams_opened_total", direction="outbound") == 0
        flows = {f["reporter"]: f for f in w.flows()}
        assert (flows["destination"]["verdict"], flows["destination"]["response_flags"],
                flows["destination"]["bytes_received"], flows["destination"]["same_node"]) == ("denied", "DENY", 0, True)
        assert (flows["source"]["verdict"], flows["source"]["response_flags"]) == ("failed", "CONNECT")
        assert w.value("istio_tcp_connections_closed_total", **sleep_to_httpbin("destination",
                                                                                response_flags="DENY")) == 1
    node(body)


def test_strict_peer_authentication_still_admits_it(node):
    async def body(w: World, route: SameNodeRoute):
        await w.app.start()
        await certificates(w)
        w.apply(document("PeerAuthentication", "mesh", "strict", "mtls: {mode: STRICT}"))
        greeting, back = await round_trip(w, b"ping\n")
        assert back == b"ping\n" and route.counts["relayed"] == 1
    node(body)


def test_a_policy_change_revokes_an_established_fast_path_connection(node):
    async def body(w: World, route: SameNodeRoute):
        await w.app.start()
        await certificates(w)
        reader, writer = await w.dial_out(SERVICE)
        greeting = await reader.readline()
        writer.write(b"hello\n")
        assert await reader.readline() == b"hello\n"
        w.apply(DENY_SLEEP)
        assert w.connections.recheck() == 1
        assert await ended(reader) == "reset"
        writer.close()
        await w.settled(flows=2)
        assert w.value("nodeagent_inbound_connections_revoked_total", reason="deny") == 1
        flows = {f["reporter"]: f for f in w.flows()}
        assert (flows["destination"]["verdict"], flows["destination"]["response_flags"],
                flows["destination"]["bytes_received"], flows["destination"]["bytes_sent"]) == (
            "denied", "DENY", len(b"hello\n"), len(greeting) + len(b"hello\n"))
        assert (flows["source"]["bytes_received"], flows["source"]["bytes_sent"]) == (
            len(b"hello\n"), len(greeting) + len(b"hello\n"))
    node(body)


def test_an_app_not_listening_fails_as_a_503_would(node):
    async def body(w: World, route: SameNodeRoute):
        await certificates(w)
        w.app.listener.close()  # nothing listens on the app's port any more
        reader, writer = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"
        writer.close()
        await w.settled(flows=2)
        assert w.failures() == {("outbound", "hbone_status_503"): 1, ("inbound", "connect_refused"): 1}
        assert route.counts["failed"] == 1
        assert {f["reporter"]: f["response_flags"] for f in w.flows()} == {"source": "CONNECT",
                                                                            "destination": "CONNECT"}
    node(body)


@pytest.mark.parametrize("why", ["waypoint", "setting off"])
def test_a_port_behind_the_waypoint_and_the_setting_off_go_over_hbone(node, why):
    async def body(w: World, route: SameNodeRoute | None):
        await w.app.start()
        await certificates(w)
        if why == "waypoint":
            w.envoy_acks(inbound={w.app.address: "chain-1"})
        reader, writer = await w.dial_out(SERVICE)
        if why == "waypoint":  # the HBONE server hands it to Envoy: our stand-in holds it
            await until_accepted(w)
            writer.close()
            assert route.counts == {"relayed": 0, "denied": 0, "failed": 0, "waypoint": 1}
        else:
            assert (await reader.readline()).startswith(CLIENT.encode())
            writer.write_eof()
            assert await ended(reader) == "eof"
            writer.close()
            await w.settled(flows=2)
            assert all("same_node" not in f for f in w.flows())
        await until(lambda: w.value("nodeagent_hbone_streams_opened_total", direction="outbound") == 1, 5,
                    "the HBONE stream opened")
    node(body, fast_path=why != "setting off")


async def until_accepted(w: World) -> None:
    await until(lambda: len(w.envoy.accepted) == 1, 5, "the HBONE server handed the stream to the waypoint")


def test_the_setting_is_on_by_default_and_can_be_turned_off(tmp_path):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cg").mkdir()
    base = {"node": "node-1", "source": f"files:{tmp_path / 'cluster'}", "cgroup": str(tmp_path / "cg")}
    assert config.load(base, {}).same_node_fast_path is True
    assert config.load(base, {"NODEAGENT_SAME_NODE_FAST_PATH": "false"}).same_node_fast_path is False
    assert config.load({**base, "same_node_fast_path": False}, {}).same_node_fast_path is False


class RefusingMaps:
    """Stand-in for capture.sockmap.SockmapJoin whose kernel refuses every pair (as it
    refuses a socket that is no longer established)."""

    def __init__(self):
        self.asked = 0

    def insert(self, a, b):
        self.asked += 1
        raise OSError(95, "Operation not supported")


@pytest.mark.parametrize("pair", ["refused by the kernel", "unix socket"])
def test_a_pair_the_kernel_join_cannot_take_goes_to_the_splicer(pair):
    """KernelJoin (bpf/samenode.c's join, kernel-tested in tests/kernel/test_same_node.py)
    hands a pair it cannot join to the Splicer, bytes and half-closes intact."""
    from nodeagent.agent.proxy.samenode import KernelJoin
    from nodeagent.agent.proxy.splice import Splicer

    async def main():
        join = KernelJoin(True, Splicer("python", LOG), LOG)
        join.maps = maps = RefusingMaps()  # as start() leaves it once loaded
        family = socket.AF_INET if pair == "refused by the kernel" else socket.AF_UNIX
        (client, a), (b, server) = connected(family), connected(family)
        relayed = asyncio.ensure_future(join.splice(a, b))
        client.sendall(b"x" * 1000)
        client.shutdown(socket.SHUT_WR)
        assert await asyncio.to_thread(read_all, server) == b"x" * 1000
        server.sendall(b"y" * 10)
        server.shutdown(socket.SHUT_WR)
        assert await asyncio.to_thread(read_all, client) == b"y" * 10
        result = await relayed
        assert (result.a_to_b, result.b_to_a, result.error) == (1000, 10, None)
        assert (join.joined, join.fallbacks, maps.asked) == ((0, 1, 1) if family == socket.AF_INET else (0, 0, 0))
        for sock in (client, server):
            sock.close()
    run(main())


def test_a_pair_revoked_before_its_join_is_never_joined():
    """A connection a re-check revoked while its delivery connected (its Abort requested
    before the splice) is reset on both sides without entering the kernel's map: a join
    flushes the client's queued bytes to the app first."""
    from nodeagent.agent.proxy.samenode import KernelJoin
    from nodeagent.agent.proxy.splice import Abort, Splicer

    async def main():
        join = KernelJoin(True, Splicer("python", LOG), LOG)
        join.maps = maps = RefusingMaps()
        (client, a), (b, server) = connected(socket.AF_INET), connected(socket.AF_INET)
        client.sendall(b"queued before the join")
        abort = Abort()
        abort()
        await join.splice(a, b, abort)
        assert (maps.asked, join.joined) == (0, 0)
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(read_all, server)
        for sock in (client, server):
            sock.close()
    run(main())


def connected(family: int) -> tuple[socket.socket, socket.socket]:
    if family == socket.AF_UNIX:
        return socket.socketpair()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        return client, listener.accept()[0]


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data
