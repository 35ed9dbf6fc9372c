"""HBONE end to end on loopback: pool -> server -> on_stream, data integrity, pooling,
half-close, back-pressure, push style through the agent's splice, idle, keepalive, GOAWAY."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from hbone_certs import AUTHORITY, Loopback, echo, pki, round_trip, run  # noqa: F401 (pki is a fixture)
from identity_fixtures import until
from nodeagent.agent.proxy.splice import _Pipe
from nodeagent.bench import hbone as bench
from nodeagent.tunnel import ConnectionLost, StreamReset, TunnelSettings
from nodeagent.tunnel.liveness import Liveness

MIB = 1024 * 1024


def test_small_echo_identities_headers_and_counts(pki):
    seen = []

    async def on_stream(info, reader, writer):
        seen.append((info, writer))
        await echo(info, reader, writer)

    async def main():
        async with Loopback(pki, on_stream) as lb:
            s = await lb.open(headers=[("baggage", "k8s.pod.name=frontend-0"), ("traceparent", "00-ab-cd-01")])
            await round_trip(s, b"ping" * 100)
            await asyncio.wait_for(s.wait_closed(), 5)
            info, server_stream = seen[0]
            assert info.peer_identity == pki.client.identity.uri  # the server sees the client's SPIFFE ID
            assert info.authority == AUTHORITY and info.peer_address[0] == "127.0.0.1"
            assert info.header("baggage") == "k8s.pod.name=frontend-0"
            assert info.header("traceparent") == "00-ab-cd-01"
            assert s.get_extra_info("peer_identity") == pki.server.identity.uri
            assert (s.bytes_sent, s.bytes_received) == (400, 400)
            assert (server_stream.bytes_received, server_stream.bytes_sent) == (400, 400)
            for direction in ("inbound", "outbound"):
                assert lb.value("nodeagent_hbone_streams_opened_total", direction=direction) == 1
                assert lb.value("nodeagent_hbone_connections", direction=direction) == 1
            await asyncio.sleep(0.05)
            assert lb.value("nodeagent_hbone_streams", direction="inbound") == 0
            assert lb.value("nodeagent_hbone_streams", direction="outbound") == 0
    run(main())


@pytest.mark.timeout(180)
def test_64_mib_through_one_stream_arrives_intact(pki):
    payload = os.urandom(64 * MIB)

    async def main():
        async with Loopback(pki) as lb:
            s = await lb.open()

            async def send():
                for i in range(0, len(payload), MIB):
                    s.write(payload[i:i + MIB])
                    await s.drain()
                s.write_eof()
            sender = asyncio.create_task(send())
            digest, total = hashlib.sha256(), 0
            while chunk := await s.read(4 * MIB):
                digest.update(chunk)
                total += len(chunk)
            await sender
            assert total == len(payload)
            assert digest.digest() == hashlib.sha256(payload).digest()
            assert s.bytes_sent == s.bytes_received == len(payload)
    run(main(), timeout=170)


def test_50_concurrent_streams_share_one_connection(pki):
    async def main():
        async with Loopback(pki) as lb:
            all_open = asyncio.Event()
            opened = []

            async def one(i):
                s = await lb.open()
                opened.append(s)
                if len(opened) == 50:
                    all_open.set()
                await all_open.wait()  # every stream is open at once before any data moves
                payload = f"stream {i};".encode() * (1000 + i)
                await round_trip(s, payload)
                return s.stream_id
            ids = await asyncio.gather(*(one(i) for i in range(50)))
            assert len(set(ids)) == 50
            assert lb.connects == 1  # exactly one TCP connection
            assert lb.pool.connections() == 1
            assert lb.value("nodeagent_hbone_connections", direction="inbound") == 1
            assert lb.value("nodeagent_hbone_streams_opened_total", direction="inbound") == 50
            assert lb.value("nodeagent_hbone_pool_connections") == 1
    run(main())


def test_stream_limit_opens_more_connections(pki):
    async def main():
        async with Loopback(pki, pool_kw={"max_streams_per_connection": 4}) as lb:
            streams = await asyncio.gather(*(lb.open() for _ in range(10)))
            assert lb.connects == 3 and lb.pool.connections() == 3
            assert lb.value("nodeagent_hbone_connections", direction="inbound") == 3
            for i, s in enumerate(streams):
                s.write(b"%d" % i)
                s.write_eof()
            assert [await s.read() for s in streams] == [b"%d" % i for i in range(10)]
    run(main())


def test_half_close_both_ways(pki):
    async def main():
        late = asyncio.Queue()

        async def on_stream(info, reader, writer):
            writer.respond(200)
            if info.authority[1] == 1:  # client closes first: answer after its EOF
                request = await reader.read()
                writer.write(b"got " + request)
                writer.write_eof()
            else:  # server closes first: keep reading what the client still sends
                writer.write(b"hello")
                writer.write_eof()
                await late.put(await reader.read())

        async with Loopback(pki, on_stream) as lb:
            s = await lb.open(authority=("10.0.0.1", 1))
            s.write(b"question")
            s.write_eof()
            assert await s.read() == b"got question"
            await asyncio.wait_for(s.wait_closed(), 5)

            s = await lb.open(authority=("10.0.0.1", 2))
            assert await s.read() == b"hello" and s.at_eof()
            s.write(b"late data")  # our direction is still open
            s.write_eof()
            assert await asyncio.wait_for(late.get(), 5) == b"late data"
            await asyncio.wait_for(s.wait_closed(), 5)
    run(main())


def test_back_pressure_bounds_buffering_and_spares_other_streams(pki):
    settings = TunnelSettings(stream_window=64 * 1024, connection_window=MIB, write_buffer=64 * 1024)
    total = 8 * MIB

    async def main():
        release = asyncio.Event()
        server_streams = {}

        async def on_stream(info, reader, writer):
            server_streams[info.authority[1]] = writer
            if info.authority[1] == 1:  # the slow app: reads nothing until released
                writer.respond(200)
                await release.wait()
                data = await reader.read()
                writer.write(hashlib.sha256(data).digest())
                writer.write_eof()
            else:
                await echo(info, reader, writer)

        async with Loopback(pki, on_stream, settings=settings) as lb:
            slow = await lb.open(authority=("10.0.0.1", 1))
            payload = os.urandom(total)

            async def send():
                for i in range(0, total, 256 * 1024):
                    slow.write(payload[i:i + 256 * 1024])
                    await slow.drain()
                slow.write_eof()
            sender = asyncio.create_task(send())
            await asyncio.sleep(0.5)
            assert not sender.done()  # drain() holds the writer
            assert slow.bytes_sent <= 64 * 1024  # the peer's stream window
            assert slow.get_write_buffer_size() <= 64 * 1024 + 256 * 1024
            assert server_streams[1].bytes_received <= 64 * 1024
            fast = await lb.open(authority=("10.0.0.1", 2))  # same connection, still flows
            await round_trip(fast, b"x" * 300_000)
            assert lb.connects == 1
            release.set()
            await sender
            assert await slow.read() == hashlib.sha256(payload).digest()
    run(main())


def test_push_style_through_the_agent_splice(pki):
    """The agent's splice drives an attached stream like a socket transport."""
    size = 4 * MIB

    async def main():
        loop = asyncio.get_running_loop()

        async def app(reader, writer):  # the pod's app: an echo server
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
        app_server = await asyncio.start_server(app, "127.0.0.1", 0)
        results = []

        async def on_stream(info, reader, writer):
            upstream = await loop.run_in_executor(
                None, socket.create_connection, app_server.sockets[0].getsockname())
            writer.respond(200)
            pipe = _Pipe(loop)  # what splice() does, with the stream attached in place of a socket
            await loop.connect_accepted_socket(lambda: pipe.a, sock=upstream)
            writer.attach(pipe.b)
            results.append(await pipe.done)

        try:
            async with Loopback(pki, on_stream) as lb:
                s = await lb.open()
                payload = os.urandom(size)

                async def send():
                    s.write(payload)
                    await s.drain()
                    s.write_eof()
                sender = asyncio.create_task(send())
                assert await s.read() == payload
                await sender
                await asyncio.wait_for(s.wait_closed(), 5)
                await until(lambda: results, 5, "the splice to finish")
                assert (results[0].a_to_b, results[0].b_to_a, results[0].error) == (size, size, None)
        finally:
            app_server.close()
            await app_server.wait_closed()
    run(main())


def test_idle_connection_is_closed_and_replaced(pki):
    async def main():
        async with Loopback(pki, pool_kw={"idle_timeout": 0.3}) as lb:
            s = await lb.open()
            s.write_eof()
            assert await s.read() == b""
            await asyncio.wait_for(s.wait_closed(), 5)
            await until(lambda: lb.pool.connections() == 0 and not lb.value(
                "nodeagent_hbone_connections", direction="inbound"), 5, "the idle connection to close")
            assert lb.value("nodeagent_hbone_pool_connections") == 0
            assert lb.value("nodeagent_hbone_connections", direction="outbound") == 0
            assert lb.value("nodeagent_hbone_connections", direction="inbound") == 0
            s = await lb.open()
            await round_trip(s, b"again")
            assert lb.connects == 2
    run(main())


def test_keepalive_keeps_a_quiet_healthy_connection(pki, monkeypatch):
    # PINGs every 0.05 s of silence; the timeout is generous, so a slow machine answering
    # late is not taken for a dead peer (test_hbone_refusals checks that a silent one is).
    settings = TunnelSettings(keepalive_interval=0.05, keepalive_timeout=30)
    pongs = []
    answered = Liveness.pong

    def pong(liveness: Liveness) -> None:  # counts PING answers, either side
        pongs.append(liveness)
        answered(liveness)
    monkeypatch.setattr(Liveness, "pong", pong)

    async def main():
        async with Loopback(pki, settings=settings) as lb:
            s = await lb.open()
            await until(lambda: len(pongs) >= 20, 30, "20 PINGs answered")  # many rounds, no data
            await round_trip(s, b"still here")
            assert lb.value("nodeagent_hbone_connection_errors_total", direction="inbound",
                            reason="keepalive_timeout") == 0
            assert lb.connects == 1
    run(main())


def test_draining_server_refuses_new_streams_and_pool_moves_on(pki):
    async def main():
        async with Loopback(pki) as lb:
            old = await lb.open()
            (session,) = lb.server.sessions
            session.drain()  # graceful: REFUSED_STREAM for new streams, GOAWAY when the old one ends
            new = await lb.open()  # retried on a second connection
            assert lb.connects == 2
            for s, word in ((old, b"old"), (new, b"new")):
                await round_trip(s, word)  # the old stream finished on the draining connection
            await asyncio.wait_for(session.closed, 5)
            assert lb.value("nodeagent_hbone_streams_refused_total", direction="inbound", reason="draining") == 1
            assert lb.value("nodeagent_hbone_streams_opened_total", direction="outbound") == 2
    run(main())


def test_goaway_ends_the_connection_and_pool_opens_a_new_one(pki):
    async def main():
        async with Loopback(pki) as lb:
            s = await lb.open()
            (session,) = lb.server.sessions
            session.goaway()  # h2 ends every stream on GOAWAY (python-hyper/h2#1181)
            with pytest.raises(ConnectionLost, match="GOAWAY"):
                await asyncio.wait_for(s.read(), 5)
            await until(lambda: lb.pool.connections() == 0, 5, "the pool to drop the connection")
            s = await lb.open()
            await round_trip(s, b"fresh")
            assert lb.connects == 2
    run(main())


@pytest.mark.parametrize("eof_first", [False, True])
def test_close_while_the_peer_sends_stops_it_and_frees_the_windows(pki, eof_first):
    settings = TunnelSettings(stream_window=256 * 1024, connection_window=MIB)

    async def main():
        outcome = asyncio.get_running_loop().create_future()

        async def on_stream(info, reader, writer):
            if info.authority[1] != 1:
                return await echo(info, reader, writer)
            writer.respond(200)
            try:
                while True:  # a server that would stream forever
                    writer.write(b"z" * 65536)
                    await writer.drain()
            except Exception as exc:
                outcome.set_result(exc)
                raise

        async with Loopback(pki, on_stream, settings=settings) as lb:
            s = await lb.open(authority=("10.0.0.1", 1))
            if eof_first:
                s.write_eof()  # our END_STREAM is out before close()
            assert await s.read(1000)
            s.close()  # END_STREAM, then RST_STREAM NO_ERROR: "stop sending"
            await asyncio.wait_for(s.wait_closed(), 5)
            exc = await asyncio.wait_for(outcome, 5)
            assert isinstance(exc, StreamReset) and exc.error_code == 0  # like EPIPE, not a hang
            # Whatever was in flight was given back to the connection window: 4 x the window flows.
            await round_trip(await lb.open(), os.urandom(4 * MIB))
            assert lb.connects == 1
    run(main())


@pytest.mark.timeout(120)
def test_bench_runs_and_prints_the_three_paths_side_by_side(capsys):
    assert bench.main(["--round-trips", "50", "--megabytes", "4"]) == 0
    out = capsys.readouterr().out
    assert "direct TCP" in out and "TLS 1.3 only" in out and "HBONE" in out
    rows = [line for line in out.splitlines() if line.startswith(("round trip", "throughput"))]
    assert len(rows) == 4
    for row in rows:
        values = [float(v) for v in row.split()[-3:]]
        assert all(v > 0 for v in values), row


def test_ipv6_destination_and_authority(pki):
    seen = []

    async def on_stream(info, reader, writer):
        seen.append(info)
        await echo(info, reader, writer)

    async def main():
        async with Loopback(pki, on_stream, host="::1") as lb:
            s = await lb.open(authority=("fd00:10:244::5", 9080))
            await round_trip(s, b"six")
            assert seen[0].authority == ("fd00:10:244::5", 9080)
            assert seen[0].peer_address[0] == "::1" and seen[0].local_address[0] == "::1"
    run(main())
