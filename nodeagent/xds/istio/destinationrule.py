"""DestinationRule (networking.istio.io v1, v1beta1, v1alpha3) → typed traffic policies.

A TrafficPolicy has four components (loadBalancer, connectionPool, outlierDetection,
tls) at the rule level, per port (`portLevelSettings`) and per subset. `Rule.policy_for`
merges them as istiod does (MergeTrafficPolicy): a port-level entry replaces every
component (unset ones fall back to Envoy's defaults, not to the rule level), a subset's
components override the rule's, and the subset's own port-level entry replaces all.
Refused, naming the field: consistentHash and locality settings, TLS origination
(SIMPLE/MUTUAL: the agent does all TLS; ISTIO_MUTUAL is accepted with a note, since the
mesh's mTLS is HBONE's and always on, and DISABLE with a warning that it cannot turn it off), workloadSelector and exportTo narrower than "*". Pure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Callable, Mapping

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject
from nodeagent.policy.schema import Field, attempt, created, report
from nodeagent.xds.istio import fields as f
from nodeagent.xds.istio.virtualservice import UNSUPPORTED, export_to

SIMPLE_LB = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")
H2_UPGRADE = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")
TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
COMPONENTS = ("load_balancer", "connection_pool", "outlier_detection")
KEEPALIVE_MAX = 2**32 - 1  # seconds: Envoy's TcpKeepalive fields are 32-bit
Warn = Callable[[ConfigError], None]


@dataclass(frozen=True)
class LoadBalancer:
    simple: str = "UNSPECIFIED"
    warmup: timedelta | None = None


@dataclass(frozen=True)
class TcpSettings:
    max_connections: int | None = None
    connect_timeout: timedelta | None = None
    keepalive: tuple[int | None, timedelta | None, timedelta | None] | None = None  # probes, time, interval
    max_connection_duration: timedelta | None = None
    idle_timeout: timedelta | None = None


@dataclass(frozen=True)
class HttpSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None
    idle_timeout: timedelta | None = None
    h2_upgrade_policy: str = "DEFAULT"
    use_client_protocol: bool = False
    max_concurrent_streams: int | None = None


@dataclass(frozen=True)
class ConnectionPool:
    tcp: TcpSettings | None = None
    http: HttpSettings | None = None


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int | None = None
    consecutive_gateway: int | None = None
    interval: timedelta | None = None
    base_ejection_time: timedelta | None = None
    max_ejection_percent: int | None = None
    min_health_percent: int = 0
    split_local_origin: bool = False
    consecutive_local_origin: int | None = None


@dataclass(frozen=True)
class Policy:
    """The components in force for one (subset, port)."""

    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None


@dataclass(frozen=True)
class TrafficPolicy:
    base: Policy = Policy()
    ports: Mapping[int, Policy] = None  # type: ignore[assignment]

    def for_port(self, port: int) -> Policy:
        return (self.ports or {}).get(port, self.base)


@dataclass(frozen=True)
class Subset:
    name: str
    labels: Mapping[str, str]
    policy: TrafficPolicy | None = None
    where: str = ""  # the resource and spec.subsets[i] that defined it, for messages


@dataclass(frozen=True)
class DestinationRule:
    namespace: str
    name: str
    where: str
    host: str
    policy: TrafficPolicy | None = None
    subsets: tuple[Subset, ...] = ()
    created: datetime | None = None  # metadata.creationTimestamp: the oldest comes first in a merge
    merged: tuple[str, ...] = ()  # ns/name of the younger rules merged into this one (services.py)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def subset(self, name: str) -> Subset | None:
        return next((s for s in self.subsets if s.name == name), None)

    def policy_for(self, subset: str, port: int) -> Policy:
        merged = self.policy.for_port(port) if self.policy else Policy()
        chosen = self.subset(subset) if subset else None
        if chosen is None or chosen.policy is None:
            return merged
        if port in (chosen.policy.ports or {}):
            return chosen.policy.ports[port]
        overrides = {c: getattr(chosen.policy.base, c) for c in COMPONENTS
                     if getattr(chosen.policy.base, c) is not None}
        return replace(merged, **overrides)


def destination_rule(obj: KubeObject, warn: Warn) -> DestinationRule:
    spec = Field.spec_of(obj)
    p = spec.fields(("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"))
    host = attempt(p["host"].string, "?")
    if not host:
        report(p["host"].error("must be set"))
    if p["workloadSelector"].present:
        report(p["workloadSelector"].error(
            f"workloadSelector {UNSUPPORTED}: the per-node waypoint serves every source workload", "remove it"))
    attempt(lambda: export_to(p["exportTo"]))
    seen: set[str] = set()
    subsets = p["subsets"].each(lambda item: _subset(item, seen, warn))
    return DestinationRule(obj.namespace, obj.name, spec.where, host,
                           attempt(lambda: _traffic_policy(p["trafficPolicy"], warn)), tuple(subsets),
                           attempt(lambda: created(obj)))


def _subset(item: Field, seen: set[str], warn: Warn) -> Subset:
    s = item.fields(("name", "labels", "trafficPolicy"))
    name = s["name"].string()
    if not name:
        raise s["name"].error("must be set")
    if name in seen:
        raise s["name"].error(f"subset {name!r} is defined twice")
    seen.add(name)
    labels = attempt(s["labels"].labels, {})
    return Subset(name, labels, _traffic_policy(s["trafficPolicy"], warn), f"{item.where} {item.path}")


def _traffic_policy(field: Field, warn: Warn) -> TrafficPolicy | None:
    if not field.present:
        return None
    p = field.fields(("loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings",
                      "tunnel", "proxyProtocol"))
    for name in ("tunnel", "proxyProtocol"):
        if p[name].present:
            report(p[name].error(f"{name} {UNSUPPORTED}"))
    ports: dict[int, Policy] = {}
    p["portLevelSettings"].each(lambda item: _port_level(item, ports, warn))
    return TrafficPolicy(_policy(p, warn), ports)


def _port_level(item: Field, ports: dict[int, Policy], warn: Warn) -> None:
    s = item.fields(("port", "loadBalancer", "connectionPool", "outlierDetection", "tls"))
    port = f.integer(s["port"].fields(("number",))["number"], 1, 65535)
    if port is None or port in ports:
        raise s["port"].error("needs a port number not given by another entry")
    ports[port] = _policy(s, warn)


def _policy(p: dict[str, Field], warn: Warn) -> Policy:
    attempt(lambda: _tls(p["tls"], warn))
    return Policy(attempt(lambda: _load_balancer(p["loadBalancer"])),
                  attempt(lambda: _connection_pool(p["connectionPool"])),
                  attempt(lambda: _outlier(p["outlierDetection"], warn)))


TLS_IN_AMBIENT = {
    "ISTIO_MUTUAL": (f.Note, "ISTIO_MUTUAL is what the mesh always does: traffic between meshed pods is "
                             "mutual TLS (HBONE, done by the agents) whatever the DestinationRule says",
                     "remove tls; it changes nothing"),
    "DISABLE": (ConfigError, "DISABLE has no effect in ambient mode: traffic between meshed pods is always "
                             "mutual TLS (HBONE, done by the agents), and a DestinationRule cannot turn it off",
                "to let a destination accept plaintext, use a PeerAuthentication with mode PERMISSIVE or "
                "DISABLE on it; remove tls here"),
}


def _tls(field: Field, warn: Warn) -> None:
    if not field.present:
        return
    t = field.fields(("mode", "clientCertificate", "privateKey", "caCertificates", "credentialName",
                      "subjectAltNames", "sni", "insecureSkipVerify", "caCrl"))
    mode = t["mode"].enum(TLS_MODES, "DISABLE")
    if mode in ("SIMPLE", "MUTUAL"):
        raise t["mode"].error(f"TLS origination ({mode}) {UNSUPPORTED}: the agent does all TLS",
                              "use ISTIO_MUTUAL (mesh mTLS, done by the agent) or remove tls")
    extra = [n for n, v in t.items() if v.present and n != "mode"]
    if extra:
        raise t[extra[0]].error(f"has no effect with mode {mode}", "remove it")
    kind, message, hint = TLS_IN_AMBIENT[mode]
    warn(kind(f"{t['mode'].where} {t['mode'].path}", message, hint))


def _load_balancer(field: Field) -> LoadBalancer | None:
    if not field.present:
        return None
    p = field.fields(("simple", "consistentHash", "localityLbSetting", "warmupDurationSecs", "warmup"))
    for name in ("consistentHash", "localityLbSetting", "warmup"):
        if p[name].present:
            raise p[name].error(f"{name} {UNSUPPORTED}", "use simple: ROUND_ROBIN, LEAST_REQUEST or RANDOM")
    return LoadBalancer(p["simple"].enum(SIMPLE_LB, "UNSPECIFIED"), f.duration(p["warmupDurationSecs"]))


def _connection_pool(field: Field) -> ConnectionPool | None:
    if not field.present:
        return None
    p = field.fields(("tcp", "http"))
    return ConnectionPool(_tcp(p["tcp"]), _http(p["http"]))


def _tcp(field: Field) -> TcpSettings | None:
    if not field.present:
        return None
    p = field.fields(("maxConnections", "connectTimeout", "tcpKeepalive", "maxConnectionDuration",
                      "idleTimeout"))
    keepalive = None
    if p["tcpKeepalive"].present:
        k = p["tcpKeepalive"].fields(("probes", "time", "interval"))
        keepalive = (f.integer(k["probes"], 1), f.duration(k["time"], timedelta(seconds=1), KEEPALIVE_MAX),
                     f.duration(k["interval"], timedelta(seconds=1), KEEPALIVE_MAX))
    return TcpSettings(f.integer(p["maxConnections"], 1), f.duration(p["connectTimeout"]), keepalive,
                       f.duration(p["maxConnectionDuration"]), f.duration(p["idleTimeout"]))


def _http(field: Field) -> HttpSettings | None:
    if not field.present:
        return None
    p = field.fields(("http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection",
                      "maxRetries", "idleTimeout", "h2UpgradePolicy", "useClientProtocol",
                      "maxConcurrentStreams"))
    return HttpSettings(
        f.integer(p["http1MaxPendingRequests"], 1), f.integer(p["http2MaxRequests"], 1),
        f.integer(p["maxRequestsPerConnection"], 0), f.integer(p["maxRetries"], 0),
        f.duration(p["idleTimeout"]), p["h2UpgradePolicy"].enum(H2_UPGRADE, "DEFAULT"),
        p["useClientProtocol"].boolean(), f.integer(p["maxConcurrentStreams"], 1))


def _outlier(field: Field, warn: Warn) -> OutlierDetection | None:
    if not field.present:
        return None
    p = field.fields(("consecutiveErrors", "consecutive5xxErrors", "consecutiveGatewayErrors", "interval",
                      "baseEjectionTime", "maxEjectionPercent", "minHealthPercent",
                      "splitExternalLocalOriginErrors", "consecutiveLocalOriginFailures"))
    gateway = f.integer(p["consecutiveGatewayErrors"])
    errors_5xx = f.integer(p["consecutive5xxErrors"])
    if p["consecutiveErrors"].present:
        # Deprecated; istiod read it as gateway errors (502/503/504) only, and turned off
        # ejection on any 5xx (Envoy's default, 5 in a row, would eject on an app's 500s).
        if gateway is not None:
            raise p["consecutiveErrors"].error("cannot be combined with consecutiveGatewayErrors")
        gateway = f.integer(p["consecutiveErrors"])
        errors_5xx = 0 if errors_5xx is None else errors_5xx
        warn(p["consecutiveErrors"].error("is deprecated", "write consecutiveGatewayErrors"))
    return OutlierDetection(
        errors_5xx, gateway, f.duration(p["interval"]),
        f.duration(p["baseEjectionTime"]), f.integer(p["maxEjectionPercent"], 0, 100),
        f.integer(p["minHealthPercent"], 0, 100) or 0, p["splitExternalLocalOriginErrors"].boolean(),
        f.integer(p["consecutiveLocalOriginFailures"]))
