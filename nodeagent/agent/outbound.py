"""Outbound relay: connections a meshed pod's app opened, captured to the agent's
in-pod listener (127.0.0.1:15001 / [::1]:15001).

For each accepted connection: recover the original destination from the capture maps
(keyed by the pod's netns cookie and the client port), decide how to reach it, open
the upstream socket inside the pod netns with the agent's mark, and splice. The decision
is a pluggable `choose_route(ctx, dst) -> Route`; today every destination is reached by
`Passthrough` (plain TCP, which stays for destinations outside the mesh); the tunnel
issue adds an HBONE route beside it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Callable, Protocol

from nodeagent.agent import inpod
from nodeagent.agent.inpod import PodContext
from nodeagent.agent.metrics import AgentMetrics
from nodeagent.agent.splice import reset, splice

Address = tuple[str, int]


class Route(Protocol):
    name: str

    async def connect(self, ctx: PodContext, dst: Address) -> socket.socket: ...


class Passthrough:
    """Plain TCP from the pod's own netns to the original destination."""

    name = "passthrough"

    def __init__(self, mark: int, timeout: float):
        self.mark = mark
        self.timeout = timeout

    async def connect(self, ctx: PodContext, dst: Address) -> socket.socket:
        sock = inpod.upstream(ctx.netns_fd, inpod.family_of(dst[0]), self.mark)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, dst), self.timeout)
            return sock
        except BaseException:
            sock.close()
            raise


def connect_failure_reason(exc: BaseException) -> str:
    """A short label for why an upstream connect failed (metrics label and log text)."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "connect_timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "connect_unreachable"
    return "connect_error"


class Relay:
    """What both relays share: counting and logging a failed connection, then resetting
    the client so it sees the failure at once."""

    direction = ""

    def __init__(self, metrics: AgentMetrics, log: logging.Logger):
        self.metrics = metrics
        self.log = log

    def _fail(self, ctx: PodContext, client: socket.socket, reason: str, detail: str) -> None:
        self.metrics.failure(self.direction, reason)
        self.log.warning("%s %s: %s", self.direction, ctx, detail)
        reset(client)


class OutboundRelay(Relay):
    direction = "outbound"

    def __init__(self, capture, metrics: AgentMetrics, log: logging.Logger,
                 choose_route: Callable[[PodContext, Address], Route]):
        super().__init__(metrics, log)
        self.capture = capture
        self.choose_route = choose_route

    async def handle(self, ctx: PodContext, client: socket.socket) -> None:
        self.metrics.outbound.inc()
        try:
            client_port = client.getpeername()[1]
        except OSError:
            self._fail(ctx, client, "client_gone", "the client closed before it was accepted")
            return
        dst = self.capture.pop_original_dst(ctx.cookie, client.family, client_port)
        if dst is None:
            self._fail(ctx, client, "no_original_dst",
                       f"no original destination recorded for client port {client_port} "
                       "(a direct connection to the outbound port?); closing it")
            return
        route = self.choose_route(ctx, dst)
        try:
            upstream = await route.connect(ctx, dst)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = connect_failure_reason(exc)
            self._fail(ctx, client, reason, f"{route.name} to {dst[0]}:{dst[1]} failed: {reason} ({exc})")
            return
        if route.name == Passthrough.name:
            self.metrics.passthrough.inc()
        self.log.debug("outbound %s -> %s:%d via %s", ctx, dst[0], dst[1], route.name)
        await relay(self.metrics, "outbound", client, upstream)


async def relay(metrics: AgentMetrics, direction: str, client: socket.socket, upstream: socket.socket) -> None:
    """Splice client<->upstream, keeping the active gauge and byte counters."""
    active = metrics.active_by[direction]
    active.inc()
    try:
        result = await splice(client, upstream)
    finally:
        active.dec()
    metrics.bytes_by[(direction, "sent")].inc(result.a_to_b)
    metrics.bytes_by[(direction, "received")].inc(result.b_to_a)
