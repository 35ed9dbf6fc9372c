"""The same-node fast path (issue 11): an outbound connection whose endpoint is a meshed
pod enrolled on this very node skips HBONE, its TLS and HTTP/2 and its second hop.

HBONE between two pods of one node would have this agent encrypt to itself: both ends'
certificates are its own, so the mutual TLS proves nothing it does not know already.
The fast path therefore decides what the HBONE server would have decided for that
connection — `admission.admit` with the source pod's SPIFFE identity, namespace and IP
and the endpoint's port, not plaintext, so PeerAuthentication STRICT holds — reports it
as both ends would (the source's report and the destination's, `mutual_tls`, the same
DENY, counters and flow lines, marked `same_node` in the flow log), delivers into the
server pod's netns as the client's address (delivery.Delivery, as the HBONE server
does), tracks the connection for revocation (admission.InboundConnections) and joins
the client socket with the delivery socket in one relay of the inputs' Splicer (native:
splice(2) on the engine's thread; Python otherwise).

A connection it does not take goes over HBONE exactly as before: the setting
`same_node_fast_path` off (the outbound relay then has no SameNodeRoute), an endpoint
that is not an enrolled pod of this node, a pod without a valid certificate now (HBONE
waits for it and reports the failure), a port of the agent's own, or a pod port behind
the waypoint (server-side L7: Envoy decides, reached through the HBONE server). A
denied connection is refused as the HBONE client sees a 403: the client is reset and
the source counts `hbone_status_403`, so dashboards do not tell the two paths apart.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from prometheus_client import CollectorRegistry, Counter

from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.admission import DENY, WAYPOINT, admit
from nodeagent.agent.proxy.delivery import Delivery, open_flow, relay_delivered
from nodeagent.agent.proxy.destinations import Target
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.proxy.relay import Relay, connect_failure_reason
from nodeagent.agent.proxy.telemetry import FLAG_CONNECT, MTLS, SOURCE, Flow, Peer
from nodeagent.policy import Connection

Address = tuple[str, int]
DENIED_REASON = "hbone_status_403"  # the source's failure label of a denial, as over HBONE
UNREACHABLE_REASON = "hbone_status_503"  # ... of an app that refused the delivery
OUTCOMES = ("relayed", "denied", "failed", "waypoint")


class SameNodeRoute(Relay):
    """Outbound connections to a meshed pod of this node, admitted and joined here."""

    direction = "outbound"  # its failures are the outbound relay's, as over HBONE

    def __init__(self, inputs: ProxyInputs, delivery: Delivery, registry: CollectorRegistry, log: logging.Logger):
        super().__init__(inputs, log)
        self.delivery = delivery  # the HBONE server's: its sockets are known to the steering loop check
        counter = Counter("nodeagent_same_node_connections",
                          "Outbound connections to a meshed pod of this node decided by the same-node fast "
                          "path (no HBONE), by outcome: relayed, denied, failed (the app refused), or waypoint "
                          "(the port is behind the waypoint: left to HBONE)", ["outcome"], registry=registry)
        self._counters = {outcome: counter.labels(outcome=outcome) for outcome in OUTCOMES}
        self.counts = dict.fromkeys(OUTCOMES, 0)  # the same, for status

    def _count(self, outcome: str) -> None:
        self._counters[outcome].inc()
        self.counts[outcome] += 1

    def local(self, target: Target) -> PodContext | None:
        """The enrolled pod of this node `target` is, when it is one and meshed."""
        if not target.meshed or target.pod is None:
            return None
        ctx = self.inputs.pod_at(target.address[0])
        return ctx if ctx is not None and ctx.pod.key == target.pod.key else None

    async def relay(self, ctx: PodContext, client: socket.socket, src: Address, dst: Address,
                    target: Target) -> bool:
        """Take the connection from `ctx`'s pod to `target` if it is this node's: True
        once it is decided and done (relayed, refused or failed), False when it must go
        over HBONE (nothing was reported or counted then)."""
        server = self.local(target)
        if server is None or target.address[1] in self.inputs.agent_ports:
            return False
        identities = self.inputs.identities
        source, destination = identities.uri_of(ctx.pod), identities.uri_of(target.pod)
        if not identities.enabled or source is None or destination is None or \
                identities.missing([ctx.pod, target.pod]):
            return False
        conn = Connection(src[0], source, ctx.pod.namespace, server.pod, *target.address)
        admission = admit(self.inputs.policies.current, self.inputs.waypoint, conn, plaintext=False)
        if admission.route == WAYPOINT:
            self._count("waypoint")
            return False
        telemetry = self.inputs.telemetry
        outbound = telemetry.open(Flow(SOURCE, src, dst, Peer.of(ctx.pod, source), Peer.of(target.pod, destination),
                                       target.service, MTLS, upstream=target.address, same_node=True))
        self.metrics.inbound.inc()
        inbound = open_flow(self.inputs, server, src, target.address, source, MTLS)
        inbound.upstream, inbound.same_node = target.address, True
        if admission.route == DENY:
            self._count("denied")
            telemetry.denied(inbound, admission.policy, admission.reason)
            self._fail(ctx, client, DENIED_REASON, f"to {_where(server, target)} denied by policy on this node "
                       f"(same-node fast path): {admission.reason}")
            telemetry.close(outbound, flags=FLAG_CONNECT, verdict="failed", reason=admission.reason)
            return True
        await self._join(ctx, server, client, conn, src, target, outbound, inbound)
        return True

    async def _join(self, ctx: PodContext, server: PodContext, client: socket.socket, conn: Connection,
                    src: Address, target: Target, outbound: Flow, inbound: Flow) -> None:
        """Deliver into the server pod as the client and relay, tracked for re-checks."""
        metrics, telemetry = self.metrics, self.inputs.telemetry
        with self.inputs.connections.delivering(conn, src, plaintext=False) as entry:
            try:
                upstream = await self.delivery.connect(server, src, target.address)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = connect_failure_reason(exc)
                self._count("failed")
                metrics.failure("inbound", reason)  # as the HBONE server counts it
                telemetry.close(inbound, flags=FLAG_CONNECT, verdict="failed", reason=reason)
                self._fail(ctx, client, UNREACHABLE_REASON, f"to {_where(server, target)}: delivery failed: "
                           f"{reason} ({exc})")
                telemetry.close(outbound, flags=FLAG_CONNECT, verdict="failed", reason=reason)
                return
            self._count("relayed")
            self.log.debug("outbound %s -> %s: same-node fast path", ctx, _where(server, target))
            active = metrics.active_by["outbound"]  # the inbound side's gauge and bytes: relay_delivered
            active.inc()
            try:
                result = await relay_delivered(self.inputs, inbound, entry, client, upstream)
            finally:
                active.dec()
        metrics.bytes_by[("outbound", "sent")].inc(result.a_to_b)
        metrics.bytes_by[("outbound", "received")].inc(result.b_to_a)
        telemetry.close(outbound, received=result.a_to_b, sent=result.b_to_a)

    def describe(self) -> dict:
        """For status: on, how the bytes move, and the outcomes so far."""
        return {"enabled": True, "join": "splice" if self.inputs.splicer.engine is not None else "python",
                "connections": dict(self.counts)}


def _where(server: PodContext, target: Target) -> str:
    return f"{target.address[0]}:{target.address[1]} ({server.pod.namespace}/{server.pod.name})"
