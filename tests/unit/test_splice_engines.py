"""What every engine of the data path must do beyond test_splice.py (engines.py: python,
native, native-copy): byte-identical transfers small and large over TCP, unix sockets and
a mix (the waypoint's sockets are unix), half-close from either side, a reset passed on
while the relay holds bytes, bounded bytes in flight, many relays at once, no descriptor
left after 1000 relays; and what only the native engine has: its limits, its stop."""

from __future__ import annotations

import asyncio
import gc
import errno
import hashlib
import os
import socket

import pytest

from engines import engine_fixture, native_relays, read_all, require_native, splicer, tcp_pair, unix_pair
from nodeagent.agent.proxy.splice import Abort
from nodeagent.resets import reset

engine = engine_fixture()
PAIRS = {"tcp": (tcp_pair, tcp_pair), "unix": (unix_pair, unix_pair), "tcp-unix": (tcp_pair, unix_pair)}
MiB = 1 << 20


async def _relay(s, kind: str = "tcp", abort: Abort | None = None):
    """client <-> [a splice b] <-> server over `kind` sockets; (client, server, task)."""
    client_pair, server_pair = PAIRS[kind]
    client, a = await client_pair()
    server, b = await server_pair()
    return client, server, asyncio.create_task(s.splice(a, b, abort))


async def _send_and_fin(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def _digest_until_eof(sock: socket.socket) -> tuple[int, str]:
    loop, digest, size = asyncio.get_running_loop(), hashlib.sha256(), 0
    while chunk := await loop.sock_recv(sock, MiB):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("size", [0, 1, 64 * MiB])
def test_transfers_both_ways_at_once_are_byte_identical(engine, kind, size):
    up, down = os.urandom(size), os.urandom(size)

    async def main():
        async with splicer(engine) as s:
            client, server, task = await _relay(s, kind)
            got = await asyncio.wait_for(asyncio.gather(
                _send_and_fin(client, up), _send_and_fin(server, down),
                _digest_until_eof(server), _digest_until_eof(client)), 60)
            result = await asyncio.wait_for(task, 5)
            client.close()
            server.close()
            assert got[2:] == [(size, hashlib.sha256(up).hexdigest()), (size, hashlib.sha256(down).hexdigest())]
            assert (result.a_to_b, result.b_to_a, result.error) == (size, size, None)
            assert native_relays(s) == (0 if engine == "python" else 1)
            if engine == "native-copy" and size:
                assert s.engine.stats()["copy_directions"] == 2  # the read/write fallback moved them
    asyncio.run(main())


@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("first", ["client", "server"])
def test_half_close_from_either_side_keeps_the_other_direction(engine, kind, first):
    """The side that sends FIN first still receives everything the other sends after."""
    async def main():
        loop = asyncio.get_running_loop()
        async with splicer(engine) as s:
            client, server, task = await _relay(s, kind)
            early, late = (client, server) if first == "client" else (server, client)
            await _send_and_fin(early, b"first, then FIN")
            assert await asyncio.wait_for(read_all(late), 5) == b"first, then FIN"
            await loop.sock_sendall(late, b"after the FIN " * 10000)
            late.close()
            assert await asyncio.wait_for(read_all(early), 5) == b"after the FIN " * 10000
            early.close()
            result = await asyncio.wait_for(task, 5)
            counts = (15, 140000) if first == "client" else (140000, 15)
            assert (result.a_to_b, result.b_to_a, result.error) == (*counts, None)
    asyncio.run(main())


def test_a_reset_is_passed_on_while_the_relay_holds_bytes(engine):
    """The server stops reading, the client fills every buffer, then resets: the server
    reads what reached it and then the reset, never a clean end."""
    async def main():
        loop = asyncio.get_running_loop()
        async with splicer(engine) as s:
            client, server, task = await _relay(s)
            await _fill(client)
            reset(client)
            with pytest.raises(ConnectionResetError):
                while await asyncio.wait_for(loop.sock_recv(server, MiB), 5):
                    pass
            server.close()
            result = await asyncio.wait_for(task, 5)
            assert isinstance(result.error, ConnectionResetError)
            if s.engine is not None:
                assert s.engine.stats()["bytes_held"] == 0
    asyncio.run(main())


async def _fill(sock: socket.socket) -> int:
    """Send until nothing more goes for 0.2 s (every buffer on the way is full)."""
    sent, stalled, block = 0, 0, b"z" * 65536
    while stalled < 20:
        try:
            sent += sock.send(block)
            stalled = 0
        except BlockingIOError:
            stalled += 1
            await asyncio.sleep(0.01)
    return sent


@pytest.mark.parametrize("pipe_size", [16 * 1024, 64 * 1024])
def test_the_native_engine_holds_at_most_pipe_size_per_direction(pipe_size):
    require_native()

    async def main():
        loop = asyncio.get_running_loop()
        async with splicer("native", pipe_size=pipe_size) as s:
            client, server, task = await _relay(s)
            sent = await _fill(client)  # the server does not read
            stats = s.engine.stats()
            assert 0 < stats["bytes_held"] <= pipe_size and stats["pipe_size"] == pipe_size
            client.shutdown(socket.SHUT_WR)
            got = 0
            while chunk := await loop.sock_recv(server, MiB):
                got += len(chunk)
            server.close()
            result = await asyncio.wait_for(task, 5)
            client.close()
            assert got == sent == result.a_to_b and s.engine.stats()["bytes_held"] == 0
    asyncio.run(main())


@pytest.mark.parametrize("kind", ["unix", "tcp-unix"])
@pytest.mark.parametrize("native_engine", ["native", "native-copy"])
def test_the_native_engine_wakes_once_per_message_not_per_read_of_its_peer(kind, native_engine):
    """Requests and answers one at a time (the waypoint's pattern: its sockets are unix):
    the engine wakes for each message it is to move, and not again when a peer reads what
    it wrote (a unix socket's every read makes its peer writable: waking on that, the
    engine pumped both directions for nothing, about twice the wake-ups). Edge-triggered,
    a message costs one read that finds nothing, not two: the pump read again after
    writing what it had read although its last read had found the socket empty."""
    require_native()
    rounds, request, answer = 50, b"GET / HTTP/1.1\r\n\r\n" * 5, b"HTTP/1.1 200 OK\r\n\r\n" * 8

    async def exchange(loop, client, server) -> None:
        await loop.sock_sendall(client, request)
        assert await _recv_exactly(server, len(request)) == request
        await loop.sock_sendall(server, answer)
        assert await _recv_exactly(client, len(answer)) == answer

    async def main():
        loop = asyncio.get_running_loop()
        async with splicer(native_engine) as s:
            client, server, task = await _relay(s, kind)
            await exchange(loop, client, server)  # the relay is registered and has moved bytes
            before = s.engine.stats()
            for _ in range(rounds):
                await exchange(loop, client, server)
            after = s.engine.stats()
            woken = after["wakeups"] - before["wakeups"]
            empty = after["empty_reads"] - before["empty_reads"]
            client.close()
            server.close()
            result = await asyncio.wait_for(task, 5)
            assert (result.a_to_b, result.b_to_a) == ((rounds + 1) * len(request), (rounds + 1) * len(answer))
            assert woken <= 2 * rounds, f"{woken} wake-ups for {2 * rounds} messages"
            assert empty <= 2 * rounds, f"{empty} reads found nothing for {2 * rounds} messages"
    asyncio.run(main())


async def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    loop, got = asyncio.get_running_loop(), b""
    while len(got) < size:
        chunk = await loop.sock_recv(sock, size - len(got))
        assert chunk, f"EOF after {len(got)} of {size} bytes"
        got += chunk
    return got


def test_many_relays_at_once(engine):
    count = 100  # 4 descriptors each, under a default limit of 1024

    async def one(s, n: int) -> None:
        client, server, task = await _relay(s, "unix" if n % 4 == 0 else "tcp")
        up, down = bytes([n % 251]) * (n * 331), bytes([(n + 1) % 251]) * (n * 127)
        got = await asyncio.gather(_send_and_fin(client, up), _send_and_fin(server, down),
                                   read_all(server), read_all(client))
        assert got[2:] == [up, down]
        result = await task
        assert (result.a_to_b, result.b_to_a, result.error) == (len(up), len(down), None)
        client.close()
        server.close()

    async def main():
        async with splicer(engine) as s:
            await asyncio.wait_for(asyncio.gather(*(one(s, n) for n in range(count))), 60)
            if s.engine is not None:
                stats = s.engine.stats()
                assert (stats["relays_total"], stats["relays_open"], stats["ends_queued"]) == (count, 0, 0)
    asyncio.run(main())


def _descriptors() -> dict[str, int]:
    """This process's open descriptors by kind (socket, pipe, anon_inode, ...)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the listing's own descriptor
            continue
        kind = target.split(":", 1)[0] if ":" in target else "file"
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def test_no_descriptor_is_left_after_1000_relays(engine):
    """Clean ends, resets from either side and aborts, 100 at a time: afterwards the
    process holds the descriptors it held before (plus the native engine's pooled pipes)."""
    async def one(s, n: int) -> None:
        loop = asyncio.get_running_loop()
        abort = Abort()
        client, server, task = await _relay(s, "unix" if n % 5 == 0 else "tcp", abort)
        await loop.sock_sendall(client, b"x")
        assert await loop.sock_recv(server, 1) == b"x"
        how = n % 4
        if how == 0:
            client.shutdown(socket.SHUT_WR)
            server.shutdown(socket.SHUT_WR)
            assert await read_all(client) == b"" and await read_all(server) == b""
        elif how in (1, 2):  # the other end sees the reset (over unix: EOF, then closes)
            gone, peer = (client, server) if how == 1 else (server, client)
            reset(gone)
            try:
                await read_all(peer)
            except ConnectionResetError:
                pass
            peer.close()
        else:
            abort()
        await asyncio.wait_for(task, 5)
        client.close()
        server.close()

    async def main():
        async with splicer(engine) as s:
            gc.collect()  # an earlier test's unreachable sockets close now, not during the count
            before = _descriptors()
            for batch in range(10):
                await asyncio.gather(*(one(s, batch * 100 + n) for n in range(100)))
            after = _descriptors()
            pipes = s.engine.stats()["pipes"] if s.engine is not None else 0
            assert native_relays(s) == (0 if engine == "python" else 1000)
            if s.engine is not None:
                assert s.engine.stats()["relays_open"] == 0
        assert after.get("socket", 0) == before.get("socket", 0)
        assert after.get("pipe", 0) == before.get("pipe", 0) + 2 * pipes and pipes <= 64
    asyncio.run(main())


def test_a_full_native_engine_resets_the_pair_and_says_why():
    require_native()

    async def main():
        loop = asyncio.get_running_loop()
        async with splicer("native", max_relays=2) as s:
            held = [await _relay(s) for _ in range(2)]
            client, server, task = await _relay(s)
            result = await asyncio.wait_for(task, 5)
            assert (result.a_to_b, result.b_to_a, result.error.errno) == (0, 0, errno.ENOSPC)
            for sock in (client, server):
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
                sock.close()
            for c, srv, t in held:  # the two in the engine still relay
                await loop.sock_sendall(c, b"ok")
                assert await loop.sock_recv(srv, 2) == b"ok"
                c.close()
                srv.close()
                await asyncio.wait_for(t, 5)
    asyncio.run(main())


def test_closing_the_native_engine_resets_what_it_still_relays():
    require_native()

    async def main():
        loop = asyncio.get_running_loop()
        async with splicer("native") as s:
            client, server, task = await _relay(s)
            await loop.sock_sendall(client, b"hello")
            assert await loop.sock_recv(server, 5) == b"hello"
            s.close()  # as the agent's data path does last when it stops
            result = await asyncio.wait_for(task, 5)
            assert (result.a_to_b, result.error.errno) == (5, errno.ECONNABORTED)
            for sock in (client, server):
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
                sock.close()
            assert s.describe()["engine"] == "python"  # later pairs take the Python path
    asyncio.run(main())
