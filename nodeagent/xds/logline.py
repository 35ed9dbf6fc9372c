"""The waypoint's access-log line: what Envoy writes for each request and how the agent
reads it (issue 11).

Every HTTP connection manager of the waypoint logs each request with Envoy's file access
logger into a FIFO in the waypoint's directory (`Sockets.access_log`), which the agent
reads (accesslog.AccessLogPipe). Envoy formats a line on the worker that handled the
request and writes the buffered lines from a flush thread of its own, so a worker never
waits for the agent. The line is compact JSON; Envoy 1.40 writes a format's keys sorted
(its `sort_properties` option is deprecated), and either order of the two parts reads:

    {"l":{"c":…,"ct":…,"d":…,"dp":…,"f":…,"gh":…,"gt":…,"log":…,"p":…,"r":…,"s":…,"u":…,"w":…},"m":"12 310 0 122 53"}

`l` holds what the request's labels depend on (the cache key: no client port, no
timings), `m` what is measured: the duration in ms, then the request's headers and body
bytes and the response's. JSON escapes every value a client or an app chose (a header
value can hold spaces and quotes), so `"m":"` occurs once, right before the measures
(digits, spaces and "-"), and a line splits without parsing it; the label part is parsed (json) only the first time it
is seen.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from nodeagent.xds import dataplane

PRINCIPAL = dataplane.FILTER_STATE[dataplane.TLV_PRINCIPAL]
SOURCE_WORKLOAD = dataplane.FILTER_STATE[dataplane.TLV_SOURCE_WORKLOAD]
# All of content-type the labels read: gRPC is "application/grpc" or "application/grpc+…"
# (as Envoy tells it; "application/grpc-web" is not).
CONTENT_TYPE_CHARS = len("application/grpc+")
GRPC_STATUS_CHARS = 8  # grpc-status is a small number (0-16, or an app's own code); more is cut here
# What grpc_response_status may be: one of gRPC's codes, 0-16, written without leading
# zeros; anything else an app sends is "unknown", so an app cannot make the agent keep a
# label set per distinct value ("7", "07" and "007" were three).
GRPC_CODES = 16
# Without a grpc-status, the code Envoy infers from the HTTP status (Grpc::Utility::
# httpToGrpcStatus), as Istio's label has it: 2 (UNKNOWN) for any other.
HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
LABEL_FORMAT = {
    "p": f"%FILTER_STATE({PRINCIPAL}:PLAIN)%",  # the SPIFFE ID the agent verified (TLV 0xE0)
    "w": f"%FILTER_STATE({SOURCE_WORKLOAD}:PLAIN)%",  # "ns/pod" (TLV 0xE3)
    "s": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",  # the PROXY source: the client pod
    "d": "%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%",  # the PROXY destination: a VIP or a pod IP …
    "dp": "%DOWNSTREAM_LOCAL_PORT%",  # … and its port
    "u": "%UPSTREAM_HOST%",  # envoy://<internal listener>/<endpoint id> on the client side
    "c": "%UPSTREAM_CLUSTER_RAW%",
    "ct": f"%REQ(content-type):{CONTENT_TYPE_CHARS}%",
    "gt": f"%TRAILER(grpc-status):{GRPC_STATUS_CHARS}%",
    "gh": f"%RESP(grpc-status):{GRPC_STATUS_CHARS}%",  # trailers-only responses carry it as a header
    "r": "%RESPONSE_CODE%",  # 0: no response
    "f": "%RESPONSE_FLAGS%",  # Envoy's short form, "-" when none
}
MEASURED_FORMAT = "%DURATION% %REQUEST_HEADERS_BYTES% %BYTES_RECEIVED% %RESPONSE_HEADERS_BYTES% %BYTES_SENT%"
MEASURES = b',"m":"'
MEASURES_FIRST = b'{"m":"'
INTERNAL = "envoy://"


class RequestFacts(NamedTuple):
    """What Istio's labels of one request depend on."""
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
    milliseconds: int
    request_bytes: int
    response_bytes: int


class MalformedLine(ValueError):
    """A line that is not what the waypoint's format writes."""


def json_format(log_name: str) -> dict:
    """The JSON format of the lines one listener's requests are logged with."""
    return {"l": {**LABEL_FORMAT, "log": log_name}, "m": MEASURED_FORMAT}


def split(line: bytes) -> tuple[bytes, bytes]:
    """(the label part, the measures) of a line; MalformedLine when it has no measures.
    The label part is the line less its measures and its last brace."""
    if line.startswith(MEASURES_FIRST):  # {"m":"…","l":{…}}
        end = line.find(b'"', len(MEASURES_FIRST))
        if end < 0 or line[end:end + 2] != b'",' or not line.endswith(b"}"):
            raise MalformedLine(f"no measures in {line[:200]!r}")
        return b"{" + line[end + 2:-1], line[len(MEASURES_FIRST):end]
    at = line.rfind(MEASURES)  # {"l":{…},"m":"…"}
    if at < 0 or not line.endswith(b'"}'):
        raise MalformedLine(f"no measures in {line[:200]!r}")
    return line[:at], line[at + len(MEASURES):-2]


def labels_of(part: bytes) -> tuple[str, RequestFacts]:
    """(the log name, the facts) of a line's label part (split's first)."""
    try:
        found = json.loads(part + b"}")["l"]
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedLine(f"unreadable labels in {part[:200]!r}: {exc}") from None
    if not isinstance(found, dict) or not isinstance(found.get("log"), str):
        raise MalformedLine(f"no log name in {part[:200]!r}")
    ct, upstream = _text(found, "ct") or "", _text(found, "u")
    grpc = ct == "application/grpc" or ct.startswith("application/grpc+")
    endpoint = None
    if upstream is not None and upstream.startswith(INTERNAL):
        endpoint = upstream[len(INTERNAL):].partition("/")[2]
    return found["log"], RequestFacts(
        _text(found, "p"), _text(found, "w"), _text(found, "s"), _text(found, "d"), _number(found, "dp"),
        endpoint, _text(found, "c") or "", grpc,
        _grpc_status(_text(found, "gt") or _text(found, "gh"), _number(found, "r")) if grpc else "",
        _number(found, "r"), _text(found, "f") or "-")


def measured(part: bytes) -> Measured:
    """The measures of a line (split's second)."""
    try:  # "-": Envoy has none (no response: no response headers)
        took, request_headers, received, response_headers, sent = (0 if n == b"-" else int(n)
                                                                    for n in part.split(b" "))
    except ValueError:
        raise MalformedLine(f"unreadable measures {part[:100]!r}") from None
    return Measured(took, request_headers + received, response_headers + sent)


def _grpc_status(value: str | None, http_code: int) -> str:
    """The trailer's or header's status as Envoy reads it, else inferred from the HTTP
    status; "" with no response at all."""
    if value is None:
        return str(HTTP_TO_GRPC.get(http_code, 2)) if http_code else ""
    if not (value.isascii() and value.isdigit()) or int(value) > GRPC_CODES:
        return "unknown"
    return str(int(value))


def _text(found: dict, key: str) -> str | None:
    """A string value; None for what Envoy writes when it has none (null, "-" or "")."""
    value = found.get(key)
    if value is None or value in ("-", ""):
        return None
    if not isinstance(value, str):
        return str(value)
    return value


def _number(found: dict, key: str) -> int:
    value = found.get(key)
    if value is None or value in ("-", ""):
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        raise MalformedLine(f"{key} is not a number: {value!r}") from None
