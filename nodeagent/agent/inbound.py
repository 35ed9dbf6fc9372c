"""Inbound relay: connections to a meshed pod's IP, steered by sk_lookup to the agent's
in-pod listener (0.0.0.0:15006), and the tunnel port (15008) until HBONE lands.

The accepted socket's local address is the original destination. The agent delivers
to the app from inside the pod netns over loopback, with a transparent socket bound to
the client's IP, so the app sees the real client address; the pod's policy routing
(podrouting.py) brings the app's replies back to that socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from nodeagent.agent import inpod
from nodeagent.agent.inpod import PodContext
from nodeagent.agent.metrics import AgentMetrics
from nodeagent.agent.outbound import Relay, connect_failure_reason, relay
from nodeagent.agent.splice import reset


class InboundRelay(Relay):
    direction = "inbound"

    def __init__(self, metrics: AgentMetrics, log: logging.Logger, *, mark: int, timeout: float,
                 agent_ports: frozenset[int]):
        super().__init__(metrics, log)
        self.mark = mark
        self.timeout = timeout
        self.agent_ports = agent_ports
        self._delivering: set[tuple[str, int]] = set()  # local addresses of our delivery sockets

    async def handle(self, ctx: PodContext, client: socket.socket) -> None:
        self.metrics.inbound.inc()
        try:
            dst = client.getsockname()[:2]
            src = client.getpeername()[:2]
        except OSError:
            self._fail(ctx, client, "client_gone", "the client closed before it was accepted")
            return
        if src in self._delivering:
            # Our own delivery came back: steering must skip it, else every retry loops.
            self._fail(ctx, client, "steering_loop", f"delivery from {src[0]}:{src[1]} was steered back to "
                       "the agent; is the pod's sk_lookup program current?")
            return
        if dst[1] in self.agent_ports:
            # Only a direct connection to the agent's own port lands here unsteered.
            self._fail(ctx, client, "agent_port", f"{src[0]} connected to agent port {dst[1]}; closing it")
            return
        try:
            upstream = inpod.transparent_upstream(ctx.netns_fd, self.mark, src[0], avoid_port=src[1])
        except OSError as exc:
            self._fail(ctx, client, "delivery_socket", f"cannot open a delivery socket as {src[0]}: {exc}")
            return
        local = upstream.getsockname()[:2]
        self._delivering.add(local)  # before connecting: a loop shows up during the connect
        try:
            await self._deliver(ctx, client, upstream, src, dst)
        finally:
            self._delivering.discard(local)

    async def _deliver(self, ctx: PodContext, client: socket.socket, upstream: socket.socket,
                       src: tuple[str, int], dst: tuple[str, int]) -> None:
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(upstream, dst), self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            upstream.close()
            reason = connect_failure_reason(exc)
            self._fail(ctx, client, reason, f"delivery from {src[0]} to {dst[0]}:{dst[1]} failed: {reason} ({exc})")
            return
        except BaseException:
            upstream.close()
            raise
        self.log.debug("inbound %s:%d -> %s %s:%d", src[0], src[1], ctx, dst[0], dst[1])
        await relay(self.metrics, "inbound", client, upstream)


class TunnelPlaceholder:
    """The tunnel port (15008) is reserved for HBONE (next issue): accept, say so, close."""

    def __init__(self, metrics: AgentMetrics, log: logging.Logger, port: int):
        self.metrics = metrics
        self.log = log
        self.port = port
        self._warned: set[int] = set()

    async def handle(self, ctx: PodContext, client: socket.socket) -> None:
        self.metrics.failure("inbound", "hbone_not_implemented")
        try:
            peer = client.getpeername()[0]
        except OSError:
            peer = "?"
        level = logging.DEBUG if ctx.cookie in self._warned else logging.WARNING
        self._warned.add(ctx.cookie)
        self.log.log(level, "inbound to %s: the HBONE tunnel on port %d is not implemented yet; "
                     "closing the connection from %s (send plain TCP to the pod's app port)",
                     ctx, self.port, peer)
        reset(client)
