"""The source side's native HBONE pool (agent/proxy/native_outbound.NativePool) given the
client's socket, as the outbound relay opens its streams: the engine gets a copy of the
socket with the CONNECT and relays it from the 200 on, with no round through the event
loop between the answer and the client's first bytes, which it sends (peeked) with the
CONNECT. Against the Python HBONE server on
loopback: byte-identical both ways with half-close and the client's FIN passed on as a
FIN; a refused CONNECT leaves the socket unread to the caller, which resets it; a stream
the server never processed (it drains: REFUSED_STREAM) is retried on a new connection
with the same socket, whose SO_LINGER is as it was before the engine reset its first copy; and a stream opened without the socket still takes it at `carry`.

Without the built module the tests skip on a developer machine and fail under CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest
from prometheus_client import CollectorRegistry

from engines import require_native_hbone
from hbone_certs import AUTHORITY, LOG, Loopback, pki, run  # noqa: F401 (pki is a fixture)
from nodeagent.agent.proxy.hbone_native import HboneEngines
from nodeagent.agent.proxy.native_outbound import NativePool
from nodeagent.resets import LINGER_DEFAULT, reset
from nodeagent.tunnel import ConnectRefused, ResponseTimeout, TunnelMetrics
from identity_fixtures import until
from nodeagent.tunnel import TunnelSettings
from test_native_hbone import NativeServer, engine, exchange, pair


@pytest.fixture(autouse=True)
def built():
    require_native_hbone()


@contextlib.asynccontextmanager
async def native_pool(pki, server: Loopback | NativeServer, settings: TunnelSettings = TunnelSettings()):
    """A NativePool of the client workload to `server`, on an engine of its own;
    `pool.sockets` counts the TCP connections it made."""
    engines = HboneEngines("native", LOG)
    await engines.start()
    metrics = TunnelMetrics(CollectorRegistry())

    def connect(ip: str, port: int) -> socket.socket:
        pool.sockets += 1
        return socket.socket()
    pool = NativePool(engines, connect, lambda source: engines.tls(pki.client), metrics=metrics, log=LOG,
                      settings=settings)
    pool.sockets = 0
    try:
        yield pool
    finally:
        await pool.close()
        engines.close()


async def open_for(pool: NativePool, pki, server: Loopback | NativeServer, agent: socket.socket | None):
    return await pool.open_stream(pki.client.identity.uri, pki.server.identity.uri, server.address, AUTHORITY,
                                  sock=agent)


@pytest.mark.parametrize("with_socket", [True, False], ids=["copy-at-open", "socket-at-carry"])
def test_a_stream_relays_the_client_byte_identical_and_ends_with_fin(pki, with_socket):
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def main():
        async with Loopback(pki) as lb, native_pool(pki, lb) as pool:
            app, agent = pair()
            early = b"GET / HTTP/1.1\r\n\r\n"  # waiting in the socket before the CONNECT is answered
            app.send(early)
            stream = await open_for(pool, pki, lb, agent if with_socket else None)
            assert stream.holds_copy is with_socket
            carried = asyncio.create_task(stream.carry(agent))
            got = await exchange(app, payload)
            assert got == early + payload  # the echo server: FIN passed on, its FIN back
            result = await carried
            assert (result.a_to_b, result.b_to_a, result.error) == (len(early + payload),) * 2 + (None,)
            assert agent.fileno() == -1  # the caller's copy is closed (or was handed over)
            app.close()
    run(main(), timeout=120)


def test_a_refused_connect_leaves_the_socket_unread_to_the_caller(pki):
    async def refuse(info, reader, writer):
        writer.respond(403)

    async def main():
        async with Loopback(pki, refuse) as lb, native_pool(pki, lb) as pool:
            app, agent = pair()
            app.send(b"ping")
            with pytest.raises(ConnectRefused) as refused:
                await open_for(pool, pki, lb, agent)
            assert refused.value.status == 403
            assert agent.recv(4, socket.MSG_PEEK) == b"ping"  # nothing of it was read
            reset(agent)  # as the outbound relay's _fail does
            loop = asyncio.get_running_loop()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(loop.sock_recv(app, 1), 10)
            app.close()
    run(main())


def test_the_first_bytes_reach_the_server_before_it_answers(pki):
    """The client's first bytes go with the CONNECT: a server that reads before it answers
    gets them (with an engine that read only after the 200 it waited forever), and once
    answered the rest follows in order; the stream counts each byte once."""
    seen = []

    async def read_then_echo(info, reader, writer):
        seen.append(await reader.readexactly(len(b"GET / HTTP/1.1\r\n\r\n")))
        writer.respond(200)
        writer.write(seen[0])
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()

    async def main():
        async with Loopback(pki, read_then_echo) as lb, native_pool(pki, lb) as pool:
            app, agent = pair()
            early = b"GET / HTTP/1.1\r\n\r\n"
            app.send(early)
            stream = await asyncio.wait_for(open_for(pool, pki, lb, agent), 10)
            assert seen == [early]
            carried = asyncio.create_task(stream.carry(agent))
            payload = os.urandom(200_000)
            assert await exchange(app, payload) == early + payload
            result = await carried
            assert (result.a_to_b, result.b_to_a, result.error) == (len(early + payload),) * 2 + (None,)
            app.close()
    run(main(), timeout=60)


def test_a_refused_connect_saw_the_first_bytes_but_the_socket_keeps_them(pki):
    """Refused after reading what came with the CONNECT: the bytes are still the caller's
    (peeked, not read) and the stream reports none sent."""
    seen = []

    async def read_then_refuse(info, reader, writer):
        seen.append(await reader.readexactly(4))
        writer.respond(403)

    async def main():
        async with Loopback(pki, read_then_refuse) as lb, native_pool(pki, lb) as pool:
            app, agent = pair()
            app.send(b"ping")
            with pytest.raises(ConnectRefused):
                await asyncio.wait_for(open_for(pool, pki, lb, agent), 10)
            assert seen == [b"ping"]
            assert agent.recv(8, socket.MSG_PEEK) == b"ping"
            app.close()
            agent.close()
    run(main())


def test_a_stream_the_server_never_processed_is_retried_with_the_same_socket(pki):
    """The server drains (REFUSED_STREAM for new streams): the engine reset its copy of the
    socket, which it never read; the pool undoes that reset's SO_LINGER and opens again on
    a new connection."""
    async def main():
        async with Loopback(pki) as lb, native_pool(pki, lb) as pool:
            first_app, first = pair()
            held = await open_for(pool, pki, lb, first)  # keeps the first connection open
            carried = asyncio.create_task(held.carry(first))
            (session,) = lb.server.sessions
            session.drain()
            app, agent = pair()
            app.send(b"before ")
            stream = await open_for(pool, pki, lb, agent)
            assert pool.sockets == 2  # answered on a second connection
            # SO_LINGER as it was: the first copy's reset would otherwise end this one with RST
            assert agent.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == LINGER_DEFAULT
            assert lb.value("nodeagent_hbone_streams_refused_total", direction="inbound", reason="draining") == 1
            result = asyncio.create_task(stream.carry(agent))
            assert await exchange(app, b"after") == b"before after"
            assert (await result).error is None
            app.close()
            assert await exchange(first_app, b"old") == b"old"
            await carried
            first_app.close()
    run(main(), timeout=60)


def test_a_connect_still_unsent_when_the_server_drains_is_retried(pki):
    """The native server takes one stream at a time, so the second CONNECT on the pooled
    connection waits unsent in the client's nghttp2 when the server drains (GOAWAY at once,
    closed once its stream is done): the pool opens it again on a new connection, with the
    same socket and the bytes the client sent before, rather than failing the client."""
    async def main():
        async with engine(TunnelSettings(max_concurrent_streams=1)) as eng, NativeServer(eng, pki) as srv:
            async with native_pool(pki, srv) as pool:
                first_app, first = pair()
                held = await open_for(pool, pki, srv, first)
                carried = asyncio.create_task(held.carry(first))
                app, agent = pair()
                app.send(b"before ")
                opening = asyncio.create_task(open_for(pool, pki, srv, agent))
                client_engine = pool.engines.engine
                await until(lambda: client_engine.stats()["streams_open"] == 2, what="the second CONNECT submitted")
                srv.conns[0].close()
                assert await exchange(first_app, b"old") == b"old"
                await carried
                stream = await opening
                assert pool.sockets == 2  # answered on a second connection
                assert len(srv.requests) == 2  # the server saw it once, on the new connection
                result = asyncio.create_task(stream.carry(agent))
                assert await exchange(app, b"after") == b"before after"
                assert (await result).error is None
                first_app.close()
                app.close()
    run(main(), timeout=60)


def test_a_connect_not_answered_within_open_timeout_fails_and_is_reset(pki):
    """The server never answers: open_stream raises ResponseTimeout after open_timeout,
    counted (refused, reason timeout), and the stream is reset, so the server sees it
    go; a second open that its caller cancels resets its stream too, and no stream is
    left counted open."""
    async def main():
        async with engine() as eng, NativeServer(eng, pki, app="hold") as srv:
            async with native_pool(pki, srv, TunnelSettings(open_timeout=0.3)) as pool:
                app, agent = pair()
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(ResponseTimeout):
                    await open_for(pool, pki, srv, agent)
                assert 0.3 <= loop.time() - started < 5
                assert pool.metrics.streams_refused.labels(direction="outbound", reason="timeout")._value.get() == 1
                (held,) = srv.requests
                assert await asyncio.wait_for(held.cancelled, 10) == 8  # RST_STREAM CANCEL
                other_app, other = pair()
                opening = asyncio.create_task(open_for(pool, pki, srv, other))
                await until(lambda: len(srv.requests) == 2, what="the second CONNECT")
                opening.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await opening
                assert await asyncio.wait_for(srv.requests[1].cancelled, 10) == 8
                assert pool.metrics.streams.labels(direction="outbound")._value.get() == 0
                for sock in (app, agent, other_app, other):
                    sock.close()
    run(main(), timeout=60)
