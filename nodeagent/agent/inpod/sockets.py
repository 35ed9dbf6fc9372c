"""Sockets inside a pod's network namespace: the agent's in-pod listeners and its
upstream sockets (in-pod mode, as ztunnel does it).

Every socket here is created by briefly entering the pod netns on the calling thread
(`netns.socket_in`) and carries the agent's mark, so the capture programs never capture
the agent's own connections. `InPodListener` accepts without blocking the event loop and
hands each connection to a handler task, which `PodContext` tracks so removal can wait
for a pod's relays to finish before undoing its routing.

Every listener sets SO_REUSEPORT, so a rolling update's new agent binds beside the old
one and the two serve the pod together; when the old one closes its listeners, the pod
netns' `net.ipv4.tcp_migrate_req=1` (podrouting.py) moves the connections waiting in
its accept queues to the new agent's listener instead of resetting them. The kernel
lets a socket join a reuseport group only when its owner uid is the group's (the
agent's: root), so a process in the pod running as root can bind the same port and
take a share of the pod's captured connections: docs/design.md, "Install on a
cluster", says what that does and does not allow.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol

from nodeagent import netns
from nodeagent.model import Pod
from nodeagent.nodelay import set_nodelay
from nodeagent.throttle import LOG_INTERVAL, Throttle

IP_TRANSPARENT = 19
IP_FREEBIND = 15
BACKLOG = 1024
ACCEPT_PAUSE = 0.1  # seconds a listener stops accepting after accept(2) failed for want of descriptors or memory
# accept(2) errors that are one queued connection's (Linux passes its pending network
# error, or it was aborted in the queue): the next one is accepted at once, as accept(2)
# says to, "like EAGAIN"
PER_CONNECTION = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN, errno.ENOPROTOOPT, errno.EHOSTDOWN,
                            errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.EPERM))


@dataclass(eq=False)
class PodContext:
    """What a relay needs to know about the enrolled pod a connection belongs to."""

    pod: Pod
    netns_fd: int
    cookie: int
    tasks: dict[str, set[asyncio.Task]] = field(default_factory=lambda: {"outbound": set(), "inbound": set()})
    ports: PortRange | None = None  # its deliveries' source ports (port_range), read at the first one
    # The address the node's own connections to the pod come from (kubelet's probes), as
    # the agent's netns (the node's) routes to it at enrolment; None if it has no route.
    node_source: str | None = None

    def track(self, direction: str, task: asyncio.Task) -> None:
        bucket = self.tasks.setdefault(direction, set())
        bucket.add(task)
        task.add_done_callback(bucket.discard)

    def __str__(self) -> str:
        return f"{self.pod.namespace}/{self.pod.name}"


Handler = Callable[[PodContext, socket.socket], Awaitable[None]]


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def source_towards(ip: str) -> str | None:
    """The source address this netns's routing picks for a connection to `ip` (a UDP
    connect sends nothing), None when it has no route."""
    try:
        with socket.socket(family_of(ip), socket.SOCK_DGRAM) as sock:
            sock.connect((ip, 9))
            source = sock.getsockname()[0]
    except OSError:
        return None
    return None if ipaddress.ip_address(source).is_unspecified else source  # no address to send from


@dataclass(frozen=True)
class ListenSpec:
    host: str
    port: int
    freebind: bool = False  # the address need not exist yet (the pod IP, early)
    optional: bool = False  # skip it when the netns lacks the address (::1 without IPv6)
    buffers: int | None = None  # SO_SNDBUF and SO_RCVBUF, which accepted sockets inherit (LOCAL_BUFFER)


# The send and receive buffers of the sockets between the agent and an app of the pod,
# over the pod's own loopback: its deliveries (transparent_upstream) and the connections
# captured from it (the outbound listeners', which accepted sockets inherit). What the
# app has not read waits in the agent's send queue, and what the far side does not take
# waits in its receive queue, in kernel memory charged to the agent, and autotuning grows
# them to tcp_wmem's 4 MiB and tcp_rmem's 6 MiB: 20 connections to an app that never
# reads held 70.7 MiB in the destination agent's delivery sockets, 3.1-5.2 MiB with this
# (the kernel doubles it: 512 KiB a queue at most), and the source agent's captured
# sockets held 1-2 MiB each of what the client still sent. A loopback path needs no more
# to run at full speed (one stream across nodes both ways and on one node, A/B on bench
# mesh's lab: unchanged within the runs' spread; docs/design.md). Sockets that cross the
# network (HBONE, passthrough, plaintext clients) keep autotuning.
LOCAL_BUFFER = 256 << 10


def bound_buffers(sock: socket.socket, size: int) -> None:
    """SO_SNDBUF and SO_RCVBUF `size` (LOCAL_BUFFER): autotuning off for both queues.
    Before connect or listen, so the window scale offered fits the buffer."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def listeners(netns_fd: int, specs: list[ListenSpec]) -> list[socket.socket | None]:
    """Listening sockets in the netns, one per spec (None for a missing optional one).
    The netns is entered once, to create them all; binding happens outside."""
    created: list[socket.socket | None] = []
    with netns.entered(netns_fd):
        for spec in specs:
            try:
                created.append(socket.socket(family_of(spec.host), socket.SOCK_STREAM))
            except OSError:
                if not spec.optional:
                    _close_all(created)
                    raise
                created.append(None)  # IPv6 disabled in this kernel
    try:
        return [_listen(sock, spec) if sock is not None else None for sock, spec in zip(created, specs)]
    except BaseException:
        _close_all(created)
        raise


def _listen(sock: socket.socket, spec: ListenSpec) -> socket.socket | None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # the next agent binds beside this one
    if spec.freebind:
        level = socket.IPPROTO_IPV6 if sock.family == socket.AF_INET6 else socket.IPPROTO_IP
        sock.setsockopt(level, IP_FREEBIND, 1)
    if spec.buffers:
        bound_buffers(sock, spec.buffers)
    try:
        sock.bind((spec.host, spec.port))
    except OSError as exc:
        if spec.optional and exc.errno == errno.EADDRNOTAVAIL:
            sock.close()
            return None
        raise
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def _close_all(socks: list[socket.socket | None]) -> None:
    for sock in socks:
        if sock is not None:
            sock.close()


def upstream(netns_fd: int, family: int, mark: int) -> socket.socket:
    """A non-blocking TCP socket in the pod netns, marked so capture leaves it alone,
    Nagle off (set directly: it is TCP, which set_nodelay would ask first)."""
    return upstreams(netns_fd, family, mark, 1)[0]


def upstreams(netns_fd: int, family: int, mark: int, count: int) -> list[socket.socket]:
    """`count` sockets as `upstream` makes one, in one entry into the netns."""
    made = netns.sockets_in(netns_fd, count, family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        for sock in made:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return made
    except BaseException:
        _close_all(made)
        raise


PORT_RANGE_SYSCTL = "/proc/sys/net/ipv4/ip_local_port_range"  # the netns' own; it applies to IPv6 too
RESERVED_PORTS_SYSCTL = "/proc/sys/net/ipv4/ip_local_reserved_ports"  # likewise
SOURCE_PORT_TRIES = 16


@dataclass(frozen=True)
class PortRange:
    """The ports a delivery may bind in a netns: its ephemeral range less the ports it
    reserves (ip_local_reserved_ports), which the kernel never hands out as ephemeral
    ports either; an app reserves the ports it will listen on, and a delivery bound to
    one would make that listen fail (EADDRINUSE)."""

    low: int
    high: int
    free: tuple[tuple[int, int], ...]  # inclusive intervals of the range, reserved ports left out
    size: int  # how many ports they hold

    @classmethod
    def of(cls, low: int, high: int, reserved: str) -> PortRange:
        """From the range and the reserved ports as the sysctl shows them ("8080,9000-9100")."""
        cut = sorted(_interval(item) for item in reserved.replace(",", " ").split())
        free, start = [], low
        for a, b in cut:
            if b < start or a > high:
                continue
            if a > start:
                free.append((start, a - 1))
            start = max(start, b + 1)
        if start <= high:
            free.append((start, high))
        return cls(low, high, tuple(free), sum(b - a + 1 for a, b in free))

    def draw(self) -> int:
        """A port at random, each free one alike."""
        n = random.randrange(self.size)
        for a, b in self.free:
            if n <= b - a:
                return a + n
            n -= b - a + 1
        raise AssertionError("unreachable: n < size")


def _interval(item: str) -> tuple[int, int]:
    a, _, b = item.partition("-")
    return int(a), int(b or a)


def port_range(ctx: PodContext) -> PortRange:
    """The delivery ports of the pod's netns, read at its first delivery and kept with
    its context (so for the pod's life, and never handed to a later pod: a cache keyed
    by descriptor and netns inode gave a new pod an old one's range, since the kernel
    reuses a freed netns's inode number at once). Reserved ports the pod sets after its
    first delivery are not seen."""
    if ctx.ports is None:
        with netns.entered(ctx.netns_fd):
            with open(PORT_RANGE_SYSCTL) as f:
                low, high = (int(n) for n in f.read().split())
            with open(RESERVED_PORTS_SYSCTL) as f:
                reserved = f.read()
        ctx.ports = PortRange.of(low, high, reserved)
    return ctx.ports


def transparent_upstream(ctx: PodContext, mark: int, source_ip: str, avoid_port: int) -> socket.socket:
    """A marked socket bound to `source_ip` (not local: IP_TRANSPARENT), so the app sees
    the real client address, and to `lo`, so sk_lookup sees a loopback connection and
    does not steer it back to the agent; its buffers LOCAL_BUFFER. The port is never the
    client's own port: the app's accepted socket would then have the same 4-tuple as the
    agent's inbound one.

    The port is drawn at random from the pod netns' ephemeral range less its reserved
    ports (`port_range`) and bound with SO_REUSEADDR, not left to bind(port 0): every
    delivery its client closes first ends in TIME_WAIT here for 60 s under the client's
    address, and bind(port 0) looks for a port no socket holds, scanning further as they
    fill, so one client opening connections at a steady rate exhausted the range (28,232
    ports: ~470 a second) with the agent at 100 % system CPU in inet_csk_get_port. A
    TIME_WAIT socket does not stop this bind; connect() then checks the 4-tuple, reusing
    a TIME_WAIT one more than a second old on lo (tcp_tw_reuse=2, the default) and
    refusing a live one (EADDRNOTAVAIL: Delivery.connect draws again)."""
    return transparent_upstreams(ctx, mark, source_ip, avoid_port, 1)[0]


def transparent_upstreams(ctx: PodContext, mark: int, source_ip: str, avoid_port: int,
                          count: int, verify: bool = False) -> list[socket.socket]:
    """`count` sockets as `transparent_upstream` makes one, in one entry into the netns;
    with `verify`, checked to be in `ctx`'s netns (OSError ESTALE if not: a descriptor of a
    pod gone, closed and reused, for sockets made outside the connection's own step)."""
    family = family_of(source_ip)
    level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.IPPROTO_IP
    ports = port_range(ctx)
    if not ports.size:
        raise OSError(errno.EADDRNOTAVAIL, f"no source port for {source_ip}: every port of {ports.low}-{ports.high} "
                                           "is in the pod's ip_local_reserved_ports")
    made = upstreams(ctx.netns_fd, family, mark, count)
    try:
        if verify and netns.cookie_of_socket(made[0]) != ctx.cookie:
            raise OSError(errno.ESTALE, f"descriptor {ctx.netns_fd} is no longer the netns of pod {ctx}")
        for sock in made:
            bound_buffers(sock, LOCAL_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
            sock.setsockopt(level, IP_TRANSPARENT, 1)
            _bind_drawn(sock, source_ip, ports, avoid_port)
        return made
    except BaseException:
        _close_all(made)
        raise


def _bind_drawn(sock: socket.socket, source_ip: str, ports: "PortRange", avoid_port: int) -> None:
    """Bind to `source_ip` at a port drawn from `ports` (never `avoid_port`), drawing again
    while the port is in use (a failed bind leaves the socket unbound)."""
    for _ in range(SOURCE_PORT_TRIES):
        port = ports.draw()
        if port == avoid_port:
            continue
        try:
            sock.bind((source_ip, port))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"no source port for {source_ip} in {ports.low}-{ports.high} "
                                    f"after {SOURCE_PORT_TRIES} tries")


class AcceptFailures:
    """Failed accepts of all the agent's in-pod listeners: each counted (`count(direction,
    reason)`, the agent's connection failures with reason accept_<errno>), and logged at
    once, then at most every LOG_INTERVAL with how many there were, for all pods together:
    a pod that takes the agent's last descriptors makes thousands a second."""

    def __init__(self, log: logging.Logger, count: Callable[[str, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.log, self.count = log, count
        self._report = Throttle(LOG_INTERVAL, clock)

    def failed(self, listener: "InPodListener", exc: OSError, pause: float | None) -> None:
        """`pause`: seconds the listener stops accepting (None: it goes on at once)."""
        name = errno.errorcode.get(exc.errno, str(exc.errno)).lower()
        if self.count is not None:
            self.count(listener.direction, f"accept_{name}")
        failures = self._report.due()
        if not failures:
            return
        then = f"the listener pauses {pause:g} s" if pause is not None else "the next queued one is accepted"
        why = (" (the agent's open descriptors are at their limit: `nodeagent status` shows OPEN FILES; "
               "a pod holding thousands of connections?)" if exc.errno in (errno.EMFILE, errno.ENFILE) else "")
        self.log.warning("%s %s: accept on %s:%d failed: %s%s; %s. %d failed accept(s) of in-pod listeners since "
                         "the last report, reported at most every %g s", listener.direction, listener.ctx,
                         *listener.address, exc.strerror or exc, why, then, failures, self._report.interval)


class Offloaded(Protocol):
    """An in-pod listener another engine accepts on (InPodListener's `offload`)."""

    def close(self, accept_queued: bool) -> None:
        """Stop accepting (accept_queued: what is queued first)."""


class InPodListener:
    """Accept connections on an in-pod listening socket and run `handler` for each. When
    accept(2) fails for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM)
    the connection stays queued and the socket readable: the listener stops watching it
    for ACCEPT_PAUSE instead of retrying at once, which spun the loop (62,000 failed
    accepts and log lines in 0.5 s) and starved every other pod's connections.
    `offload(listener)`, when given, may take the accepting over at start (the native HBONE
    engine's, for outbound listeners: agent/proxy/source_routes.py): it returns what then
    accepts, or None to leave it to this loop."""

    def __init__(self, sock: socket.socket, ctx: PodContext, direction: str, handler: Handler,
                 log: logging.Logger, failures: AcceptFailures | None = None, pause: float = ACCEPT_PAUSE,
                 offload: Callable[["InPodListener"], Offloaded | None] | None = None):
        self.sock = sock
        self.ctx = ctx
        self.direction = direction
        self.handler = handler
        self.log = log
        self.failures = failures or AcceptFailures(log)
        self.pause = pause
        self.address = sock.getsockname()[:2]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._paused: asyncio.TimerHandle | None = None
        self.offload = offload
        self.offloaded: Offloaded | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.offload is not None:
            self.offloaded = self.offload(self)
            if self.offloaded is not None:
                return
        self._loop.add_reader(self.sock.fileno(), self._accept_ready)

    def _accept_ready(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in PER_CONNECTION:
                    self.failures.failed(self, exc, None)
                    continue
                self.failures.failed(self, exc, self.pause)
                self._pause()
                return
            set_nodelay(conn)  # relayed bytes go out at once (nodelay.py)
            self.spawn(conn)

    def spawn(self, conn: socket.socket, *args) -> None:
        """Run the handler for `conn` (with `args`, when an offloaded listener's engine handed
        it over) as for a connection accepted here: a task the pod tracks."""
        task = self._loop.create_task(self._run(conn, *args))
        self.ctx.track(self.direction, task)

    async def _run(self, conn: socket.socket, *args) -> None:
        try:
            await self.handler(self.ctx, conn, *args)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception:  # a bug in one connection's handling must not go unnoticed, nor spread
            self.log.exception("%s connection of pod %s failed", self.direction, self.ctx)
            conn.close()

    def _pause(self) -> None:
        if self._loop is None or self._paused is not None or self.sock.fileno() == -1:
            return
        self._loop.remove_reader(self.sock.fileno())
        self._paused = self._loop.call_later(self.pause, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self.sock.fileno() != -1:
            self._loop.add_reader(self.sock.fileno(), self._accept_ready)

    def _unpause(self) -> None:
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None

    def close(self, accept_queued: bool = True) -> None:
        """Stop listening. Connections already queued are accepted and relayed first, so
        removing a pod never resets a connection its app already saw established.
        `accept_queued=False` (handing over to the next agent): they are left to the
        kernel, which moves them to another listener of the reuseport group
        (tcp_migrate_req) or, with none left, resets them."""
        if self.sock.fileno() == -1:
            return  # closed already (handed over, then the agent's shutdown)
        if self.offloaded is not None:
            self.offloaded.close(accept_queued)  # the engine's copy of the socket, and its accepting
            self.sock.close()
            return
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._unpause()
            if accept_queued:
                self._accept_ready()
                self._unpause()  # accept failed: what is still queued is reset with the socket
        self.sock.close()
