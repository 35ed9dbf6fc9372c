"""What the agent's sockets toward a pod's app may hold when the app does not read
(nodeagent/agent/inpod/sockets.py LOCAL_SNDBUF), in a throwaway netns on a real kernel:
a delivery to an app that never reads, and a connection accepted on a listener made as
the outbound ones are, each written to until the kernel takes no more. Autotuned, each
held ~3.5 MiB (tcp_wmem's 4 MiB); bounded, about twice LOCAL_SNDBUF (the kernel
doubles what it is given)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import termios
from contextlib import ExitStack

from nodeagent import netns
from nodeagent.agent.inpod import sockets as inpod
from nodeagent.agent.inpod.sockets import ListenSpec, PodContext
from nodeagent.agent.proxy.delivery import Delivery
from nodeagent.model import Pod

APP = ("127.0.0.1", 8080)
CLIENT = ("127.0.0.2", 40001)
MARK = 0x539
# The kernel doubles the SO_SNDBUF it is given, and takes a write while what is queued is
# under that: the last write may go past it by up to its own size (one 64 KiB chunk).
BOUND = 2 * inpod.LOCAL_SNDBUF + 65536


def fill(sock: socket.socket) -> int:
    """Write to `sock` until the kernel takes no more; what waits in its send queue."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    try:
        while True:
            sock.send(chunk)
    except BlockingIOError:
        pass
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]


def test_a_delivery_to_an_app_that_does_not_read_holds_at_most_its_bound(make_netns):
    ns = make_netns()
    app = ns.listener(*APP)  # accepts nothing, reads nothing
    fd = netns.open_netns(ns.path)
    pod = Pod(namespace="test", name="app", uid="u1", node="node1", ip=APP[0], labels={}, annotations={})

    async def main() -> int:
        with ExitStack() as ends:
            upstream = await Delivery(MARK, timeout=5).connect(PodContext(pod, fd, 0), CLIENT, APP, ends)
            with upstream:
                return fill(upstream)
    try:
        with app:
            queued = asyncio.run(main())
    finally:
        os.close(fd)
    assert 0 < queued <= BOUND, queued


def test_a_connection_accepted_by_an_outbound_listener_inherits_the_bound(make_netns):
    ns = make_netns()
    fd = netns.open_netns(ns.path)
    try:
        [bounded, autotuned] = inpod.listeners(fd, [ListenSpec("127.0.0.1", 15001, sndbuf=inpod.LOCAL_SNDBUF),
                                                    ListenSpec("127.0.0.1", 15002)])
    finally:
        os.close(fd)
    held = {}
    with bounded, autotuned:
        for name, listener in (("bounded", bounded), ("autotuned", autotuned)):
            client = ns.new_socket()  # the app: connects, never reads
            with client:
                client.connect(listener.getsockname())
                listener.setblocking(True)
                conn, _ = listener.accept()
                with conn:
                    held[name] = fill(conn)
    assert 0 < held["bounded"] <= BOUND, held
    assert held["autotuned"] > 4 * BOUND, held  # what the bound keeps out
