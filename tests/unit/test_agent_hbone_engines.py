"""The agent's HBONE hops on both HBONE engines (setting hbone_engine: tunnel/ in Python,
or the native engine of native/hbone.c), through the real relays of a loopback node
(relay_world.py): byte-identical large transfers both ways with the byte counts of both
reports, half-close from either end, resets passed on both ways, a delivered stream
revoked by a policy change, a destination presenting another identity, one pooled
connection reused across streams, and certificate rotation (new connections present the
new certificate, the open one keeps working). test_agent_relays.py runs every other
relay test on both as well (engine `native-hbone`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from engines import NATIVE_HBONE, engine_fixture
from identity_fixtures import run, until
from nodeagent.memory import FAIR_FLOOR, INTERVAL, MIB, MemoryGuard
from nodeagent.resets import LINGER_RESET
from nodeagent.tunnel import ConnectRefused, TunnelError, TunnelSettings
from policy_world import document
from relay_world import CLIENT, LEGACY, LOG, SERVER, SERVICE, World, ended, principal, sleep_to_httpbin

engine = engine_fixture(("python", NATIVE_HBONE))


@pytest.fixture
def node(tmp_path, monkeypatch, engine):
    def on_node(body, **kw):
        async def main():
            async with World(tmp_path, monkeypatch, engine=engine, **kw) as world:
                await body(world)
        run(main(), timeout=120)
    return on_node


class Server:
    """An app of the server pod on its own port: `handler(reader, writer)` per connection;
    what each handler raised (a reset seen) in `errors`."""

    def __init__(self, handler):
        self.handler, self.errors, self.done = handler, [], asyncio.Event()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, SERVER, 0)
        self.address = self.server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.errors.append(type(exc).__name__)
        finally:
            writer.close()
            self.done.set()


async def echo_all(reader, writer):
    while data := await reader.read(1 << 20):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


def test_a_large_transfer_is_byte_identical_and_counted_by_both_reports(node, engine):
    payload = os.urandom(8 * MIB + 11)

    async def body(w: World):
        async with Server(echo_all) as app:
            reader, writer = await w.dial_out(app.address)

            async def send():
                writer.write(payload)
                await writer.drain()
                writer.write_eof()
            sender = asyncio.create_task(send())
            got = await reader.read(-1)
            await sender
            writer.close()
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            await w.settled(flows=2)
        flows = {f["reporter"]: f for f in w.flows()}
        for reporter in ("source", "destination"):
            assert (flows[reporter]["bytes_received"], flows[reporter]["bytes_sent"], flows[reporter]["security"],
                    flows[reporter]["verdict"]) == (len(payload), len(payload), "mutual_tls", "allowed")
        labels = sleep_to_httpbin("destination", service=None)
        assert w.value("istio_tcp_received_bytes_total", **labels) == len(payload)
        assert w.value("istio_tcp_sent_bytes_total", **labels) == len(payload)
        assert w.value("istio_tcp_connections_closed_total", **labels) == 1
    node(body)


def test_half_close_from_the_server_first(node):
    """The app sends and ends its side first; the client still sends after that."""
    got = []

    async def greeter(reader, writer):
        writer.write(b"hello " * 1000)
        writer.write_eof()
        got.append(await reader.read(-1))

    async def body(w: World):
        async with Server(greeter) as app:
            reader, writer = await w.dial_out(app.address)
            assert await reader.read(-1) == b"hello " * 1000  # EOF with our side still open
            writer.write(b"after your FIN")
            writer.write_eof()
            await asyncio.wait_for(app.done.wait(), 10)
            writer.close()
            assert got == [b"after your FIN"] and app.errors == []
            await w.settled(flows=2)
        assert [f["verdict"] for f in w.flows()] == ["allowed", "allowed"]
    node(body)


def test_a_reset_is_passed_on_both_ways(node):
    async def body(w: World):
        holding = asyncio.Event()

        async def hold(reader, writer):
            writer.write(b"ready\n")
            holding.set()
            await reader.read(-1)  # the client's reset reaches us as ConnectionResetError

        async with Server(hold) as app:
            reader, writer = await w.dial_out(app.address)
            assert await reader.readline() == b"ready\n"
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            writer.transport.abort()  # the client resets
            await asyncio.wait_for(app.done.wait(), 10)
            assert app.errors == ["ConnectionResetError"]

        async def reset_me(reader, writer):
            writer.write(b"ready\n")
            await reader.readexactly(3)  # the client has "ready": a reset cannot overtake it
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            writer.transport.abort()  # the app resets

        async with Server(reset_me) as app:
            reader, writer = await w.dial_out(app.address)
            assert await reader.readline() == b"ready\n"
            writer.write(b"go\n")
            assert await ended(reader) == "reset"
            writer.close()
        await w.settled(flows=4)
    node(body)


def test_a_stream_revoked_by_a_policy_change_is_reset_and_reported_denied(node):
    async def body(w: World):
        await w.app.start()
        reader, writer = await w.dial_out(SERVICE)
        assert (await reader.readline()).startswith(CLIENT.encode())
        writer.write(b"before\n")
        assert await reader.readexactly(7) == b"before\n"
        w.apply(document("AuthorizationPolicy", "mesh", "deny-sleep", """
action: DENY
rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/sleep]}}]}]
"""))
        assert w.connections.recheck() == 1
        assert await ended(reader) == "reset"
        writer.close()
        await w.settled(flows=2)
        destination = next(f for f in w.flows() if f["reporter"] == "destination")
        assert (destination["verdict"], destination["response_flags"], destination["bytes_received"]) == (
            "denied", "DENY", 7)
        assert destination["reason"].startswith("no longer allowed")
        assert w.value("nodeagent_inbound_connections_revoked_total", reason="deny") == 1
        assert w.value("nodeagent_policy_denials_total", policy="mesh/deny-sleep") == 1
        assert len(w.connections) == 0
    node(body)


def test_a_destination_with_another_identity_is_refused_before_any_stream(node):
    async def body(w: World):
        await w.app.start()
        pool = w.hbone._pool(w.enrolled[CLIENT])
        identity = w.identities.of(w.model.pod_by_ip(CLIENT))
        await w.identities.ready(identity)
        with pytest.raises(TunnelError) as refused:
            await pool.open_stream(identity.uri, principal("mesh", "other"), (SERVER, w.tunnel_port), w.app.address)
        assert refused.value.reason == "identity_mismatch"
        assert w.value("nodeagent_hbone_handshake_failures_total", direction="outbound",
                       reason="identity_mismatch") == 1
        assert w.app.peers == [] and pool.connections() == 0
    node(body)


def test_streams_share_one_pooled_connection(node, engine):
    async def body(w: World):
        await w.app.start()
        held = [await w.dial_out(SERVICE) for _ in range(5)]
        for reader, _ in held:
            assert (await reader.readline()).startswith(CLIENT.encode())
        assert w.hbone.connections() == 1 and w.tunnel.connections() == 1
        assert w.value("nodeagent_hbone_streams", direction="outbound") == 5
        for reader, writer in held:
            writer.write_eof()
            assert await ended(reader) == "eof"
            writer.close()
        await w.settled(flows=10)
        assert w.hbone.connections() == 1  # kept for the next streams (idle timeout: minutes)
        assert w.value("nodeagent_hbone_streams", direction="outbound") == 0
        assert w.value("nodeagent_hbone_streams_opened_total", direction="inbound") == 5
        if engine == NATIVE_HBONE:
            assert w.hbone_engines.describe()["native"]["conns_total"] == 2  # one each side
    node(body)


def test_a_rotated_certificate_serves_new_connections(node, engine):
    """After rotation the next connection presents the new certificates (a new nh_tls per
    identity for the native engine) and carries streams as before."""
    async def body(w: World):
        await w.app.start()
        assert (await _exchange(w)).startswith(CLIENT)
        manager = w.identities.manager
        before = {identity: manager.current(identity) for identity in manager.identities}
        for identity in list(before):
            manager.forget(identity)  # as a rotation: fetched anew below
        w.identities.sync([w.model.pod_by_ip(ip) for ip in (CLIENT, SERVER)])
        await until(lambda: all(manager.current(i) not in (None, before[i]) for i in before), 10,
                    "new certificates")
        await w.hbone.release(w.enrolled[CLIENT])  # its pool closed: the next stream makes a new connection
        assert (await _exchange(w)).startswith(CLIENT)
        await w.settled(flows=4)
        if engine == NATIVE_HBONE:
            assert {i: creds for i, (creds, _) in w.hbone_engines._tls.items()} == {
                i: manager.current(i) for i in before}
            assert w.hbone_engines.describe()["native"]["conns_total"] == 4  # two each side
    node(body)


async def _exchange(w: World) -> str:
    """A connection to the service: the app's greeting, an echo, both half-closed."""
    reader, writer = await w.dial_out(SERVICE)
    greeting = (await reader.readline()).decode().strip()
    writer.write(b"ping\n")
    assert await reader.readexactly(5) == b"ping\n"
    writer.write_eof()
    assert await ended(reader) == "eof"
    writer.close()
    return greeting


async def _served(w: World, pool) -> None:
    """One stream through `pool` to the server pod's app: its greeting, then both half-closed."""
    stream = await w.open_stream(pool, w.app.address)
    greeting = b""
    while not greeting.endswith(b"\n"):
        greeting += await stream.read(64)
    assert greeting.decode().startswith(CLIENT + ":")
    stream.write_eof()
    assert await stream.read() == b""


def test_one_source_keeps_at_most_max_connections_per_source_open(tmp_path, monkeypatch, engine):
    """A client pod holding a valid certificate opens one connection after another to the
    server pod's HBONE port and keeps them: 3 stay open (max_connections_per_source), the
    4th is reset at accept and counted once, and once one of the 3 closes the 4th gets in.
    (Each open connection holds ~80 KiB and a slot the agent's own outbound connections
    share.)"""
    settings = TunnelSettings(max_connections_per_source=3, max_pending_handshakes_per_source=2)

    async def main():
        async with World(tmp_path, monkeypatch, engine=engine, tunnel=settings) as w:
            await w.app.start()
            budget = w.tunnel.server.handshakes
            pools = [await w.hbone_client() for _ in range(4)]
            for pool in pools[:3]:
                await _served(w, pool)
            assert budget.open_from(CLIENT) == 3 and w.tunnel.connections() == 3
            with pytest.raises(TunnelError):
                await _served(w, pools[3])
            assert w.value("nodeagent_hbone_limit_hits_total", direction="inbound",
                           limit="max_connections_per_source") == 1
            await pools[0].close()
            await until(lambda: budget.open_from(CLIENT) == 2, what="the closed connection to leave the budget")
            await _served(w, pools[3])
            assert budget.open_from(CLIENT) == 3 and w.tunnel.connections() == 3
    run(main(), timeout=120)


def test_over_its_memory_limit_the_agent_refuses_new_work_of_the_pods_over_their_share(
        tmp_path, monkeypatch, engine, caplog):
    """Over 90 % of its memory limit the agent takes nothing new for a local pod holding
    more than its share of what it relays (the mean of the pods holding any, and at least
    FAIR_FLOOR): the server pod, with 65 streams open against the client pod's one
    connection, gets no new HBONE connection (reset at accept, limit memory_limit), no new
    stream on an open one (503) and no plaintext inbound connection (reset, reason
    memory_limit), while the client pod's new connections get in; over 95 % nothing new
    gets in, whichever pod it is for. What is open goes on all along, and under 85 % again
    everything gets in. (The agent's memory is what the test says it is: reading it is
    tests/unit/test_memory.py's.)"""
    now, usage = [0.0], [0]
    memory = MemoryGuard(None, LOG, clock=lambda: now[0], read=lambda: usage[0], sockets=None)

    def holding(share: float) -> None:  # as if the agent, with a limit of 1 GiB, held `share` of it
        memory.limit = 1024 * MIB
        usage[0] = int(share * memory.limit)
        now[0] += 2 * INTERVAL  # the next accept reads again

    async def main():
        async with World(tmp_path, monkeypatch, engine=engine, memory=memory) as w:
            await w.app.start()
            legacy = await w.serve(LEGACY)
            first, second = await w.hbone_client(), await w.hbone_client()
            holding(0.5)
            await _served(w, first)
            streams = [await w.open_stream(first, w.app.address) for _ in range(FAIR_FLOOR + 1)]
            for stream in streams:
                assert (await _line(stream)).startswith(CLIENT.encode() + b":")
            kept = await w.dial_out(legacy.address)  # the client pod holds one connection
            assert (await _line(kept[0])).startswith(CLIENT.encode() + b":")
            holdings = memory.holdings
            assert (holdings.of(SERVER), holdings.of(CLIENT)) == (FAIR_FLOOR + 1, 1)

            holding(0.92)  # over the mark, under FULL
            with pytest.raises(TunnelError):  # a new HBONE connection to the server pod
                await _served(w, second)
            assert memory.over and memory.episodes == 1
            assert w.value("nodeagent_hbone_limit_hits_total", direction="inbound", limit="memory_limit") == 1
            assert (f"to the pod at {SERVER}, which holds {FAIR_FLOOR + 1} of the {FAIR_FLOOR + 2} connections "
                    "the agent relays") in caplog.text  # the accept budget's report names whom it refused for
            with pytest.raises(ConnectRefused) as refused:  # a new stream on the open connection
                await _served(w, first)
            assert refused.value.status == 503
            assert w.stream_refusals() == {("inbound", "memory_limit"): 1}
            steered = await w.dial(LEGACY, w.steer())  # plaintext inbound to the server pod
            assert await ended(steered[0]) == "reset"
            reader, writer = await w.dial_out(legacy.address)  # the client pod, under its share
            assert (await _line(reader)).startswith(CLIENT.encode() + b":")
            writer.write_eof()
            assert await ended(reader) == "eof"
            assert w.failures() == {("inbound", "memory_limit"): 1}

            holding(0.96)  # FULL: nothing new, whichever pod
            refused_out = await w.dial_out(legacy.address)
            assert await ended(refused_out[0]) == "reset"
            assert w.failures() == {("inbound", "memory_limit"): 1, ("outbound", "memory_limit"): 1}
            streams[0].write(b"still here\n")  # what is open goes on
            assert await _line(streams[0]) == b"still here\n"
            kept[1].write(b"me too\n")
            assert await _line(kept[0]) == b"me too\n"

            holding(0.875)  # between 85 and 90 %: still over the mark, the server pod still over its share
            with pytest.raises(TunnelError):
                await _served(w, second)
            assert w.value("nodeagent_hbone_limit_hits_total", direction="inbound", limit="memory_limit") == 2
            holding(0.7)
            await _served(w, second)
            await _served(w, first)
            assert not memory.over and memory.episodes == 1 and w.tunnel.connections() == 2
            reader, writer = await w.dial_out(w.app.address)  # through HBONE to the server pod
            assert (await _line(reader)).startswith(CLIENT.encode() + b":")
            writer.write_eof()
            assert await ended(reader) == "eof"
            assert w.failures() == {("inbound", "memory_limit"): 1, ("outbound", "memory_limit"): 1}
            for stream in streams:
                stream.write_eof()
                assert await stream.read() == b""
            kept[1].write_eof()
            assert await ended(kept[0]) == "eof"
            await until(lambda: holdings.total == 0, what="every connection to leave the holdings")
    run(main(), timeout=120)


async def _line(reader) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = await reader.read(1)
        assert chunk, f"ended after {line!r}"
        line += chunk
    return line


def test_a_pod_holds_at_most_max_connections_per_pod(tmp_path, monkeypatch, engine, caplog):
    """With max_connections_per_pod 3, the server pod holding 3 streams gets no 4th (503,
    pod_connection_limit) and no plaintext inbound connection (reset), while the client
    pod, holding 1, still connects out; one of the 3 ending lets the next in. The refusals
    are logged once per interval, naming the pod; the agent's memory plays no part."""
    memory = MemoryGuard(None, LOG, per_pod=3)

    async def main():
        async with World(tmp_path, monkeypatch, engine=engine, memory=memory) as w:
            await w.app.start()
            legacy = await w.serve(LEGACY)
            pool = await w.hbone_client()
            streams = [await w.open_stream(pool, w.app.address) for _ in range(3)]
            for stream in streams:
                assert (await _line(stream)).startswith(CLIENT.encode() + b":")
            kept = await w.dial_out(legacy.address)  # the client pod holds one connection
            assert (await _line(kept[0])).startswith(CLIENT.encode() + b":")
            assert (memory.holdings.of(SERVER), memory.holdings.of(CLIENT)) == (3, 1)

            with pytest.raises(ConnectRefused) as refused:
                await _served(w, pool)
            assert refused.value.status == 503
            assert w.stream_refusals() == {("inbound", "pod_connection_limit"): 1}
            steered = await w.dial(LEGACY, w.steer())  # plaintext inbound to the server pod
            assert await ended(steered[0]) == "reset"
            assert w.failures() == {("inbound", "pod_connection_limit"): 1}
            reader, writer = await w.dial_out(legacy.address)  # the client pod, under the cap
            assert (await _line(reader)).startswith(CLIENT.encode() + b":")
            writer.write_eof()
            assert await ended(reader) == "eof"
            assert caplog.text.count("the most one pod may (max_connections_per_pod)") == 1
            assert "holds 3 connections" in caplog.text

            streams[0].write_eof()  # one of the three ends: the next gets in
            assert await streams[0].read() == b""
            await until(lambda: memory.holdings.of(SERVER) == 2, what="the stream to leave the holdings")
            await _served(w, pool)
            assert w.stream_refusals() == {("inbound", "pod_connection_limit"): 1}
            assert not memory.over and memory.episodes == 0
            for stream in streams[1:]:
                stream.write_eof()
                assert await stream.read() == b""
            kept[1].write_eof()
            assert await ended(kept[0]) == "eof"
            await until(lambda: memory.holdings.total == 0, what="every connection to leave the holdings")
    run(main())
