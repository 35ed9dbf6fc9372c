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
accepted socket (`NativeServing`): the same accept budget (per source, in Python: it sees
each connection up or ended), the same peer check (`tls.verifier` on the chain the engine
reports, its verdict before any HTTP/2), and each CONNECT goes through the same
`_on_stream` as a `NativeRequest`, which answers as an HboneStream does and hands the
delivered socket to the engine when relayed (the splice's `carry`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Awaitable, TypeVar

from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.admission import DENY, WAYPOINT, Admission, admit
from nodeagent.agent.proxy.delivery import Delivery, open_flow, open_inbound, relay_delivered
from nodeagent.agent.proxy.hbone_native import ERROR_ENDS, HboneEngines, error_label, tls_reason
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.proxy.relay import connect_failure_reason
from nodeagent.agent.proxy.telemetry import FLAG_CONNECT, MTLS
from nodeagent.identity.errors import IdentityUnavailable
from nodeagent.native import SpliceResult, hbone
from nodeagent.policy import Connection
from nodeagent.resets import reset
from nodeagent.tunnel import HboneServer, HboneStream, StreamInfo, TunnelMetrics, TunnelSettings, tls
from nodeagent.tunnel.authority import parse_authority
from nodeagent.tunnel.limits import STREAM_CAP, STREAM_RESETS

T = TypeVar("T")
DIRECTION = "inbound"


class TunnelInbound:
    def __init__(self, inputs: ProxyInputs, delivery: Delivery, tunnel_metrics: TunnelMetrics, log: logging.Logger,
                 *, settings: TunnelSettings = TunnelSettings(), engines: HboneEngines | None = None):
        self.inputs = inputs
        self.delivery = delivery
        self.metrics = inputs.metrics
        self.log = log
        self.verify = tls.verifier(inputs.identities.trust_domain)
        self.server = HboneServer(self._context_for, self.verify, self._on_stream,
                                  metrics=tunnel_metrics, log=log, settings=settings)
        self.engines = engines  # None or python: the HboneServer above serves
        self.native = NativeServing(self, tunnel_metrics, log)

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

    async def _on_stream(self, info: StreamInfo, _reader, stream: "HboneStream | NativeRequest") -> None:
        ctx = self.inputs.pod_at(info.local_address[0])
        if ctx is None:
            stream.respond(503, reason="pod_gone")
            return
        self.metrics.inbound.inc()
        src, dst = info.peer_address, info.authority
        flow = open_flow(self.inputs, ctx, src, dst, info.peer_identity, MTLS)
        flow.upstream = info.local_address
        refusal = self._refusal(ctx, dst)
        if refusal is not None:
            stream.respond(400, reason="bad_destination")
            self.metrics.failure("inbound", "hbone_bad_destination")
            self.log.warning("inbound HBONE from %s to %s: %s", info.peer_identity, ctx, refusal)
            self.inputs.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason=refusal)
            return
        conn = Connection(src[0], info.peer_identity, flow.source.namespace, ctx.pod, dst[0], dst[1])
        admission = admit(self.inputs.policies.current, self.inputs.waypoint, conn, plaintext=False)
        if admission.route == WAYPOINT:
            await self._through_waypoint(ctx, stream, flow, conn, admission)
            return
        if admission.route == DENY:
            stream.respond(403, reason="policy_denied")
            self.log.debug("inbound HBONE %s -> %s port %d denied: %s", info.peer_identity, ctx, dst[1],
                           admission.reason)
            self.inputs.telemetry.denied(flow, admission.policy, admission.reason)
            return
        await self._deliver(ctx, stream, flow, conn, src, dst)

    def _refusal(self, ctx: PodContext, dst: tuple[str, int]) -> str | None:
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
        with self.inputs.connections.delivering(conn, src, plaintext=False, admission=admission) as entry:
            upstream = await unless_reset(stream, open_inbound(self.inputs.waypoint, src, dst, conn.source_principal))
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

    async def _deliver(self, ctx: PodContext, stream: HboneStream, flow, conn: Connection, src, dst) -> None:
        with self.inputs.connections.delivering(conn, src, plaintext=False) as entry:
            try:
                upstream = await unless_reset(stream, self.delivery.connect(ctx, src, dst))
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
            await relay_delivered(self.inputs, flow, entry, stream, upstream)

    def _client_reset(self, flow) -> None:
        """The client reset the stream before it reached the app: counted, not logged (a
        flood of them is logged once, by the tunnel's reset limit)."""
        self.metrics.failure("inbound", "client_reset")
        self.inputs.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason="client_reset")


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


@dataclass(eq=False)
class _Served:
    """A native server connection: where it came from and whom TLS proved it to be."""

    ctx: PodContext
    peer: tuple[str, int]
    local: tuple[str, int]
    conn: hbone.ServerConnection | None = None
    identity: str | None = None
    released: bool = False
    draining: bool = False  # its pod left: GOAWAY sent, no new streams


class NativeServing:
    """The tunnel listener's connections on the native engine, decided as the HboneServer
    decides them (hbone_server.py): budget, peer identity, each CONNECT's authority, then
    TunnelInbound._on_stream; counted in the same tunnel metrics."""

    def __init__(self, tunnel: TunnelInbound, metrics: TunnelMetrics, log: logging.Logger):
        self.tunnel, self.metrics, self.log = tunnel, metrics, log
        self.conns: dict[int, _Served] = {}  # engine connection id -> what we know of it
        self._tasks: set[asyncio.Task] = set()  # stream handlers

    async def handle_connection(self, ctx: PodContext, sock: socket.socket) -> None:
        """Serve one accepted socket until its connection ends; never raises (but CancelledError)."""
        budget = self.tunnel.server.handshakes  # one accept budget whichever engine serves
        try:
            served = _Served(ctx, sock.getpeername()[:2], sock.getsockname()[:2])
        except OSError:
            self._refused("closed", "?", "the client left before the handshake")
            sock.close()
            return
        if not budget.admit(served.peer[0]):
            reset(sock)  # counted and logged by the budget
            return
        try:
            now = self.tunnel.inputs.pod_at(served.local[0])  # as _context_for: the pod enrolled there now
            if now is None:
                raise IdentityUnavailable(f"{served.local[0]} is not an enrolled pod of this node")
            identities = self.tunnel.inputs.identities
            creds = identities.manager.current(identities.of(now.pod)) if identities.manager else None
            if creds is None:
                raise IdentityUnavailable(f"no valid certificate for {now}")
            engine_tls = self.tunnel.engines.tls(creds)
            served.conn = self.tunnel.engines.engine.serve(sock, engine_tls, lambda pem: self._admit(served, pem),
                                                           lambda request: self._request(served, request))
        except (IdentityUnavailable, ValueError, OSError) as exc:
            budget.release(served.peer[0])
            self._refused("no_local_identity" if not isinstance(exc, OSError) else "engine",
                          "%s:%d" % served.peer, str(exc))
            if sock.fileno() >= 0:
                reset(sock)
            return
        conn = served.conn
        conn.up.add_done_callback(lambda _: self._release(served))
        conn.closed.add_done_callback(lambda _: self._release(served))
        try:
            await asyncio.shield(conn.up)
        except hbone.HboneFailed as failed:
            end = failed.end
            if end.how != "identity":  # _admit counted that one
                self._refused(tls_reason(end), "%s:%d" % served.peer, end.reason)
            return
        except asyncio.CancelledError:
            conn.close(abort=True)
            raise
        self.conns[conn.id] = served
        self.metrics.connections.labels(direction=DIRECTION).inc()
        try:
            end = await asyncio.shield(conn.closed)
        except asyncio.CancelledError:
            conn.close(abort=True)
            raise
        finally:
            self.conns.pop(conn.id, None)
            self.metrics.connections.labels(direction=DIRECTION).dec()
        self._count_refusals(served, end)
        if end.how == "flood":  # as FloodGuard and the Python session count and log it
            self.metrics.limit_hit(DIRECTION, STREAM_RESETS)
            self.metrics.connection_error(DIRECTION, "too_many_resets")
            self.log.warning("HBONE connection from %s (%s:%d): %s", served.identity, *served.peer, end.reason)
        elif end.how in ERROR_ENDS:
            self.metrics.connection_error(DIRECTION, error_label(end))
            self.log.info("HBONE connection from %s (%s:%d) ended: %s (%s)", served.identity, *served.peer,
                          end.how, end.reason)

    def _count_refusals(self, served: _Served, end: hbone.End) -> None:
        """The streams the engine refused without asking (stream cap, draining), counted as
        the Python server counts them, once the connection has ended."""
        if end.refused_draining:
            self.metrics.streams_refused.labels(direction=DIRECTION, reason="draining").inc(end.refused_draining)
        if end.refused_cap:
            self.metrics.streams_refused.labels(direction=DIRECTION, reason="too_many_streams").inc(end.refused_cap)
            self.metrics.limit_hit(DIRECTION, STREAM_CAP)
            self.log.warning("HBONE connection from %s (%s:%d): %d streams refused (REFUSED_STREAM) at the limit of "
                             "%d served at once; a client resetting streams faster than we finish them?",
                             served.identity, *served.peer, end.refused_cap,
                             self.tunnel.server.settings.max_concurrent_streams)

    def _release(self, served: _Served) -> None:
        if not served.released:
            served.released = True
            self.tunnel.server.handshakes.release(served.peer[0])

    def _admit(self, served: _Served, chain_pem: bytes) -> bool:
        """The engine's question after TLS: may this peer connect? (as the Python server's check_peer)"""
        try:
            served.identity = self.tunnel.verify(hbone.leaf_der(chain_pem))
            return True
        except Exception as exc:  # PeerRefused, or a chain we cannot read
            self._refused(getattr(exc, "reason", "identity"), "%s:%d" % served.peer, str(exc))
            return False

    def _refused(self, reason: str, peer: str, detail: str) -> None:
        self.metrics.handshake_failure(DIRECTION, reason)
        self.log.info("HBONE connection from %s refused (%s): %s", peer, reason, detail)

    def _request(self, served: _Served, request: hbone.Request) -> None:
        authority = parse_authority(request.authority)
        if authority is None:
            self.metrics.refused(DIRECTION, "bad_authority")
            self.log.info("HBONE stream from %s refused (bad_authority): %r", served.identity, request.authority)
            request.refuse(400)
            return
        self.metrics.streams.labels(direction=DIRECTION).inc()
        request.ended.add_done_callback(lambda _: self.metrics.streams.labels(direction=DIRECTION).dec())
        info = StreamInfo(served.identity, served.peer, served.local, authority, request.headers)
        task = asyncio.get_running_loop().create_task(self._serve(info, NativeRequest(request, self.metrics)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, info: StreamInfo, stream: "NativeRequest") -> None:
        """As HboneServer._handle: a handler that fails or returns without answering gets 503."""
        try:
            await self.tunnel._on_stream(info, stream, stream)
        except asyncio.CancelledError:
            stream.abort()
            raise
        except Exception as exc:
            self.log.warning("HBONE stream to %s:%d from %s: handler failed: %r", *info.authority,
                             info.peer_identity, exc)
            if stream.status is None:
                stream.respond(503, reason="handler_error")
            else:
                stream.abort()
            return
        if stream.status is None and stream.ended:
            stream.abort()  # reset by the client before the answer: the engine still waits for one
        elif stream.status is None:
            self.log.warning("HBONE stream to %s:%d: handler returned without an answer; answering 503",
                             *info.authority)
            stream.respond(503, reason="unanswered")

    def drain(self, ip: str) -> None:
        for served in list(self.conns.values()):
            if served.local[0] == ip and not served.draining:
                served.draining = True
                served.conn.close()  # GOAWAY: no new streams; closed once they end

    async def close(self, grace: float) -> None:
        conns = [s.conn for s in self.conns.values()]
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=grace)
        for conn in conns:
            if not conn.closed.done():
                conn.close(abort=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)


class NativeRequest:
    """An inbound CONNECT of the native engine as `_on_stream` uses a server HboneStream:
    `respond` (200 is sent when the relay hands over the delivered socket: the engine
    answers and relays at once), `ended`/`wait_closed` (the client reset it, or it
    ended), and `carry` for the relay's splice."""

    def __init__(self, request: hbone.Request, metrics: TunnelMetrics):
        self.request, self.metrics = request, metrics
        self.status: int | None = None

    def respond(self, status: int = 200, headers=(), reason: str | None = None) -> None:
        if self.status is not None:
            raise RuntimeError("respond() is for a server stream, once")
        self.status = status
        if status == 200:  # sent by carry(), with the socket
            if not self.ended:
                self.metrics.streams_opened.labels(direction=DIRECTION).inc()
            return
        if not self.ended:  # else the client reset it first: answered all the same, not counted
            self.metrics.refused(DIRECTION, reason or f"status_{status}")
        self.request.refuse(status)

    @property
    def ended(self) -> bool:
        return self.request.ended.done() or self.request.cancelled.done()

    async def wait_closed(self) -> None:
        await asyncio.wait((self.request.ended, self.request.cancelled), return_when=asyncio.FIRST_COMPLETED)

    def abort(self) -> None:
        if self.status is None:
            self.status = 0
            self.request.refuse(0)  # unanswered: REFUSED_STREAM
        else:
            self.request.reset()

    async def carry(self, sock: socket.socket, abort=None) -> SpliceResult:
        if self.request.cancelled.done() and not self.request.ended.done():
            self.request.refuse(0)  # reset by the client before the answer: nothing to relay
            reset(sock)
            return SpliceResult()
        return await self.request.carry(sock, abort)
