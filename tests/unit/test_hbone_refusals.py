"""HBONE refusals on loopback: bad certificates and identities both ways, garbage and
broken HTTP/2, refused CONNECTs. Each is refused, typed and counted exactly once while a
healthy stream opened before it keeps working."""

from __future__ import annotations

import asyncio
import socket

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from hyperframe.frame import DataFrame, WindowUpdateFrame
from prometheus_client import CollectorRegistry

from hbone_certs import AUTHORITY, LOG, Loopback, TunnelMetrics, echo, pki, round_trip, run, verify  # noqa: F401
from identity_fixtures import until
from nodeagent.tunnel import (ConnectFailed, ConnectRefused, HandshakeFailed, HbonePool, IdentityMismatch, PoolClosed,
                              StreamReset, TunnelSettings)


async def healthy(lb: Loopback):
    """A stream opened before the misbehaviour (check it with `still_works`)."""
    s = await lb.open()
    s.write(b"before")
    assert await s.readexactly(6) == b"before"
    return s


async def still_works(s) -> None:
    await round_trip(s, b"after")


async def counted(lb: Loopback, name: str, **labels) -> float:
    """The counter, once it has moved (the server counts asynchronously)."""
    await until(lambda: lb.value(name, **labels), 5, f"{name}{labels} to move")
    return lb.value(name, **labels)


def stranger_pool(lb: Loopback, creds) -> HbonePool:
    ctx = lb.pki.context(creds, server_side=False)
    return HbonePool(lambda ip, port: socket.socket(), lambda source: ctx, verify,
                     metrics=TunnelMetrics(CollectorRegistry()), log=LOG)


@pytest.mark.parametrize("case, reason", [
    ("other_ca", "unknown_ca"), ("expired", "cert_expired"), ("wrong_spiffe_id", "identity"),
    ("no_certificate", "no_client_cert")])
def test_server_refuses_bad_client_certificates(pki, case, reason):
    creds = {"other_ca": lambda: pki.issue("default", "frontend", pki.foreign),
            "expired": lambda: pki.expired("default", "frontend"),
            "wrong_spiffe_id": lambda: pki.issue("default", "frontend", trust_domain="evil.example"),
            "no_certificate": lambda: None}[case]()

    async def main():
        async with Loopback(pki) as lb:
            good = await healthy(lb)
            stranger = stranger_pool(lb, creds)
            try:
                with pytest.raises(HandshakeFailed) as err:
                    await stranger.open_stream(pki.client.identity.uri, pki.server.identity.uri, lb.address, AUTHORITY)
                assert err.value.reason == "peer_closed"
            finally:
                await stranger.close()
            assert await counted(lb, "nodeagent_hbone_handshake_failures_total",
                                 direction="inbound", reason=reason) == 1
            await still_works(good)
            assert lb.value("nodeagent_hbone_connections", direction="inbound") == 1
    run(main())


def test_client_refuses_a_server_with_another_identity(pki):
    async def main():
        async with Loopback(pki) as lb:
            good = await healthy(lb)
            with pytest.raises(IdentityMismatch, match="expected spiffe://cluster.local/ns/default/sa/reviews, "
                                                       "got spiffe://cluster.local/ns/default/sa/backend"):
                await lb.open(dest_identity="spiffe://cluster.local/ns/default/sa/reviews")
            assert lb.value("nodeagent_hbone_handshake_failures_total", direction="outbound",
                            reason="identity_mismatch") == 1
            await still_works(good)
    run(main())


@pytest.mark.parametrize("case, reason", [("other_ca", "unknown_ca"), ("expired", "cert_expired")])
def test_client_refuses_bad_server_certificates(pki, case, reason):
    creds = pki.issue("default", "backend", pki.foreign) if case == "other_ca" else pki.expired("default", "backend")

    async def main():
        async with Loopback(pki, server_creds=creds) as lb:
            with pytest.raises(HandshakeFailed) as err:
                await lb.open()
            assert err.value.reason == reason
            assert lb.value("nodeagent_hbone_handshake_failures_total", direction="outbound", reason=reason) == 1
            assert lb.pool.connections() == 0
    run(main())


def test_garbage_bytes_on_the_port(pki):
    async def main():
        async with Loopback(pki) as lb:
            good = await healthy(lb)
            reader, writer = await asyncio.open_connection(*lb.address)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on us
            writer.close()
            assert await counted(lb, "nodeagent_hbone_handshake_failures_total",
                                 direction="inbound", reason="not_tls") == 1
            await still_works(good)
    run(main())


async def frames_until_closed(reader) -> list:
    """The server's HTTP/2 frames, parsed by a client-side h2 connection, until EOF."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    events = []
    while data := await asyncio.wait_for(reader.read(65536), 5):
        events += conn.receive_data(data)
    return events


def test_garbage_after_tls_gets_goaway_protocol_error(pki):
    async def main():
        async with Loopback(pki) as lb:
            good = await healthy(lb)
            reader, writer = await lb.raw_tls()
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            events = await frames_until_closed(reader)
            writer.close()
            goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert [e.error_code for e in goaway] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
            assert lb.value("nodeagent_hbone_connection_errors_total", direction="inbound", reason="bad_preface") == 1
            await still_works(good)
    run(main())


@pytest.mark.parametrize("cut", ["preface", "mid_frame"])
def test_truncated_http2_is_counted(pki, cut):
    async def main():
        async with Loopback(pki) as lb:
            good = await healthy(lb)
            reader, writer = await lb.raw_tls()
            if cut == "preface":
                writer.write(b"PRI * HTTP/2.0\r\n")
            else:
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                conn.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
                writer.write(conn.data_to_send()[:-5])  # the HEADERS frame without its last 5 bytes
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.close()
            assert await counted(lb, "nodeagent_hbone_connection_errors_total",
                                 direction="inbound", reason="truncated") == 1
            await still_works(good)
    run(main())


async def raw_request(lb: Loopback, headers) -> int:
    """Send one request over a fresh TLS connection with a bare h2 client; the status."""
    reader, writer = await lb.raw_tls()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=True)
    writer.write(conn.data_to_send())
    try:
        while data := await asyncio.wait_for(reader.read(65536), 5):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    return int(dict(event.headers)[b":status"])
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    raise AssertionError("no response")


def test_non_connect_method_and_malformed_authority(pki):
    async def main():
        async with Loopback(pki) as lb:
            good = await healthy(lb)
            get = [(":method", "GET"), (":scheme", "https"), (":authority", "10.0.0.1:80"), (":path", "/")]
            assert await raw_request(lb, get) == 405
            for authority in ("backend.default:80", "10.0.0.1", "10.0.0.1:99999", "::1:80"):
                assert await raw_request(lb, [(":method", "CONNECT"), (":authority", authority)]) == 400
            assert await raw_request(lb, [(":method", "CONNECT"), (":authority", "[::1]:80")]) == 200
            assert lb.value("nodeagent_hbone_streams_refused_total", direction="inbound", reason="bad_method") == 1
            assert lb.value("nodeagent_hbone_streams_refused_total", direction="inbound", reason="bad_authority") == 4
            await still_works(good)
    run(main())


@pytest.mark.parametrize("status", [401, 403, 503])
def test_refusal_status_is_a_typed_error_at_the_client(pki, status):
    async def on_stream(info, reader, writer):
        if info.authority[1] == 8080:
            return await echo(info, reader, writer)
        writer.respond(status)

    async def main():
        async with Loopback(pki, on_stream) as lb:
            good = await healthy(lb)
            with pytest.raises(ConnectRefused) as err:
                await lb.open(authority=("10.0.0.9", 9090))
            assert (err.value.status, err.value.authority) == (status, ("10.0.0.9", 9090))
            assert f"status {status}" in str(err.value)
            assert lb.value("nodeagent_hbone_streams_refused_total", direction="inbound",
                            reason=f"status_{status}") == 1
            assert lb.value("nodeagent_hbone_streams_refused_total", direction="outbound",
                            reason=f"status_{status}") == 1
            await still_works(good)
            assert lb.connects == 1  # a refused stream does not cost the connection
    run(main())


def test_handler_failure_answers_503_and_reset_after_200_is_typed(pki):
    async def on_stream(info, reader, writer):
        if info.authority[1] == 1:
            raise RuntimeError("policy engine exploded")
        writer.respond(200)
        await reader.readexactly(3)
        writer.abort()  # RST_STREAM CANCEL

    async def main():
        async with Loopback(pki, on_stream) as lb:
            with pytest.raises(ConnectRefused) as err:
                await lb.open(authority=("10.0.0.1", 1))
            assert err.value.status == 503
            assert lb.value("nodeagent_hbone_streams_refused_total", direction="inbound",
                            reason="handler_error") == 1
            s = await lb.open(authority=("10.0.0.1", 2))
            s.write(b"abc")
            with pytest.raises(StreamReset) as reset:
                await asyncio.wait_for(s.read(), 5)
            assert reset.value.error_code == 8
    run(main())


def test_connection_refused_is_typed_and_says_what_to_do(pki):
    async def main():
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            address = probe.getsockname()
        metrics = TunnelMetrics(CollectorRegistry())
        pool = HbonePool(lambda ip, port: socket.socket(), lambda source: None, verify, metrics=metrics, log=LOG)
        try:
            with pytest.raises(ConnectFailed, match="NetworkPolicy is blocking HBONE port 15008") as err:
                await pool.open_stream(pki.client.identity.uri, pki.server.identity.uri, address, AUTHORITY)
            assert err.value.reason == "connect_refused"
        finally:
            await pool.close()
    run(main())


def test_concurrent_opens_share_one_failed_attempt(pki):
    async def main():
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            address = probe.getsockname()
        calls = []

        def connect(ip, port):
            calls.append((ip, port))
            return socket.socket()
        registry = CollectorRegistry()
        pool = HbonePool(connect, lambda source: None, verify, metrics=TunnelMetrics(registry), log=LOG)
        try:
            results = await asyncio.gather(*(pool.open_stream(pki.client.identity.uri, pki.server.identity.uri, address, AUTHORITY)
                                             for _ in range(20)), return_exceptions=True)
            assert all(isinstance(r, ConnectFailed) for r in results)
            assert calls == [address]  # one attempt for the burst, not twenty
            assert registry.get_sample_value("nodeagent_hbone_handshake_failures_total",
                                             {"direction": "outbound", "reason": "connect_refused"}) == 1
            assert pool.connections() == 0
        finally:
            await pool.close()
    run(main())


def test_keepalive_closes_a_silent_peer(pki):
    settings = TunnelSettings(keepalive_interval=0.1, keepalive_timeout=0.3)

    async def main():
        async with Loopback(pki, settings=settings) as lb:
            good = await healthy(lb)
            reader, writer = await lb.raw_tls()
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            writer.write(conn.data_to_send())  # a valid start, then silence: PINGs go unanswered
            assert await asyncio.wait_for(reader.read(), 5) != b""  # it ends: SETTINGS, PING, GOAWAY
            writer.close()
            assert lb.value("nodeagent_hbone_connection_errors_total", direction="inbound",
                            reason="keepalive_timeout") == 1
            await still_works(good)  # answered its PINGs all along
    run(main())


def test_server_handshake_timeout_is_counted(pki):
    async def main():
        async with Loopback(pki, settings=TunnelSettings(server_handshake_timeout=0.3)) as lb:
            good = await healthy(lb)
            reader, writer = await asyncio.open_connection(*lb.address)  # TCP, then silence
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert await counted(lb, "nodeagent_hbone_handshake_failures_total",
                                 direction="inbound", reason="timeout") == 1
            await still_works(good)
    run(main())


def test_closing_the_pool_during_a_connect_gives_waiters_pool_closed(pki):
    async def main():
        with socket.socket() as mute:  # accepts TCP (backlog) but never speaks TLS
            mute.bind(("127.0.0.1", 0))
            mute.listen(8)
            ctx = pki.context(pki.client, server_side=False)
            pool = HbonePool(lambda ip, port: socket.socket(), lambda source: ctx, verify,
                             metrics=TunnelMetrics(CollectorRegistry()), log=LOG)
            opens = [asyncio.create_task(pool.open_stream(pki.client.identity.uri, pki.server.identity.uri,
                                                          mute.getsockname(), AUTHORITY)) for _ in range(3)]
            await until(lambda: pool.connections() == 1, 5, "the connection attempt")
            await pool.close()
            results = await asyncio.wait_for(asyncio.gather(*opens, return_exceptions=True), 5)
            assert [type(r) for r in results] == [PoolClosed] * 3
            assert pool.connections() == 0
    run(main())


@pytest.mark.parametrize("frame, code, reason", [
    (lambda: DataFrame(1, data=b"x" * (200 * 1024)), "FRAME_SIZE_ERROR", "frame_too_large"),  # > 128 KiB
    (lambda: WindowUpdateFrame(0, window_increment=0), "PROTOCOL_ERROR", "protocol_error")])
def test_bad_frames_get_goaway_with_their_error_code(pki, frame, code, reason):
    async def main():
        async with Loopback(pki) as lb:
            good = await healthy(lb)
            reader, writer = await lb.raw_tls()
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            writer.write(conn.data_to_send() + frame().serialize())
            events = await frames_until_closed(reader)
            writer.close()
            goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert [e.error_code for e in goaway] == [getattr(h2.errors.ErrorCodes, code)]
            assert lb.value("nodeagent_hbone_connection_errors_total", direction="inbound", reason=reason) == 1
            await still_works(good)
    run(main())
