"""One stream's error costs that stream only: on a pooled HBONE connection, a socket
error of one relay (ENOTCONN from passing a FIN to an app socket that was reset while
the relay was not reading it) or an exception of a stream's protocol resets that stream
(RST_STREAM) while another stream on the same connection keeps exchanging bytes — it
used to close the connection as "internal error handling HTTP/2 input"."""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

import pytest

from hbone_certs import Loopback, echo, pki, run  # noqa: F401 (pki is a fixture)
from identity_fixtures import until
from nodeagent.agent.proxy.splice import HIGH_WATER, splice
from nodeagent.resets import reset
from nodeagent.tunnel import StreamReset, TunnelSettings

MIB = 1024 * 1024
TCP_CLOSE = 7  # tcpi_state: the socket took a RST
ROUND = 100_000  # bytes each way per round on the stream that lives on
ECHO, RELAYED, FAILING = ("10.0.0.1", 1), ("10.0.0.1", 2), ("10.0.0.1", 3)


def tcp_state(sock: socket.socket) -> int:
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


async def exchange(stream, size: int = ROUND) -> None:
    """`size` bytes to the echo and exactly them back."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    stream.write(payload)
    assert await asyncio.wait_for(stream.readexactly(size), 10) == payload


async def the_other_stream_lives_on(lb: Loopback, other) -> None:
    await exchange(other)
    other.write_eof()
    assert await asyncio.wait_for(other.read(), 10) == b""
    assert (other.bytes_sent, other.bytes_received) == (2 * ROUND, 2 * ROUND)
    assert lb.connects == 1 and len(lb.server.sessions) == 1
    assert lb.value("nodeagent_hbone_connection_errors_total", direction="inbound", reason="internal_error") == 0


def test_a_reset_app_socket_resets_its_stream_only(pki):
    """The app resets its connection while the relay's reading of it is paused (the
    client does not read); then the client half-closes: passing that FIN on raises
    ENOTCONN from shutdown(). That stream is reset, the other one never notices."""
    settings = TunnelSettings(stream_window=64 * 1024, connection_window=MIB)  # the client's window fills fast

    async def main():
        loop = asyncio.get_running_loop()
        with socket.socket() as app:
            app.bind(("127.0.0.1", 0))
            app.listen()
            app.setblocking(False)
            relayed, results = {}, []

            async def on_stream(info, reader, stream):
                if info.authority != RELAYED:
                    return await echo(info, reader, stream)
                upstream = socket.socket()
                upstream.setblocking(False)
                await loop.sock_connect(upstream, app.getsockname())
                relayed.update(stream=stream, upstream=upstream)
                stream.respond(200)
                results.append(await splice(upstream, stream))

            async with Loopback(pki, on_stream, settings=settings) as lb:
                other = await lb.open(authority=ECHO)
                await exchange(other)
                victim = await lb.open(authority=RELAYED)
                app_end, _ = await loop.sock_accept(app)
                flood = asyncio.create_task(loop.sock_sendall(app_end, b"x" * (8 * MIB)))
                # The client reads nothing: its window fills, the stream's buffer passes the
                # high-water mark and the relay stops reading the app socket.
                await until(lambda: relayed["stream"].get_write_buffer_size() > HIGH_WATER, 10,
                            "the relay to pause reading the app")
                flood.cancel()
                await asyncio.gather(flood, return_exceptions=True)
                reset(app_end)  # the app resets; the paused relay does not read it, so does not see it
                await until(lambda: tcp_state(relayed["upstream"]) == TCP_CLOSE, 10, "the RST to reach the relay")
                victim.write_eof()  # -> eof_received -> write_eof() on the reset socket: ENOTCONN
                with pytest.raises(StreamReset) as err:
                    await asyncio.wait_for(victim.read(), 10)
                assert err.value.error_code == 8  # CANCEL: a reset passed on as a reset
                await until(lambda: results, 10, "the relay to end")
                assert isinstance(results[0].error, OSError) and results[0].error.errno == errno.ENOTCONN
                assert results[0].b_to_a == 0 and relayed["upstream"].fileno() == -1
                await the_other_stream_lives_on(lb, other)
    run(main())


def test_an_exception_of_a_stream_protocol_resets_that_stream_only(pki):
    class Failing(asyncio.Protocol):
        """A relay with a bug: it fails on EOF."""

        def __init__(self):
            self.received = b""
            self.lost = asyncio.get_running_loop().create_future()

        def data_received(self, data: bytes) -> None:
            self.received += data

        def eof_received(self):
            raise RuntimeError("a bug in a relay")

        def connection_lost(self, exc) -> None:
            self.lost.set_result(exc)

    async def main():
        protocols = []

        async def on_stream(info, reader, stream):
            if info.authority != FAILING:
                return await echo(info, reader, stream)
            protocols.append(Failing())
            stream.respond(200)
            stream.attach(protocols[0])
            await protocols[0].lost

        async with Loopback(pki, on_stream) as lb:
            other = await lb.open(authority=ECHO)
            await exchange(other)
            victim = await lb.open(authority=FAILING)
            victim.write(b"abc")
            victim.write_eof()
            with pytest.raises(StreamReset) as err:
                await asyncio.wait_for(victim.read(), 10)
            assert err.value.error_code == 2  # INTERNAL_ERROR: our failure, this stream's only
            lost = await asyncio.wait_for(protocols[0].lost, 10)
            assert isinstance(lost, RuntimeError) and protocols[0].received == b"abc"
            await the_other_stream_lives_on(lb, other)
    run(main())
