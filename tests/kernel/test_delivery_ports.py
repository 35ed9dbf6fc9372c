"""Delivery's source ports under TIME_WAIT (nodeagent/agent/proxy/delivery.py,
inpod.transparent_upstream), in a throwaway netns on a real kernel.

A delivery its client closes first ends in TIME_WAIT in the pod netns for 60 s, under
the client's address. When one client opened connections at a steady rate, those held
every port of the range: bind(port 0) then failed, and scanned further each time
before it did (the agent at 100 % system CPU, ~150-250 connections a second). Here
every port of a 256-port range holds a TIME_WAIT of the client's address to the app,
as after such a burst; the kernel refuses bind(port 0) for that address (what the
agent did before), and the delivery still connects, reusing 4-tuples in TIME_WAIT
over a second old on lo, and never with the client's own port. Nor with a port the pod
reserves (ip_local_reserved_ports)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import time
from contextlib import ExitStack

import pytest

from nodeagent import netns
from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.delivery import Delivery
from nodeagent.model import Pod

APP = ("127.0.0.1", 8080)
CLIENT_IP = "127.0.0.2"  # the client's address the delivery binds (every 127/8 address is local on lo)
LOW, HIGH = 40000, 40255
MARK = 0x539


def time_waits(ns) -> set[int]:
    """Local ports of the TIME_WAIT sockets from CLIENT_IP to the app in `ns`."""
    out = subprocess.run(["ip", "netns", "exec", ns.name, "ss", "-Htn", "state", "time-wait",
                          "src", CLIENT_IP, "dst", f"{APP[0]}:{APP[1]}"],
                         capture_output=True, text=True, check=True).stdout
    return {int(line.split()[2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def close_first(client: socket.socket, app: socket.socket) -> None:
    """The client ends the connection first, as wrk does with Connection: close, so its
    side is the one left in TIME_WAIT."""
    client.setblocking(True)
    client.settimeout(5)
    client.shutdown(socket.SHUT_WR)
    conn, _ = app.accept()
    with conn:
        conn.settimeout(5)
        assert conn.recv(1) == b""
    assert client.recv(1) == b""
    client.close()


def in_range(ns, low: int, high: int, reserved: str = "") -> None:
    """Set the ephemeral range and the reserved ports of `ns`."""
    with netns.entered(ns.path):
        with open("/proc/sys/net/ipv4/ip_local_port_range", "w") as f:
            f.write(f"{low} {high}")
        with open("/proc/sys/net/ipv4/ip_local_reserved_ports", "w") as f:
            f.write(reserved)


def deliver(ns, app: socket.socket, client: tuple[str, int], n: int, fd: int | None = None) -> list[int]:
    """The source ports of `n` deliveries from `client`'s address to the app in `ns` (a
    new pod's, on descriptor `fd` of it if given), each closed by the client first
    (checked: marked, bound to the client's IP, the address ours for as long as the
    delivery lives)."""
    own = fd is None
    fd = netns.open_netns(ns.path) if own else fd
    pod = Pod(namespace="test", name="app", uid="u1", node="node1", ip=APP[0], labels={}, annotations={})
    ctx, delivery = PodContext(pod, fd, 0), Delivery(MARK, timeout=5)

    async def main() -> list[int]:
        ports = []
        for _ in range(n):
            with ExitStack() as ends:
                upstream = await delivery.connect(ctx, client, APP, ends)
                local = upstream.getsockname()
                assert local[0] == client[0]
                assert upstream.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == MARK
                assert delivery.is_ours(local)
                ports.append(local[1])
                close_first(upstream, app)
            assert not delivery.is_ours(local)
        return ports

    try:
        return asyncio.run(main())
    finally:
        if own:
            os.close(fd)


def test_delivery_reuses_ports_the_clients_connections_left_in_time_wait(make_netns):
    ns = make_netns()
    in_range(ns, LOW, HIGH)
    app = ns.listener(*APP)
    with app:
        # A TIME_WAIT of the client's address on every port of the range, as the agent's
        # deliveries leave them (SO_REUSEADDR, bound to lo).
        for port in range(LOW, HIGH + 1):
            sock = ns.new_socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
            sock.bind((CLIENT_IP, port))
            sock.connect(APP)
            close_first(sock, app)
        assert time_waits(ns) == set(range(LOW, HIGH + 1))
        # What the agent did before: the kernel has no port left for that address.
        probe = ns.new_socket()
        with probe, pytest.raises(OSError) as refused:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
            probe.bind((CLIENT_IP, 0))
        assert refused.value.errno == errno.EADDRINUSE
        # tcp_tw_reuse=2 takes a TIME_WAIT on lo once it is more than a second old
        # (whole seconds of its last timestamp): past two, every one qualifies.
        time.sleep(2.1)

        client_port = LOW + 7  # the client's own port: never the delivery's
        ports = deliver(ns, app, (CLIENT_IP, client_port), 32)
        assert len(ports) == 32 and client_port not in ports and all(LOW <= port <= HIGH for port in ports)


def test_delivery_never_binds_a_port_the_pod_reserved(make_netns):
    """ip_local_reserved_ports: ports an app will listen on, which the kernel never hands
    out as ephemeral ports; a delivery bound to one would make that listen fail."""
    ns = make_netns()
    in_range(ns, LOW, HIGH, f"{LOW}-{HIGH - 16},{HIGH - 3}")  # free: 15 of the 256
    app = ns.listener(*APP)
    with app:
        ports = deliver(ns, app, (CLIENT_IP, 1234), 4)  # unreserved, 4 in (15/256)^4 = 1e-5
    assert len(ports) == 4 and all(HIGH - 15 <= port <= HIGH and port != HIGH - 3 for port in ports), ports
    full = make_netns()
    in_range(full, LOW, HIGH, f"{LOW}-{HIGH}")
    app = full.listener(*APP)
    with app, pytest.raises(OSError) as refused:
        deliver(full, app, (CLIENT_IP, 1234), 1)
    assert refused.value.errno == errno.EADDRNOTAVAIL
    assert refused.value.strerror == (f"no source port for {CLIENT_IP}: every port of {LOW}-{HIGH} is in the pod's "
                                      "ip_local_reserved_ports")


def test_a_new_pod_on_the_same_descriptor_and_netns_inode_reads_its_own_range(make_netns):
    """The range is the pod's, read at its first delivery. It was cached per descriptor
    and checked against the netns inode, and the kernel hands a freed netns's inode
    number to the next netns at once: a new pod on a recycled descriptor then drew from
    the old pod's range and reserved ports. Here the second pod has the same descriptor
    and inode as the first, and a range of its own."""
    ns = make_netns()
    in_range(ns, LOW, LOW + 15)
    app = ns.listener(*APP)
    fd = netns.open_netns(ns.path)
    try:
        with app:
            first = deliver(ns, app, (CLIENT_IP, 1234), 4, fd)
            in_range(ns, HIGH - 15, HIGH)
            second = deliver(ns, app, (CLIENT_IP, 1234), 4, fd)
    finally:
        os.close(fd)
    assert all(LOW <= port <= LOW + 15 for port in first), first
    assert all(HIGH - 15 <= port <= HIGH for port in second), second
