"""Per-connection telemetry: Istio's TCP metrics and the flow log.

Every connection the agent decides about is a `Flow`: who (workload, namespace,
principal) talks to whom, over what (`mutual_tls` through HBONE, `none` for plaintext),
reported by the source agent (`reporter="source"`, outbound) or the destination agent
(`"destination"`, inbound). `Telemetry.open` counts it in
`istio_tcp_connections_opened_total`; `Telemetry.close` counts
`istio_tcp_connections_closed_total` with the final `response_flags` (ztunnel's: `-`
done, `DENY` refused by policy, `CONNECT` no upstream), adds the bytes (received = from
the client, sent = back to it, as Istio counts them) and writes one JSON line to the
flow log. The labels are Istio's (workload, namespace, principal, app, version, canonical
service and revision of both ends, the destination service's host, name and namespace,
`request_protocol="tcp"`), so Kiali draws L4 edges. Unknown values are "unknown", as in Istio. Registry, clocks and the flow-log
stream are handed in. A connection like an earlier one (same reporter, peers, service,
security) finds its metrics' children in a cache instead of looking each up by its
labels (23 → 6 µs a connection; at most SERIES_CACHE label sets, then it starts over). A connection the same-node fast path took (samenode.py) is
reported exactly as over HBONE by both ends; its flow lines say `"same_node": true`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from prometheus_client import CollectorRegistry, Counter

from nodeagent.model import Pod, Service

UNKNOWN = "unknown"
MTLS, PLAINTEXT = "mutual_tls", "none"
FLAG_OK, FLAG_DENY, FLAG_CONNECT = "-", "DENY", "CONNECT"
SOURCE, DESTINATION = "source", "destination"
# Istio's TCP metric labels, as its request metrics have them (xds/accesslog.py) with
# request_protocol "tcp"; no source_cluster/destination_cluster (nor there).
LABELS = ("reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
          "source_version", "source_canonical_service", "source_canonical_revision",
          "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
          "destination_version", "destination_service", "destination_service_name",
          "destination_service_namespace", "destination_canonical_service", "destination_canonical_revision",
          "request_protocol", "response_flags", "connection_security_policy")
Address = tuple[str, int]
SERIES_CACHE = 4096  # label sets whose metrics' children are kept at hand


@dataclass(frozen=True)
class Peer:
    """One end of a connection as telemetry names it."""

    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    principal: str = UNKNOWN  # a SPIFFE URI, only when proven (or, for our own pods, known)
    app: str = UNKNOWN  # Istio's app, version and canonical service and revision of the pod
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = UNKNOWN

    @classmethod
    def of(cls, pod: Pod | None, principal: str | None = None) -> "Peer":
        if pod is None:
            return cls(principal=principal or UNKNOWN)
        return cls(pod.workload_name, pod.namespace, principal or UNKNOWN, pod.app or UNKNOWN,
                   pod.version or UNKNOWN, pod.canonical_service, pod.canonical_revision)

    def labels(self, side: str) -> dict[str, str]:
        return {f"{side}_workload": self.workload, f"{side}_workload_namespace": self.namespace,
                f"{side}_principal": self.principal, f"{side}_app": self.app, f"{side}_version": self.version,
                f"{side}_canonical_service": self.canonical_service,
                f"{side}_canonical_revision": self.canonical_revision}


def format_address(addr: Address) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


@dataclass
class Flow:
    reporter: str
    src: Address
    dst: Address  # the original destination (what the client asked for)
    source: Peer
    destination: Peer
    service: Service | None = None
    security: str = PLAINTEXT
    upstream: Address | None = None  # where the agent connected (endpoint, or pod:15008 for HBONE)
    same_node: bool = False  # taken by the same-node fast path (samenode.py): flow log `same_node`
    started: float = 0.0  # monotonic
    opened_at: float = 0.0  # wall clock
    closed: bool = field(default=False, repr=False)

    def series_key(self) -> tuple:
        """What its labels other than response_flags depend on."""
        return (self.reporter, self.source, self.destination, self.service.hostname if self.service else UNKNOWN,
                self.security)

    def labels(self, flags: str) -> dict[str, str]:
        service = self.service
        return {"reporter": self.reporter, **self.source.labels("source"), **self.destination.labels("destination"),
                "destination_service": service.hostname if service else UNKNOWN,
                "destination_service_name": service.name if service else UNKNOWN,
                "destination_service_namespace": service.namespace if service else UNKNOWN,
                "request_protocol": "tcp", "connection_security_policy": self.security, "response_flags": flags}


class TrafficMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.opened = Counter("istio_tcp_connections_opened", "The total number of TCP connections opened",
                              LABELS, registry=registry)
        self.closed = Counter("istio_tcp_connections_closed", "The total number of TCP connections closed",
                              LABELS, registry=registry)
        self.received = Counter("istio_tcp_received_bytes",
                                "The size of total bytes received during request in case of a TCP connection",
                                LABELS, registry=registry)
        self.sent = Counter("istio_tcp_sent_bytes",
                            "The size of total bytes sent during response in case of a TCP connection",
                            LABELS, registry=registry)
        self.denials = Counter("nodeagent_policy_denials",
                               "Connections refused by policy at this destination, by the deciding policy "
                               "(ns/name, no-allow-match, or peer-authentication-strict)", ["policy"],
                               registry=registry)


class FlowLog:
    """One JSON object per line to `stream` (None: off). A file is rotated when it would
    pass `max_bytes`: renamed to `<file>.1` (replacing the previous one) and started anew,
    so a flood of connections costs at most twice `max_bytes` of disk.

    `write` only queues the line: a writer thread writes what queued at most `flush_every`
    seconds later, in one write(2), as Envoy's file access log is flushed by a thread of
    its own (every second). On the event loop the write(2) of each line cost ~30 µs of a
    new connection's p50 with the log on ext4, and a full disk or a stalled reader of
    stderr would have stalled every connection. At most MAX_QUEUED lines wait (~5 MB); a
    line past that is dropped, counted and warned about once per episode, as a failing
    write is. `flush()` writes what waits now; `close()` flushes and stops the thread."""

    MAX_QUEUED = 10_000

    def __init__(self, stream: TextIO | None, log: logging.Logger, path: Path | None = None,
                 max_bytes: int | None = None, flush_every: float = 0.05):
        self.stream = stream
        self.log = log
        self.path = path  # the file, when `stream` is one (rotation needs it)
        self.max_bytes = max_bytes
        self.flush_every = flush_every
        self.size = os.fstat(stream.fileno()).st_size if path is not None else 0
        self.rotations = 0
        self.dropped = 0  # lines that found the queue full
        self._failed = False
        self._queued: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()  # the stream, its size and rotation: the writer's or flush()'s
        self._wake = threading.Event()
        self._stop = threading.Event()  # close(): no more lines, the writer ends
        self._writer: threading.Thread | None = None

    @classmethod
    def open(cls, destination: str | Path, log: logging.Logger, max_bytes: int | None = None) -> "FlowLog":
        """`stderr`, `off`, or a file appended to, rotated at `max_bytes`."""
        if destination == "off":
            return cls(None, log)
        if destination == "stderr":
            return cls(sys.stderr, log)
        path = Path(destination)
        return cls(open(path, "a", encoding="utf-8"), log, path, max_bytes)

    def _rotate(self) -> None:
        self.stream.close()
        os.replace(self.path, f"{self.path}.1")
        self.stream = open(self.path, "a", encoding="utf-8")
        self.size = 0
        self.rotations += 1

    def write(self, line: str) -> None:
        """Queue one JSON line (ASCII: its length is its size in bytes)."""
        if self.stream is None or self._stop.is_set():
            return
        if len(self._queued) >= self.MAX_QUEUED:
            if not self.dropped:
                self.log.warning("the flow log is %d lines behind: flow lines are dropped until it catches up",
                                 self.MAX_QUEUED)
            self.dropped += 1
            return
        idle = not self._queued
        self._queued.append(line)
        if self._writer is None:
            self._writer = threading.Thread(target=self._run, name="flow-log", daemon=True)
            self._writer.start()
        if idle:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._stop.wait(self.flush_every)  # gather: one write(2) for what comes meanwhile
            self._wake.clear()  # before taking: a line queued after this wakes us again
            self.flush()

    def flush(self) -> None:
        """Write what is queued now."""
        with self._lock:
            lines = []
            while self._queued:
                lines.append(self._queued.popleft())
            if lines and self.stream is not None:
                self._write(lines)

    def _write(self, lines: list[str]) -> None:
        done = 0  # of `lines`, written
        try:
            chunk = []
            for line in lines:
                line += "\n"
                if self.max_bytes is not None and self.size and self.size + len(line) > self.max_bytes:
                    self.stream.write("".join(chunk))
                    done += len(chunk)
                    chunk = []
                    self._rotate()
                chunk.append(line)
                self.size += len(line)
            self.stream.write("".join(chunk))
            self.stream.flush()
            done = len(lines)
            if self._failed or self.dropped:
                self.log.warning("the flow log is written again; %d flow lines were dropped", self.dropped)
            self._failed, self.dropped = False, 0
        except (OSError, ValueError) as exc:  # a full disk must not break connections
            if not self._failed and not self.dropped:
                self.log.warning("cannot write the flow log: %s (flow lines are dropped until it works)", exc)
            self._failed = True
            self.dropped += len(lines) - done

    def close(self, timeout: float = 5.0) -> None:
        """Write what waits and end the writer thread. A writer stuck in a write (a full
        pipe nobody reads, a hung disk) is left behind after `timeout` s, with a warning,
        so the agent still stops: what it holds and what waits are lost."""
        self._stop.set()
        self._wake.set()
        if self._writer is not None:
            self._writer.join(timeout)
            if self._writer.is_alive():
                self.log.warning("the flow log's writer is stuck in a write after %g s: %d queued flow lines "
                                 "are not written", timeout, len(self._queued))
                return
            self._writer = None
        self.flush()
        with self._lock:
            if self.stream is not None and self.stream not in (sys.stderr, sys.stdout):
                self.stream.close()
            self.stream = None


class _Series:
    """The metrics' children of one label set (response_flags aside), made when first used."""

    def __init__(self, metrics: TrafficMetrics, labels: dict[str, str], flow: Flow):
        self.metrics, self.labels = metrics, labels  # response_flags "-"
        self.opened = metrics.opened.labels(**labels)
        self._received = self._sent = None
        self._closed: dict[str, object] = {}
        # The flow-log line's pieces that depend only on what the series key holds
        self.reporter = f'"reporter":{_text(flow.reporter)},"src":{{"addr":'
        self.source = f",{_peer(flow.source)}}},\"dst\":{{\"addr\":"
        self.destination = (f",{_peer(flow.destination)},\"service\":{_text(labels['destination_service'])}}},"
                            f'"upstream":')
        self.security = f',"security":{_text(flow.security)},"bytes_received":'

    def closed(self, flags: str):
        child = self._closed.get(flags)
        if child is None:
            child = self._closed[flags] = self.metrics.closed.labels(**{**self.labels, "response_flags": flags})
        return child

    def received(self):
        if self._received is None:
            self._received = self.metrics.received.labels(**self.labels)
        return self._received

    def sent(self):
        if self._sent is None:
            self._sent = self.metrics.sent.labels(**self.labels)
        return self._sent


class Telemetry:
    def __init__(self, metrics: TrafficMetrics, flow_log: FlowLog, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.metrics = metrics
        self.flow_log = flow_log
        self.clock = clock
        self.wall_clock = wall_clock
        self._series: dict[tuple, _Series] = {}

    def _series_of(self, flow: Flow) -> _Series:
        key = flow.series_key()
        series = self._series.get(key)
        if series is None:
            if len(self._series) >= SERIES_CACHE:
                self._series.clear()
            series = self._series[key] = _Series(self.metrics, flow.labels(FLAG_OK), flow)
        return series

    def open(self, flow: Flow) -> Flow:
        flow.started, flow.opened_at = self.clock(), self.wall_clock()
        self._series_of(flow).opened.inc()
        return flow

    def close(self, flow: Flow, *, received: int = 0, sent: int = 0, flags: str = FLAG_OK,
              verdict: str = "allowed", reason: str = "") -> None:
        """Count the end of `flow` (once) and write its flow-log line."""
        if flow.closed:
            return
        flow.closed = True
        series = self._series_of(flow)
        series.closed(flags).inc()
        if received:
            series.received().inc(received)
        if sent:
            series.sent().inc(sent)
        if self.flow_log.stream is not None:
            self.flow_log.write(self._line(series, flow, received, sent, flags, verdict, reason))

    def denied(self, flow: Flow, policy: str, reason: str, *, received: int = 0, sent: int = 0) -> None:
        """A connection refused by policy (at once, or after `received`/`sent` bytes when
        a policy change revoked it): counted by policy, closed with DENY."""
        self.metrics.denials.labels(policy=policy).inc()
        self.close(flow, received=received, sent=sent, flags=FLAG_DENY, verdict="denied", reason=reason)

    def _line(self, series: _Series, flow: Flow, received: int, sent: int, flags: str, verdict: str,
              reason: str) -> str:
        """The flow-log line, as json.dumps(separators=(",", ":")) writes this object:
        {"time", "reporter", "src": {"addr", "workload", "namespace", "principal"},
         "dst": {"addr", "workload", "namespace", "principal", "service"}, "upstream"
         (null when none), "security", "bytes_received", "bytes_sent", "duration_ms",
         "verdict", "response_flags", "reason", and "same_node": true on the fast path}.
        Built from the series' fixed pieces and each string quoted by json's own C
        quoting (a dict through json.dumps was 12 of this path's 20 µs a connection)."""
        upstream = _text(format_address(flow.upstream)) if flow.upstream else "null"
        duration = round((self.clock() - flow.started) * 1000, 3)
        return (f'{{"time":"{_iso(self.wall_clock())}",{series.reporter}{_text(format_address(flow.src))}'
                f"{series.source}{_text(format_address(flow.dst))}{series.destination}{upstream}"
                f'{series.security}{received:d},"bytes_sent":{sent:d},"duration_ms":{duration!r},'
                f'"verdict":{_text(verdict)},"response_flags":{_text(flags)},"reason":{_text(reason)}'
                f'{_SAME_NODE if flow.same_node else ""}}}')


_text = json.encoder.encode_basestring_ascii  # a str as json.dumps writes it (quoted, ASCII)
_SAME_NODE = ',"same_node":true'


def _peer(peer: Peer) -> str:
    return f'"workload":{_text(peer.workload)},"namespace":{_text(peer.namespace)},"principal":{_text(peer.principal)}'


_SECOND: list = [None, ""]  # the second _iso formatted last, and its text


def _iso(timestamp: float) -> str:
    """UTC, milliseconds: 2026-12-04T16:23:04.695Z. The part down to the second is
    formatted once per second (strftime was ~5 % of a new connection's CPU)."""
    second = int(timestamp)
    if second != _SECOND[0]:
        _SECOND[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_SECOND[1]}.{int(timestamp % 1 * 1000):03d}Z"
