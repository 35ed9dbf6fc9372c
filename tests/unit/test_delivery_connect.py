"""How a delivery connects (agent/proxy/delivery.py: connect_socket, Delivery.connect):
on loopback in the caller's own loop round, with no writer, timer or task; a refused
port raises as connect(2) does; a connect that cannot complete (the app's accept queue
is full, so its SYN is dropped) waits, and ends in TimeoutError, or returns False the
moment the client's stream is gone, leaving nothing registered with the loop; Delivery
then resets the socket and forgets its address."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import types
from contextlib import ExitStack

import pytest

from identity_fixtures import run
from nodeagent.agent.inpod import sockets as inpod
from nodeagent.agent.proxy.delivery import Delivery, connect_socket


POD = types.SimpleNamespace(netns_fd=-1)  # transparent_upstream is replaced: no netns is entered


def nonblocking() -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    return sock


@contextlib.contextmanager
def full_listener():
    """A listener whose accept queue is full: a further SYN is dropped, so a connect to it
    stays pending (the kernel retries the SYN for seconds)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # room for one connection not yet accepted
        queued = []
        for _ in range(2):  # fill it (the kernel's queue takes backlog + 1)
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(listener.getsockname())
            queued.append(sock)
        try:
            yield listener.getsockname()
        finally:
            for sock in queued:
                sock.close()


def test_a_loopback_connect_completes_without_a_loop_round():
    with socket.socket() as listener, nonblocking() as sock:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        coro = connect_socket(sock, listener.getsockname(), 5.0)
        with pytest.raises(StopIteration) as done:  # no await suspended it: no event loop needed
            coro.send(None)
        assert done.value.value is True and sock.getpeername() == listener.getsockname()


def test_a_descriptor_above_select_s_limit_connects_too():
    """select() refuses descriptors above 1023; an agent with many connections has them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1024:  # what a unit (the DaemonSet, systemd) gives the agent is far above
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.ExitStack() as undo, socket.socket() as listener, nonblocking() as low:
        undo.callback(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        high = os.dup2(low.fileno(), 1024)
        sock = socket.socket(fileno=high)
        try:
            coro = connect_socket(sock, listener.getsockname(), 5.0)
            with pytest.raises(StopIteration) as done:
                coro.send(None)
            assert done.value.value is True
        finally:
            sock.close()


def test_a_refused_connect_raises_as_connect_does():
    with socket.socket() as free, nonblocking() as sock:
        free.bind(("127.0.0.1", 0))  # bound, not listening: the port refuses
        with pytest.raises(ConnectionRefusedError) as refused:
            run(connect_socket(sock, free.getsockname(), 5.0))
    assert refused.value.errno == errno.ECONNREFUSED


def test_a_pending_connect_times_out_and_leaves_nothing_with_the_loop():
    async def main():
        loop = asyncio.get_running_loop()
        with full_listener() as address, nonblocking() as sock:
            with pytest.raises(TimeoutError, match=r"timed out after 0.2 s"):
                await connect_socket(sock, address, 0.2)
            assert not loop.remove_writer(sock.fileno())  # no writer left behind
    run(main())


def test_a_pending_connect_gives_up_when_the_stream_is_gone():
    async def main():
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        with full_listener() as address, nonblocking() as sock:
            connecting = asyncio.ensure_future(connect_socket(sock, address, 30.0, (gone,)))
            await asyncio.sleep(0)
            assert not connecting.done()
            gone.set_result(None)
            assert await connecting is False
            assert not loop.remove_writer(sock.fileno())
    run(main())


def test_delivery_resets_an_abandoned_connect_and_forgets_its_address(monkeypatch):
    made = []

    def upstream(ctx, mark, source_ip, avoid_port):
        sock = nonblocking()
        sock.bind((source_ip, 0))
        made.append(sock)
        return sock
    monkeypatch.setattr(inpod, "transparent_upstream", upstream)

    async def main():
        loop = asyncio.get_running_loop()
        delivery, gone = Delivery(0x539, timeout=30.0), loop.create_future()
        with full_listener() as address, ExitStack() as ends:
            connecting = asyncio.ensure_future(delivery.connect(POD, ("127.0.0.1", 1), address, ends, (gone,)))
            await asyncio.sleep(0)
            local = made[0].getsockname()
            assert delivery.is_ours(local)
            gone.set_result(None)
            assert await connecting is None
            assert made[0].fileno() == -1 and not delivery.is_ours(local)
            # gone before it starts: nothing is made
            assert await delivery.connect(POD, ("127.0.0.1", 1), address, ends, (gone,)) is None
            assert len(made) == 1
    run(main())
