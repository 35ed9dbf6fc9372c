"""What the native HBONE engine (native/hbone.c) needs beyond test_native_hbone.py to stand
in for the Python path in the agent: keepalive PINGs (an answered PING keeps a quiet
connection, an unanswered one ends it as `keepalive`), the idle timeout of connections
without streams (client and server side), a client stream opened before its socket
(the answer first, then `carry(sock)`, as the agent's outbound relay needs it), the
client's reset of a request the agent has not answered yet (`request.cancelled`), the
client's and the server's own handshake timeouts, and a peer's protocol error after the
preface ending the connection as one.
On loopback, certificates from hbone_certs.Pki; skipped without the built module, failed
under CI (test_native_hbone.py's `built` rule).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time

import pytest

from engines import ci_enabled
from hbone_certs import pki, run  # noqa: F401 (pki is a fixture)
from identity_fixtures import until
from nodeagent import native
from nodeagent.native.hbone import HboneFailed
from nodeagent.agent.proxy.splice import Abort
from nodeagent.tunnel import TunnelSettings
from test_native_hbone import AUTH, NativeServer, drained, engine, exchange, native_client, pair, pool

QUICK = TunnelSettings(keepalive_interval=0.1, keepalive_timeout=0.3)


@pytest.fixture(autouse=True)
def built():
    from nodeagent.native import hbone as nh
    try:
        nh.load()
    except native.NativeUnavailable as exc:
        if ci_enabled():
            pytest.fail(f"CI: {exc}", pytrace=False)
        pytest.skip(str(exc))


class Cable:
    """A TCP forwarder between a client and `target` that can be cut (`cut = True`: bytes
    are read and dropped both ways, as a frozen peer or a dead link would), counting what
    it forwarded."""

    def __init__(self, target):
        self.target, self.cut, self.forwarded = target, False, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.tasks: set[asyncio.Task] = set()

    async def __aenter__(self):
        self.tasks.add(asyncio.create_task(self._accept()))
        return self

    async def __aexit__(self, *exc):
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.listener.close()

    async def _accept(self):
        loop = asyncio.get_running_loop()
        a, _ = await loop.sock_accept(self.listener)
        b = socket.create_connection(self.target)
        b.setblocking(False)
        for src, dst in ((a, b), (b, a)):
            self.tasks.add(asyncio.create_task(self._pump(src, dst)))

    async def _pump(self, src, dst):
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(src, 65536):
                if not self.cut:
                    self.forwarded += len(data)
                    await loop.sock_sendall(dst, data)
        finally:
            src.close()
            dst.close()


def test_keepalive_pings_keep_a_quiet_connection_and_end_a_silent_one(pki):
    """No stream for 1 s (> keepalive_timeout): PINGs and their answers cross the cable
    and the connection stays up; once the cable drops everything, the connection ends
    `keepalive` within interval + timeout (+ a tick)."""
    async def main():
        # The server in an engine of its own with the default keepalive, so only the client's ends it.
        async with engine(QUICK) as eng, engine() as server_engine, NativeServer(server_engine, pki) as srv, \
                Cable(srv.address) as cable:
            conn = await native_client(eng, pki, cable.address)
            before = cable.forwarded
            await asyncio.sleep(1.0)
            assert not conn.closed.done() and cable.forwarded > before  # PINGs, answered
            app, theirs = pair()
            stream = conn.open(theirs, AUTH)
            assert await stream.response == 200
            assert await exchange(app, b"still works") == b"still works"
            app.close()
            cable.cut = True
            cut_at = time.monotonic()
            end = await asyncio.wait_for(conn.closed, 2.0)
            assert (end.how, end.reason) == ("keepalive", "no answer to PING within 300 ms")
            assert 0.3 <= time.monotonic() - cut_at <= 1.0
            await drained(eng)
    run(main())


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_connection_without_streams_closes_after_its_idle_time(pki, side):
    """A stream held open past the idle time keeps the connection; once it ends, the idle
    side sends GOAWAY and both ends close cleanly (`closed`), the client's within the idle
    time and a tick."""
    idle = {"client_idle": 0.3} if side == "client" else {"server_idle": 0.3}

    async def main():
        async with engine(**idle) as eng, NativeServer(eng, pki) as srv:
            conn = await native_client(eng, pki, srv.address)
            app, theirs = pair()
            stream = conn.open(theirs, AUTH)
            assert await stream.response == 200
            await asyncio.sleep(0.6)
            assert not conn.closed.done()  # busy: never idle
            assert await exchange(app, b"x" * 1000) == b"x" * 1000
            app.close()
            assert (await stream.ended).how == "closed"
            idle_from = time.monotonic()
            end = await asyncio.wait_for(conn.closed, 2.0)
            assert end.how == "closed" and 0.25 <= time.monotonic() - idle_from <= 1.0
            await drained(eng)
    run(main())


def test_a_stream_opened_before_its_socket_relays_what_came_first(pki):
    """open(None): the answer is known before the socket is given (the agent's outbound
    relay); the server's first bytes wait in the engine and arrive intact after `carry`,
    byte counts in the SpliceResult; a refusal is known without any socket; a socket
    given to a stream that has ended is reset."""
    payload = os.urandom(2 * 1024 * 1024 + 3)

    async def greeter(sock, request):
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(sock, b"hello\n")
        while data := await loop.sock_recv(sock, 1 << 20):
            await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)

    async def main():
        async with engine() as eng, NativeServer(eng, pki, app=greeter) as srv:
            conn = await native_client(eng, pki, srv.address)
            stream = conn.open(None, AUTH)
            assert await stream.response == 200
            await until(lambda: eng.stats()["bytes_held"] >= 6, what="the greeting held by the engine")
            app, theirs = pair()
            carried = asyncio.create_task(stream.carry(theirs))
            got = await exchange(app, payload)
            app.close()
            assert hashlib.sha256(got).digest() == hashlib.sha256(b"hello\n" + payload).digest()
            result = await carried
            assert (result.a_to_b, result.b_to_a, result.error) == (len(payload), len(payload) + 6, None)

            srv.app = None  # refuses 503
            refused = conn.open(None, AUTH)
            assert await refused.response == 503
            assert ((await refused.ended).how, refused.ended.result().status) == ("refused", 503)

            srv.app = "hold"
            held = conn.open(None, AUTH)
            await until(lambda: len(srv.requests) == 3, what="the third request")
            srv.requests[-1].accept(pair()[1])
            assert await held.response == 200
            held.reset()
            assert (await held.ended).how == "aborted"
            app, theirs = pair()
            result = await held.carry(theirs)  # the stream is gone: its socket is reset
            app.setblocking(True)
            with pytest.raises(ConnectionResetError):
                app.recv(1)
            app.close()
            conn.close()
            await drained(eng)
    run(main())


def test_abort_before_carry_resets_the_socket_as_it_starts(pki):
    """A policy revocation (splice.Abort) that came before the socket: the stream and the
    socket are reset at once, nothing relayed."""
    async def main():
        async with engine() as eng, NativeServer(eng, pki) as srv:
            conn = await native_client(eng, pki, srv.address)
            stream = conn.open(None, AUTH)
            assert await stream.response == 200
            abort = Abort()
            abort()
            app, theirs = pair()
            result = await stream.carry(theirs, abort)
            assert (result.a_to_b, result.b_to_a, result.error) == (0, 0, None)
            app.setblocking(True)
            with pytest.raises(ConnectionResetError):
                app.recv(1)
            app.close()
            conn.close()
            await drained(eng)
    run(main())


def test_a_request_reset_before_the_answer_is_reported_cancelled(pki):
    """The Python pool opens a CONNECT and resets it while the native server's app is
    still being reached: `request.cancelled` says so (the agent stops connecting to the
    app), and the late answer ends the stream as reset."""
    async def main():
        async with engine() as eng, NativeServer(eng, pki, app="hold") as srv:
            client = pool(pki)
            opening = asyncio.create_task(client.open_stream("source", pki.server.identity.uri, srv.address,
                                                             ("10.244.1.5", 8080)))
            await until(lambda: srv.requests, what="the request")
            request = srv.requests[0]
            opening.cancel()  # the pool resets the stream it gave up on
            await asyncio.gather(opening, return_exceptions=True)
            await asyncio.wait_for(request.cancelled, 5.0)
            request.refuse(503)
            assert (await request.ended).how in ("refused", "reset")
            await client.close()
            await drained(eng)
    run(main())


def test_client_and_server_handshakes_have_their_own_timeouts(pki):
    """A client connection to a silent server waits `handshake_timeout` (the pool's), a
    server connection from a silent client `server_handshake_timeout`; one started later
    with a shorter timeout still ends first."""
    settings = TunnelSettings(handshake_timeout=1.5, server_handshake_timeout=0.3)

    async def main():
        async with engine(settings) as eng, NativeServer(eng, pki) as srv:
            silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
            started = time.monotonic()
            client = asyncio.create_task(native_client(eng, pki, silent.getsockname()))
            await asyncio.sleep(0.1)
            mute = socket.create_connection(srv.address)  # says nothing to the native server
            await until(lambda: srv.conns, what="the server connection")
            server_end = await asyncio.wait_for(srv.conns[0].closed, 5)
            assert server_end.how == "timeout" and time.monotonic() - started < 1.2
            with pytest.raises(HboneFailed) as failed:
                await asyncio.wait_for(client, 5)
            assert failed.value.end.how == "timeout" and 1.4 <= time.monotonic() - started < 3
            assert failed.value.end.reason == "no TLS handshake within 1500 ms"
            mute.close()
            silent.close()
            await drained(eng)
    run(main())


def test_a_protocol_error_after_the_preface_ends_the_connection_as_one(pki):
    """A valid preface and SETTINGS, then DATA on stream 0: nghttp2 answers GOAWAY
    PROTOCOL_ERROR itself, and the connection ends `protocol_error` (code 1), not `closed`."""
    import ssl

    async def main():
        async with engine() as eng, NativeServer(eng, pki) as srv:
            ctx = pki.client.ssl_context(False)
            ctx.set_alpn_protocols(["h2"])
            reader, writer = await asyncio.open_connection(*srv.address, ssl=ctx, server_hostname="127.0.0.1")
            assert isinstance(ctx, ssl.SSLContext)
            settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS
            data_on_zero = b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x"  # DATA, stream 0: a connection error
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + data_on_zero)
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
            await until(lambda: srv.conns and srv.conns[0].closed.done(), what="the connection's end")
            end = srv.conns[0].closed.result()
            assert (end.how, end.code) == ("protocol_error", 1) and "PROTOCOL_ERROR" in end.reason
            await drained(eng)
    run(main())
