"""VirtualService (networking.istio.io v1, v1beta1, v1alpha3) → typed routes.

Checks what Istio's CRD schema and webhook check (unknown fields, types, ranges, one
action per route, regexes, compiled as Envoy's RE2 compiles them) and what Envoy would
refuse of the translation (sourceLabels too many for one RE2 matcher), and refuses,
naming the field, what the per-node waypoint cannot do (delegate, corsPolicy, tls
routes, exponential delays, HTTP/2 error aborts, per-source matches on tcp routes,
exportTo narrower than "*"). Deprecated spellings are read as Istio reads them (fault
`percent`, `mirrorPercent`) with a warning. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Callable, Mapping

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject
from nodeagent.policy.schema import Field, attempt, created, report
from nodeagent.xds import dataplane
from nodeagent.xds.istio import fields as f
from nodeagent.xds.istio.fields import Destination, HeaderOps, StringMatch

MESH_GATEWAY = "mesh"
GRPC_STATUS = {"OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
               "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
               "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
               "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16}
REDIRECT_CODES = (301, 302, 303, 307, 308)
UNSUPPORTED = "is not supported by nodeagent's waypoint"
Warn = Callable[[ConfigError], None]


@dataclass(frozen=True)
class HttpMatch:
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    source_labels: Mapping[str, str] = field(default_factory=dict)
    source_namespace: str = ""
    ignore_uri_case: bool = False
    stat_prefix: str = ""
    gateways: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteDestination:
    destination: Destination
    weight: int = 0
    headers: HeaderOps | None = None


@dataclass(frozen=True)
class Retry:
    attempts: int
    per_try_timeout: timedelta | None = None
    retry_on: str = ""
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: timedelta | None = None


@dataclass(frozen=True)
class Fraction:
    """A percentage as Istio gives it: `percentage.value` (float, 0-100) or the
    deprecated integer `percent`."""

    value: float
    legacy_integer: bool = False


@dataclass(frozen=True)
class Fault:
    delay: timedelta | None = None
    delay_fraction: Fraction | None = None
    abort_http: int | None = None
    abort_grpc: int | None = None
    abort_fraction: Fraction | None = None
    has_abort: bool = False


@dataclass(frozen=True)
class Mirror:
    destination: Destination
    fraction: Fraction | None = None  # None: every request


@dataclass(frozen=True)
class Redirect:
    uri: str = ""
    authority: str = ""
    code: int = 301
    scheme: str = ""
    port: int | None = None
    derive_port: str = ""


@dataclass(frozen=True)
class Rewrite:
    uri: str = ""
    authority: str = ""
    regex: tuple[str, str] | None = None  # (match, rewrite)


@dataclass(frozen=True)
class HttpRoute:
    path: str  # spec.http[i], for messages
    name: str = ""
    matches: tuple[HttpMatch, ...] = ()
    route: tuple[RouteDestination, ...] = ()
    redirect: Redirect | None = None
    direct_status: int | None = None
    direct_body: str | None = None
    rewrite: Rewrite | None = None
    timeout: timedelta | None = None
    retries: Retry | None = None
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    headers: HeaderOps | None = None


@dataclass(frozen=True)
class TcpRoute:
    path: str
    ports: tuple[int | None, ...] = ()  # one per match (None: any port); () matches every port
    route: tuple[RouteDestination, ...] = ()
    mesh: bool = True  # False when every match is for gateways only


@dataclass(frozen=True)
class VirtualService:
    namespace: str
    name: str
    where: str
    hosts: tuple[str, ...]
    http: tuple[HttpRoute, ...] = ()
    tcp: tuple[TcpRoute, ...] = ()
    mesh: bool = True  # applies to sidecars/waypoints (gateways include "mesh" or absent)
    created: datetime | None = None  # metadata.creationTimestamp: the oldest wins a conflict

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def virtual_service(obj: KubeObject, warn: Warn) -> VirtualService:
    spec = Field.spec_of(obj)
    parts = spec.fields(("hosts", "gateways", "http", "tls", "tcp", "exportTo"))
    hosts = attempt(parts["hosts"].strings, ())
    if not _listed(parts["hosts"]):
        report(parts["hosts"].error("must list at least one host"))
    attempt(lambda: _refuse(parts["tls"], "tls routes (SNI passthrough)", "route TLS traffic with tcp routes"))
    attempt(lambda: export_to(parts["exportTo"]))
    gateways = attempt(parts["gateways"].strings, ())
    if "*" in hosts and (not gateways or MESH_GATEWAY in gateways):  # as Istio's webhook
        report(parts["hosts"].error('the wildcard host "*" is not allowed for a VirtualService bound to the mesh: '
                                    "it would take every service's traffic", "name the hosts it routes"))
    http = tuple(parts["http"].each(lambda item: _http_route(item, warn)))
    tcp = tuple(parts["tcp"].each(_tcp_route))
    if not _listed(parts["http"]) and not _listed(parts["tcp"]):
        raise spec.error("has neither http nor tcp routes")
    return VirtualService(obj.namespace, obj.name, spec.where, hosts, http, tcp,
                          mesh=not gateways or MESH_GATEWAY in gateways, created=attempt(lambda: created(obj)))


def _listed(field: Field) -> bool:
    """Whether a list field has elements (its type is checked where it is read)."""
    return isinstance(field.value, list) and bool(field.value)


def export_to(field: Field) -> None:
    """exportTo narrows which source namespaces see a resource; one waypoint serves
    sources of every namespace on its node, so only "*" (the default) is supported."""
    values = field.strings()
    if values and "*" not in values:
        raise field.error(f"exportTo {list(values)} {UNSUPPORTED}: the per-node waypoint serves every "
                          "source namespace", 'remove exportTo or use ["*"]')


def _refuse(field: Field, what: str, hint: str | None = None) -> None:
    if field.present:
        raise field.error(f"{what} {UNSUPPORTED}", hint)


HTTP_FIELDS = ("name", "match", "route", "redirect", "directResponse", "delegate", "rewrite", "timeout",
               "retries", "fault", "mirror", "mirrors", "mirrorPercent", "mirrorPercentage",
               "corsPolicy", "headers")


def _http_route(field: Field, warn: Warn) -> HttpRoute:
    """Every component is read on its own (attempt), so all their problems are found."""
    p = field.fields(HTTP_FIELDS)
    attempt(lambda: _refuse(p["delegate"], "delegate", "inline the delegate's routes"))
    attempt(lambda: _refuse(p["corsPolicy"], "corsPolicy"))
    actions = [n for n in ("route", "redirect", "directResponse") if p[n].present]
    if len(actions) != 1:
        report(field.error("needs exactly one of route, redirect, directResponse"
                                           + (f", not {' and '.join(actions)}" if actions else "")))
    if p["redirect"].present and (p["rewrite"].present or p["mirror"].present or p["mirrors"].present):
        report(field.error("a redirect cannot be combined with rewrite or mirror"))
    status, body = attempt(lambda: _direct_response(p["directResponse"]), (None, None))
    return HttpRoute(
        path=field.path, name=attempt(p["name"].string, ""),
        matches=tuple(p["match"].each(_http_match)),
        route=attempt(lambda: _destinations(p["route"], http=True), ()),
        redirect=attempt(lambda: _redirect(p["redirect"])), direct_status=status, direct_body=body,
        rewrite=attempt(lambda: _rewrite(p["rewrite"])),
        timeout=attempt(lambda: f.duration(p["timeout"], timedelta(0))),
        retries=attempt(lambda: _retry(p["retries"])), fault=attempt(lambda: _fault(p["fault"], warn)),
        mirrors=attempt(lambda: _mirrors(p, warn), ()), headers=attempt(lambda: f.header_ops(p["headers"])))


MATCH_FIELDS = ("name", "uri", "scheme", "method", "authority", "headers", "port", "sourceLabels",
                "gateways", "queryParams", "ignoreUriCase", "withoutHeaders", "sourceNamespace",
                "statPrefix")


def _http_match(field: Field) -> HttpMatch:
    p = field.fields(MATCH_FIELDS)
    headers = attempt(lambda: f.string_matches(p["headers"], header_names=True), ())
    without = attempt(lambda: f.string_matches(p["withoutHeaders"], header_names=True), ())
    for name, _ in headers + without:
        if name.startswith("@request.auth.claims"):
            report(p["headers"].error(
                f"{name} needs JWT validation, which runs only on the server-side waypoint; it {UNSUPPORTED} "
                "in a client-side route"))
    return HttpMatch(
        name=attempt(p["name"].string, ""), uri=attempt(lambda: _optional_match(p["uri"])),
        scheme=attempt(lambda: _optional_match(p["scheme"])), method=attempt(lambda: _optional_match(p["method"])),
        authority=attempt(lambda: _optional_match(p["authority"])), headers=headers, without_headers=without,
        query_params=attempt(lambda: f.string_matches(p["queryParams"]), ()),
        port=attempt(lambda: f.integer(p["port"], 1, 65535)),
        source_labels=attempt(lambda: _source_labels(p["sourceLabels"]), {}),
        source_namespace=attempt(p["sourceNamespace"].string, ""), ignore_uri_case=attempt(p["ignoreUriCase"].boolean),
        stat_prefix=attempt(p["statPrefix"].string, ""), gateways=attempt(p["gateways"].strings, ()))


def _source_labels(field: Field) -> Mapping[str, str]:
    """The waypoint matches sourceLabels with one RE2 (dataplane.labels_regex), which Envoy
    refuses past its program size limit."""
    labels = field.labels()
    size = f.program_size(dataplane.labels_regex(labels)) if labels else 0
    if isinstance(size, int) and size > f.MAX_PROGRAM_SIZE:
        raise field.error(f"these {len(labels)} labels make a matcher too large for Envoy: its RE2 program "
                          f"size is {size}, over Envoy's limit of {f.MAX_PROGRAM_SIZE}",
                          "match on fewer or shorter labels")
    return labels


def _optional_match(field: Field) -> StringMatch | None:
    return f.string_match(field) if field.present else None


def _destinations(field: Field, http: bool) -> tuple[RouteDestination, ...]:
    items = field.items()
    out = field.each(lambda item: _route_destination(item, http))
    if field.present and not items:
        raise field.error("must list at least one destination")
    if len(out) == len(items) > 1 and not any(d.weight for d in out):
        raise field.error("every destination has weight 0", "give at least one destination a weight")
    return tuple(out)


def _route_destination(item: Field, http: bool) -> RouteDestination:
    p = item.fields(("destination", "weight", "headers") if http else ("destination", "weight"))
    headers = attempt(lambda: f.header_ops(p["headers"])) if http else None
    weight = attempt(lambda: f.integer(p["weight"], 0, 2**31 - 1) or 0, 0)
    return RouteDestination(f.destination(p["destination"]), weight, headers)


def _redirect(field: Field) -> Redirect | None:
    if not field.present:
        return None
    p = field.fields(("uri", "authority", "port", "derivePort", "scheme", "redirectCode"))
    if p["port"].present and p["derivePort"].present:
        raise field.error("port and derivePort exclude each other")
    code = f.integer(p["redirectCode"], 0, 999) or 301
    if code not in REDIRECT_CODES:
        raise p["redirectCode"].error(f"{code} is not a redirect code", f"use one of {REDIRECT_CODES}")
    derive = p["derivePort"].enum(("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"), "") if p["derivePort"].present else ""
    if not (any(attempt(p[n].string, "") for n in ("uri", "authority", "scheme"))  # as Istio's webhook: not empty
            or p["port"].present or p["derivePort"].present):
        raise field.error("must set uri, authority, scheme or port", "a redirect to the same URL would loop")
    return Redirect(p["uri"].string(), p["authority"].string(), code, p["scheme"].string(),
                    f.integer(p["port"], 1, 65535), derive)


def _direct_response(field: Field) -> tuple[int | None, str | None]:
    if not field.present:
        return None, None
    p = field.fields(("status", "body"))
    status = f.integer(p["status"], 200, 599)
    if status is None:
        raise p["status"].error("must be set")
    if not p["body"].present:
        return status, None
    body = p["body"].fields(("string", "bytes"))
    _refuse(body["bytes"], "a bytes body", "use body.string")
    return status, body["string"].string()


def _rewrite(field: Field) -> Rewrite | None:
    if not field.present:
        return None
    p = field.fields(("uri", "authority", "uriRegexRewrite"))
    if not (attempt(p["uri"].string, "") or attempt(p["authority"].string, "")  # as Istio's webhook: not empty
            or p["uriRegexRewrite"].present):
        raise field.error("must set uri, uriRegexRewrite or authority")
    regex = None
    if p["uriRegexRewrite"].present:
        if p["uri"].present:
            raise field.error("uri and uriRegexRewrite exclude each other")
        r = p["uriRegexRewrite"].fields(("match", "rewrite"))
        regex = (f.regex(r["match"], r["match"].string()), r["rewrite"].string())
    return Rewrite(p["uri"].string(), p["authority"].string(), regex)


def _retry(field: Field) -> Retry | None:
    if not field.present:
        return None
    p = field.fields(("attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities",
                      "retryIgnorePreviousHosts", "backoff"))
    optional = {n: attempt(p[n].boolean) if p[n].present else None
                for n in ("retryRemoteLocalities", "retryIgnorePreviousHosts")}
    attempts = attempt(lambda: f.integer(p["attempts"], 0, 2**31 - 1) or 0, 0)
    if p["attempts"].value in (None, 0):
        others = [n for n in ("perTryTimeout", "retryOn") if attempt(p[n].string, "")] + \
            (["retryRemoteLocalities"] if p["retryRemoteLocalities"].present else [])
        if others:  # as Istio's webhook: attempts 0 (or unset) turns retries off
            report(field.error(f"sets {', '.join(others)} but no attempts: retries are off with 0 attempts",
                               "set attempts (Istio's default is 2), or remove the other fields"))
    return Retry(attempts,
                 attempt(lambda: f.duration(p["perTryTimeout"])), attempt(lambda: retry_on(p["retryOn"]), ""),
                 optional["retryRemoteLocalities"], optional["retryIgnorePreviousHosts"],
                 attempt(lambda: f.duration(p["backoff"])))


# The retryOn policies Istio's webhook accepts (Envoy's HTTP and gRPC retry conditions);
# any HTTP status code is accepted as well (a retriable status code).
RETRY_ON = ("5xx", "gateway-error", "reset", "reset-before-request", "connect-failure", "envoy-ratelimited",
            "retriable-4xx", "refused-stream", "retriable-status-codes", "retriable-headers",
            "http3-post-connect-failure", "cancelled", "deadline-exceeded", "internal", "resource-exhausted",
            "unavailable")


def retry_on(field: Field) -> str:
    """retryOn as Istio's webhook checks it: a comma list of known policies and status codes."""
    text = field.string()
    for policy in text.split(",") if text else ():
        code = int(policy) if policy.isdigit() else 0
        if policy not in RETRY_ON and not 100 <= code <= 599:
            raise field.error(f"{policy!r} is not a retryOn policy",
                              f"use a comma list of {', '.join(RETRY_ON)} or HTTP status codes")
    return text


def _fraction(parts: dict[str, Field], warn: Warn) -> Fraction | None:
    """`percentage.value` wins; else the deprecated integer `percent` (Istio's order)."""
    value = f.percentage(parts["percentage"])
    if value is not None:
        return Fraction(value)
    legacy = f.integer(parts["percent"], 0, 100)
    if legacy is None:
        return None
    warn(parts["percent"].error("is deprecated", f"write percentage: {{value: {legacy}}}"))
    return Fraction(float(legacy), legacy_integer=True)


def _fault(field: Field, warn: Warn) -> Fault | None:
    if not field.present:
        return None
    p = field.fields(("delay", "abort"))
    if not p["delay"].present and not p["abort"].present:
        raise field.error("needs delay or abort")
    delay = fraction = None
    if p["delay"].present:
        d = p["delay"].fields(("fixedDelay", "exponentialDelay", "percent", "percentage"))
        _refuse(d["exponentialDelay"], "exponentialDelay", "use fixedDelay")
        delay = f.duration(d["fixedDelay"])
        if delay is None:
            raise d["fixedDelay"].error("must be set")
        fraction = _fraction(d, warn)
    return Fault(delay, fraction, *_abort(p["abort"], warn))


def _abort(field: Field, warn: Warn) -> tuple:
    if not field.present:
        return None, None, None, False
    a = field.fields(("httpStatus", "grpcStatus", "http2Error", "percent", "percentage"))
    _refuse(a["http2Error"], "http2Error", "use httpStatus or grpcStatus")
    if a["httpStatus"].present == a["grpcStatus"].present:
        raise field.error("needs exactly one of httpStatus, grpcStatus")
    grpc = None
    if a["grpcStatus"].present:
        grpc = GRPC_STATUS.get(a["grpcStatus"].enum(tuple(GRPC_STATUS), "UNKNOWN"))
    return f.integer(a["httpStatus"], 200, 599), grpc, _fraction(a, warn), True


def _mirrors(p: dict[str, Field], warn: Warn) -> tuple[Mirror, ...]:
    out = []
    if p["mirror"].present:
        fraction = None
        if p["mirrorPercentage"].present:
            fraction = Fraction(f.percentage(p["mirrorPercentage"]) or 0.0)
        elif p["mirrorPercent"].present:
            legacy = f.integer(p["mirrorPercent"], 0, 100) or 0
            warn(p["mirrorPercent"].error("is deprecated", f"write mirrorPercentage: {{value: {legacy}}}"))
            fraction = Fraction(float(legacy), legacy_integer=True)
        out.append(Mirror(f.destination(p["mirror"]), fraction))
    elif p["mirrorPercentage"].present or p["mirrorPercent"].present:
        raise p["mirrorPercentage"].error("a mirror percentage needs mirror")
    for item in p["mirrors"].items():
        m = item.fields(("destination", "percentage"))
        fraction = Fraction(f.percentage(m["percentage"]) or 0.0) if m["percentage"].present else None
        out.append(Mirror(f.destination(m["destination"]), fraction))
    return tuple(out)


def _tcp_route(field: Field) -> TcpRoute:
    p = field.fields(("match", "route"))
    ports = [port for found in p["match"].each(_tcp_match) for port in found]
    if not _listed(p["route"]):
        report(p["route"].error("must list at least one destination"))
    route = attempt(lambda: _destinations(p["route"], http=False), ())
    return TcpRoute(field.path, tuple(ports), route, mesh=bool(ports) or not p["match"].items())


def _tcp_match(m: Field) -> list[int | None]:
    """The port of one tcp match ([None]: any port), [] for a match for gateways only."""
    a = m.fields(("destinationSubnets", "port", "sourceLabels", "gateways", "sourceNamespace", "sourceSubnet"))
    for name in ("destinationSubnets", "sourceLabels", "sourceNamespace", "sourceSubnet"):
        attempt(lambda name=name: _refuse(a[name], f"tcp match {name}", "a tcp route can match on port only"))
    gateways = attempt(a["gateways"].strings, ())
    if gateways and MESH_GATEWAY not in gateways:
        return []  # a match for gateways only: never applies to the mesh
    return [f.integer(a["port"], 1, 65535)]
