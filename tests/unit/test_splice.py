"""splice: bytes both ways, half-close, resets and back-pressure, over loopback TCP, for
every engine of the data path (engines.py: python, native, native-copy)."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from engines import engine_fixture, native_relays, read_all, splicer, tcp_pair
from nodeagent.agent.proxy.splice import HIGH_WATER, Abort
from nodeagent.resets import reset

SMALL_BUFFER = 4096  # socket buffers (the kernel doubles it), far below what the relay holds
RESPONSE = HIGH_WATER * 3 // 4  # held by the relay without pausing its reads

engine = engine_fixture()


async def _relay(s) -> tuple[socket.socket, socket.socket, asyncio.Task]:
    """client <-> [a splice b] <-> server; returns (client, server, splice task)."""
    client, a = await tcp_pair()
    server, b = await tcp_pair()
    return client, server, asyncio.create_task(s.splice(a, b))


def test_request_half_close_response(engine):
    async def main():
        loop = asyncio.get_running_loop()
        async with splicer(engine) as s:
            client, server, task = await _relay(s)
            await loop.sock_sendall(client, b"request")
            client.shutdown(socket.SHUT_WR)  # FIN: the server must see EOF, and still answer
            assert await read_all(server) == b"request"
            await loop.sock_sendall(server, b"response" * 1000)
            server.close()
            assert await read_all(client) == b"response" * 1000
            result = await asyncio.wait_for(task, 5)
            client.close()
            assert (result.a_to_b, result.b_to_a, result.error) == (7, 8000, None)
            assert native_relays(s) == (0 if engine == "python" else 1)
    asyncio.run(main())


@pytest.mark.parametrize("resetting", ["server", "client"])
def test_reset_is_passed_on_as_a_reset(engine, resetting):
    async def main():
        loop = asyncio.get_running_loop()
        async with splicer(engine) as s:
            client, server, task = await _relay(s)
            await loop.sock_sendall(client, b"x")
            assert await loop.sock_recv(server, 10) == b"x"
            gone, peer = (server, client) if resetting == "server" else (client, server)
            reset(gone)
            await _assert_reset(peer)  # RST: a FIN here would read as a clean end
            result = await asyncio.wait_for(task, 5)
            assert (result.a_to_b, result.b_to_a) == (1, 0)
            assert type(result.error) is ConnectionResetError and result.error.errno == errno.ECONNRESET
    asyncio.run(main())


def test_clean_close_is_passed_on_after_the_buffered_bytes(engine):
    async def main():
        loop = asyncio.get_running_loop()
        async with splicer(engine) as s:
            client, a = await tcp_pair(rcvbuf=SMALL_BUFFER)
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
            server, b = await tcp_pair()
            task = asyncio.create_task(s.splice(a, b))
            client.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(loop.sock_recv(server, 10), 5) == b""
            # The server answers and closes while the client is not reading: the relay holds
            # most of the answer when both directions are done, and must close with FIN after
            # writing it (an RST here would cut the answer short).
            await loop.sock_sendall(server, b"r" * RESPONSE)
            server.close()
            assert await asyncio.wait_for(read_all(client), 5) == b"r" * RESPONSE
            client.close()
            result = await asyncio.wait_for(task, 5)
            assert (result.a_to_b, result.b_to_a, result.error) == (0, RESPONSE, None)
    asyncio.run(main())


def _kernel_buffers() -> int:
    """The most the kernel may hold between a sender and a reader that stopped, with a
    relay between them: the relay's receiving socket can autotune up to tcp_rmem's
    maximum, its sending socket up to tcp_wmem's (the ends' own buffers are set small)."""
    def maximum(name: str) -> int:
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            return int(f.read().split()[2])
    return maximum("tcp_rmem") + maximum("tcp_wmem")


RELAY_ALLOWANCE = 4 * 1024 * 1024  # far above what either engine holds itself (64 KiB + a read)


def test_back_pressure_bounds_buffering(engine):
    bound = _kernel_buffers() + RELAY_ALLOWANCE

    async def main():
        loop = asyncio.get_running_loop()
        async with splicer(engine) as s:
            client, server, task = await _relay(s)
            for sock in (client, server):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            sent, block = 0, b"z" * 65536
            stalled = 0
            while stalled < 20 and sent < bound + 16 * 1024 * 1024:  # server never reads
                try:
                    sent += client.send(block)
                    stalled = 0
                except BlockingIOError:
                    stalled += 1
                    await asyncio.sleep(0.01)
            assert sent < bound, f"relay buffered {sent} bytes without back-pressure"
            got = 0
            client.shutdown(socket.SHUT_WR)
            while chunk := await loop.sock_recv(server, 1 << 20):
                got += len(chunk)
            assert got == sent
            server.close()
            await asyncio.wait_for(task, 5)
            client.close()
    asyncio.run(main())


def test_cancel_aborts_both(engine):
    async def main():
        loop = asyncio.get_running_loop()
        async with splicer(engine) as s:
            client, server, task = await _relay(s)
            await loop.sock_sendall(client, b"x")  # the splice runs: both sides connected
            assert await asyncio.wait_for(loop.sock_recv(server, 10), 5) == b"x"
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _assert_reset(client, server)
    asyncio.run(main())


async def _assert_reset(*socks: socket.socket) -> None:
    """Each socket's peer reset it (RST, not FIN); all are closed, also when one was not."""
    try:
        for sock in socks:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 10), 5)
    finally:
        for sock in socks:
            sock.close()


def test_abort_resets_both_sides_and_returns_the_counts(engine):
    async def main():
        loop = asyncio.get_running_loop()
        async with splicer(engine) as s:
            client, a = await tcp_pair()
            server, b = await tcp_pair()
            abort = Abort()
            task = asyncio.create_task(s.splice(a, b, abort))
            await loop.sock_sendall(client, b"hello")
            assert await loop.sock_recv(server, 10) == b"hello"
            await loop.sock_sendall(server, b"hi")
            assert await loop.sock_recv(client, 10) == b"hi"
            abort()
            result = await asyncio.wait_for(task, 5)
            assert (result.a_to_b, result.b_to_a, result.error) == (5, 2, None)
            await _assert_reset(client, server)
    asyncio.run(main())


def test_abort_before_the_splice_starts_ends_it_as_it_starts(engine):
    async def main():
        async with splicer(engine) as s:
            client, a = await tcp_pair()
            server, b = await tcp_pair()
            abort = Abort()
            abort()
            result = await asyncio.wait_for(s.splice(a, b, abort), 5)
            assert (result.a_to_b, result.b_to_a) == (0, 0)
            await _assert_reset(client, server)
    asyncio.run(main())
