"""The inbound HBONE side: the tunnel listener (`<pod IP>:15008`) of every enrolled pod,
served by one HboneServer.

A connection is accepted in the pod's netns; once the pod's own certificate is at hand
the server does the TLS 1.3 handshake with it (client certificate required, verified
against the mesh root, SPIFFE ID of our trust domain). Each CONNECT stream must name
this pod's IP and a port that is not the agent's; AuthorizationPolicy then decides with
the verified principal, its namespace and the outer connection's peer IP. Denied: 403
and a `DENY` report. Allowed: delivered to the app inside the pod netns as the client's
IP (delivery.py, the same as plaintext), answered 200 once the app accepted, then
spliced. PeerAuthentication has nothing to say here: this is mTLS. A stream the client
resets before the app accepted (rapid reset, CVE-2023-44487) cancels the connect, so it
leaves no socket behind; one reset later ends its relay, which resets the app connection.

With the native HBONE engine (setting hbone_engine) the engine does TLS and HTTP/2 on the
accepted socket (native_inbound.NativeServing) and each CONNECT comes to the same
`_on_stream` as a NativeRequest. Once a CONNECT was delivered, the engine is given a
route for more of its kind on that connection (routes.py) and delivers them itself; each
comes here afterwards, already delivered, is admitted again as any other, and is reset
if what decides it changed as the engine read it; one delivered while nothing changed
(the route's generation is still the agent's) is decided as its route was, and reported
and tracked at once, in the engine's batch of events (`delivered_at_once`), without a task.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from functools import partial
from typing import Awaitable, TypeVar

from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.admission import DELIVER, DENY, WAYPOINT, Admission, Delivered, admit
from nodeagent.agent.proxy.delivery import (Delivery, close_delivered, inbound_header, open_flow, open_inbound,
                                            relay_delivered)
from nodeagent.agent.proxy.hbone_native import HboneEngines
from nodeagent.agent.proxy.native_inbound import NativeRequest, NativeServing
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.proxy.relay import connect_failure_reason
from nodeagent.agent.proxy.routes import Known, Routes
from nodeagent.agent.proxy.splice import Abort
from nodeagent.agent.proxy.telemetry import DESTINATION, FLAG_CONNECT, MTLS, Flow
from nodeagent.errors import ConfigError
from nodeagent.identity.errors import IdentityUnavailable
from nodeagent.identity.spiffe import Identity
from nodeagent.native import hbone
from nodeagent.policy import Connection
from nodeagent.resets import reset
from nodeagent.throttle import Throttle
from nodeagent.tunnel import HboneServer, HboneStream, StreamBudget, StreamInfo, TunnelMetrics, TunnelSettings, tls
from nodeagent.xds import dataplane

T = TypeVar("T")


class TunnelInbound:
    def __init__(self, inputs: ProxyInputs, delivery: Delivery, tunnel_metrics: TunnelMetrics, log: logging.Logger,
                 *, settings: TunnelSettings = TunnelSettings(), engines: HboneEngines | None = None,
                 budget: StreamBudget | None = None):
        self.inputs = inputs
        self.delivery = delivery
        self.metrics = inputs.metrics
        self.log = log
        self.verify = tls.verifier(inputs.identities.trust_domain)
        self.server = HboneServer(self._context_for, self.verify, self._on_stream,
                                  metrics=tunnel_metrics, log=log, settings=settings, budget=budget,
                                  memory=inputs.memory)
        self.engines = engines  # None or python: the HboneServer above serves
        self.native = NativeServing(self, tunnel_metrics, log)
        self.routes = Routes(delivery, engines, inputs.memory, log)
        inputs.connections.changing.append(self.routes.invalidate)
        inputs.memory.tightening.append(self.routes.invalidate)
        self._not_vouched = Throttle()  # a node vouching for what it cannot: logged at most every few seconds
        self._opened = tunnel_metrics.streams_opened.labels(direction="inbound")
        self._active = inputs.metrics.active_by["inbound"]
        self._sent = inputs.metrics.bytes_by[("inbound", "sent")]
        self._received = inputs.metrics.bytes_by[("inbound", "received")]

    async def handle(self, ctx: PodContext, sock: socket.socket) -> None:
        """An accepted connection on the pod's tunnel port."""
        identities = self.inputs.identities
        try:
            await identities.ready(identities.of(ctx.pod))
        except IdentityUnavailable as exc:
            self.metrics.failure("inbound", "no_certificate")
            self.log.warning("inbound %s: cannot serve HBONE without the pod's certificate: %s", ctx, exc)
            reset(sock)
            return
        if self.engines is not None and self.engines.native:
            await self.native.handle_connection(ctx, sock)
            return
        await self.server.handle_connection(sock)

    def connections(self) -> int:
        """HBONE connections served now (either engine)."""
        return len(self.server.sessions) + len(self.native.conns)

    def drain(self, ip: str) -> None:
        """A pod left: its HBONE connections take no new streams (GOAWAY once idle)."""
        self.routes.invalidate()
        for session in list(self.server.sessions):
            if session.local_address[0] == ip:
                session.drain()
        self.native.drain(ip)

    async def close(self) -> None:
        await self.native.close(grace=1.0)
        await self.server.close(grace=1.0)

    def _context_for(self, local_ip: str):
        ctx = self.inputs.pod_at(local_ip)
        if ctx is None:
            raise IdentityUnavailable(f"{local_ip} is not an enrolled pod of this node")
        identities = self.inputs.identities
        return identities.context(identities.of(ctx.pod), server_side=True)

    async def _on_stream(self, info: StreamInfo, _reader, stream: HboneStream | NativeRequest) -> None:
        ctx = self.inputs.pod_at(info.local_address[0])
        if ctx is None:
            stream.respond(503, reason="pod_gone")
            return
        self.metrics.inbound.inc()
        refusal = self.inputs.memory.refusal(ctx.pod.ip, ctx)
        if refusal is not None:  # a new stream: 503, as Envoy's circuit breakers and overload manager answer
            if _delivered(stream):
                self.routes.invalidate()  # the engine delivers nothing more for the pod without asking
            stream.respond(503, reason=refusal)
            return
        with self.inputs.memory.holdings.held(ctx.pod.ip):
            await self._stream(ctx, info, stream)

    async def _stream(self, ctx: PodContext, info: StreamInfo, stream: HboneStream | NativeRequest) -> None:
        src, dst = info.peer_address, info.authority
        vouched = self._vouched(info)
        if isinstance(vouched, str):
            stream.respond(403, reason="not_vouched")
            self.metrics.failure("inbound", "not_vouched")
            count = self._not_vouched.due()
            if count:
                self.log.warning("inbound HBONE from %s (%s) to %s: refused, %s (%d refused so since the last report)",
                                 info.peer_identity, src[0], ctx, vouched, count)
            return
        principal, enforced = vouched
        flow = open_flow(self.inputs, ctx, src, dst, principal, MTLS)
        flow.upstream = info.local_address
        refusal = self._refusal(ctx, dst)
        if refusal is not None:
            stream.respond(400, reason="bad_destination")
            self.metrics.failure("inbound", "hbone_bad_destination")
            self.log.warning("inbound HBONE from %s to %s: %s", info.peer_identity, ctx, refusal)
            self.inputs.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason=refusal)
            return
        conn = Connection(src[0], principal, flow.source.namespace, ctx.pod, dst[0], dst[1])
        # what the admission below decides under (kept with a route: Known)
        generation, policies, dataplane = (self.routes.generation, self.inputs.policies.current,
                                           self.inputs.waypoint.dataplane())
        admission = admit(policies, self.inputs.waypoint, conn, plaintext=False, enforced=enforced)
        if admission.route != DELIVER and _delivered(stream):
            self.routes.invalidate()  # the engine read it as what decides it changed: no more of those
            if admission.route == WAYPOINT:
                stream.respond(503, reason="waypoint_steering_changed")
                self.inputs.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed",
                                            reason="the port is now behind the waypoint")
                return
        if admission.route == WAYPOINT:
            await self._through_waypoint(ctx, stream, flow, conn, admission)
            return
        if admission.route == DENY:
            stream.respond(403, reason="policy_denied")
            self.log.debug("inbound HBONE %s -> %s port %d denied: %s", info.peer_identity, ctx, dst[1],
                           admission.reason)
            self.inputs.telemetry.denied(flow, admission.policy, admission.reason)
            return
        known = Known(ctx, conn, flow.source, flow.destination, flow.service, generation, policies, dataplane)
        await self._deliver(ctx, stream, flow, conn, src, dst, None if enforced is not None else known,
                            admission, enforced)

    def _vouched(self, info: StreamInfo) -> tuple[str, str | None] | str:
        """(the source principal, the digest of the HTTP policy a routing waypoint enforced
        for the stream or None), or why the stream is refused. A workload's certificate is
        its principal, and says nothing of enforcement whatever its headers say. A node
        agent's (spiffe.NODE_NAMESPACE) is no workload: it vouches for the pod of its node
        the connection comes from (its address, which the node's agent connects from), which
        must be that node's in our model and hold the principal the agent names; and for the
        digest of the policy its waypoint enforced (one waypoint per request)."""
        try:
            peer = Identity.parse(info.peer_identity)
        except ConfigError:
            return info.peer_identity, None
        if peer.node is None:
            return info.peer_identity, None
        enforced, principal = info.header(dataplane.ENFORCED_HEADER), info.header(dataplane.SOURCE_HEADER)
        if not enforced or not principal:
            return f"node {peer.node}'s identity without the source it vouches for and what its waypoint enforced"
        pod = self.inputs.model().pod_by_ip(info.peer_address[0])
        if pod is None or pod.node != peer.node:
            return f"{info.peer_address[0]} is no pod of node {peer.node} here"
        if self.inputs.identities.uri_of(pod) != principal:
            return f"pod {pod.namespace}/{pod.name} at {info.peer_address[0]} is not {principal}"
        return principal, enforced

    def delivered_at_once(self, info: StreamInfo, request: hbone.Request) -> bool:
        """A CONNECT the engine delivered on a route while nothing that decides delivery
        changed since the agent admitted the route's first (Routes.known): admitted as that
        one was, so reported, tracked for re-checks and counted here and now, its end
        closing its report (`_delivered_end`), as `_deliver` and relay_delivered do for the
        ones it awaits. False (nothing done): the general path admits it again."""
        known = self.routes.known(request)
        if known is None or known.policies is not self.inputs.policies.current \
                or known.dataplane != self.inputs.waypoint.dataplane():
            return False
        ctx, src, dst = known.ctx, info.peer_address, info.authority
        if self.inputs.memory.refusal(ctx.pod.ip, ctx) is not None:
            return False  # answered 503 by the general path, which stops the routes for the pod
        self.metrics.inbound.inc()
        flow = self.inputs.telemetry.open(Flow(DESTINATION, src, dst, known.source, known.destination,
                                               known.service, MTLS, upstream=info.local_address))
        entry = self.inputs.connections.track(Delivered(known.conn, src, False, Admission(DELIVER), Abort()))
        ip = ctx.pod.ip
        self.inputs.memory.holdings.take(ip)
        if self.routes.delivered(request, src[0], entry.ends):
            asyncio.get_running_loop().call_soon(self.routes.offer, ctx, request, src, dst, known)
        self._opened.inc()
        self._active.inc()
        entry.abort.bind(request)  # a re-check that revokes it resets the stream
        request.ended.add_done_callback(partial(self._delivered_end, flow, entry, ip))
        return True

    def _delivered_end(self, flow: Flow, entry: Delivered, ip: str, ended) -> None:
        end = ended.result()
        received, sent = end.from_peer, end.to_peer  # the client's bytes to the app, the app's back
        self._active.dec()
        self._sent.inc(received)
        self._received.inc(sent)
        self.inputs.connections.untrack(entry)
        self.inputs.memory.holdings.give(ip)
        close_delivered(self.inputs, flow, entry, received, sent)

    def _refusal(self, ctx: PodContext, dst: tuple[str, int]) -> str | None:
        if dst[0] in ctx.pod.other_ips:
            return (f":authority {dataplane.endpoint(*dst)} is this dual-stack pod's other-family address, which the mesh "
                    f"does not carry (only its status.podIP {ctx.pod.ip})")
        if dst[0] != ctx.pod.ip:
            return f":authority {dst[0]}:{dst[1]} is not this pod ({ctx.pod.ip}); the source's model is stale?"
        if dst[1] in self.inputs.agent_ports:
            return f":authority port {dst[1]} is one of the agent's own ports"
        return None

    async def _through_waypoint(self, ctx: PodContext, stream: HboneStream, flow, conn: Connection,
                                admission: Admission) -> None:
        """Server-side L7: Envoy enforces the pod's policy with the verified principal.
        Tracked, so a change of that policy resets the stream."""
        src, dst = flow.src, flow.dst
        header = inbound_header(src, dst, conn.source_principal)
        with self.inputs.connections.delivering(conn, src, plaintext=False, admission=admission) as entry, \
                self.inputs.waypoint.expecting("inbound", header):
            upstream = await unless_reset(stream, open_inbound(self.inputs.waypoint, header))
            if upstream is None:
                self._client_reset(flow)
                return
            if isinstance(upstream, str):
                stream.respond(503, reason="waypoint_unavailable")
                self.metrics.failure("inbound", "waypoint_unavailable")
                self.log.warning("inbound HBONE to %s port %d: %s", ctx, dst[1], upstream)
                self.inputs.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason="waypoint_unavailable")
                return
            stream.respond(200)
            await relay_delivered(self.inputs, flow, entry, stream, upstream)

    async def _deliver(self, ctx: PodContext, stream: HboneStream | NativeRequest, flow, conn: Connection, src,
                       dst, known: Known | None, admission: Admission, enforced: str | None) -> None:
        """Deliver to the app as the client; `known` None: the engine gets no route for
        more of its kind (a stream a node vouched for: what it says is per stream)."""
        with self.inputs.connections.delivering(conn, src, plaintext=False, admission=admission,
                                                enforced=enforced) as entry:
            if _delivered(stream):  # by the engine, on a route: connected and answered
                self.routes.delivered(stream.request, src[0], entry.ends)
                stream.respond(200)
                if known is not None:
                    self.routes.later(ctx, stream, src, dst, known)
                await relay_delivered(self.inputs, flow, entry, stream, None)
                return
            try:
                upstream = await self.delivery.connect(ctx, src, dst, entry.ends, stream.gone)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = connect_failure_reason(exc)
                stream.respond(503, reason="app_unreachable")
                self.metrics.failure("inbound", reason)
                self.log.warning("inbound HBONE to %s port %d: delivery failed: %s (%s)", ctx, dst[1], reason, exc)
                self.inputs.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason=reason)
                return
            if upstream is None:
                self._client_reset(flow)
                return
            stream.respond(200)
            if known is not None:
                self.routes.later(ctx, stream, src, dst, known)
            await relay_delivered(self.inputs, flow, entry, stream, upstream)

    def _client_reset(self, flow) -> None:
        """The client reset the stream before it reached the app: counted, not logged (a
        flood of them is logged once, by the tunnel's reset limit)."""
        self.metrics.failure("inbound", "client_reset")
        self.inputs.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason="client_reset")


def _delivered(stream) -> bool:
    """Whether the native engine delivered `stream` on a route (routes.py)."""
    return getattr(stream, "delivered", None) is not None


async def unless_reset(stream: HboneStream, opening: Awaitable[T]) -> T | None:
    """Await `opening` (the connect to the app or the waypoint) unless the client ends
    `stream` first: then the connect is cancelled — a socket it made is closed, also one
    that connected at that very moment — and None is returned. Without this, a stream
    reset while the agent connects (rapid reset) left an app connection open for good."""
    if stream.ended:
        opening.close()  # never started: nothing to undo
        return None
    task = asyncio.ensure_future(opening)
    gone = asyncio.ensure_future(stream.wait_closed())
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()  # also when we are cancelled ourselves
    if task.done():
        return task.result()  # connected (or failed) first; a stream reset meanwhile ends its relay
    await asyncio.wait((task,))  # let the cancelled connect close its socket
    if not task.cancelled() and task.exception() is None and isinstance(task.result(), socket.socket):
        reset(task.result())  # it connected as it was cancelled (3.11's wait_for can return then)
    return None

