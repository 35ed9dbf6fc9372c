"""Inbound: plaintext connections to a meshed pod's IP, steered by sk_lookup to the
agent's in-pod listener (0.0.0.0:15006), and delivery to the app, shared with the HBONE
server (tunnel_inbound.py).

The accepted socket's local address is the original destination. Policy first, read at
accept time (so a change applies to the next connection): PeerAuthentication STRICT on
that port refuses plaintext; otherwise AuthorizationPolicy decides with no principal.
A refused connection is reset and reported (`DENY`). An allowed one is delivered from
inside the pod netns over loopback, with a transparent socket bound to the client's IP,
so the app sees the real client address; the pod's policy routing (podrouting.py)
brings the app's replies back to that socket. The decision is admission.admit's, and a
delivered connection is re-checked there when policies change.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from nodeagent.agent.inpod import sockets as inpod
from nodeagent.agent.proxy.admission import DENY, WAYPOINT, Admission, Delivered, InboundConnections, admit, describe
from nodeagent.agent.proxy.identities import WorkloadIdentities
from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.metrics import AgentMetrics
from nodeagent.agent.proxy.outbound import Relay, connect_failure_reason, relay
from nodeagent.agent.proxy.policies import PolicyState
from nodeagent.agent.proxy.telemetry import DESTINATION, FLAG_CONNECT, PLAINTEXT, Flow, Peer, Telemetry
from nodeagent.errors import NodeagentError
from nodeagent.model import Model
from nodeagent.xds import dataplane
from nodeagent.policy import Connection
from nodeagent.resets import reset

Address = tuple[str, int]


class Delivery:
    """Connections to the app inside the pod netns, as the client (transparent, on lo)."""

    def __init__(self, mark: int, timeout: float):
        self.mark = mark
        self.timeout = timeout
        self._connecting: set[Address] = set()  # local addresses of our delivery sockets

    def is_ours(self, addr: Address) -> bool:
        """True for a connection from one of our delivery sockets (a steering loop)."""
        return addr in self._connecting

    async def connect(self, ctx: PodContext, src: Address, dst: Address) -> socket.socket:
        upstream = inpod.transparent_upstream(ctx.netns_fd, self.mark, src[0], avoid_port=src[1])
        local = upstream.getsockname()[:2]
        self._connecting.add(local)  # before connecting: a loop shows up during the connect
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(upstream, dst), self.timeout)
            return upstream
        except BaseException:
            upstream.close()
            raise
        finally:
            self._connecting.discard(local)


class InboundView:
    """What inbound handling reads, shared by the plaintext relay and the HBONE server."""

    def __init__(self, model: Callable[[], Model], policies: PolicyState, identities: WorkloadIdentities,
                 telemetry: Telemetry, connections: InboundConnections):
        self.model = model
        self.policies = policies
        self.identities = identities
        self.telemetry = telemetry
        self.connections = connections

    def flow(self, ctx: PodContext, src: Address, dst: Address, principal: str | None, security: str) -> Flow:
        """Open the destination's report of a connection to `ctx`'s pod. The source
        workload is the pod at the client address when its identity agrees with the
        proven principal (or when no principal was proven)."""
        model, pod = self.model(), ctx.pod
        client = model.pod_by_ip(src[0])
        if client is not None and principal and self.identities.uri_of(client) != principal:
            client = None
        source = Peer.of(client, principal) if client or not principal else _peer_of_principal(principal)
        own = self.identities.uri_of(pod) if self.identities.enabled else None
        return self.telemetry.open(Flow(DESTINATION, src, dst, source, Peer.of(pod, own),
                                        model.service_of(pod, dst[1]), security))

    def deny(self, flow: Flow, policy: str, reason: str) -> None:
        self.telemetry.denied(flow, policy, reason)

    async def relay_delivered(self, metrics: AgentMetrics, flow: Flow, entry: Delivered, client,
                              upstream: socket.socket) -> None:
        """Relay a connection the agent sent on (to the app, or to the waypoint), tracked
        (`entry`, from `connections.delivering`, entered before the upstream connect so
        no re-check misses it) for re-checks, then close its report: with DENY when a
        policy change revoked it. One revoked while connecting is reset as it starts."""
        result = await relay(metrics, "inbound", client, upstream, entry.abort)
        received, sent, revoked = result.a_to_b, result.b_to_a, entry.revoked
        if revoked is None:
            self.telemetry.close(flow, received=received, sent=sent)
        elif revoked.route == DENY:
            self.telemetry.denied(flow, revoked.policy, describe(revoked, entry), received=received, sent=sent)
        else:
            self.telemetry.close(flow, received=received, sent=sent, reason=describe(revoked, entry))


def _peer_of_principal(principal: str) -> Peer:
    parts = principal.split("/")  # spiffe: '' td ns <ns> sa <sa>
    namespace = parts[4] if len(parts) == 7 and parts[3] == "ns" else None
    return Peer(namespace=namespace, principal=principal) if namespace else Peer(principal=principal)


class InboundRelay(Relay):
    direction = "inbound"

    def __init__(self, metrics: AgentMetrics, log: logging.Logger, *, view: InboundView, delivery: Delivery,
                 agent_ports: frozenset[int]):
        super().__init__(metrics, log)
        self.view = view
        self.delivery = delivery
        self.agent_ports = agent_ports
        self.waypoint = None  # the node's Waypoint (agent/waypoint.py), when it runs one

    async def handle(self, ctx: PodContext, client: socket.socket) -> None:
        self.metrics.inbound.inc()
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
        if dst[1] in self.agent_ports:
            # Only a direct connection to the agent's own port lands here unsteered.
            self._fail(ctx, client, "agent_port", f"{src[0]} connected to agent port {dst[1]}; closing it")
            return
        flow = self.view.flow(ctx, src, dst, None, PLAINTEXT)
        conn = Connection(src[0], None, None, ctx.pod, dst[0], dst[1])
        admission = admit(self.view.policies.current, self.waypoint, conn, plaintext=True)
        if admission.route == DENY:
            self.log.debug("inbound %s:%d -> %s port %d denied: %s", src[0], src[1], ctx, dst[1], admission.reason)
            reset(client)
            self.view.deny(flow, admission.policy, admission.reason)
            return
        if admission.route == WAYPOINT:
            await self._through_waypoint(ctx, client, flow, conn, admission)
            return
        with self.view.connections.delivering(conn, src, plaintext=True) as entry:
            try:
                upstream = await self.delivery.connect(ctx, src, dst)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = connect_failure_reason(exc)
                self._fail(ctx, client, reason,
                           f"delivery from {src[0]} to {dst[0]}:{dst[1]} failed: {reason} ({exc})")
                self.view.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason=reason)
                return
            self.log.debug("inbound %s:%d -> %s %s:%d", src[0], src[1], ctx, dst[0], dst[1])
            await self.view.relay_delivered(self.metrics, flow, entry, client, upstream)

    async def _through_waypoint(self, ctx: PodContext, client, flow: Flow, conn: Connection,
                                admission: Admission) -> None:
        """Server-side L7: the pod's HTTP port is behind the waypoint, which enforces every
        policy of the pod and hands allowed requests back on deliver.sock. Tracked, so a
        change of that policy resets it."""
        src, dst = flow.src, flow.dst
        with self.view.connections.delivering(conn, src, plaintext=True, admission=admission) as entry:
            upstream = await open_inbound(self.waypoint, src, dst, None)
            if isinstance(upstream, str):
                self._fail(ctx, client, "waypoint_unavailable", f"from {src[0]} to {dst[0]}:{dst[1]}: {upstream}")
                self.view.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason="waypoint_unavailable")
                return
            await self.view.relay_delivered(self.metrics, flow, entry, client, upstream)

    async def handle_delivery(self, sock: socket.socket, header: dataplane.ProxyHeader) -> None:
        """A request Envoy allowed, handed back on deliver.sock: into the pod, as the client."""
        src, dst = header.source, header.destination
        ctx = self._enrolled(sock, dst[0], "delivery to")
        if ctx is None:
            return
        try:
            upstream = await self.delivery.connect(ctx, src, dst)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = connect_failure_reason(exc)
            self._fail(ctx, sock, reason, f"waypoint delivery from {src[0]} to {dst[0]}:{dst[1]} failed: "
                       f"{reason} ({exc})")
            return
        await relay(self.metrics, "inbound", sock, upstream)


async def open_inbound(waypoint, src: Address, dst: Address, principal: str | None):
    """A connection to the waypoint's inbound listener for `dst`, or the reason there is none."""
    tlvs = ((dataplane.TLV_PRINCIPAL, principal.encode()),) if principal else ()
    try:
        return await waypoint.open("inbound", dataplane.ProxyHeader(src, dst, tlvs))
    except NodeagentError as exc:
        return str(exc)
