"""The agent's relays on a loopback node (relay_world.py): outbound (passthrough, HBONE,
through the waypoint), plaintext inbound, the HBONE server, and every way they fail.
A failure is counted once under its reason, the client is reset (or the HBONE stream
answered with its status), and the flow log says so."""

from __future__ import annotations

import asyncio
import socket
from contextlib import ExitStack

import pytest

from engines import NATIVE_HBONE, engine_fixture, native_relays
from identity_fixtures import run, until
from nodeagent.agent.proxy.routes import ROUTE_SOCKETS
from nodeagent.resets import LINGER_RESET
from nodeagent.tunnel import ConnectRefused, HandshakeFailed
from nodeagent.xds.dataplane import TLV_ENDPOINT, TLV_PRINCIPAL, TLV_SOURCE_LABELS, TLV_SOURCE_WORKLOAD, ProxyHeader
from policy_world import document
from relay_world import (ADMIN_PORT, BROKEN, CLIENT, DELIVERY_MARK, EMPTY_SERVICE, LEGACY, MARK, OTHER, SERVER,
                         SERVER_V6, SERVICE,
                         Envoy, World, ended, header_of, principal)

SLEEP, HTTPBIN = principal("mesh", "sleep"), principal("mesh", "httpbin")
PING = b"ping\n"


engine = engine_fixture(("python", "native", NATIVE_HBONE))


@pytest.fixture
def node(tmp_path, monkeypatch, engine):
    """node(body, **kw) runs `async body(world)` on a fresh World(**kw), closed after;
    once per engine of the data path."""
    def on_node(body, **kw):
        async def main():
            async with World(tmp_path, monkeypatch, engine=engine, **kw) as world:
                await body(world)
        run(main())
    return on_node


async def exchange(reader, writer) -> tuple[str, bytes]:
    """Against the app: its greeting (the client address it saw), then PING echoed;
    half-closes and expects EOF after."""
    greeting = (await reader.readline()).decode().strip()
    writer.write(PING)
    echo = await reader.readexactly(len(PING))
    writer.write_eof()
    assert await ended(reader) == "eof"
    writer.close()
    return greeting, echo


def test_outbound_to_a_meshed_service_crosses_hbone_and_reaches_the_app_as_the_client(node, engine):
    async def body(w: World):
        await w.app.start()
        greeting, echo = await exchange(*await w.dial_out(SERVICE))
        assert echo == PING and greeting.startswith(CLIENT + ":")  # the app saw the client pod's address
        await w.settled(flows=2)
        client, server = w.enrolled[CLIENT], w.enrolled[SERVER]
        delivery = ("transparent", server.netns_fd, DELIVERY_MARK, CLIENT)  # into the server pod, as the client
        # the native HBONE engine is then given a route's sockets for more of its kind, made the same way
        routed = ROUTE_SOCKETS if engine == NATIVE_HBONE else 0
        assert w.sockets.asked == [("upstream", client.netns_fd, MARK),  # HBONE from the client pod's netns
                                   delivery] + [delivery] * routed
        assert w.failures() == {}
        assert (w.value("nodeagent_outbound_connections_total"), w.value("nodeagent_inbound_connections_total"),
                w.value("nodeagent_passthrough_connections_total")) == (1, 1, 0)
        back = len(greeting) + 1 + len(PING)  # the greeting line, then the echo
        for direction in ("outbound", "inbound"):
            assert w.value("nodeagent_hbone_streams_opened_total", direction=direction) == 1
            assert w.value("nodeagent_relayed_bytes_total", direction=direction, flow="sent") == len(PING)
            assert w.value("nodeagent_relayed_bytes_total", direction=direction, flow="received") == back
        app = f"{SERVER}:{w.app.address[1]}"
        flows = {f["reporter"]: f for f in w.flows()}
        assert (flows["source"]["dst"]["addr"], flows["source"]["upstream"], flows["source"]["security"],
                flows["source"]["src"]["principal"], flows["source"]["dst"]["principal"],
                flows["source"]["dst"]["service"], flows["source"]["verdict"]) == (
            "10.96.0.10:80", f"{SERVER}:{w.tunnel_port}", "mutual_tls", SLEEP, HTTPBIN,
            "httpbin.mesh.svc.cluster.local", "allowed")
        assert (flows["destination"]["dst"]["addr"], flows["destination"]["src"]["workload"],
                flows["destination"]["src"]["principal"], flows["destination"]["bytes_received"],
                flows["destination"]["verdict"]) == (app, "sleep", SLEEP, len(PING), "allowed")
    node(body)


# --- outbound -------------------------------------------------------------------------

def test_outbound_to_an_unmeshed_pod_is_passed_through_from_the_pod(node):
    async def body(w: World):
        legacy = await w.serve(LEGACY)
        greeting, echo = await exchange(*await w.dial_out(legacy.address))
        assert echo == PING and greeting.startswith(CLIENT + ":")
        await w.settled(flows=1)
        assert w.sockets.asked == [("upstream", w.enrolled[CLIENT].netns_fd, MARK)]
        assert w.failures() == {} and w.value("nodeagent_passthrough_connections_total") == 1
        [flow] = w.flows()
        assert (flow["reporter"], flow["dst"]["workload"], flow["dst"]["namespace"], flow["upstream"], flow["security"],
                flow["bytes_received"], flow["bytes_sent"], flow["verdict"]) == (
            "source", "legacy", "plain", f"{LEGACY}:{legacy.address[1]}", "none", len(PING),
            len(greeting) + 1 + len(PING), "allowed")
    node(body)


def test_outbound_to_a_service_without_endpoints_is_reset_and_reported(node):
    async def body(w: World):
        reader, _ = await w.dial_out(EMPTY_SERVICE)
        assert await ended(reader) == "reset"
        await w.settled(flows=1)
        assert w.failures() == {("outbound", "no_endpoints"): 1}
        assert w.sockets.asked == []  # nothing was dialled
        [flow] = w.flows()
        assert (flow["reporter"], flow["dst"]["addr"], flow["dst"]["service"], flow["src"]["workload"],
                flow["verdict"], flow["response_flags"], flow["reason"]) == (
            "source", "10.96.0.11:80", "nobody.mesh.svc.cluster.local", "sleep", "failed", "CONNECT", "no_endpoints")
    node(body)


def test_outbound_without_an_original_destination_is_reset(node):
    async def body(w: World):
        reader, _ = await w.dial(CLIENT, w.outbound_listener.getsockname())  # nothing recorded by capture
        assert await ended(reader) == "reset"
        await w.settled(flows=0)
        assert w.failures() == {("outbound", "no_original_dst"): 1}
    node(body)


def refused_port(ip: str) -> tuple[socket.socket, tuple[str, int]]:
    """A port of `ip` that refuses connections (bound, never listening: nobody else gets it)."""
    sock = socket.socket()
    sock.bind((ip, 0))
    return sock, sock.getsockname()


def test_outbound_connect_failures_are_reset_and_counted_by_reason(node):
    async def body(w: World):
        closed, where = refused_port(LEGACY)
        with closed:
            reader, _ = await w.dial_out(where)  # passthrough, refused
            assert await ended(reader) == "reset"
            await w.settled(flows=1)
        reader, _ = await w.dial_out((BROKEN, 80))  # mesh/broken: meshed, without a valid identity
        assert await ended(reader) == "reset"
        await w.settled(flows=2)
        assert w.failures() == {("outbound", "connect_refused"): 1, ("outbound", "no_certificate"): 1}
        assert [(f["upstream"], f["verdict"], f["response_flags"]) for f in w.flows()] == [
            (f"{where[0]}:{where[1]}", "failed", "CONNECT"), (f"{BROKEN}:{w.tunnel_port}", "failed", "CONNECT")]
        assert w.flows()[1]["reason"].startswith("pod mesh/broken has no valid identity")
    node(body)


@pytest.mark.parametrize("relay", ["outbound", "inbound"])
def test_a_client_gone_before_the_relay_reads_it_is_counted(node, relay):
    async def body(w: World):
        listener = socket.create_server((LEGACY, 0))
        with listener:
            client = socket.create_connection(listener.getsockname())
            accepted, _ = listener.accept()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        client.close()  # RST: the accepted socket has no peer any more
        await until(lambda: not has_peer(accepted), 5, "the client's reset")
        ctx = w.enrolled[CLIENT if relay == "outbound" else SERVER]
        await getattr(w, relay).handle(ctx, accepted)
        assert accepted.fileno() == -1 and w.failures() == {(relay, "client_gone"): 1}
    node(body)


def has_peer(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


async def envoy_side(envoy: Envoy, count: int = 1):
    """The `count`-th connection the agent opened to Envoy: its kind, its PROXY header,
    and Envoy's end as (reader, writer)."""
    await until(lambda: len(envoy.accepted) >= count, 5, f"{count} connections to Envoy")
    kind, sock = envoy.accepted[count - 1]
    header = header_of(sock)
    return kind, header, *await asyncio.open_connection(sock=sock)


async def through_envoy(client, envoy_end) -> None:
    """Bytes both ways between the client and Envoy's end, then both half-close."""
    (reader, writer), (e_reader, e_writer) = client, envoy_end
    e_writer.write(b"from envoy\n")
    assert await reader.readline() == b"from envoy\n"
    writer.write(PING)
    assert await e_reader.readexactly(len(PING)) == PING
    writer.write_eof()
    e_writer.write_eof()
    assert (await ended(reader), await ended(e_reader)) == ("eof", "eof")
    writer.close()
    e_writer.close()


@pytest.mark.parametrize("ca", [True, False])
def test_outbound_through_the_waypoint_tells_envoy_who_the_client_is(node, ca):
    async def body(w: World):
        envoy = w.envoy_acks(outbound={SERVICE})
        client = await w.dial_out(SERVICE)
        kind, header, *envoy_end = await envoy_side(envoy)
        principal_claim = {TLV_PRINCIPAL: SLEEP.encode()} if ca else {}  # without a CA, no identity to claim
        assert (kind, header.source, header.destination, dict(header.tlvs)) == (
            "outbound", (CLIENT, 0), SERVICE,  # port 0: Envoy pools per source pod
            {**principal_claim, TLV_SOURCE_LABELS: b",app=sleep,", TLV_SOURCE_WORKLOAD: b"mesh/sleep"})
        back = ProxyHeader((CLIENT, 0), SERVICE)  # what Envoy may hand back while it lasts, and no other
        assert [envoy.handoffs.solicited(*h) for h in (("upstream", back), ("deliver", back),
                ("upstream", ProxyHeader((CLIENT, 0), (SERVICE[0], SERVICE[1] + 1))))] == [True, False, False]
        await through_envoy(client, envoy_end)
        await until(lambda: not envoy.handoffs, 5, "the relay through Envoy to end")
        await w.settled(flows=0)  # Envoy's upstream connection is the one reported
        assert w.failures() == {} and w.sockets.asked == []
        assert w.value("nodeagent_relayed_bytes_total", direction="outbound", flow="sent") == len(PING)
    node(body, ca=ca)


def test_outbound_to_an_unavailable_waypoint_is_reset(node):
    async def body(w: World):
        w.envoy_acks(outbound={SERVICE}, down=True)
        reader, _ = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"
        await w.settled(flows=0)
        assert w.failures() == {("outbound", "waypoint_unavailable"): 1}
        assert w.sockets.asked == []  # no way around the waypoint
    node(body)


def test_a_connection_envoy_hands_back_goes_to_the_endpoint_it_picked(node):
    async def body(w: World):
        await w.app.start()
        ours, theirs = socket.socketpair()
        endpoint = f"{SERVER}:{w.app.address[1]}".encode()
        header = ProxyHeader((CLIENT, 0), SERVICE, ((TLV_PRINCIPAL, SLEEP.encode()), (TLV_ENDPOINT, endpoint)))
        w.handle(w.enrolled[CLIENT], "outbound", w.outbound.handle_upstream(ours, header))
        greeting, echo = await exchange(*await asyncio.open_connection(sock=theirs))
        assert echo == PING and greeting.startswith(CLIENT + ":")  # over HBONE, as the client pod
        await w.settled(flows=2)
        flows = {f["reporter"]: f for f in w.flows()}
        assert (flows["source"]["dst"]["addr"], flows["source"]["upstream"], flows["source"]["dst"]["service"],
                flows["destination"]["src"]["principal"]) == (
            "10.96.0.10:80", f"{SERVER}:{w.tunnel_port}", "httpbin.mesh.svc.cluster.local", SLEEP)
        legacy = await w.serve(LEGACY)
        ours, theirs = socket.socketpair()
        header = ProxyHeader((CLIENT, 0), legacy.address)  # no ENDPOINT (a PASSTHROUGH DestinationRule)
        w.handle(w.enrolled[CLIENT], "outbound", w.outbound.handle_upstream(ours, header))
        greeting, _ = await exchange(*await asyncio.open_connection(sock=theirs))
        assert greeting.startswith(CLIENT + ":") and w.value("nodeagent_passthrough_connections_total") == 1
        await w.settled(flows=3)
        assert w.failures() == {}
    node(body)


@pytest.mark.parametrize("source, endpoint, reason", [
    (LEGACY, None, "waypoint_pod_gone"),  # Envoy names a source pod the agent does not serve
    (CLIENT, b"not-an-endpoint", "waypoint_bad_endpoint")])
def test_a_connection_envoy_hands_back_for_no_pod_or_no_endpoint_is_closed(node, source, endpoint, reason):
    async def body(w: World):
        ours, theirs = socket.socketpair()
        tlvs = ((TLV_ENDPOINT, endpoint),) if endpoint else ()
        with theirs:
            await w.outbound.handle_upstream(ours, ProxyHeader((source, 0), SERVICE, tlvs))
            theirs.settimeout(5)
            assert ours.fileno() == -1 and theirs.recv(1) == b""
        assert w.failures() == {("outbound", reason): 1} and w.flows() == [] and w.sockets.asked == []
    node(body)


# --- plaintext inbound ----------------------------------------------------------------

async def steered_to_the_app(w: World):
    """A plaintext client (the unmeshed legacy pod) connecting to httpbin's app, its
    connection steered to the agent's inbound relay, then the app started: the client's
    (reader, writer)."""
    client = await w.dial(LEGACY, w.app.address)
    steered = await w.app.take()
    await w.app.start()
    w.handle(w.enrolled[SERVER], "inbound", w.inbound.handle(w.enrolled[SERVER], steered))
    return client


def test_plaintext_inbound_is_delivered_to_the_app_as_the_client(node):
    async def body(w: World):
        reader, writer = await steered_to_the_app(w)
        client_port = writer.get_extra_info("sockname")[1]
        greeting, echo = await exchange(reader, writer)
        host, _, port = greeting.partition(":")
        assert echo == PING and host == LEGACY and int(port) != client_port  # never the client's own 4-tuple
        await w.settled(flows=1)
        assert w.sockets.asked == [("transparent", w.enrolled[SERVER].netns_fd, DELIVERY_MARK, LEGACY)]
        assert w.failures() == {} and w.value("nodeagent_inbound_connections_total") == 1
        [flow] = w.flows()
        assert (flow["reporter"], flow["src"]["workload"], flow["src"]["principal"], flow["dst"]["principal"],
                flow["dst"]["service"], flow["security"], flow["bytes_received"], flow["verdict"]) == (
            "destination", "legacy", "unknown", HTTPBIN, "httpbin.mesh.svc.cluster.local", "none", len(PING),
            "allowed")
        assert len(w.connections) == 0  # no longer tracked for re-checks once it ended
    node(body)


def test_socket_pairs_go_to_the_native_engine_and_hbone_hops_to_the_hbone_engine(node, engine):
    async def body(w: World):
        legacy = await w.serve(LEGACY)
        await exchange(*await w.dial_out(legacy.address))  # passthrough: socket <-> socket
        await exchange(*await steered_to_the_app(w))  # plaintext inbound: socket <-> socket
        await w.settled(flows=2)
        socket_pairs = native_relays(w.splicer)
        await exchange(*await w.dial_out(SERVICE))  # HBONE: client <-> stream, then stream <-> app
        await w.settled(flows=4)
        assert (socket_pairs, native_relays(w.splicer)) == ((0, 0) if engine == "python" else (2, 2))
        assert w.splicer.describe()["summary"] == ("python: data_path_engine=python" if engine == "python"
                                                   else "native (socket pairs); python for HBONE streams")
        hbone = w.hbone_engines.describe()
        assert hbone["engine"] == ("native" if engine == NATIVE_HBONE else "python")
        if engine == NATIVE_HBONE:  # the client's stream and the server's, both in the one engine
            assert (hbone["native"]["conns_total"], hbone["native"]["streams_total"]) == (2, 2)
    node(body)


def test_plaintext_inbound_refused_by_strict_is_reset_and_denied(node):
    async def body(w: World):
        w.apply(document("PeerAuthentication", "mesh", "strict", "mtls: {mode: STRICT}"))
        reader, _ = await steered_to_the_app(w)
        assert await ended(reader) == "reset"
        await w.settled(flows=1)
        assert w.app.peers == [] and w.sockets.asked == [] and w.failures() == {}
        assert w.value("nodeagent_policy_denials_total", policy="peer-authentication-strict") == 1
        [flow] = w.flows()
        assert (flow["verdict"], flow["response_flags"], flow["reason"]) == (
            "denied", "DENY", f"PeerAuthentication STRICT on port {w.app.address[1]}: plaintext refused")
    node(body)


def test_plaintext_inbound_to_an_agent_port_is_reset(node):
    async def body(w: World):
        reader, _ = await w.dial(LEGACY, w.inbound_listener.getsockname())  # straight at the agent's port
        assert await ended(reader) == "reset"
        await w.settled(flows=0)
        assert w.failures() == {("inbound", "agent_port"): 1} and w.sockets.asked == []
    node(body)


def test_a_delivery_steered_back_to_the_agent_is_reset_not_looped(node):
    """A stale sk_lookup program steering the agent's own delivery back to it: the
    loop is caught at once (else every delivery would make one more)."""
    async def body(w: World):
        steered = w.steer()  # no app behind it: every connection to it reaches the agent
        reader, _ = await w.dial(LEGACY, steered)
        assert await ended(reader) == "reset"
        await w.settled(flows=1)
        assert w.failures() == {("inbound", "steering_loop"): 1}
        assert w.value("nodeagent_inbound_connections_total") == 2  # the client's, and the delivery come back
        assert len(w.sockets.asked) == 1  # one delivery, not one more per loop
    node(body)


def test_a_steering_loop_is_caught_after_the_delivery_connected(node):
    """The looped connection handled only after the connect that made it returned (the
    event loop may run either first): still caught, since a delivery's address is ours
    until the delivered connection ends, and only until then."""
    async def body(w: World):
        server, loop = w.enrolled[SERVER], asyncio.get_running_loop()
        with ExitStack() as ends:
            upstream = await w.delivery.connect(server, (LEGACY, 40000), w.app.address, ends)
            local = upstream.getsockname()[:2]
            looped = await w.app.take()  # as a stale sk_lookup would steer it to the agent
            w.handle(server, "inbound", w.inbound.handle(server, looped))
            with upstream, pytest.raises(ConnectionResetError):
                await loop.sock_recv(upstream, 1)
            assert w.failures() == {("inbound", "steering_loop"): 1} and w.delivery.is_ours(local)
        assert not w.delivery.is_ours(local)
    node(body)


def test_plaintext_inbound_to_an_app_not_listening_is_reset(node):
    async def body(w: World):
        reader, _ = await w.dial(LEGACY, w.app.address)
        steered = await w.app.take()
        w.app.listener.close()  # the app is gone: the delivery is refused
        w.handle(w.enrolled[SERVER], "inbound", w.inbound.handle(w.enrolled[SERVER], steered))
        assert await ended(reader) == "reset"
        await w.settled(flows=1)
        assert w.failures() == {("inbound", "connect_refused"): 1}
        [flow] = w.flows()
        assert (flow["src"]["addr"].partition(":")[0], flow["verdict"], flow["response_flags"], flow["reason"]) == (
            LEGACY, "failed", "CONNECT", "connect_refused")
    node(body)


def test_plaintext_inbound_behind_the_waypoint_goes_to_envoy(node):
    async def body(w: World):
        envoy = w.envoy_acks(inbound={w.app.address: "chain-1"})
        client = await steered_to_the_app(w)
        client_address = client[1].get_extra_info("sockname")[:2]
        kind, header, *envoy_end = await envoy_side(envoy)
        assert (kind, header.source, header.destination, header.tlvs) == (
            "inbound", client_address, w.app.address, ())  # plaintext: no principal to vouch for
        assert envoy.handoffs.solicited("deliver", header) and not envoy.handoffs.solicited("upstream", header)
        await through_envoy(client, envoy_end)
        await until(lambda: not envoy.handoffs, 5, "the relay through Envoy to end")
        await w.settled(flows=1)
        assert w.failures() == {} and w.sockets.asked == [] and w.app.peers == []
        assert [(f["verdict"], f["bytes_received"]) for f in w.flows()] == [("allowed", len(PING))]
    node(body)


def test_plaintext_inbound_behind_an_unavailable_waypoint_is_reset(node):
    async def body(w: World):
        w.envoy_acks(inbound={w.app.address: "chain-1"}, down=True)
        reader, _ = await steered_to_the_app(w)
        assert await ended(reader) == "reset"
        await w.settled(flows=1)
        assert w.failures() == {("inbound", "waypoint_unavailable"): 1}
        assert w.app.peers == [] and w.sockets.asked == []  # never around the waypoint's policy
        [flow] = w.flows()
        assert (flow["verdict"], flow["response_flags"], flow["reason"]) == (
            "failed", "CONNECT", "waypoint_unavailable")
    node(body)


def test_a_request_envoy_allowed_is_delivered_as_the_client(node):
    async def body(w: World):
        await w.app.start()
        ours, theirs = socket.socketpair()
        header = ProxyHeader((CLIENT, 40000), w.app.address)
        w.handle(w.enrolled[SERVER], "inbound", w.inbound.handle_delivery(ours, header))
        greeting, echo = await exchange(*await asyncio.open_connection(sock=theirs))
        assert echo == PING and greeting.startswith(CLIENT + ":")
        await w.settled(flows=0)
        assert w.failures() == {}
        assert w.sockets.asked == [("transparent", w.enrolled[SERVER].netns_fd, DELIVERY_MARK, CLIENT)]
    node(body)


@pytest.mark.parametrize("destination, reason", [("other", "waypoint_pod_gone"), ("app_down", "connect_refused")])
def test_a_request_envoy_allowed_for_a_gone_pod_or_app_is_closed(node, destination, reason):
    async def body(w: World):
        if destination == "app_down":
            w.app.listener.close()
        dst = (OTHER, 80) if destination == "other" else w.app.address  # mesh/other: not served by this agent
        ours, theirs = socket.socketpair()
        with theirs:
            await w.inbound.handle_delivery(ours, ProxyHeader((CLIENT, 40000), dst))
            theirs.settimeout(5)
            assert ours.fileno() == -1 and theirs.recv(1) == b""
        assert w.failures() == {("inbound", reason): 1} and w.flows() == []
    node(body)


# --- the HBONE server -----------------------------------------------------------------

async def round_trip(stream) -> str:
    """Against the app through an HBONE stream: its greeting, then PING echoed."""
    greeting = b""
    while not greeting.endswith(b"\n"):  # the app sends nothing more before PING
        greeting += await stream.read(64)
    stream.write(PING)
    stream.write_eof()
    assert await stream.read() == PING
    return greeting.decode().strip()


def test_a_valid_client_cannot_aim_a_stream_at_another_pod_or_an_agent_port(node):
    """The :authority must be this pod's IP on a port not the agent's; each refusal is a
    400 counted once, and the connection goes on serving good streams."""
    async def body(w: World):
        await w.app.start()
        pool, app = await w.hbone_client(), w.app.address
        assert (await round_trip(await w.open_stream(pool, app))).startswith(CLIENT + ":")
        outbound_port, inbound_port = w.outbound_listener.getsockname()[1], w.inbound_listener.getsockname()[1]
        aimed = [(OTHER, app[1]), (SERVER, w.tunnel_port), (SERVER, outbound_port), (SERVER, inbound_port),
                 (SERVER, ADMIN_PORT)]
        for count, authority in enumerate(aimed, 1):
            with pytest.raises(ConnectRefused) as refused:
                await w.open_stream(pool, authority)
            assert refused.value.status == 400
            assert w.failures() == {("inbound", "hbone_bad_destination"): count}
            assert w.stream_refusals() == {("inbound", "bad_destination"): count}
        assert (await round_trip(await w.open_stream(pool, app))).startswith(CLIENT + ":")
        assert pool.connections() == 1 and w.tunnel.connections() == 1  # the same connection all along
        assert [p[0] for p in w.app.peers] == [CLIENT, CLIENT]  # only the good streams reached the app
        await w.settled(flows=len(aimed) + 2)
        # a good stream's flow is logged when its relay ends, which may be after the refusals'
        flows = [(f["dst"]["addr"], f["verdict"], f["response_flags"], f["reason"]) for f in w.flows()]
        assert [f for f in flows if f[1] != "failed"] == [(f"{SERVER}:{app[1]}", "allowed", "-", "")] * 2
        assert [f for f in flows if f[1] == "failed"] == [
            (f"{OTHER}:{app[1]}", "failed", "CONNECT",
             f":authority {OTHER}:{app[1]} is not this pod ({SERVER}); the source's model is stale?"),
            *((f"{SERVER}:{port}", "failed", "CONNECT", f":authority port {port} is one of the agent's own ports")
              for _, port in aimed[1:])]
        assert w.value("nodeagent_hbone_streams_opened_total", direction="inbound") == 2
    node(body)


def test_a_dual_stack_pods_other_address_is_refused_at_the_source_and_at_the_pod(node):
    """The mesh carries a pod's status.podIP only: a connection to its other-family
    address is reset at the source, saying why (never sent plaintext around the mesh, as
    when the model did not know the address), and a stream naming it is refused by the
    pod's agent, saying why."""
    async def body(w: World):
        await w.app.start()
        reader, _ = await w.dial_out((SERVER_V6, w.app.address[1]))
        assert await ended(reader) == "reset"
        await w.settled(flows=1)
        assert w.failures() == {("outbound", "other_family"): 1} and w.sockets.asked == []
        [flow] = w.flows()
        assert (flow["dst"]["addr"], flow["dst"]["workload"], flow["verdict"], flow["reason"]) == (
            f"[{SERVER_V6}]:{w.app.address[1]}", "httpbin", "failed", "other_family")
        pool = await w.hbone_client()
        with pytest.raises(ConnectRefused) as refused:
            await w.open_stream(pool, (SERVER_V6, w.app.address[1]))
        assert refused.value.status == 400 and w.app.peers == []
        await w.settled(flows=2)
        assert w.flows()[-1]["reason"] == (
            f":authority [{SERVER_V6}]:{w.app.address[1]} is this dual-stack pod's other-family address, which the "
            f"mesh does not carry (only its status.podIP {SERVER})")
    node(body)


def test_a_stream_for_a_pod_that_left_is_refused_503_pod_gone(node):
    async def body(w: World):
        await w.app.start()
        pool = await w.hbone_client()
        await round_trip(await w.open_stream(pool, w.app.address))
        del w.enrolled[SERVER]  # removed between the handshake and the next stream
        # as the agent does when a pod leaves (TunnelInbound.drain, before its GOAWAY): the
        # native engine's routes are stale, so the stream comes to the agent's own check
        w.tunnel.routes.invalidate()
        with pytest.raises(ConnectRefused) as refused:
            await w.open_stream(pool, w.app.address)
        assert refused.value.status == 503
        assert w.stream_refusals() == {("inbound", "pod_gone"): 1} and w.failures() == {}
        assert len(w.app.peers) == 1 and w.value("nodeagent_inbound_connections_total") == 1
        with pytest.raises(HandshakeFailed):  # a new connection: no certificate to serve it with
            await w.open_stream(await w.hbone_client(), w.app.address)
        await until(lambda: w.value("nodeagent_hbone_handshake_failures_total", direction="inbound",
                                    reason="no_local_identity") == 1, 5, "the refused handshake counted")
    node(body)


def test_a_stream_is_reported_as_its_proven_principal_not_as_the_pod_at_its_address(node):
    """A workload holding mesh/other's certificate connects from sleep's address: the
    destination reports (and authorizes) mesh/other's principal, not the sleep pod."""
    async def body(w: World):
        await w.app.start()
        pool = await w.hbone_client(certificate_of=OTHER)
        await round_trip(await w.open_stream(pool, w.app.address))
        await w.settled(flows=1)
        [flow] = w.flows()
        assert flow["src"] == {"addr": flow["src"]["addr"], "workload": "unknown", "namespace": "mesh",
                               "principal": principal("mesh", "other")}
        assert flow["src"]["addr"].startswith(CLIENT + ":")
    node(body)


def test_a_stream_to_an_app_not_listening_is_refused_503_app_unreachable(node):
    async def body(w: World):
        w.app.listener.close()
        reader, _ = await w.dial_out(SERVICE)  # the source agent's HBONE stream is refused
        assert await ended(reader) == "reset"
        await w.settled(flows=2)
        assert w.stream_refusals() == {("inbound", "app_unreachable"): 1, ("outbound", "status_503"): 1}
        assert w.failures() == {("inbound", "connect_refused"): 1, ("outbound", "hbone_status_503"): 1}
        flows = {f["reporter"]: f for f in w.flows()}
        assert (flows["destination"]["verdict"], flows["destination"]["response_flags"],
                flows["destination"]["reason"]) == ("failed", "CONNECT", "connect_refused")
        assert (flows["source"]["verdict"], flows["source"]["response_flags"]) == ("failed", "CONNECT")
        assert "refused with status 503" in flows["source"]["reason"]
    node(body)


def test_a_stream_behind_the_waypoint_goes_to_envoy_with_the_verified_principal(node):
    async def body(w: World):
        envoy = w.envoy_acks(inbound={w.app.address: "chain-1"})
        client = await w.dial_out(SERVICE)
        kind, header, *envoy_end = await envoy_side(envoy)
        assert (kind, header.source[0], header.destination, header.tlvs) == (
            "inbound", CLIENT, w.app.address, ((TLV_PRINCIPAL, SLEEP.encode()),))
        assert envoy.handoffs.solicited("deliver", header) and len(envoy.handoffs) == 1
        await through_envoy(client, envoy_end)
        await until(lambda: not envoy.handoffs, 5, "the relay through Envoy to end")
        await w.settled(flows=2)
        assert w.failures() == {} and w.app.peers == []
        assert w.value("nodeagent_hbone_streams_opened_total", direction="inbound") == 1
    node(body)


def test_a_stream_behind_an_unavailable_waypoint_is_refused_503(node):
    async def body(w: World):
        w.envoy_acks(inbound={w.app.address: "chain-1"}, down=True)
        await w.app.start()
        reader, _ = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"
        await w.settled(flows=2)
        assert w.stream_refusals() == {("inbound", "waypoint_unavailable"): 1, ("outbound", "status_503"): 1}
        assert w.failures() == {("inbound", "waypoint_unavailable"): 1, ("outbound", "hbone_status_503"): 1}
        assert w.app.peers == []
        destination = next(f for f in w.flows() if f["reporter"] == "destination")
        assert (destination["verdict"], destination["response_flags"], destination["reason"]) == (
            "failed", "CONNECT", "waypoint_unavailable")
    node(body)


def test_a_stream_denied_by_policy_is_refused_403(node):
    async def body(w: World):
        await w.app.start()
        w.apply(document("AuthorizationPolicy", "mesh", "deny-sleep", """
action: DENY
rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/sleep]}}]}]
"""))
        reader, _ = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"
        await w.settled(flows=2)
        assert w.stream_refusals() == {("inbound", "policy_denied"): 1, ("outbound", "status_403"): 1}
        assert w.failures() == {("outbound", "hbone_status_403"): 1} and w.app.peers == []
        assert w.value("nodeagent_policy_denials_total", policy="mesh/deny-sleep") == 1
        destination = next(f for f in w.flows() if f["reporter"] == "destination")
        assert (destination["verdict"], destination["response_flags"]) == ("denied", "DENY")
    node(body)


def test_without_a_mesh_ca_hbone_is_refused_both_ways(node):
    async def body(w: World):
        reader, _ = await w.dial_out(SERVICE)  # source side: no certificate to present
        assert await ended(reader) == "reset"
        await w.settled(flows=1)
        reader, _ = await w.dial(CLIENT, (SERVER, w.tunnel_port))  # server side: none to serve with
        assert await ended(reader) == "reset"
        await until(lambda: w.failures().get(("inbound", "no_certificate")) == 1, 5, "the refusal counted")
        assert w.failures() == {("outbound", "no_certificate"): 1, ("inbound", "no_certificate"): 1}
        assert w.sockets.asked == [] and w.flows()[0]["reason"].startswith("this agent has no mesh CA")
    node(body, ca=False)


def test_removed_pods_let_go_of_their_tunnel_connections_once_their_relays_end(node):
    async def body(w: World):
        await w.app.start()
        client = w.enrolled[CLIENT]
        await exchange(*await w.dial_out(SERVICE))
        reader, writer = await w.dial_out(SERVICE)  # held open, on the same pooled connection
        assert (await reader.readline()).startswith(CLIENT.encode())
        assert w.hbone.connections() == 1 and w.tunnel.connections() == 1
        w.tunnel.drain(OTHER)  # another pod's connections only
        assert draining(w) == [False]
        w.tunnel.drain(SERVER)  # the server pod left: no new streams, GOAWAY once idle
        assert draining(w) == [True]
        released = asyncio.create_task(w.hbone.release(client))  # the client pod left
        for _ in range(3):
            await asyncio.sleep(0)
        assert client in w.hbone.pools  # kept while its relay runs
        writer.write(PING)
        assert await reader.readexactly(len(PING)) == PING  # the held stream still works
        writer.write_eof()
        assert await ended(reader) == "eof"
        writer.close()
        await released
        assert w.hbone.connections() == 0 and client not in w.hbone.pools
        await until(lambda: not w.tunnel.connections(), 5, "the drained connection closed")
        await w.settled(flows=4)
        await w.hbone.release(client)  # twice: nothing left to close
    node(body)


def draining(w: World) -> list[bool]:
    """Whether each HBONE connection the tunnel listener serves is draining (either engine)."""
    return [s.draining for s in w.tunnel.server.sessions] + [s.draining for s in w.tunnel.native.conns.values()]


@pytest.mark.parametrize("change", ["deny", "waypoint"])
def test_a_delivered_connection_revoked_by_a_change_is_reset_and_reported(node, change):
    async def body(w: World):
        reader, writer = await steered_to_the_app(w)
        assert (await reader.readline()).startswith(LEGACY.encode())
        if change == "deny":
            w.apply(document("PeerAuthentication", "mesh", "strict", "mtls: {mode: STRICT}"))
        else:
            w.envoy_acks(inbound={w.app.address: "chain-1"})
        assert w.connections.recheck() == 1
        assert await ended(reader) == "reset"
        writer.close()
        await w.settled(flows=1)
        [flow] = w.flows()
        assert (flow["verdict"], flow["response_flags"], flow["reason"]) == {
            "deny": ("denied", "DENY", f"no longer allowed: PeerAuthentication STRICT on port {w.app.address[1]}: "
                                       "plaintext refused"),
            "waypoint": ("allowed", "-", "the port is now behind the waypoint (server-side L7 policy); the client "
                                         "reconnects through it")}[change]
    node(body)
