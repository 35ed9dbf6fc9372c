"""What every relay of the data path shares, below its users: `relay()` splices a
client with its upstream (sockets, or one side an HBONE stream) by the engine the
inputs' Splicer chose (native for socket pairs, or Python), keeping the active gauge and
byte counters; `connect_failure_reason` labels a failed upstream connect;
`Relay` is the base of the outbound and inbound relays: it counts and logs a failed
connection and resets the client, and finds the enrolled pod a connection Envoy handed
back is for. The inbound paths and the outbound path both build on this module, never
on each other.
"""

from __future__ import annotations

import logging
import socket

from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.proxy.splice import Abort, SpliceResult
from nodeagent.identity.errors import IdentityUnavailable
from nodeagent.resets import reset
from nodeagent.tunnel import TunnelError
from nodeagent.tunnel.errors import connect_failure_reason as tcp_failure_reason


def connect_failure_reason(exc: BaseException) -> str:
    """A short label for why an upstream connect failed (metrics label and log text)."""
    if isinstance(exc, TunnelError):
        return f"hbone_{exc.reason}"
    if isinstance(exc, IdentityUnavailable):
        return "no_certificate"
    return tcp_failure_reason(exc)


async def relay(inputs: ProxyInputs, direction: str, client, upstream, abort: Abort | None = None) -> SpliceResult:
    """Splice client<->upstream, keeping the active gauge and byte counters. Both are
    sockets, or one is an HBONE stream; `a_to_b` of the result is client -> upstream.
    `abort` can end it early (splice.Abort)."""
    metrics, splice = inputs.metrics, inputs.splicer.splice
    active = metrics.active_by[direction]
    active.inc()
    try:
        if isinstance(client, socket.socket):
            result = await splice(client, upstream, abort)
        else:
            back = await splice(upstream, client, abort)
            result = SpliceResult(back.b_to_a, back.a_to_b, back.error)
    finally:
        active.dec()
    metrics.bytes_by[(direction, "sent")].inc(result.a_to_b)
    metrics.bytes_by[(direction, "received")].inc(result.b_to_a)
    return result


class Relay:
    """What both relays share: counting and logging a failed connection, then resetting
    the client so it sees the failure at once."""

    direction = ""

    def __init__(self, inputs: ProxyInputs, log: logging.Logger):
        self.inputs = inputs
        self.metrics = inputs.metrics
        self.log = log

    def _fail(self, ctx: PodContext, client: socket.socket, reason: str, detail: str) -> None:
        self.metrics.failure(self.direction, reason)
        self.log.warning("%s %s: %s", self.direction, ctx, detail)
        reset(client)

    def _overloaded(self, ctx: PodContext, client: socket.socket) -> bool:
        """`ctx`'s pod holds as many connections as one pod may, or the agent is over its
        memory limit's mark (and the pod over its share): a new connection is reset,
        counted (reason pod_connection_limit, memory_limit) and logged at most every few
        seconds."""
        reason = self.inputs.memory.refusal(ctx.pod.ip, ctx)
        if reason is None:
            return False
        self.metrics.failure(self.direction, reason)
        reset(client)
        return True

    def _enrolled(self, sock: socket.socket, ip: str, what: str) -> PodContext | None:
        """The enrolled pod at `ip` a connection Envoy handed back is for; else reset it."""
        ctx = self.inputs.pod_at(ip)
        if ctx is None:
            self.metrics.failure(self.direction, "waypoint_pod_gone")
            self.log.warning("waypoint %s %s: not an enrolled pod of this node; closing", what, ip)
            reset(sock)
        return ctx
