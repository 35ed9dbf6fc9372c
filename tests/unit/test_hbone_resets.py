"""HTTP/2 rapid reset (CVE-2023-44487) on loopback: streams a client resets before,
during and after their delivery leave nothing open — not the app connection, not the
stream — and the per-connection limits hold: a stream counts against the cap until its
handler returns, and one reset too many within the window is GOAWAY ENHANCE_YOUR_CALM,
counted and logged once, while another connection never notices."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes

from hbone_certs import AUTHORITY, Loopback, pki, run  # noqa: F401 (pki is a fixture)
from identity_fixtures import until
from nodeagent.agent.proxy.splice import splice
from nodeagent.agent.proxy.tunnel_inbound import unless_reset
from nodeagent.tunnel import StreamReset, TunnelSettings
from test_hbone_refusals import healthy, still_works

CONNECT = [(":method", "CONNECT"), (":authority", "%s:%d" % AUTHORITY)]


class RawClient:
    """A bare h2 client on one TLS connection to the loopback server: it sends what the
    pool never would (streams reset right behind their HEADERS)."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.resets: dict[int, int] = {}  # stream id -> error code of the server's RST_STREAM
        self.goaway: h2.events.ConnectionTerminated | None = None

    @classmethod
    async def connect(cls, lb: Loopback) -> "RawClient":
        client = cls(*await lb.raw_tls())
        assert await client.ping()
        return client

    def open(self) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, CONNECT)
        return stream_id

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)

    def rapid_resets(self, count: int) -> list[int]:
        ids = []
        for _ in range(count):
            ids.append(self.open())
            self.reset(ids[-1])
        return ids

    async def ping(self) -> bool:
        """Send what is queued and a PING, and read until it is answered (the server has
        handled everything before it) or a GOAWAY comes; True unless a GOAWAY came."""
        self.conn.ping(os.urandom(8))
        self.writer.write(self.conn.data_to_send())
        acked = False
        while not acked and self.goaway is None:
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            assert data, "closed without GOAWAY"
            acked = self._receive(data)
        return self.goaway is None

    async def until_closed(self) -> None:
        """Read (keeping a GOAWAY) until the server closes the connection."""
        while data := await asyncio.wait_for(self.reader.read(65536), 10):
            self._receive(data)

    def _receive(self, data: bytes) -> bool:
        acked = False
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
            elif isinstance(event, h2.events.PingAckReceived):
                acked = True
        if self.goaway is None:
            self.writer.write(self.conn.data_to_send())
        return acked

    def close(self) -> None:
        self.writer.close()


async def app_server(outcomes: list):
    """The pod's app: records how each connection ended ('reset' or the bytes until EOF)."""
    async def app(reader, writer):
        try:
            outcomes.append(await reader.read())
        except ConnectionResetError:
            outcomes.append("reset")
        writer.close()
    return await asyncio.start_server(app, "127.0.0.1", 0)


def test_a_relay_started_for_a_stream_already_reset_resets_the_app_connection(pki):
    """Reset after delivery: the agent connected to the app while the RST arrived, then
    answers 200 and relays. The relay must end at once and reset the app connection
    (it waited forever: one agent socket and one app connection leaked per stream)."""
    async def main():
        loop = asyncio.get_running_loop()
        outcomes, results = [], []
        server = await app_server(outcomes)

        async def on_stream(info, reader, stream):
            await stream.wait_closed()  # the client's RST_STREAM is in
            upstream = socket.socket()
            upstream.setblocking(False)
            await loop.sock_connect(upstream, server.sockets[0].getsockname())
            stream.respond(200)
            results.append(await splice(upstream, stream))

        try:
            async with Loopback(pki, on_stream) as lb:
                client = await RawClient.connect(lb)
                client.rapid_resets(1)
                assert await client.ping()
                await until(lambda: results and outcomes, 10, "the relay to end and the app to see it")
                (result,) = results
                assert (result.a_to_b, result.b_to_a) == (0, 0)
                assert isinstance(result.error, StreamReset) and result.error.error_code == ErrorCodes.CANCEL
                assert outcomes == ["reset"]  # a RST where the client reset: not a clean end
                assert lb.value("nodeagent_hbone_streams_opened_total", direction="inbound") == 0
                assert lb.value("nodeagent_hbone_streams", direction="inbound") == 0
                client.close()
        finally:
            server.close()
            await server.wait_closed()
    run(main())


def test_a_reset_during_the_connect_cancels_it_and_closes_its_socket(pki):
    """Reset during delivery: the app has not accepted yet when the RST arrives; the
    connect is cancelled and its socket closed, and nothing is answered."""
    async def main():
        made, returned = [], []
        connecting = asyncio.Event()

        async def connect():  # as Delivery.connect: a socket, then an app that never accepts
            sock = socket.socket()
            made.append(sock)
            try:
                connecting.set()
                await asyncio.Event().wait()
            except BaseException:
                sock.close()
                raise

        async def on_stream(info, reader, stream):
            returned.append(await unless_reset(stream, connect()))

        async with Loopback(pki, on_stream) as lb:
            client = await RawClient.connect(lb)
            stream_id = client.open()
            assert await client.ping()
            await asyncio.wait_for(connecting.wait(), 10)
            client.reset(stream_id)
            assert await client.ping()
            await until(lambda: returned, 10, "the handler to give up the connect")
            assert returned == [None] and made[0].fileno() == -1  # cancelled, its socket closed
            (session,) = lb.server.sessions
            await until(lambda: session.serving == 0, 10, "the stream's handler to return")
            assert lb.value("nodeagent_hbone_streams", direction="inbound") == 0
            assert lb.value("nodeagent_hbone_streams_opened_total", direction="inbound") == 0
            assert client.resets == {} and client.goaway is None  # nothing answered, connection fine
            client.close()
    run(main())


def test_a_stream_already_reset_is_never_connected(pki):
    """Reset before delivery: the RST came in the same read as the HEADERS."""
    async def main():
        calls, returned = [], []

        async def connect():
            calls.append(1)

        async def on_stream(info, reader, stream):
            returned.append(await unless_reset(stream, connect()))

        async with Loopback(pki, on_stream) as lb:
            client = await RawClient.connect(lb)
            client.rapid_resets(10)
            assert await client.ping()
            await until(lambda: len(returned) == 10, 10, "the ten handlers")
            assert returned == [None] * 10 and calls == []
            client.close()
    run(main())


def test_reset_streams_count_against_the_cap_until_their_handler_returns(pki, caplog):
    settings = TunnelSettings(max_concurrent_streams=3)

    async def main():
        release = asyncio.Event()
        served = []

        async def on_stream(info, reader, stream):
            served.append(stream.stream_id)
            await release.wait()  # slow work that goes on after the client's reset
            if not stream.ended:
                stream.respond(200)

        async with Loopback(pki, on_stream, settings=settings) as lb:
            client = await RawClient.connect(lb)
            assert client.conn.remote_settings.max_concurrent_streams == 3  # advertised in SETTINGS
            first = client.rapid_resets(3)  # h2 forgets them; their handlers still run
            assert await client.ping()
            over = client.rapid_resets(2) + [client.open()]
            assert await client.ping()
            assert served == first
            assert client.resets == {over[2]: ErrorCodes.REFUSED_STREAM}  # the others were reset already
            assert lb.value("nodeagent_hbone_streams_refused_total", direction="inbound",
                            reason="too_many_streams") == 3
            release.set()
            (session,) = lb.server.sessions
            await until(lambda: session.serving == 0, 10, "the handlers to return")
            later = client.open()
            assert await client.ping()
            await until(lambda: later in served, 10, "the stream after them to be served")
            assert lb.value("nodeagent_hbone_limit_hits_total", direction="inbound",
                            limit="max_concurrent_streams") == 1
            assert client.goaway is None
            client.close()
    with caplog.at_level(logging.WARNING, logger="test.hbone"):
        run(main())
    assert len([r for r in caplog.records if "refusing more" in r.getMessage()]) == 1  # once per connection


def test_one_reset_too_many_in_the_window_is_goaway_enhance_your_calm(pki, caplog):
    settings = TunnelSettings(max_stream_resets=5, stream_reset_window=10.0)
    now = [1000.0]

    async def main():
        async with Loopback(pki, settings=settings, server_kw={"clock": lambda: now[0]}) as lb:
            good = await healthy(lb)  # the pool's own connection
            client = await RawClient.connect(lb)
            client.rapid_resets(5)
            assert await client.ping()  # at the limit, not over it
            now[0] += 10.0  # the window has passed
            client.rapid_resets(5)
            assert await client.ping()
            for _ in range(3):  # stop sending (END_STREAM, then RST_STREAM NO_ERROR): not counted
                stream_id = client.open()
                client.conn.end_stream(stream_id)
                client.conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
            assert await client.ping()
            last = client.rapid_resets(2)[0]  # the sixth reset within 10 s
            await client.ping()  # h2 answers it while reading, maybe before our GOAWAY
            await client.until_closed()
            assert client.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
            assert client.goaway.last_stream_id == last  # the stream behind it was not handled
            client.close()
            assert lb.value("nodeagent_hbone_limit_hits_total", direction="inbound", limit="stream_resets") == 1
            assert lb.value("nodeagent_hbone_connection_errors_total", direction="inbound",
                            reason="too_many_resets") == 1
            await still_works(good)
            await until(lambda: len(lb.server.sessions) == 1, 10, "the flooding connection to be gone")
    with caplog.at_level(logging.WARNING, logger="test.hbone"):
        run(main())
    assert len([r for r in caplog.records if "rapid reset" in r.getMessage()]) == 1
