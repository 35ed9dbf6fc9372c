"""Istio's request metrics from the waypoint Envoy's access log (gRPC ALS).

Every HTTP connection manager of the waypoint streams its access log to the agent's xDS
server (envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs, served by the same
grpclib server as ADS); the first message of a stream names the log, which is the
listener: `outbound` (client side, reporter "waypoint") or `inbound` (server side,
reporter "destination"), so a request through both counts once under each reporter.
`RequestMetrics` turns each entry into istio_requests_total and the duration, request
and response size histograms (milliseconds and bytes, Envoy's default buckets, as
Istio's), with Istio's standard labels named from the Model:
- source: the pod of filter state `nodeagent.source_workload` ("ns/pod", the agent's
  TLV), else the pod at the PROXY source address when its service account agrees with
  the proven principal (filter state `nodeagent.source_principal`);
- destination: client side, the pod of the endpoint Envoy picked (the internal
  address's endpoint id "ip:port") and the service of the `outbound|port|subset|host`
  cluster; server side, the pod of the PROXY destination and the service selecting it
  on that port (as the agent's L4 reporter picks it);
- connection_security_policy "mutual_tls" when a source principal is known.
Missing facts are "unknown", as in Istio. A message or entry that cannot be read is
counted in nodeagent_access_log_errors_total and logged (the first time only); it never
ends the stream. Registry, Model and logger are handed in.

Cost (issue 11): messages are parsed by upb against the subset of Envoy's schema the
labels read (alsproto.py), and the label set of a request is looked up by its facts
(RequestFacts: principal, source workload and address, destination, cluster, code,
flags …) in a cache of the metrics' children for the current Model, so a request the
waypoint already reported costs a dict lookup and four increments (bench: python -m
nodeagent.bench.accesslog). A Model never changes once built, so the cache is dropped
when the model is another object; `principal_of` must depend on the pod alone.
"""

from __future__ import annotations

import logging
import struct
from typing import Callable, Iterable, NamedTuple, Protocol

from grpclib.exceptions import StreamTerminatedError
from prometheus_client import CollectorRegistry, Counter, Histogram

from nodeagent import grpcwire
from nodeagent.errors import ConfigError
from nodeagent.identity.spiffe import Identity
from nodeagent.model import Model, Pod, Service
from nodeagent.xds import dataplane
from nodeagent.xds.alsproto import AlsDecoder, DecodeError, RequestFacts
from nodeagent.xds.translate import names

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
METHOD = "StreamAccessLogs"
UNKNOWN = "unknown"
WAYPOINT, DESTINATION = "waypoint", "destination"
REPORTERS = {names.OUTBOUND_LISTENER: WAYPOINT, names.INBOUND_LISTENER: DESTINATION}
MTLS = "mutual_tls"
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
# What reading a message or an entry can raise: upb's DecodeError for bytes that are not
# the message (or a filter state that is not a StringValue), OverflowError for a duration
# out of range, MalformedEntry (a ValueError); the rest, should a label lookup meet
# something unexpected, since one bad entry must never end the stream.
PARSE_ERRORS = (DecodeError, ValueError, KeyError, EOFError, OverflowError, TypeError, IndexError, AttributeError,
                struct.error, RecursionError)
# At most this many label sets cached (facts → metric children); then the cache starts over.
SERIES_CACHE = 4096


class MalformedEntry(ValueError):
    """An access-log entry without the facts every entry has."""


class AccessLogSink(Protocol):
    def stream(self) -> Callable[[bytes], None]:
        """A reader for the raw messages of one StreamAccessLogs stream, in order."""


def serve(sink: AccessLogSink) -> Callable:
    """AccessLogService's handler for a grpclib server (grpcwire.Raw codec): each stream's
    raw messages go to a reader of `sink`; the answer is the empty StreamAccessLogsResponse."""
    async def stream(call) -> None:
        take = sink.stream()
        try:
            while (data := await grpcwire.receive(call)) is not None:
                take(data)
        except StreamTerminatedError:
            return  # Envoy reset the stream (restart, shutdown); it opens another at its next flush
        await call.send_message(b"")
    return stream


class Series(NamedTuple):
    """The metrics' children of one label set."""
    requests: Counter
    duration: Histogram
    request_bytes: Histogram
    response_bytes: Histogram


class RequestMetrics:
    """istio_requests_total and friends from ALS streams; `model` names the workloads,
    `principal_of` gives a pod's SPIFFE URI (destination_principal; None: unknown)."""

    def __init__(self, registry: CollectorRegistry, model: Callable[[], Model], log: logging.Logger | None = None,
                 principal_of: Callable[[Pod], str | None] | None = None):
        self.model, self.principal_of = model, principal_of
        self.log = log or logging.getLogger(__name__)
        self.requests = Counter("istio_requests", "Requests handled by the waypoint", LABELS, registry=registry)
        self.duration = Histogram("istio_request_duration_milliseconds", "Duration of requests", LABELS,
                                  buckets=BUCKETS, registry=registry)
        self.request_bytes = Histogram("istio_request_bytes", "Sizes of requests (headers and body)", LABELS,
                                       buckets=BUCKETS, registry=registry)
        self.response_bytes = Histogram("istio_response_bytes", "Sizes of responses (headers and body)", LABELS,
                                        buckets=BUCKETS, registry=registry)
        self.errors = Counter("nodeagent_access_log_errors",
                              "Access-log messages or entries from the waypoint that could not be read",
                              registry=registry)
        self.decoder = AlsDecoder()
        self._logged = False
        # (the model, {(reporter, facts): Series}), replaced as one object when the model
        # changes, so a stream thread still on the previous model never fills the new one's.
        self._cache: tuple[Model | None, dict[tuple[str, RequestFacts], Series]] = (None, {})

    def consume(self, messages: Iterable[bytes]) -> None:
        """Record every HTTP entry of one stream's messages."""
        take = self.stream()
        for data in messages:
            take(data)

    def stream(self) -> Callable[[bytes], None]:
        """A reader of one stream's messages: it records every HTTP entry; the stream's
        first message names the log."""
        log_name = None

        def take(data: bytes) -> None:
            nonlocal log_name
            try:
                message = self.decoder.parse(data)
            except DecodeError as exc:
                self._error(f"an access-log message ({len(data)} bytes) does not parse: {exc!r}")
                return
            if message.HasField("identifier"):
                log_name = message.identifier.log_name
            if message.HasField("http_logs"):
                model = self.model()
                for entry in message.http_logs.log_entry:
                    self.record(log_name, entry, model)
        return take

    def record(self, log_name: str | None, entry, model: Model | None = None) -> bool:
        """Count one request (an HTTPAccessLogEntry as AlsDecoder parsed it); False (and an
        error counted) when the entry is unreadable."""
        try:
            reporter = REPORTERS.get(log_name or "")
            if reporter is None:
                raise MalformedEntry(f"log name {log_name!r} is none of {sorted(REPORTERS)}")
            if not entry.HasField("common_properties"):
                raise MalformedEntry("no common_properties")
            if entry.common_properties.intermediate_log_entry:
                return False  # a long request's periodic entry: counted once, when it ends
            facts, measured = self.decoder.facts(entry)
            series = self._series_of(reporter, facts, model or self.model())
        except PARSE_ERRORS as exc:  # MalformedEntry is a ValueError
            self._error(f"an access-log entry of log {log_name!r} is unreadable: {exc!r}")
            return False
        series.requests.inc()
        series.duration.observe(measured.milliseconds)
        series.request_bytes.observe(measured.request_bytes)
        series.response_bytes.observe(measured.response_bytes)
        return True

    def _series_of(self, reporter: str, facts: RequestFacts, model: Model) -> Series:
        cached_for, cache = self._cache
        if cached_for is not model:
            cache = {}
            self._cache = (model, cache)
        key = (reporter, facts)
        series = cache.get(key)
        if series is None:
            labels = request_labels(reporter, facts, model, self.principal_of)
            series = Series(self.requests.labels(**labels), self.duration.labels(**labels),
                            self.request_bytes.labels(**labels), self.response_bytes.labels(**labels))
            if len(cache) >= SERIES_CACHE:
                cache.clear()
            cache[key] = series
        return series

    def _error(self, what: str) -> None:
        self.errors.inc()
        if not self._logged:
            self._logged = True
            self.log.warning("%s; this and further ones are counted in nodeagent_access_log_errors_total "
                             "and not logged again", what)


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
        "connection_security_policy": MTLS if principal else UNKNOWN,
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
    labels = pod.labels
    app = labels.get("app") or labels.get("app.kubernetes.io/name")
    version = labels.get("version") or labels.get("app.kubernetes.io/version")
    return {
        f"{side}_workload": pod.workload_name, f"{side}_workload_namespace": pod.namespace,
        f"{side}_app": app or UNKNOWN, f"{side}_version": version or UNKNOWN,
        f"{side}_canonical_service": labels.get("service.istio.io/canonical-name")
        or labels.get("app.kubernetes.io/name") or labels.get("app") or pod.workload_name,
        f"{side}_canonical_revision": labels.get("service.istio.io/canonical-revision")
        or labels.get("app.kubernetes.io/version") or labels.get("version") or "latest",
    }


def _endpoint_ip(endpoint: str) -> str:
    """The IP of an endpoint id `10.0.0.1:80` / `[fd00::1]:80`; "" for `passthrough`."""
    try:
        return dataplane.parse_endpoint(endpoint)[0]
    except ValueError:
        return ""
