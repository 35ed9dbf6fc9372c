"""Istio's request metrics from the waypoint Envoy's access log.

Every HTTP connection manager of the waypoint writes a line per request into a FIFO in
the waypoint's directory (logline.py: Envoy's file access logger, its lines written by a
flush thread of Envoy's own, at least every 200 ms); `AccessLogPipe` reads it in a thread
of the agent. A line names its log, which is the listener: `outbound` (client side,
reporter "waypoint") or `inbound` (server side, reporter "destination"), so a request
through both counts once under each reporter. `RequestMetrics` turns each line into
istio_requests_total and the duration, request and response size histograms
(milliseconds and bytes, Envoy's default buckets, as Istio's), with Istio's standard
labels named from the Model:
- source: the pod of filter state `nodeagent.source_workload` ("ns/pod", the agent's
  TLV), else the pod at the PROXY source address when its service account agrees with
  the proven principal (filter state `nodeagent.source_principal`);
- destination: client side, the pod of the endpoint Envoy picked (the internal
  address's endpoint id "ip:port") and the service of the `outbound|port|subset|host`
  cluster; server side, the pod of the PROXY destination and the service selecting it
  on that port (as the agent's L4 reporter picks it);
- connection_security_policy "mutual_tls" when a source principal is known, else "none" at the
  destination (plaintext taken, as Istio says it) and "unknown" at the waypoint.
Missing facts are "unknown", as in Istio. A line that cannot be read is counted in
nodeagent_access_log_errors_total and logged (the first time only); it never stops the
reading. Registry, Model and logger are handed in.

Cost (issue 11): a line's label part (everything but its measures) is looked up in a
cache of the metrics' children for the current Model, so a request like one the
waypoint already reported costs a split, a dict lookup and four increments, and the
label part is parsed only the first time (bench: python -m nodeagent.bench.accesslog).
A Model never changes once built, so the cache is dropped when the model is another
object; `principal_of` must depend on the pod alone.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import stat
import threading
from bisect import bisect_left
from itertools import accumulate
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from nodeagent.errors import ConfigError
from nodeagent.identity.spiffe import Identity
from nodeagent.model import Model, Pod, Service
from nodeagent.xds import dataplane
from nodeagent.xds.logline import MalformedLine, RequestFacts, labels_of, measured, split
from nodeagent.xds.translate import names

UNKNOWN = "unknown"
WAYPOINT, DESTINATION = "waypoint", "destination"
REPORTERS = {names.OUTBOUND_LISTENER: WAYPOINT, names.INBOUND_LISTENER: DESTINATION}
MTLS = "mutual_tls"
NONE = "none"
LABELS = ("reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
          "source_version", "source_canonical_service", "source_canonical_revision",
          "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
          "destination_version", "destination_service", "destination_service_name",
          "destination_service_namespace", "destination_canonical_service", "destination_canonical_revision",
          "request_protocol", "response_code", "grpc_response_status", "response_flags",
          "connection_security_policy")
# Envoy's default histogram buckets, which Istio's request histograms use (ms and bytes alike).
BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
           1800000, 3600000)
# What reading a line can raise: MalformedLine (a ValueError); the rest, should a label
# lookup meet something unexpected, since one bad line must never stop the reading.
PARSE_ERRORS = (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError)
# At most this many label sets cached (label part → metric children); then the cache starts over.
SERIES_CACHE = 4096
# At most this many label sets kept: each holds ~4 KB and adds ~50 KB to every /metrics
# page (~100 MB at the limit), and an app choosing its response codes with a client
# choosing paths could mint thousands; a request of a label set past it is counted in
# nodeagent_request_series_dropped_total only.
MAX_SERIES = 2_000


_UNSEEN = object()


class Series:
    """The values of one label set: the request count and the three histograms (counts
    per bucket, not cumulative, the last one +Inf; and their sum). Only the reader
    thread writes them; a scrape reads them as they are."""

    __slots__ = ("labels", "count", "duration", "duration_sum", "request", "request_sum", "response",
                 "response_sum")

    def __init__(self, labels: tuple[str, ...]):
        self.labels = labels
        self.count = 0
        self.duration, self.request, self.response = ([0] * (len(BUCKETS) + 1) for _ in range(3))
        self.duration_sum = self.request_sum = self.response_sum = 0

    def record(self, took: int, sent: int, received: int) -> None:
        self.count += 1
        self.duration[bisect_left(BUCKETS, took)] += 1
        self.duration_sum += took
        self.request[bisect_left(BUCKETS, sent)] += 1
        self.request_sum += sent
        self.response[bisect_left(BUCKETS, received)] += 1
        self.response_sum += received


class RequestMetrics:
    """istio_requests_total and friends from the waypoint's access-log lines; `model`
    names the workloads, `principal_of` gives a pod's SPIFFE URI (destination_principal;
    None: unknown).

    The values are plain counters of this object, exposed through a collector of the
    registry: prometheus_client's Counter and Histogram take a lock per value, and their
    four updates were most of a line's cost (python -m nodeagent.bench.accesslog)."""

    def __init__(self, registry: CollectorRegistry, model: Callable[[], Model], log: logging.Logger | None = None,
                 principal_of: Callable[[Pod], str | None] | None = None):
        self.model, self.principal_of = model, principal_of
        self.log = log or logging.getLogger(__name__)
        self.errors = Counter("nodeagent_access_log_errors",
                              "Access-log lines from the waypoint that could not be read", registry=registry)
        self._logged = False
        self.unread = 0  # lines that could not be read (nodeagent_access_log_errors_total)
        self._series: dict[tuple[str, ...], Series] = {}
        self.dropped = Counter("nodeagent_request_series_dropped",
                               f"Requests not counted in Istio's request metrics: their label set would have been "
                               f"one more than {MAX_SERIES}", registry=registry)
        self._dropped_logged = False
        # (the model, {label part: Series}), replaced as one object when the model changes,
        # so a reader still on the previous model never fills the new one's.
        self._cache: tuple[Model | None, dict[bytes, Series | None]] = (None, {})
        registry.register(_Collector(self._series))

    def consume(self, lines: Iterable[bytes]) -> int:
        """Record the request of every line (without its newline); how many were read."""
        model = self.model()
        cached_for, cache = self._cache
        if cached_for is not model:
            cache = {}
            self._cache = (model, cache)
        counted = 0
        for line in lines:
            try:
                key, measures = split(line)
                series = cache.get(key, _UNSEEN)
                if series is _UNSEEN:
                    series = self._series_of(key, model)  # None (dropped) is cached too
                    if len(cache) >= SERIES_CACHE:
                        cache.clear()
                    cache[key] = series
                took, sent, received = measured(measures)
            except PARSE_ERRORS as exc:  # MalformedLine is a ValueError
                self.unreadable(f"an access-log line is unreadable: {exc}")
                continue
            if series is None:
                self._drop()
            else:
                series.record(took, sent, received)
            counted += 1
        return counted

    def _series_of(self, key: bytes, model: Model) -> Series | None:
        """The label set of a line's label part; None when it would be one past MAX_SERIES."""
        log_name, facts = labels_of(key)
        reporter = REPORTERS.get(log_name)
        if reporter is None:
            raise MalformedLine(f"log name {log_name!r} is none of {sorted(REPORTERS)}")
        labels = request_labels(reporter, facts, model, self.principal_of)
        values = tuple(labels[name] for name in LABELS)
        series = self._series.get(values)
        if series is None:
            if len(self._series) >= MAX_SERIES:
                return None
            series = self._series[values] = Series(values)
        return series

    def _drop(self) -> None:
        self.dropped.inc()
        if not self._dropped_logged:
            self._dropped_logged = True
            self.log.warning("Istio's request metrics hold %d label sets, their limit: requests of further ones "
                             "are counted in nodeagent_request_series_dropped_total only (a workload minting "
                             "response codes?); not logged again", MAX_SERIES)

    def unreadable(self, what: str) -> None:
        self.unread += 1
        self.errors.inc()
        if not self._logged:
            self._logged = True
            self.log.warning("%s; this and further ones are counted in nodeagent_access_log_errors_total "
                             "and not logged again", what)


class _Collector:
    """Istio's request metrics of every label set seen, as prometheus_client families."""

    BOUNDS = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]

    def __init__(self, series: dict[tuple[str, ...], Series]):
        self.series = series

    def describe(self) -> list:
        return []  # no fixed sample names to claim: the registry checks none

    def collect(self):
        requests = CounterMetricFamily("istio_requests", "Requests handled by the waypoint", labels=LABELS)
        histograms = [(HistogramMetricFamily(name, doc, labels=LABELS), values, total)
                      for name, doc, values, total in (
                          ("istio_request_duration_milliseconds", "Duration of requests", "duration", "duration_sum"),
                          ("istio_request_bytes", "Sizes of requests (headers and body)", "request", "request_sum"),
                          ("istio_response_bytes", "Sizes of responses (headers and body)", "response",
                           "response_sum"))]
        for series in list(self.series.values()):
            requests.add_metric(series.labels, series.count)
            for family, values, total in histograms:
                cumulative = list(accumulate(getattr(series, values)))
                family.add_metric(series.labels, list(zip(self.BOUNDS, cumulative)), getattr(series, total))
        yield requests
        for family, _, _ in histograms:
            yield family


class AccessLogPipe:
    """The FIFO the waypoint Envoy writes its access-log lines into, read by a thread of
    its own that hands each chunk's complete lines to `metrics.consume`.

    `open()` makes the FIFO (replacing whatever else has its path) and opens it for
    reading and writing, so Envoy's open for writing never waits and the reader never
    sees an end of file while Envoy restarts; call it before Envoy starts. The pipe
    holds PIPE_SIZE: Envoy's flush thread waits when it is full (its workers do not;
    they add to Envoy's buffer). A line longer than MAX_LINE is dropped and counted
    unreadable. `close()` stops the thread and removes the FIFO; call it after Envoy
    stopped."""

    PIPE_SIZE = 1 << 20
    CHUNK = 1 << 20
    MAX_LINE = 1 << 16

    def __init__(self, path: str, metrics: RequestMetrics, log: logging.Logger | None = None):
        self.path, self.metrics = path, metrics
        self.log = log or logging.getLogger(__name__)
        self.lines = 0  # lines read
        self._fd = -1
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def open(self) -> AccessLogPipe:
        try:
            if not stat.S_ISFIFO(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        try:
            os.mkfifo(self.path, 0o600)
        except FileExistsError:
            pass
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETPIPE_SZ, self.PIPE_SIZE)
        except OSError as exc:  # above /proc/sys/fs/pipe-max-size for a process without CAP_SYS_RESOURCE
            self.log.info("the access-log FIFO keeps the kernel's default size: %s", exc.strerror)
        self._wake = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None and self._wake is not None:
            os.write(self._wake[1], b"x")
            self._thread.join()
            self._thread = None
        for fd in (self._fd, *(self._wake or ())):
            if fd >= 0:
                os.close(fd)
        self._fd, self._wake = -1, None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        tail, skipping = b"", False
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake[0] in ready:
                return
            while True:
                try:
                    chunk = os.read(self._fd, self.CHUNK)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    raise
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                if skipping:  # the rest of a line too long to keep
                    if not lines:
                        tail = b""
                        continue
                    lines.pop(0)
                    skipping = False
                if len(tail) > self.MAX_LINE:
                    self.metrics.unreadable(f"an access-log line is longer than {self.MAX_LINE} bytes")
                    tail, skipping = b"", True
                if lines:
                    self.lines += len(lines)
                    try:
                        self.metrics.consume(lines)
                    except Exception:  # never stop reading: Envoy's buffer would grow instead
                        self.log.exception("recording %d access-log lines failed", len(lines))


def request_labels(reporter: str, facts: RequestFacts, model: Model,
                   principal_of: Callable[[Pod], str | None] | None = None) -> dict[str, str]:
    """Istio's standard labels of one request."""
    principal = facts.principal
    source, source_ns = _source(model, facts)
    destination, service = _destination(reporter, model, facts)
    destination_principal = (principal_of(destination) if destination and principal_of else None) or UNKNOWN
    return {
        "reporter": reporter, **_workload("source", source, source_ns), "source_principal": principal or UNKNOWN,
        **_workload("destination", destination, destination.namespace if destination else UNKNOWN),
        "destination_principal": destination_principal, **_service_labels(service, facts.cluster),
        "request_protocol": "grpc" if facts.grpc else "http", "response_code": str(facts.code),
        "grpc_response_status": facts.grpc_status, "response_flags": facts.flags,
        # as Istio's: a destination that took plaintext says "none"; a source cannot tell
        "connection_security_policy": MTLS if principal else NONE if reporter == DESTINATION else UNKNOWN,
    }


def _source(model: Model, facts: RequestFacts) -> tuple[Pod | None, str]:
    """(the source pod, its namespace) from the agent's SOURCE_WORKLOAD, else from the
    PROXY source address when the pod there holds the proven principal."""
    principal = facts.principal
    if facts.workload:
        namespace, _, name = facts.workload.partition("/")
        return model.pods.get((namespace, name)), namespace or UNKNOWN
    identity = _identity(principal)
    pod = model.pod_by_ip(facts.remote_ip) if facts.remote_ip else None
    if pod is not None and principal and (identity is None or (identity.namespace, identity.service_account)
                                          != (pod.namespace, pod.service_account)):
        pod = None  # the address is another workload's now, or the principal is not this pod's
    return pod, pod.namespace if pod else identity.namespace if identity else UNKNOWN


def _identity(principal: str | None) -> Identity | None:
    try:
        return Identity.parse(principal) if principal else None
    except ConfigError:
        return None


def _destination(reporter: str, model: Model, facts: RequestFacts) -> tuple[Pod | None, Service | str | None]:
    """(the destination pod, its Service or the host name of the cluster it went to)."""
    if reporter == DESTINATION:  # the PROXY destination is the pod, the service is inferred
        pod = model.pod_by_ip(facts.local_ip) if facts.local_ip else None
        return pod, model.service_of(pod, facts.local_port) if pod else None
    pod = model.pod_by_ip(_endpoint_ip(facts.endpoint)) if facts.endpoint is not None else None
    parsed = names.parse_outbound_cluster(facts.cluster)
    if parsed is not None:
        return pod, _service_by_host(model, parsed[0]) or parsed[0]
    if facts.cluster == names.BLACKHOLE:
        return pod, None
    # no cluster: the service the chain chose
    return pod, model.service_by_ip(facts.local_ip) if facts.local_ip else None


def _service_by_host(model: Model, host: str) -> Service | None:
    name, _, rest = host.partition(".")
    namespace = rest.partition(".")[0]
    service = model.services.get((namespace, name))
    return service if service is not None and service.hostname == host else None


def _service_labels(service: Service | str | None, cluster: str) -> dict[str, str]:
    if isinstance(service, Service):
        host, name, namespace = service.hostname, service.name, service.namespace
    elif service:  # a host the model does not know
        host, name, namespace = service, service, UNKNOWN
    elif cluster == names.BLACKHOLE:  # as Istio labels requests to a dangling destination
        host, name, namespace = cluster, cluster, UNKNOWN
    else:
        host, name, namespace = UNKNOWN, UNKNOWN, UNKNOWN
    return {"destination_service": host, "destination_service_name": name,
            "destination_service_namespace": namespace}


def _workload(side: str, pod: Pod | None, namespace: str) -> dict[str, str]:
    """Workload, namespace, app, version and canonical service/revision, as Istio reads
    them from the pod's labels."""
    if pod is None:
        return {f"{side}_workload": UNKNOWN, f"{side}_workload_namespace": namespace, f"{side}_app": UNKNOWN,
                f"{side}_version": UNKNOWN, f"{side}_canonical_service": UNKNOWN,
                f"{side}_canonical_revision": UNKNOWN}
    return {
        f"{side}_workload": pod.workload_name, f"{side}_workload_namespace": pod.namespace,
        f"{side}_app": pod.app or UNKNOWN, f"{side}_version": pod.version or UNKNOWN,
        f"{side}_canonical_service": pod.canonical_service, f"{side}_canonical_revision": pod.canonical_revision,
    }


def _endpoint_ip(endpoint: str) -> str:
    """The IP of an endpoint id `10.0.0.1:80` / `[fd00::1]:80`; "" for `passthrough`."""
    try:
        return dataplane.parse_endpoint(endpoint)[0]
    except ValueError:
        return ""
