"""The HBONE server's accept budget (issue 9.4) on loopback, with real TLS: connections
that never finish their handshake. Over `max_pending_handshakes` (the whole server) or
`max_pending_handshakes_per_source` (one client IP), a connection is reset at once and
counted, exactly; a valid client gets through once a slot frees, and one source at its
budget does not starve another. A silent or stalled peer is dropped at
`server_handshake_timeout`, and a pending handshake costs a few KB of Python memory
instead of asyncio's 256 KiB read buffer (which it gets back once TLS is up).

Clients come from several loopback addresses (127.0.0.2, 127.0.0.3, ...: all of 127/8
is local on Linux), so each is its own source.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import tracemalloc

import pytest
from prometheus_client import CollectorRegistry

from hbone_certs import AUTHORITY, LOG, Loopback, TunnelMetrics, pki, round_trip, run, verify  # noqa: F401
from identity_fixtures import until
from nodeagent.errors import ConfigError
from nodeagent.tunnel import ConnectFailed, HandshakeFailed, HbonePool, TunnelSettings
from nodeagent.tunnel.limits import LOG_INTERVAL

LIMIT_HITS = "nodeagent_hbone_limit_hits_total"
FAILURES = "nodeagent_hbone_handshake_failures_total"
TOTAL, PER_SOURCE = "max_pending_handshakes", "max_pending_handshakes_per_source"


async def silent(lb: Loopback, source: str) -> socket.socket:
    """A TCP connection from `source` that never sends a byte."""
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, lb.address)
    return sock


async def was_reset(sock: socket.socket) -> bool:
    """True when the server reset `sock` (RST); False on EOF."""
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 1), 5) != b""
    except ConnectionResetError:
        return True


def still_open(sock: socket.socket) -> bool:
    """Nothing received, no EOF, no reset: the server still holds it."""
    try:
        sock.recv(1)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello (ALPN h2) from a client that will never go on."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    out = ssl.MemoryBIO()
    hello = ctx.wrap_bio(ssl.MemoryBIO(), out)
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    return out.read()


def pool_from(lb: Loopback, source: str) -> HbonePool:
    """A mesh client with a valid certificate whose connections come from `source`."""
    def connect(ip: str, port: int) -> socket.socket:
        sock = socket.socket()
        sock.bind((source, 0))
        return sock
    return HbonePool(connect, lambda uri: lb.pki.client.ssl_context(False), verify,
                     metrics=TunnelMetrics(CollectorRegistry()), log=LOG)


async def valid_round_trip(lb: Loopback, pool: HbonePool) -> None:
    stream, _ = await pool.open_stream(lb.pki.client.identity.uri, lb.pki.server.identity.uri, lb.address,
                                       AUTHORITY)
    await round_trip(stream, b"through")


def pending(lb: Loopback) -> float:
    return lb.value("nodeagent_hbone_pending_handshakes", direction="inbound")


def test_over_the_server_budget_exactly_the_extra_connections_are_reset_and_counted(pki):
    """4 pending from two sources fill the server; 3 more (a third source) are reset at
    once, 3 counted; a valid client is refused while it is full and served once one of
    the silent connections has gone."""
    settings = TunnelSettings(max_pending_handshakes=4, max_pending_handshakes_per_source=2)

    async def main():
        async with Loopback(pki, settings=settings) as lb:
            held = [await silent(lb, ip) for ip in ("127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.3")]
            await until(lambda: lb.server.handshakes.pending == 4, 5, "4 pending handshakes")
            extra = [await silent(lb, "127.0.0.4") for _ in range(3)]
            assert [await was_reset(s) for s in extra] == [True] * 3
            assert lb.value(LIMIT_HITS, direction="inbound", limit=TOTAL) == 3
            assert lb.value(LIMIT_HITS, direction="inbound", limit=PER_SOURCE) == 0
            assert [still_open(s) for s in held] == [True] * 4
            assert pending(lb) == 4
            assert lb.value(FAILURES, direction="inbound", reason="timeout") == 0  # refused, not failed

            valid = pool_from(lb, "127.0.0.5")
            try:
                with pytest.raises((ConnectFailed, HandshakeFailed)):
                    await valid_round_trip(lb, valid)  # full: reset like any other
                assert lb.value(LIMIT_HITS, direction="inbound", limit=TOTAL) == 4
                held.pop().close()
                await until(lambda: lb.server.handshakes.pending == 3, 5, "the slot of the closed connection")
                await valid_round_trip(lb, valid)
                assert lb.value("nodeagent_hbone_connections", direction="inbound") == 1
            finally:
                await valid.close()
            assert lb.value(LIMIT_HITS, direction="inbound", limit=TOTAL) == 4
            for s in held + extra:
                s.close()
            await until(lambda: lb.server.handshakes.pending == 0, 5, "every slot back")
    run(main())


def test_a_source_over_its_budget_does_not_starve_another(pki):
    """127.0.0.2 holds its 3 slots; its next 5 are reset and counted as per-source, and
    a valid client from 127.0.0.1 is served meanwhile."""
    settings = TunnelSettings(max_pending_handshakes=8, max_pending_handshakes_per_source=3)

    async def main():
        async with Loopback(pki, settings=settings) as lb:
            held = [await silent(lb, "127.0.0.2") for _ in range(3)]
            await until(lambda: lb.server.handshakes.pending == 3, 5, "3 pending handshakes")
            extra = [await silent(lb, "127.0.0.2") for _ in range(5)]
            assert [await was_reset(s) for s in extra] == [True] * 5
            assert lb.value(LIMIT_HITS, direction="inbound", limit=PER_SOURCE) == 5
            assert lb.value(LIMIT_HITS, direction="inbound", limit=TOTAL) == 0

            valid = pool_from(lb, "127.0.0.1")
            try:
                await valid_round_trip(lb, valid)
            finally:
                await valid.close()
            assert [still_open(s) for s in held] == [True] * 3
            assert lb.value(LIMIT_HITS, direction="inbound", limit=PER_SOURCE) == 5
            for s in held + extra:
                s.close()
    run(main())


def test_silent_and_stalled_peers_are_dropped_at_the_handshake_timeout(pki):
    """One peer never speaks, one sends a ClientHello and stops: together they fill their
    source's budget (a third connection is reset), both are closed at
    `server_handshake_timeout`, counted as timeouts, and their slots come back: a valid
    client from the same address is then served."""
    settings = TunnelSettings(server_handshake_timeout=0.5, max_pending_handshakes_per_source=2)

    async def main():
        loop = asyncio.get_running_loop()
        async with Loopback(pki, settings=settings) as lb:
            mute = await silent(lb, "127.0.0.2")
            stalled = await silent(lb, "127.0.0.2")
            await loop.sock_sendall(stalled, client_hello())
            assert await asyncio.wait_for(loop.sock_recv(stalled, 65536), 5)  # the server's flight: TLS began
            third = await silent(lb, "127.0.0.2")
            assert await was_reset(third)
            assert not await was_reset(mute)  # EOF: closed at the deadline
            while await asyncio.wait_for(loop.sock_recv(stalled, 65536), 5):  # asyncio aborts the handshake
                pass
            await until(lambda: lb.value(FAILURES, direction="inbound", reason="timeout") == 2, 5, "2 timeouts")
            await until(lambda: lb.server.handshakes.pending == 0, 5, "both slots back")
            assert pending(lb) == 0
            valid = pool_from(lb, "127.0.0.2")
            try:
                await valid_round_trip(lb, valid)
            finally:
                await valid.close()
            assert lb.value(LIMIT_HITS, direction="inbound", limit=PER_SOURCE) == 1
            for s in (mute, stalled, third):
                s.close()
    run(main())


def test_a_pending_handshake_holds_a_few_kilobytes_of_python_memory(pki):
    """Python allocations per pending connection (tracemalloc; OpenSSL's own ~45 KB are
    not traced): silent ones hold a reader, those mid-handshake a 4 KiB read buffer and
    no HTTP/2 session. Both held asyncio's 256 KiB buffer (~280 KB each) before."""
    count = 100
    settings = TunnelSettings(max_pending_handshakes=2 * count, max_pending_handshakes_per_source=2 * count,
                              server_handshake_timeout=60.0)

    async def main():
        loop = asyncio.get_running_loop()
        hello = client_hello()
        async with Loopback(pki, settings=settings) as lb:
            gc.collect()
            tracemalloc.start()
            try:
                before = tracemalloc.get_traced_memory()[0]
                mute = [await silent(lb, "127.0.0.2") for _ in range(count)]
                await until(lambda: lb.server.handshakes.pending == count, 10, f"{count} pending")
                gc.collect()
                per_silent = (tracemalloc.get_traced_memory()[0] - before) / count
                before = tracemalloc.get_traced_memory()[0]
                talking = [await silent(lb, "127.0.0.3") for _ in range(count)]
                for sock in talking:
                    await loop.sock_sendall(sock, hello)
                for sock in talking:  # the server answered: it holds TLS state for each
                    assert await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
                gc.collect()
                per_handshake = (tracemalloc.get_traced_memory()[0] - before) / count
            finally:
                tracemalloc.stop()
            print(f"Python memory per pending connection: silent {per_silent:.0f} B, "
                  f"mid-handshake {per_handshake:.0f} B")
            assert per_silent < 8 * 1024
            assert per_handshake < 24 * 1024
            assert lb.value("nodeagent_hbone_connections", direction="inbound") == 0
            for sock in mute + talking:
                sock.close()
            await until(lambda: lb.server.handshakes.pending == 0, 10, "every slot back")
    run(main())


def test_the_read_buffer_grows_to_asyncios_once_tls_is_up(pki):
    """The lean handshake buffer must not cost throughput: once a connection is up, its
    TLS protocol reads 256 KiB at a time as asyncio's does (this reads asyncio's private
    state on purpose: tls._LeanTLS hooks asyncio's _on_handshake_complete)."""
    async def main():
        async with Loopback(pki) as lb:
            stream = await lb.open()
            await round_trip(stream, b"x" * 300_000)
            (session,) = lb.server.sessions
            tls_protocol = session.transport._ssl_protocol
            assert tls_protocol.max_size == 256 * 1024
            assert len(tls_protocol._ssl_buffer) == 256 * 1024
    run(main())


def test_refusals_are_logged_once_per_interval_with_their_count(pki, caplog):
    now = [1000.0]
    settings = TunnelSettings(max_pending_handshakes=2, max_pending_handshakes_per_source=1)

    async def main():
        async with Loopback(pki, settings=settings, server_kw={"clock": lambda: now[0]}) as lb:
            held = await silent(lb, "127.0.0.2")
            await until(lambda: lb.server.handshakes.pending == 1, 5, "1 pending")
            refused = [await silent(lb, "127.0.0.2") for _ in range(5)]
            assert [await was_reset(s) for s in refused] == [True] * 5
            now[0] += LOG_INTERVAL
            late = await silent(lb, "127.0.0.2")
            assert await was_reset(late)
            assert lb.value(LIMIT_HITS, direction="inbound", limit=PER_SOURCE) == 6
            for s in [held, late] + refused:
                s.close()

    with caplog.at_level(logging.WARNING, logger=LOG.name):
        run(main())
    reports = [r for r in caplog.records if "reset at accept" in r.msg]
    assert [r.args[0] for r in reports] == [1, 5]  # the first at once, then the 4 held back and the late one
    assert "max_pending_handshakes_per_source" in reports[0].getMessage()


@pytest.mark.parametrize("fields, where", [
    ({"max_pending_handshakes": 0}, "tunnel.max_pending_handshakes"),
    ({"max_pending_handshakes_per_source": -1}, "tunnel.max_pending_handshakes_per_source"),
    ({"server_handshake_timeout": 0}, "tunnel.server_handshake_timeout"),
    ({"max_pending_handshakes": 10, "max_pending_handshakes_per_source": 11},
     "tunnel.max_pending_handshakes_per_source")])
def test_bad_limits_fail_naming_the_setting(fields, where):
    with pytest.raises(ConfigError) as err:
        TunnelSettings(**fields)
    assert err.value.where == where


def test_connections_kept_open_are_bounded_per_source_and_in_all(pki):
    """Connections through TLS count until they close: 2 kept open from one source are its
    max_connections_per_source (a third from it is reset), 1 more from another makes
    max_inbound_connections (3), so a fourth source is reset too, each counted once; when
    one closes, the fourth source gets in."""
    settings = TunnelSettings(max_inbound_connections=3, max_connections_per_source=2,
                              max_pending_handshakes_per_source=2)

    async def main():
        async with Loopback(pki, settings=settings) as lb:
            a1, a2, a3, b, c = (pool_from(lb, ip) for ip in
                                ("127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.3", "127.0.0.4"))
            try:
                for pool in (a1, a2):
                    await valid_round_trip(lb, pool)
                assert lb.server.handshakes.open_from("127.0.0.2") == 2
                with pytest.raises(HandshakeFailed):
                    await valid_round_trip(lb, a3)
                assert lb.value(LIMIT_HITS, direction="inbound", limit="max_connections_per_source") == 1
                await valid_round_trip(lb, b)
                with pytest.raises(HandshakeFailed):
                    await valid_round_trip(lb, c)
                assert lb.value(LIMIT_HITS, direction="inbound", limit="max_inbound_connections") == 1
                assert lb.server.handshakes.open == 3 and len(lb.server.sessions) == 3
                await a1.close()
                await until(lambda: lb.server.handshakes.open == 2, what="the closed connection to leave the budget")
                await valid_round_trip(lb, c)
                assert lb.server.handshakes.open == 3
            finally:
                for pool in (a1, a2, a3, b, c):
                    await pool.close()
    run(main(), timeout=60)


def test_the_open_connection_limits_must_nest():
    with pytest.raises(ConfigError, match="max_connections_per_source"):
        TunnelSettings(max_inbound_connections=10, max_connections_per_source=20)
    with pytest.raises(ConfigError, match="max_pending_handshakes_per_source"):
        TunnelSettings(max_connections_per_source=10, max_pending_handshakes_per_source=20)
