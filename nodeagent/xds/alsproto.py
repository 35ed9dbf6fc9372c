"""The waypoint's access-log messages, decoded natively (upb) down to the facts the
request metrics read.

Envoy streams StreamAccessLogsMessage batches of ~730-byte HTTP entries; decoding them
with envoy-data-plane's pure-Python classes (used until issue 11) cost 660-800 µs an
entry, several times what the agent spends on the request itself (python -m
nodeagent.bench.accesslog). Here protobuf's upb runtime parses them in C against a subset of
Envoy's schema: the messages and fields below, with Envoy's field numbers, and nothing
else. Every other field (paths, timestamps, the Node, wire byte counts …) is an unknown
field to upb, skipped in C and never turned into Python objects. `AlsDecoder.facts`
then reads one entry into `RequestFacts`: a tuple of what the labels depend on (the
key accesslog.py caches label sets by) and the three measured values.

The schema is built into a private DescriptorPool (nodeagent/protosubset.py) when an
AlsDecoder is made, so it never meets xds-protos' copy of Envoy's protos in the process;
the unit tests check every number and type against xds-protos' descriptors (generated
from Envoy's .proto files) and compare this decoder with xds-protos' full classes field
by field on the bytes a real Envoy sends.
"""

from __future__ import annotations

from datetime import timedelta
from typing import NamedTuple

from google.protobuf.message import DecodeError  # noqa: F401 (what parse and facts raise)

from nodeagent import protosubset as subset
from nodeagent.xds import dataplane

PACKAGE = "nodeagent.als"
STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"
# The filter state the waypoint logs (translate/listeners.py LOGGED_FILTER_STATE).
PRINCIPAL = dataplane.FILTER_STATE[dataplane.TLV_PRINCIPAL]
SOURCE_WORKLOAD = dataplane.FILTER_STATE[dataplane.TLV_SOURCE_WORKLOAD]
# ResponseFlags fields, numbered 1-28 in this order in Envoy's schema, with the short
# names Envoy joins in this order in its logs (`UF,URX`).
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
# Fields as (name, number, type, oneof): type is a scalar, a message of this schema or a
# google.protobuf one, "repeated T" or "map<string, T>"; a oneof only where Envoy has
# one, so a later member clears an earlier one exactly as in Envoy's schema.
SCHEMA: dict[str, list[tuple[str, int, str, str | None]]] = {
    # envoy/service/accesslog/v3/als.proto
    "StreamAccessLogsMessage": [("identifier", 1, "Identifier", None),
                                ("http_logs", 2, "HTTPAccessLogEntries", "log_entries"),
                                ("tcp_logs", 3, "Skipped", "log_entries")],
    "Identifier": [("log_name", 2, "string", None)],
    "HTTPAccessLogEntries": [("log_entry", 1, "repeated HTTPAccessLogEntry", None)],
    # envoy/data/accesslog/v3/accesslog.proto
    "HTTPAccessLogEntry": [("common_properties", 1, "AccessLogCommon", None),
                           ("request", 3, "HTTPRequestProperties", None),
                           ("response", 4, "HTTPResponseProperties", None)],
    "AccessLogCommon": [("downstream_remote_address", 2, "Address", None),
                        ("downstream_local_address", 3, "Address", None),
                        ("time_to_last_downstream_tx_byte", 12, "google.protobuf.Duration", None),
                        ("upstream_remote_address", 13, "Address", None),
                        ("upstream_cluster", 15, "string", None),
                        ("response_flags", 16, "ResponseFlags", None),
                        ("filter_state_objects", 21, "map<string, google.protobuf.Any>", None),
                        ("duration", 23, "google.protobuf.Duration", None),
                        ("intermediate_log_entry", 27, "bool", None)],
    "ResponseFlags": [(name, number, "Skipped" if name == "unauthorized_details" else "bool", None)
                      for number, (name, _) in enumerate(FLAGS, start=1)],
    "HTTPRequestProperties": [("request_headers_bytes", 11, "uint64", None),
                              ("request_body_bytes", 12, "uint64", None),
                              ("request_headers", 13, "map<string, string>", None)],
    "HTTPResponseProperties": [("response_code", 1, "google.protobuf.UInt32Value", None),
                               ("response_headers_bytes", 2, "uint64", None),
                               ("response_body_bytes", 3, "uint64", None),
                               ("response_headers", 4, "map<string, string>", None),
                               ("response_trailers", 5, "map<string, string>", None)],
    # envoy/config/core/v3/address.proto
    "Address": [("socket_address", 1, "SocketAddress", "address"), ("pipe", 2, "Skipped", "address"),
                ("envoy_internal_address", 3, "EnvoyInternalAddress", "address")],
    "SocketAddress": [("address", 2, "string", None), ("port_value", 3, "uint32", "port_specifier"),
                      ("named_port", 4, "string", "port_specifier")],
    "EnvoyInternalAddress": [("endpoint_id", 2, "string", None)],
    # a message whose presence alone is read (ResponseFlags.Unauthorized, Pipe, TCP entries)
    "Skipped": [],
}


class RequestFacts(NamedTuple):
    """What Istio's labels of one request depend on (the cache key: no client port, no
    timings) and, apart, what is measured."""
    principal: str | None  # filter state nodeagent.source_principal
    workload: str | None  # filter state nodeagent.source_workload, "ns/pod"
    remote_ip: str | None  # the PROXY source address (client pod)
    local_ip: str | None  # the PROXY destination (VIP or pod IP) …
    local_port: int  # … and its port
    endpoint: str | None  # the internal address's endpoint id Envoy picked; None: not an internal address
    cluster: str
    grpc: bool  # content-type application/grpc*
    grpc_status: str
    code: int  # 0: no response
    flags: str  # Envoy's short form, "-" when none


class Measured(NamedTuple):
    milliseconds: float
    request_bytes: int
    response_bytes: int


class AlsDecoder:
    """Parses StreamAccessLogsMessage bytes (`parse`, raising DecodeError) and reads an
    entry's facts (`facts`). Each instance has its own descriptor pool."""

    def __init__(self):
        classes = subset.classes("nodeagent/als_subset.proto", PACKAGE, SCHEMA)
        self.message = classes("StreamAccessLogsMessage")
        self._string_value = classes("google.protobuf.StringValue")

    def parse(self, data: bytes):
        """The message; DecodeError for bytes that are not one."""
        return self.message.FromString(data)

    def facts(self, entry) -> tuple[RequestFacts, Measured]:
        """One entry's facts and measures; DecodeError for a filter state that is not a
        StringValue's bytes, OverflowError for a duration out of range."""
        common, request, response = entry.common_properties, entry.request, entry.response
        states = common.filter_state_objects
        remote = common.downstream_remote_address.socket_address
        local = common.downstream_local_address.socket_address
        upstream = common.upstream_remote_address
        headers = request.request_headers
        grpc = headers.get("content-type", "").startswith("application/grpc")
        grpc_status = ""
        if grpc:
            grpc_status = response.response_trailers.get("grpc-status") or response.response_headers.get(
                "grpc-status") or ""
        facts = RequestFacts(
            self._string_state(states, PRINCIPAL), self._string_state(states, SOURCE_WORKLOAD),
            remote.address or None, local.address or None, local.port_value,
            upstream.envoy_internal_address.endpoint_id if upstream.HasField("envoy_internal_address") else None,
            common.upstream_cluster, grpc, grpc_status,
            response.response_code.value if response.HasField("response_code") else 0,
            _flags(common.response_flags) if common.HasField("response_flags") else "-")
        took = common.duration if common.HasField("duration") else (
            common.time_to_last_downstream_tx_byte if common.HasField("time_to_last_downstream_tx_byte") else None)
        return facts, Measured(_milliseconds(took), request.request_headers_bytes + request.request_body_bytes,
                               response.response_headers_bytes + response.response_body_bytes)

    def _string_state(self, states, key: str) -> str | None:
        """A string filter state object as the access log carries it (a StringValue in an Any)."""
        value = states.get(key)
        if value is None or value.type_url != STRING_VALUE:
            return None
        return self._string_value.FromString(value.value).value or None


def _flags(flags) -> str:
    """Envoy's short form (`UF,URX`), "-" when there are none; a flag is a bool or, for
    UAEX, a message (set when present, even empty)."""
    found = [short for name, short in FLAGS
             if (flags.HasField(name) if name == "unauthorized_details" else getattr(flags, name))]
    return ",".join(found) or "-"


def _milliseconds(took) -> float:
    """A Duration in ms exactly as before: through a timedelta (microsecond resolution)."""
    if took is None:
        return 0.0
    return float(timedelta(seconds=took.seconds, microseconds=took.nanos / 1e3).total_seconds() * 1000)
