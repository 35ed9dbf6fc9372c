"""Inbound: plaintext connections to a meshed pod's IP, steered by sk_lookup to the
agent's in-pod listener (0.0.0.0:15006), delivered to the app as the HBONE server does
(delivery.py).

The accepted socket's local address is the original destination. Policy first, read at
accept time (so a change applies to the next connection): PeerAuthentication STRICT on
that port refuses plaintext; otherwise AuthorizationPolicy decides with no principal.
kubelet's probes (plaintext to a port the pod's probes name, from the address the node
routes to the pod from, by a socket of the node itself) are delivered around both, as
Istio's ambient mode does.
A refused connection is reset and reported (`DENY`). An allowed one is delivered from
inside the pod netns over loopback, with a transparent socket bound to the client's IP,
so the app sees the real client address; the pod's policy routing (podrouting.py)
brings the app's replies back to that socket. The decision is admission.admit's, and a
delivered connection is re-checked there when policies change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from contextlib import ExitStack

from nodeagent import sockdiag
from nodeagent.addresses import unmapped
from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.admission import DENY, WAYPOINT, Admission, admit
from nodeagent.agent.proxy.delivery import Delivery, inbound_header, open_flow, open_inbound, relay_delivered
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.proxy.relay import Relay, connect_failure_reason, relay
from nodeagent.agent.proxy.telemetry import FLAG_CONNECT, PLAINTEXT, Flow
from nodeagent.policy import Connection
from nodeagent.resets import reset
from nodeagent.xds import dataplane


class InboundRelay(Relay):
    direction = "inbound"

    def __init__(self, inputs: ProxyInputs, log: logging.Logger, *, delivery: Delivery):
        super().__init__(inputs, log)
        self.delivery = delivery

    async def handle(self, ctx: PodContext, client: socket.socket) -> None:
        self.metrics.inbound.inc()
        if self._overloaded(ctx, client):
            return
        with self.inputs.memory.holdings.held(ctx.pod.ip):
            await self._handle(ctx, client)

    async def _handle(self, ctx: PodContext, client: socket.socket) -> None:
        try:
            dst = client.getsockname()[:2]
            src = client.getpeername()[:2]
        except OSError:
            self._fail(ctx, client, "client_gone", "the client closed before it was accepted")
            return
        if self.delivery.is_ours(src):
            # Our own delivery came back: steering must skip it, else every retry loops.
            self._fail(ctx, client, "steering_loop", f"delivery from {src[0]}:{src[1]} was steered back to "
                       "the agent; is the pod's sk_lookup program current?")
            return
        if dst[1] in self.inputs.agent_ports:
            # Only a direct connection to the agent's own port lands here unsteered.
            self._fail(ctx, client, "agent_port", f"{src[0]} connected to agent port {dst[1]}; closing it")
            return
        flow = open_flow(self.inputs, ctx, src, dst, None, PLAINTEXT)
        conn = Connection(src[0], None, None, ctx.pod, dst[0], dst[1])
        probe = self._probe(ctx, src, dst)
        if probe:
            self.metrics.probes.inc()
        admission = admit(self.inputs.policies.current, self.inputs.waypoint, conn, plaintext=True, probe=probe)
        if admission.route == DENY:
            self.log.debug("inbound %s:%d -> %s port %d denied: %s", src[0], src[1], ctx, dst[1], admission.reason)
            reset(client)
            self.inputs.telemetry.denied(flow, admission.policy, admission.reason)
            return
        if admission.route == WAYPOINT:
            await self._through_waypoint(ctx, client, flow, conn, admission)
            return
        with self.inputs.connections.delivering(conn, src, plaintext=True, probe=probe) as entry:
            try:
                upstream = await self.delivery.connect(ctx, src, dst, entry.ends)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = connect_failure_reason(exc)
                self._fail(ctx, client, reason,
                           f"delivery from {src[0]} to {dst[0]}:{dst[1]} failed: {reason} ({exc})")
                self.inputs.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason=reason)
                return
            self.log.debug("inbound %s:%d -> %s %s:%d", src[0], src[1], ctx, dst[0], dst[1])
            await relay_delivered(self.inputs, flow, entry, client, upstream)

    @staticmethod
    def _probe(ctx: PodContext, src: tuple[str, int], dst: tuple[str, int]) -> bool:
        """Whether the connection from `src` is kubelet's probe: to a port the pod's
        probes name, from the address the node routes to the pod from, and made by a
        socket of the node itself (its netns is the agent's). The address alone is not
        enough: kube-proxy's masquerade gives a NodePort or LoadBalancer client from
        anywhere that same source, and on a bridge a pod with NET_RAW can claim it."""
        if dst[1] not in ctx.pod.probe_ports or ctx.node_source is None:
            return False
        source = str(unmapped(ipaddress.ip_address(src[0])))
        return source == ctx.node_source and sockdiag.connected_here((source, src[1]), (ctx.pod.ip, dst[1]))

    async def _through_waypoint(self, ctx: PodContext, client, flow: Flow, conn: Connection,
                                admission: Admission) -> None:
        """Server-side L7: the pod's HTTP port is behind the waypoint, which enforces every
        policy of the pod and hands allowed requests back on deliver.sock. Tracked, so a
        change of that policy resets it."""
        src, dst = flow.src, flow.dst
        header = inbound_header(src, dst, None)
        with self.inputs.connections.delivering(conn, src, plaintext=True, admission=admission) as entry, \
                self.inputs.waypoint.expecting("inbound", header):
            upstream = await open_inbound(self.inputs.waypoint, header)
            if isinstance(upstream, str):
                self._fail(ctx, client, "waypoint_unavailable", f"from {src[0]} to {dst[0]}:{dst[1]}: {upstream}")
                self.inputs.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason="waypoint_unavailable")
                return
            await relay_delivered(self.inputs, flow, entry, client, upstream)

    async def handle_delivery(self, sock: socket.socket, header: dataplane.ProxyHeader) -> None:
        """A request Envoy allowed, handed back on deliver.sock: into the pod, as the client."""
        src, dst = header.source, header.destination
        ctx = self._enrolled(sock, dst[0], "delivery to")
        if ctx is None:
            return
        # the next leg of a connection taken: never refused
        with self.inputs.memory.holdings.held(ctx.pod.ip), ExitStack() as ends:
            try:
                upstream = await self.delivery.connect(ctx, src, dst, ends)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = connect_failure_reason(exc)
                self._fail(ctx, sock, reason, f"waypoint delivery from {src[0]} to {dst[0]}:{dst[1]} failed: "
                           f"{reason} ({exc})")
                return
            await relay(self.inputs, "inbound", sock, upstream)

