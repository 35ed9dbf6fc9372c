"""The ADS server: envoy.service.discovery.v3.AggregatedDiscoveryService over grpclib.

Serves the SnapshotCache (state of the world, one stream per Envoy) on a unix socket,
and optionally on 127.0.0.1 for tests. Each stream runs the protocol of stream.py; a
cache change reaches the streams of that node after `debounce` seconds without further
change (at most `max_delay` after the first), so a burst of changes is one push.
Metrics go to the registry passed in: nodeagent_xds_pushes_total{type},
nodeagent_xds_nacks_total{type}, nodeagent_xds_connected_proxies. NACKs are logged
with the node, type, version and Envoy's message, and handed to `on_rejected` with the
snapshot the rejected response was built from (each stream remembers it per type), so
the publisher can find what Envoy refused and publish without it. `accepted(node)` is
the last snapshot that node's proxy ACKed completely, having asked for all its route
tables and endpoints (kept across reconnects); `in_sync(node)` says whether a connected
proxy has ACKed the current one. The streams run on an event loop of the server's own
thread ("xds"), never the agent's: at most `max_streams` at once (more are refused
RESOURCE_EXHAUSTED), messages at most grpcwire.MAX_MESSAGE bytes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from typing import Callable

from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server
from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent import grpcwire
from nodeagent.xds import adsproto, resources as rt
from nodeagent.xds.cache import SnapshotCache
from nodeagent.xds.snapshot import Snapshot
from nodeagent.xds.stream import StreamState

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
METHOD = "StreamAggregatedResources"
CLOSED, REQUEST, CHANGED = "closed", "request", "changed"


class XdsMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.pushes = Counter("nodeagent_xds_pushes", "xDS responses sent, by resource type", ["type"],
                              registry=registry)
        self.nacks = Counter("nodeagent_xds_nacks", "xDS responses a proxy rejected, by resource type", ["type"],
                             registry=registry)
        self.connected = Gauge("nodeagent_xds_connected_proxies", "ADS streams open", registry=registry)


class AdsServer:
    def __init__(self, cache: SnapshotCache, registry: CollectorRegistry, log: logging.Logger | None = None,
                 debounce: float = 0.1, max_delay: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 max_streams: int = 32,
                 on_accepted: Callable[[str, Snapshot], None] | None = None,
                 on_rejected: Callable[[str, Snapshot, str, str], None] | None = None):
        self.cache, self.log, self.clock = cache, log or logging.getLogger(__name__), clock
        self.on_accepted = on_accepted  # called (in the server's thread) when a node's proxy ACKed a new snapshot
        # called (in the server's thread) with (node, snapshot, type URL, Envoy's message) on a NACK
        self.on_rejected = on_rejected
        self.debounce, self.max_delay = debounce, max_delay
        self.max_streams = max_streams
        self.metrics = XdsMetrics(registry)
        self._lock = threading.Condition()
        # stream key → (state, put: thread-safe, hands an event to the stream's queue)
        self._streams: dict[int, tuple[StreamState, Callable[[tuple], None]]] = {}
        self._open = 0  # streams being served (on the loop only)
        self._accepted: dict[str, Snapshot] = {}
        self._pending: dict[str, tuple[float, float]] = {}  # node → (first, last) change time
        self._stopping = False
        self._service = grpcwire.Service().add(SERVICE, METHOD, Cardinality.STREAM_STREAM, self._limited(self._ads))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="xds", daemon=True)
        self._servers: list[Server] = []
        self._unwatch: Callable[[], None] | None = None
        self._debouncer = threading.Thread(target=self._debounce_loop, name="xds-debounce", daemon=True)
        self.port: int | None = None
        self.path: str | None = None

    # --- lifecycle -------------------------------------------------------------------
    def start(self, unix_path: str | None = None, tcp: bool = False) -> "AdsServer":
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._listen(unix_path, tcp), self._loop).result(10)
        except BaseException:
            self._end_loop()
            raise
        self._unwatch = self.cache.watch(self._changed)
        self._debouncer.start()
        return self

    async def _listen(self, unix_path: str | None, tcp: bool) -> None:
        if unix_path:
            if os.path.exists(unix_path):
                os.unlink(unix_path)  # a stale socket of a previous run
            await self._serve_on(path=os.path.abspath(unix_path))
            self.path = unix_path
        if tcp:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            await self._serve_on(sock=sock)
            self.port = sock.getsockname()[1]

    async def _serve_on(self, **where) -> None:
        server = Server([self._service], codec=grpcwire.Raw())
        await server.start(**where)
        self._servers.append(server)

    def stop(self, grace: float = 1.0) -> None:
        if self._unwatch:
            self._unwatch()
        with self._lock:
            self._stopping = True
            for _, put in self._streams.values():
                put((CLOSED, None))
            self._lock.notify_all()
        if self._thread.is_alive():
            wait = max(grace, 1.0)  # the cancelled handlers unwinding: quick, so at least a second
            try:
                asyncio.run_coroutine_threadsafe(self._close(wait), self._loop).result(wait + 1)
            except (TimeoutError, asyncio.TimeoutError):
                self.log.warning("xDS: streams still open %.1f s after the server stopped", wait)
            self._end_loop()
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)

    async def _close(self, wait: float) -> None:
        for server in self._servers:
            server.close()  # stops listening and cancels the streams' handlers
        waits = [server.wait_closed() for server in self._servers]
        if waits:
            await asyncio.wait_for(asyncio.gather(*waits), wait)

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()

    def accepted(self, node: str) -> Snapshot | None:
        with self._lock:
            return self._accepted.get(node)

    def in_sync(self, node: str) -> bool:
        """Whether a proxy of `node` is connected and has ACKed all of the cache's snapshot."""
        snapshot = self.cache.get(node)
        with self._lock:
            states = [state for state, _ in self._streams.values() if state.node == node]
        return snapshot is not None and any(_accepted(state, snapshot) for state in states)

    def connected(self) -> list[str]:
        with self._lock:
            return sorted(state.node for state, _ in self._streams.values())

    # --- one stream --------------------------------------------------------------------
    def _limited(self, handler: Callable) -> Callable:
        """`handler` counted against max_streams: one more is refused."""
        async def serve(stream) -> None:
            if self._open >= self.max_streams:
                raise GRPCError(Status.RESOURCE_EXHAUSTED, f"this server serves at most {self.max_streams} streams")
            self._open += 1
            try:
                await handler(stream)
            finally:
                self._open -= 1
        return serve

    async def _ads(self, stream) -> None:
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        sent: dict[str, tuple[str, Snapshot | None]] = {}  # type URL → (nonce, snapshot) of the last response
        state = StreamState(on_nack=lambda node, type_url, request: self._nacked(node, type_url, request, sent),
                            on_push=lambda t: self.metrics.pushes.labels(rt.SHORT[t]).inc())
        key = id(state)
        with self._lock:
            if self._stopping:
                return
            self._streams[key] = (state, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        self.metrics.connected.inc()
        reader = asyncio.ensure_future(self._read(stream, events))
        try:
            await self._respond(stream, state, events, sent)
        finally:
            reader.cancel()
            with self._lock:
                self._streams.pop(key, None)
            self.metrics.connected.dec()

    async def _read(self, stream, events: asyncio.Queue) -> None:
        try:
            while (data := await grpcwire.receive(stream)) is not None:
                events.put_nowait((REQUEST, adsproto.DiscoveryRequest.FromString(data)))
            events.put_nowait((CLOSED, None))
        except GRPCError as exc:
            self.log.warning("xDS: a stream sent what cannot be served, it ends: %s", exc.message)
            events.put_nowait((CLOSED, exc))
        except adsproto.DecodeError as exc:
            self.log.warning("xDS: a stream sent a DiscoveryRequest that does not parse, it ends: %r", exc)
            events.put_nowait((CLOSED, GRPCError(Status.INVALID_ARGUMENT, "not a DiscoveryRequest")))

    async def _respond(self, stream, state: StreamState, events: asyncio.Queue, sent: dict) -> None:
        while True:
            kind, request = await events.get()
            if kind == CLOSED:
                if request is not None:
                    raise request  # the error the stream ends with
                return
            node = state.node or (request.node.id if kind == REQUEST else "")
            snapshot = self.cache.get(node) if node else None  # what the responses are built from
            if kind == REQUEST:
                responses = state.request(request, lambda _: snapshot)
            else:
                responses = state.pump(snapshot)
            for response in responses:
                sent[response.type_url] = (response.nonce, snapshot)
                await stream.send_message(response.SerializeToString())
            self._note_accepted(state)

    def _note_accepted(self, state: StreamState) -> None:
        snapshot = self.cache.get(state.node) if state.node else None
        if snapshot is not None and _accepted(state, snapshot):
            with self._lock:
                new = self._accepted.get(state.node) is not snapshot
                self._accepted[state.node] = snapshot
            if new and self.on_accepted is not None:
                try:
                    self.on_accepted(state.node, snapshot)
                except Exception:  # the stream must go on
                    self.log.exception("xDS: on_accepted callback failed")

    def _nacked(self, node: str, type_url: str, request, sent: dict) -> None:
        self.metrics.nacks.labels(rt.SHORT[type_url]).inc()
        detail = request.error_detail.message
        self.log.warning("xDS NACK from %s for %s (keeps version %r): %s", node, rt.SHORT[type_url],
                         request.version_info, detail)
        nonce, snapshot = sent.get(type_url, ("", None))
        if self.on_rejected is not None and snapshot is not None and nonce == request.response_nonce:
            try:
                self.on_rejected(node, snapshot, type_url, detail)
            except Exception:  # the stream must go on
                self.log.exception("xDS: on_rejected callback failed")

    # --- snapshot changes, debounced -----------------------------------------------------
    def _changed(self, node: str) -> None:
        now = self.clock()
        with self._lock:
            first, _ = self._pending.get(node, (now, now))
            self._pending[node] = (first, now)
            self._lock.notify_all()

    def _debounce_loop(self) -> None:
        with self._lock:
            while not self._stopping:
                if not self._pending:
                    self._lock.wait()
                    continue
                now = self.clock()
                due = [n for n, (first, last) in self._pending.items()
                       if now - last >= self.debounce or now - first >= self.max_delay]
                for node in due:
                    del self._pending[node]
                    for state, put in self._streams.values():
                        if state.node == node:
                            put((CHANGED, None))
                if not due:
                    self._lock.wait(self._next_due(now))

    def _next_due(self, now: float) -> float:
        return max(0.001, min(min(last + self.debounce, first + self.max_delay) - now
                              for first, last in self._pending.values()))


def _accepted(state: StreamState, snapshot: Snapshot) -> bool:
    """The stream ACKed all of `snapshot`, having asked for every route table and endpoints
    resource it uses: right after ACKing new listeners (or clusters) a proxy asks for their
    route tables (endpoints) in a request of its own, and until then what it ACKed lacks them."""
    return state.accepted(snapshot) and all(
        snapshot.wanted.get(t, frozenset()) <= state.types[t].names for t in rt.NAMED if state.types[t].subscribed)
