"""Istio's request metrics from the waypoint Envoy's access log (gRPC ALS).

Every HTTP connection manager of the waypoint streams its access log to the agent's xDS
server (envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs, served by the same
grpcio server as ADS); the first message of a stream names the log, which is the
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
"""

from __future__ import annotations

import logging
import struct
from typing import Callable, Iterable, Protocol

import grpc
from envoy_data_plane.envoy.config.core.v3 import Address
from envoy_data_plane.envoy.data.accesslog.v3 import AccessLogCommon, HttpAccessLogEntry
from envoy_data_plane.envoy.service.accesslog.v3 import StreamAccessLogsMessage, StreamAccessLogsResponse
from envoy_data_plane.google.protobuf import StringValue
from prometheus_client import CollectorRegistry, Counter, Histogram

from nodeagent.errors import ConfigError
from nodeagent.identity.spiffe import Identity
from nodeagent.model import Model, Pod, Service
from nodeagent.xds import dataplane
from nodeagent.xds.translate import names

SERVICE = "envoy.service.accesslog.v3.AccessLogService"
METHOD = "StreamAccessLogs"
UNKNOWN = "unknown"
WAYPOINT, DESTINATION = "waypoint", "destination"
REPORTERS = {names.OUTBOUND_LISTENER: WAYPOINT, names.INBOUND_LISTENER: DESTINATION}
MTLS = "mutual_tls"
PRINCIPAL = dataplane.FILTER_STATE[dataplane.TLV_PRINCIPAL]
SOURCE_WORKLOAD = dataplane.FILTER_STATE[dataplane.TLV_SOURCE_WORKLOAD]
STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"
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
# ResponseFlags fields and Envoy's short names, in the order Envoy joins them.
FLAGS = (("failed_local_healthcheck", "LH"), ("no_healthy_upstream", "UH"), ("upstream_request_timeout", "UT"),
         ("local_reset", "LR"), ("upstream_remote_reset", "UR"), ("upstream_connection_failure", "UF"),
         ("upstream_connection_termination", "UC"), ("upstream_overflow", "UO"), ("no_route_found", "NR"),
         ("delay_injected", "DI"), ("fault_injected", "FI"), ("rate_limited", "RL"),
         ("unauthorized_details", "UAEX"), ("rate_limit_service_error", "RLSE"),
         ("downstream_connection_termination", "DC"), ("upstream_retry_limit_exceeded", "URX"),
         ("stream_idle_timeout", "SI"), ("invalid_envoy_request_headers", "IH"),
         ("downstream_protocol_error", "DPE"), ("upstream_max_stream_duration_reached", "UMSDR"),
         ("response_from_cache_filter", "RFCF"), ("no_filter_config_found", "NFCF"), ("duration_timeout", "DT"),
         ("upstream_protocol_error", "UPE"), ("no_cluster_found", "NC"), ("overload_manager", "OM"),
         ("dns_resolution_failure", "DF"), ("downstream_remote_reset", "DR"))
# What betterproto2 raises for bytes that are not the message (it has no error type of its
# own; found by fuzzing, see the unit test).
PARSE_ERRORS = (ValueError, KeyError, EOFError, OverflowError, TypeError, IndexError, AttributeError,
                struct.error, RecursionError)


class MalformedEntry(ValueError):
    """An access-log entry without the facts every entry has."""


class AccessLogSink(Protocol):
    def consume(self, messages: Iterable[bytes]) -> None:
        """Take the raw messages of one StreamAccessLogs stream, until it ends."""


def rpc_handler(sink: AccessLogSink) -> grpc.GenericRpcHandler:
    """AccessLogService for a grpcio server: each stream's raw messages go to `sink`."""
    def stream(requests, context) -> StreamAccessLogsResponse:
        try:
            sink.consume(requests)
        except grpc.RpcError:
            pass  # Envoy reset the stream (restart, shutdown); it opens another at its next flush
        return StreamAccessLogsResponse()
    handler = grpc.stream_unary_rpc_method_handler(stream, response_serializer=bytes)
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})


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
        self._logged = False

    def consume(self, messages: Iterable[bytes]) -> None:
        """Record every HTTP entry of one stream; its first message names the log."""
        log_name = None
        for data in messages:
            try:
                message = StreamAccessLogsMessage.parse(data)
            except PARSE_ERRORS as exc:
                self._error(f"an access-log message ({len(data)} bytes) does not parse: {exc!r}")
                continue
            if message.identifier is not None:
                log_name = message.identifier.log_name
            if message.http_logs is not None:
                model = self.model()
                for entry in message.http_logs.log_entry:
                    self.record(log_name, entry, model)

    def record(self, log_name: str | None, entry: HttpAccessLogEntry, model: Model | None = None) -> bool:
        """Count one request; False (and an error counted) when the entry is unreadable."""
        try:
            reporter = REPORTERS.get(log_name or "")
            if reporter is None:
                raise MalformedEntry(f"log name {log_name!r} is none of {sorted(REPORTERS)}")
            common = entry.common_properties
            if common is None:
                raise MalformedEntry("no common_properties")
            if common.intermediate_log_entry:
                return False  # a long request's periodic entry: counted once, when it ends
            labels = request_labels(reporter, entry, model or self.model(), self.principal_of)
            took, sizes = _milliseconds(common), _sizes(entry)
        except PARSE_ERRORS as exc:  # MalformedEntry is a ValueError
            self._error(f"an access-log entry of log {log_name!r} is unreadable: {exc!r}")
            return False
        self.requests.labels(**labels).inc()
        self.duration.labels(**labels).observe(took)
        self.request_bytes.labels(**labels).observe(sizes[0])
        self.response_bytes.labels(**labels).observe(sizes[1])
        return True

    def _error(self, what: str) -> None:
        self.errors.inc()
        if not self._logged:
            self._logged = True
            self.log.warning("%s; this and further ones are counted in nodeagent_access_log_errors_total "
                             "and not logged again", what)


def request_labels(reporter: str, entry: HttpAccessLogEntry, model: Model,
                   principal_of: Callable[[Pod], str | None] | None = None) -> dict[str, str]:
    """Istio's standard labels of one request."""
    common, request, response = entry.common_properties, entry.request, entry.response
    principal = _filter_state(common, PRINCIPAL)
    source, source_ns = _source(model, common, principal)
    destination, service = _destination(reporter, model, common)
    destination_principal = (principal_of(destination) if destination and principal_of else None) or UNKNOWN
    headers = request.request_headers if request is not None else {}
    grpc_call = headers.get("content-type", "").startswith("application/grpc")
    grpc_status = ""
    if grpc_call and response is not None:
        grpc_status = response.response_trailers.get("grpc-status") or response.response_headers.get(
            "grpc-status") or ""
    code = response.response_code if response is not None and response.response_code is not None else 0
    return {
        "reporter": reporter, **_workload("source", source, source_ns), "source_principal": principal or UNKNOWN,
        **_workload("destination", destination, destination.namespace if destination else UNKNOWN),
        "destination_principal": destination_principal, **_service_labels(service, common.upstream_cluster),
        "request_protocol": "grpc" if grpc_call else "http", "response_code": str(code),
        "grpc_response_status": grpc_status, "response_flags": response_flags(common),
        "connection_security_policy": MTLS if principal else UNKNOWN,
    }


def response_flags(common: AccessLogCommon) -> str:
    """Envoy's short form (`UF,URX`), "-" when there are none."""
    flags = common.response_flags
    if flags is None:
        return "-"
    # a flag is a bool or, for UAEX, a message (set when present, even empty)
    found = [short for name, short in FLAGS if getattr(flags, name) not in (None, False)]
    return ",".join(found) or "-"


def _filter_state(common: AccessLogCommon, key: str) -> str | None:
    """A string filter state object as the access log carries it (a StringValue)."""
    value = common.filter_state_objects.get(key)
    if value is None or value.type_url != STRING_VALUE:
        return None
    return StringValue.parse(value.value).value or None


def _source(model: Model, common: AccessLogCommon, principal: str | None) -> tuple[Pod | None, str]:
    """(the source pod, its namespace) from the agent's SOURCE_WORKLOAD, else from the
    PROXY source address when the pod there holds the proven principal."""
    workload = _filter_state(common, SOURCE_WORKLOAD)
    if workload:
        namespace, _, name = workload.partition("/")
        return model.pods.get((namespace, name)), namespace or UNKNOWN
    identity = _identity(principal)
    address = _ip_port(common.downstream_remote_address)
    pod = model.pod_by_ip(address[0]) if address else None
    if pod is not None and principal and (identity is None or (identity.namespace, identity.service_account)
                                          != (pod.namespace, pod.service_account)):
        pod = None  # the address is another workload's now, or the principal is not this pod's
    return pod, pod.namespace if pod else identity.namespace if identity else UNKNOWN


def _identity(principal: str | None) -> Identity | None:
    try:
        return Identity.parse(principal) if principal else None
    except ConfigError:
        return None


def _destination(reporter: str, model: Model, common: AccessLogCommon) -> tuple[Pod | None, Service | str | None]:
    """(the destination pod, its Service or the host name of the cluster it went to)."""
    if reporter == DESTINATION:  # the PROXY destination is the pod, the service is inferred
        address = _ip_port(common.downstream_local_address)
        pod = model.pod_by_ip(address[0]) if address else None
        return pod, model.service_of(pod, address[1]) if pod else None
    upstream = common.upstream_remote_address
    internal = upstream.envoy_internal_address if upstream is not None else None
    pod = model.pod_by_ip(_endpoint_ip(internal.endpoint_id)) if internal is not None else None
    parsed = names.parse_outbound_cluster(common.upstream_cluster)
    if parsed is not None:
        return pod, _service_by_host(model, parsed[0]) or parsed[0]
    if common.upstream_cluster == names.BLACKHOLE:
        return pod, None
    address = _ip_port(common.downstream_local_address)  # no cluster: the service the chain chose
    return pod, model.service_by_ip(address[0]) if address else None


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


def _ip_port(address: Address | None) -> tuple[str, int] | None:
    socket = address.socket_address if address is not None else None
    if socket is None or not socket.address:
        return None
    return socket.address, socket.port_value or 0


def _endpoint_ip(endpoint: str) -> str:
    """The IP of an endpoint id `10.0.0.1:80` / `[fd00::1]:80`; "" for `passthrough`."""
    try:
        return dataplane.parse_endpoint(endpoint)[0]
    except ValueError:
        return ""


def _milliseconds(common: AccessLogCommon) -> float:
    """The request's duration (start to its end), else to the last byte sent downstream."""
    took = common.duration if common.duration is not None else common.time_to_last_downstream_tx_byte
    return float(took.total_seconds() * 1000) if took is not None else 0.0


def _sizes(entry: HttpAccessLogEntry) -> tuple[int, int]:
    """(request, response) bytes, headers and body, as Istio's request.total_size."""
    request, response = entry.request, entry.response
    return (0 if request is None else int(request.request_headers_bytes + request.request_body_bytes),
            0 if response is None else int(response.response_headers_bytes + response.response_body_bytes))
