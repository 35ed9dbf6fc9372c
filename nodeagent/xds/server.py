"""The ADS server: envoy.service.discovery.v3.AggregatedDiscoveryService over grpcio.

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
proxy has ACKed the current one. With an `access_log` sink (such as
accesslog.RequestMetrics) the same server also takes the waypoint's access-log streams
(AccessLogService); each open stream, ADS or ALS, holds one of the `workers` threads,
and Envoy opens an ALS stream per worker thread and listener.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent import futures
from typing import Callable

import grpc
from envoy_data_plane.envoy.service.discovery.v3 import DiscoveryRequest
from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.xds import accesslog, resources as rt
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
                 workers: int = 32, access_log: accesslog.AccessLogSink | None = None,
                 on_accepted: Callable[[str, Snapshot], None] | None = None,
                 on_rejected: Callable[[str, Snapshot, str, str], None] | None = None):
        self.cache, self.log, self.clock = cache, log or logging.getLogger(__name__), clock
        self.on_accepted = on_accepted  # called (in a server thread) when a node's proxy ACKed a new snapshot
        # called (in a server thread) with (node, snapshot, type URL, Envoy's message) on a NACK
        self.on_rejected = on_rejected
        self.debounce, self.max_delay = debounce, max_delay
        self.metrics = XdsMetrics(registry)
        self._lock = threading.Condition()
        self._streams: dict[int, tuple[StreamState, queue.Queue]] = {}
        self._accepted: dict[str, Snapshot] = {}
        self._pending: dict[str, tuple[float, float]] = {}  # node → (first, last) change time
        self._stopping = False
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xds"),
                                   maximum_concurrent_rpcs=workers // 2)
        handler = grpc.stream_stream_rpc_method_handler(self._serve, request_deserializer=DiscoveryRequest.parse,
                                                        response_serializer=bytes)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
        if access_log is not None:
            self._server.add_generic_rpc_handlers((accesslog.rpc_handler(access_log),))
        self._unwatch: Callable[[], None] | None = None
        self._debouncer = threading.Thread(target=self._debounce_loop, name="xds-debounce", daemon=True)
        self.port: int | None = None
        self.path: str | None = None

    # --- lifecycle -------------------------------------------------------------------
    def start(self, unix_path: str | None = None, tcp: bool = False) -> "AdsServer":
        if unix_path:
            if os.path.exists(unix_path):
                os.unlink(unix_path)  # a stale socket of a previous run
            self._server.add_insecure_port(f"unix:{os.path.abspath(unix_path)}")
            self.path = unix_path
        if tcp:
            self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self._unwatch = self.cache.watch(self._changed)
        self._debouncer.start()
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self._unwatch:
            self._unwatch()
        with self._lock:
            self._stopping = True
            for _, events in self._streams.values():
                events.put((CLOSED, None))
            self._lock.notify_all()
        self._server.stop(grace).wait(grace + 1)
        if self.path and os.path.exists(self.path):
            os.unlink(self.path)

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
    def _serve(self, requests, context):
        events: queue.Queue = queue.Queue()
        sent: dict[str, tuple[str, Snapshot | None]] = {}  # type URL → (nonce, snapshot) of the last response
        state = StreamState(on_nack=lambda node, type_url, request: self._nacked(node, type_url, request, sent),
                            on_push=lambda t: self.metrics.pushes.labels(rt.SHORT[t]).inc())
        key = id(state)
        with self._lock:
            self._streams[key] = (state, events)
        self.metrics.connected.inc()
        context.add_callback(lambda: events.put((CLOSED, None)))
        threading.Thread(target=self._read, args=(requests, events), name="xds-read", daemon=True).start()
        try:
            yield from self._respond(state, events, sent)
        finally:
            with self._lock:
                self._streams.pop(key, None)
            self.metrics.connected.dec()

    def _read(self, requests, events: queue.Queue) -> None:
        try:
            for request in requests:
                events.put((REQUEST, request))
        except grpc.RpcError:
            pass  # the stream ended; the close callback reports it
        events.put((CLOSED, None))

    def _respond(self, state: StreamState, events: queue.Queue, sent: dict):
        while True:
            kind, request = events.get()
            if kind == CLOSED:
                return
            node = state.node or (request.node.id if kind == REQUEST and request.node else "")
            snapshot = self.cache.get(node) if node else None  # what the responses are built from
            if kind == REQUEST:
                responses = state.request(request, lambda _: snapshot)
            else:
                responses = state.pump(snapshot)
            for response in responses:
                sent[response.type_url] = (response.nonce, snapshot)
            yield from responses
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

    def _nacked(self, node: str, type_url: str, request: DiscoveryRequest, sent: dict) -> None:
        self.metrics.nacks.labels(rt.SHORT[type_url]).inc()
        detail = request.error_detail.message if request.error_detail else ""
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
                    for state, events in self._streams.values():
                        if state.node == node:
                            events.put((CHANGED, None))
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
