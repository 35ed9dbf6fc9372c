"""The tunnel listener's connections on the native HBONE engine (setting hbone_engine;
docs/design.md "Native HBONE engine"), decided as tunnel/hbone_server.HboneServer decides
them: the same accept budget (per source, in Python: it sees each connection up or
ended), the same peer check (`tls.verifier` on the chain the engine reports, its verdict
before any HTTP/2), each CONNECT's `:authority` parsed (400), then TunnelInbound's
`_on_stream` — admission, delivery, tracking for re-checks, telemetry — with a
`NativeRequest`, which answers as a server HboneStream does and hands the delivered socket
to the engine when the relay carries it. Counted in the same tunnel metrics.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.hbone_native import ERROR_ENDS, error_label, tls_reason
from nodeagent.identity.errors import IdentityUnavailable
from nodeagent.native import SpliceResult, hbone
from nodeagent.resets import reset
from nodeagent.tunnel import StreamInfo, TunnelMetrics
from nodeagent.tunnel.authority import parse_authority
from nodeagent.tunnel.limits import STREAM_CAP, STREAM_RESETS

if TYPE_CHECKING:
    from nodeagent.agent.proxy.tunnel_inbound import TunnelInbound

DIRECTION = "inbound"


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

    def __init__(self, tunnel: "TunnelInbound", metrics: TunnelMetrics, log: logging.Logger):
        self.tunnel, self.metrics, self.log = tunnel, metrics, log
        self.conns: dict[int, _Served] = {}  # engine connection id -> what we know of it
        self._tasks: set[asyncio.Task] = set()  # stream handlers
        self._streams = metrics.streams.labels(direction=DIRECTION)  # looked up once (a few µs a call)

    async def handle_connection(self, ctx: PodContext, sock: socket.socket) -> None:
        """Serve one accepted socket until its connection ends; never raises (but CancelledError)."""
        budget = self.tunnel.server.handshakes  # one accept budget whichever engine serves
        try:
            served = _Served(ctx, sock.getpeername()[:2], sock.getsockname()[:2])
        except OSError:
            self._refused("closed", "?", "the client left before the handshake")
            sock.close()
            return
        if not budget.admit(served.peer[0], served.local[0]):
            reset(sock)  # counted and logged by the budget
            return
        try:
            await self._serve_connection(sock, served)
        finally:
            budget.closed(served.peer[0])

    async def _serve_connection(self, sock: socket.socket, served: "_Served") -> None:
        """handle_connection once the accept budget let it in (admit, closed)."""
        budget = self.tunnel.server.handshakes
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
                                                           lambda request: self._request(served, request),
                                                           lambda why, count: self._stream_refused(served, why, count))
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
        if end.how == "flood":  # as FloodGuard and the Python session count and log it
            self.metrics.limit_hit(DIRECTION, STREAM_RESETS)
            self.metrics.connection_error(DIRECTION, "too_many_resets")
            self.log.warning("HBONE connection from %s (%s:%d): %s", served.identity, *served.peer, end.reason)
        elif end.how in ERROR_ENDS:
            self.metrics.connection_error(DIRECTION, error_label(end))
            self.log.info("HBONE connection from %s (%s:%d) ended: %s (%s)", served.identity, *served.peer,
                          end.how, end.reason)

    def _stream_refused(self, served: _Served, why: str, count: int) -> None:
        """Streams the engine refused without asking (REFUSED_STREAM; `count` of one read),
        counted as the Python server counts them: by reason, and the stream cap's limit
        once per connection."""
        if why == "draining":
            self.metrics.refused(DIRECTION, "draining", count)
            self.log.info("HBONE connection from %s (%s:%d): %d stream(s) refused (draining)", served.identity,
                          *served.peer, count)
            return
        self.metrics.refused(DIRECTION, "too_many_streams", count)
        if served.conn.refused["max_streams"] == count:  # the connection's first
            self.metrics.limit_hit(DIRECTION, STREAM_CAP)
            self.log.warning("HBONE connection from %s (%s:%d): %d streams still being served, refusing more "
                             "(REFUSED_STREAM) until some end; a client resetting streams faster than we finish "
                             "them? (logged once per connection)", served.identity, *served.peer,
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
        self._streams.inc()
        request.ended.add_done_callback(lambda _: self._streams.dec())
        info = StreamInfo(served.identity, served.peer, served.local, authority, request.headers)
        if request.delivered is not None and self.tunnel.delivered_at_once(info, request):
            return  # the engine delivered it under what decided its route: done in this batch
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
    ended), and `carry` for the relay's splice. One the engine delivered on a route
    (`delivered`, hbone.h Routes) was answered 200 already: any other answer resets it."""

    def __init__(self, request: hbone.Request, metrics: TunnelMetrics):
        self.request, self.metrics = request, metrics
        self.status: int | None = None

    @property
    def delivered(self) -> int | None:
        """The local port of the socket the engine delivered it on, or None: ours to deliver."""
        return self.request.delivered

    def respond(self, status: int = 200, headers=(), reason: str | None = None) -> None:
        if self.status is not None:
            raise RuntimeError("respond() is for a server stream, once")
        self.status = status
        if status == 200:  # sent by carry(), with the socket (or by the engine, on a route)
            # one the engine delivered was opened, whether or not it ended before this loop heard of it
            if not self.ended or self.delivered is not None:
                self.metrics.streams_opened.labels(direction=DIRECTION).inc()
            return
        if not self.ended:  # else the client reset it first: answered all the same, not counted
            self.metrics.refused(DIRECTION, reason or f"status_{status}")
        if self.delivered is not None:
            self.request.reset()  # answered 200 by the engine: taken back with a reset
        else:
            self.request.refuse(status)

    @property
    def ended(self) -> bool:
        return any(future.done() for future in self.gone)

    @property
    def gone(self) -> tuple[asyncio.Future, asyncio.Future]:
        """Done once the stream ended or the client reset it (what `wait_closed` waits for)."""
        return self.request.ended, self.request.cancelled

    async def wait_closed(self) -> None:
        await asyncio.wait(self.gone, return_when=asyncio.FIRST_COMPLETED)

    def abort(self) -> None:
        if self.status is None and self.delivered is None:
            self.status = 0
            self.request.refuse(0)  # unanswered: REFUSED_STREAM
        else:
            self.status = 0 if self.status is None else self.status
            self.request.reset()

    async def carry(self, sock: socket.socket | None, abort=None) -> SpliceResult:
        """Relay `sock` (None: the socket the engine delivered it on) until the stream ends."""
        if self.delivered is not None:
            return await self.request.carry(None, abort)
        if self.request.cancelled.done() and not self.request.ended.done():
            self.request.refuse(0)  # reset by the client before the answer: nothing to relay
            reset(sock)
            return SpliceResult()
        return await self.request.carry(sock, abort)
