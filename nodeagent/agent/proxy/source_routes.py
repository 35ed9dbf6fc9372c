"""The source's connections in the native HBONE engine (docs/design.md "The source's
connections in the engine", issue 11): with the native engine and the capture map at hand
(setting outbound_in_engine), a pod's outbound listeners are the engine's. It accepts, reads
the original destination from the capture map and, when the listener has an out-route for
it, opens the CONNECT itself on the pooled connection of the route's next endpoint, with the
client's first bytes. This agent hears of each afterwards, in the engine's batch of events,
and does only the bookkeeping there: the flow and Istio's TCP metrics, the pod's connection
count, the tunnel's stream counts. No task, no future, no socket object per connection.

Everything else comes to this agent with the socket, as an accepted connection is handled
without the engine (outbound.OutboundRelay.handle): no original destination recorded, no
route (the first connection to a destination), one of another generation, the endpoint's
pooled connection not up or full, the pod at its connection cap, and a routed stream that
ended before its 200 (refused, reset, unprocessed: retried through the pool as it retries,
no answer in time). A connection this agent carried over HBONE on the native pool teaches
the listener the route for its destination (`learn`): every endpoint the balancer could
pick (a Service's, in its order, or the pod), each with its pooled connection, when all
are meshed pods of other nodes with identities; else none, and each connection to that
destination is the agent's. The generation moves with everything that decides where an
outbound connection goes (InboundConnections.changing: the model, the policies, the
waypoint's steering; the memory guard tightening), so no connection the engine accepts
after such a change goes by a route learned before it.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nodeagent.agent.inpod.sockets import InPodListener, PodContext
from nodeagent.agent.proxy.destinations import Target, endpoints
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.proxy.native_outbound import NativePool, failure, unprocessed
from nodeagent.agent.proxy.telemetry import MTLS, SOURCE, Flow, Peer
from nodeagent.identity.errors import IdentityUnavailable
from nodeagent.native import hbone
from nodeagent.resets import reset
from nodeagent.tunnel.authority import format_authority, parse_authority

if TYPE_CHECKING:
    from nodeagent.agent.proxy.outbound import OutboundRelay
    from nodeagent.agent.proxy.tunnel_outbound import HboneRoute

Address = tuple[str, int]
OUTBOUND = "outbound"
LISTENER_ROUTES = 256  # out-routes one listener holds at most (native/hbone.c LISTENER_ROUTES)
ROOM_LOW = 8  # the engine's room for a pod is given again once Python counts it this low (or at half)
CLOSED_KEPT = 5.0  # seconds past open_timeout a closed listener's events are still attributed to its pod


@dataclass(eq=False)
class Offload:
    """One pod's outbound listener in the engine, and what the engine may still open on it."""

    routes: "SourceRoutes"
    inpod: InPodListener
    listener: hbone.Listener
    seen: int = 0  # routed opens heard of (opened, or ended before a 200)
    room: int | None = -1  # last room given (None: no limit; -1: none yet)...
    seen_then: int = 0  # ...when `seen` was this
    closed_at: float | None = None
    dsts: dict[Address, "_Route"] = field(default_factory=dict)

    @property
    def ctx(self) -> PodContext:
        return self.inpod.ctx

    def close(self, accept_queued: bool) -> None:
        self.listener.close(accept_queued)
        self.closed_at = time.monotonic()
        for route in self.dsts.values():
            self.routes._routes.pop(route.tag, None)
        self.dsts.clear()


@dataclass(frozen=True)
class Handed:
    """What the engine says of a connection it handed over (OutboundRelay.handle): its
    original destination (None: none recorded), and, when it missed on an out-route or
    came back from one before its 200, the endpoint the route's balancer chose."""

    via: Offload
    dst: Address | None
    client_port: int
    hint: Target | None


@dataclass(eq=False)
class _Route:
    """An out-route given to the engine: what its events' endpoints stand for."""

    tag: int
    ctx: PodContext
    targets: list[Target]
    source: Peer
    peers: list[Peer]

    def target(self, endpoint: int) -> Target | None:
        return self.targets[endpoint] if endpoint < len(self.targets) else None


class SourceRoutes:
    """The engine's listeners' owner (hbone.ListenerOwner) for the outbound relay."""

    def __init__(self, relay: "OutboundRelay", hbone_route: "HboneRoute", inputs: ProxyInputs, capture,
                 log: logging.Logger, *, enabled: bool = True):
        self.relay, self.hbone, self.inputs, self.capture, self.log = relay, hbone_route, inputs, capture, log
        self.enabled = enabled
        self.generation = 1
        self._tags = itertools.count(1)
        self._listeners: dict[int, Offload] = {}
        self._routes: dict[int, _Route] = {}  # tag -> route
        self._open: dict[int, tuple[Flow, PodContext, int]] = {}  # routed stream -> its flow, the source pod, conn
        self._per_conn: collections.Counter[int] = collections.Counter()  # open routed streams of a pooled conn
        hbone_route.engine_streams = lambda conn: self._per_conn.get(conn, 0)  # the pools count them too
        self._per_pod: collections.Counter[PodContext] = collections.Counter()  # open routed streams
        self._drained: dict[PodContext | None, asyncio.Future] = {}  # waiters for a pod's (None: all) to end
        self._engine = None  # the engine this owns the listeners of
        metrics = hbone_route.metrics
        self._streams = metrics.streams.labels(direction=OUTBOUND)
        self._opened = metrics.streams_opened.labels(direction=OUTBOUND)
        self.why = "not started"

    # --- the listeners -----------------------------------------------------------------
    def offload(self, inpod: InPodListener) -> Offload | None:
        """The engine takes `inpod`'s accepting when it can (InPodListener's `offload`)."""
        engines = self.hbone.engines
        map_fd = getattr(self.capture, "origdst_map_fd", None)
        if not self.enabled:
            self.why = "outbound_in_engine=false"
            return None
        if engines is None or not engines.native:
            self.why = "the native HBONE engine is not in use"
            return None
        if map_fd is None:
            self.why = "no capture map to read original destinations from"
            return None
        engine = engines.engine
        if self._engine is not engine:
            engine.set_out_generation(self.generation)
            engine.listener_owner = self
            self._engine = engine
        try:
            listener = engine.listen(inpod.sock, map_fd(), inpod.ctx.cookie)
        except OSError as exc:
            self.log.warning("%s: the native engine cannot accept on %s:%d (%s); this agent accepts there",
                             inpod.ctx, *inpod.address, exc)
            return None
        off = self._listeners[listener.id] = Offload(self, inpod, listener)
        self._purge()
        self._refill(off)
        self.why = "the native HBONE engine accepts on the pods' outbound listeners"
        return off

    def _purge(self) -> None:
        """Forget listeners closed long enough that no event of theirs can come unanswered."""
        limit = time.monotonic() - self.hbone.settings.open_timeout - CLOSED_KEPT
        for lid in [lid for lid, off in self._listeners.items() if off.closed_at is not None and off.closed_at < limit]:
            del self._listeners[lid]

    def invalidate(self) -> None:
        """What decides where outbound connections go changed: no route learned before is used."""
        self.generation += 1
        if self._engine is not None:
            self._engine.set_out_generation(self.generation)
        self._routes.clear()
        for off in self._listeners.values():
            off.dsts.clear()

    def describe(self) -> dict:
        return {"why": self.why, "listeners": sum(o.closed_at is None for o in self._listeners.values()),
                "routes": len(self._routes), "generation": self.generation, "open": len(self._open)}

    # --- what the agent learned ----------------------------------------------------------
    def learn(self, via: Offload | None, dst: Address) -> None:
        """A connection accepted on `via` to `dst` went over HBONE on the native pool: give
        the listener the route for `dst` (every endpoint the balancer may pick, with their
        pooled connections), when all are meshed pods of other nodes with identities."""
        if via is None or via.closed_at is not None or self._engine is None or via.listener.engine is not self._engine:
            return
        if dst in self.inputs.waypoint.dataplane().outbound:
            return  # steered through the waypoint since its connection was decided (this runs after its connect)
        route = via.dsts.get(dst)
        if route is None and len(via.dsts) >= LISTENER_ROUTES:
            return
        ctx, identities, same_node = via.ctx, self.inputs.identities, self.relay.same_node
        pool = self.hbone.pools.get(ctx)
        targets = endpoints(self.inputs.model(), dst)
        if not isinstance(pool, NativePool) or not targets or any(
                not t.meshed or t.pod is None or t.address[0] != t.pod.ip
                or (same_node is not None and same_node.local(t) is not None)
                for t in targets):
            return
        try:
            source = identities.of(ctx.pod)
            dests = [identities.of(t.pod) for t in targets]
        except IdentityUnavailable:
            return
        port = self.hbone.port
        conns = [pool.conn_id((source.uri, d.uri, (t.pod.ip, port))) for t, d in zip(targets, dests)]
        tag = next(self._tags)
        new = _Route(tag, ctx, targets, Peer.of(ctx.pod, source.uri), [Peer.of(t.pod, d.uri)
                                                                       for t, d in zip(targets, dests)])
        try:
            via.listener.route(dst, conns, [format_authority(t.address) for t in targets], tag, self.generation)
        except OSError as exc:  # the engine stopped
            self.log.debug("out-route to %s:%d not given: %s", *dst, exc)
            return
        if route is not None:
            self._routes.pop(route.tag, None)
        self._routes[tag] = via.dsts[dst] = new
        self._refill(via)

    def _refill(self, off: Offload) -> None:
        """Give the engine the pod's room for connections again when Python's count of what is
        left of it is low (the pod's cap: Holdings)."""
        holdings = self.inputs.memory.holdings
        if holdings.cap is None:
            if off.room is not None:
                off.listener.room(None, off.seen)
                off.room = None
            return
        if off.room is not None and off.room >= 0:
            left = off.room - (off.seen - off.seen_then)
            if left > ROOM_LOW and left > off.room // 2:
                return
        room = holdings.room(off.ctx.pod.ip)
        try:
            off.listener.room(room, off.seen)
        except OSError:
            return
        off.room, off.seen_then = room, off.seen

    # --- the engine's events (hbone.ListenerOwner) -----------------------------------------
    def accepted(self, listener: int, sock: socket.socket, dst: Address | None, client_port: int, tag: int,
                 endpoint: int) -> None:
        off = self._listeners.get(listener)
        if off is None:  # closed and forgotten: nobody to relay it for
            reset(sock)
            return
        route = self._routes.get(tag)
        off.inpod.spawn(sock, Handed(off, dst, client_port, route.target(endpoint) if route is not None else None))

    def opened(self, listener: int, stream: int, conn: int, dst: Address, client_port: int, tag: int,
               endpoint: int, authority: str) -> None:
        off = self._listeners.get(listener)
        route = self._routes.get(tag)
        ctx = route.ctx if route is not None else off.ctx if off is not None else None
        described = self._describe(ctx, route, endpoint, dst, authority) if ctx is not None else None
        if described is None:  # nothing to report it for: taken back
            self._engine.reset_stream(stream)
            return
        target, source, peer = described
        flow = self.inputs.telemetry.open(Flow(SOURCE, (ctx.pod.ip, client_port), dst, source, peer, target.service,
                                               MTLS, upstream=(target.pod.ip, self.hbone.port)))
        metrics = self.inputs.metrics
        metrics.outbound.inc()
        metrics.active_by[OUTBOUND].inc()
        self.inputs.memory.holdings.take(ctx.pod.ip)
        self._streams.inc()
        self._opened.inc()
        self._open[stream] = (flow, ctx, conn)
        self._per_pod[ctx] += 1
        self._per_conn[conn] += 1
        if off is not None:
            off.seen += 1
            if off.closed_at is None:
                self._refill(off)

    def ended(self, listener: int, stream: int, end: hbone.End, sock: socket.socket | None, conn: int,
              dst: Address, client_port: int, tag: int, endpoint: int) -> None:
        if sock is None:
            opened = self._open.pop(stream, None)
            if opened is None:
                return
            flow, ctx, conn = opened
            _one_less(self._per_conn, conn)
            metrics = self.inputs.metrics
            metrics.active_by[OUTBOUND].dec()
            metrics.bytes_by[(OUTBOUND, "sent")].inc(end.to_peer)
            metrics.bytes_by[(OUTBOUND, "received")].inc(end.from_peer)
            self.inputs.memory.holdings.give(ctx.pod.ip)
            self._streams.dec()
            self.inputs.telemetry.close(flow, received=end.to_peer, sent=end.from_peer)
            self._closed(ctx)
            return
        off = self._listeners.get(listener)
        if off is None:  # closed and forgotten (past open_timeout): nobody to relay it for
            reset(sock)
            return
        off.seen += 1
        ctx, route = off.ctx, self._routes.get(tag)
        target = route.target(endpoint) if route is not None else None
        if target is None or unprocessed(end):
            # never processed by the server (or what it went to is forgotten): this agent's
            # pool opens it again, on another connection, as it retries its own
            if unprocessed(end):
                pool = self.hbone.pools.get(ctx)
                if isinstance(pool, NativePool):
                    pool.unusable(conn)
                self.log.debug("HBONE to %s:%d: a routed stream not processed (%s), retried by the pool",
                               *dst, end.reason)
            off.inpod.spawn(sock, Handed(off, dst, client_port, target))
            return
        error = failure(end, (target.pod.ip, self.hbone.port), target.address, self.hbone.settings.open_timeout)
        self.hbone.metrics.refused(OUTBOUND, error.reason)
        self.relay.refused(ctx, sock, (ctx.pod.ip, client_port), dst, target, error)
        if off.closed_at is None:
            self._refill(off)

    def _closed(self, ctx: PodContext) -> None:
        if _one_less(self._per_pod, ctx):
            return
        for key in (ctx, None) if not self._per_pod else (ctx,):
            waiter = self._drained.pop(key, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def drained(self, ctx: PodContext | None = None, timeout: float | None = None) -> int:
        """Wait until the streams the engine opened for `ctx`'s pod (None: every pod) have
        ended, at most `timeout` seconds; how many are still open."""
        def left() -> int:
            return self._per_pod.get(ctx, 0) if ctx is not None else len(self._open)
        if left():
            waiter = self._drained.get(ctx)
            if waiter is None:
                waiter = self._drained[ctx] = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except asyncio.TimeoutError:
                pass
        return left()

    def accept_failed(self, listener: int, error: int, pause: float | None) -> None:
        off = self._listeners.get(listener)
        if off is not None:
            off.inpod.failures.failed(off.inpod, OSError(error, os.strerror(error)), pause)

    def _describe(self, ctx: PodContext, route: _Route | None, endpoint: int, dst: Address,
                  authority: str) -> tuple[Target, Peer, Peer] | None:
        """The target, source and peer of a routed stream: its route's, or (a route replaced
        since) the model's for the :authority it went to."""
        target = route.target(endpoint) if route is not None else None
        if target is not None:
            return target, route.source, route.peers[endpoint]
        address, model, identities = parse_authority(authority), self.inputs.model(), self.inputs.identities
        pod = model.pod_by_ip(address[0]) if address is not None else None
        if pod is None:
            return None
        target = Target(address, pod=pod, service=model.service_by_ip(dst[0]), meshed=True)
        return target, Peer.of(ctx.pod, identities.uri_of(ctx.pod)), Peer.of(pod, identities.uri_of(pod))


def _one_less(counter: collections.Counter, key) -> int:
    """Count one `key` fewer (gone from `counter` at 0); how many are left."""
    left = counter[key] - 1
    if left:
        counter[key] = left
    else:
        del counter[key]
    return left
