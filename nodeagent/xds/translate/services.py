"""Services as the client side sees them: host names, the VirtualService and
DestinationRule in force for each, the protocol of each port, and which services need
the client-side waypoint at all.

Host names resolve as istiod resolves them: a name without dots is a Service in the
resource's namespace (`reviews` → `reviews.<ns>.svc.cluster.local`), any other name is
taken as fully qualified, `*` and `*.suffix` match by suffix. One VirtualService and one
DestinationRule apply per service; with several, an exact host wins over a wildcard,
then the service's own namespace, then the root namespace, then the first by
namespace/name, and the others get a warning.
A port's protocol comes from its name (Istio's `<protocol>[-suffix]` convention); an
unnamed or unknown one is HTTP if the VirtualService has http routes for it, else TCP.
"""

from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from nodeagent.errors import ConfigError
from nodeagent.model import Model, Service, ServicePort
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.istio.destinationrule import DestinationRule
from nodeagent.xds.istio.virtualservice import VirtualService

HTTP, HTTP2, TCP = "http", "http2", "tcp"
PROTOCOLS = {"http": HTTP, "http2": HTTP2, "grpc": HTTP2, "h2c": HTTP2,
             "tcp": TCP, "tls": TCP, "https": TCP, "mongo": TCP, "mysql": TCP, "redis": TCP}
DOMAIN = "svc.cluster.local"
T = TypeVar("T", VirtualService, DestinationRule)


def qualify(host: str, namespace: str) -> str:
    return f"{host}.{namespace}.{DOMAIN}" if "." not in host and host != "*" else host


class Catalog:
    """Lookups over a Model's services and the config's VirtualServices and rules."""

    def __init__(self, model: Model, config: IstioConfig, warn: Callable[[ConfigError], None]):
        self.model = model
        self.by_host = {s.hostname: s for s in sorted(model.services.values(), key=lambda s: s.hostname)}
        self.root = config.root_namespace
        mesh = [vs for vs in config.virtual_services if vs.mesh]
        self.virtual_services = self._assign(mesh, lambda vs: vs.hosts, "VirtualService", warn)
        self.rules = self._assign(config.destination_rules, lambda dr: (dr.host,), "DestinationRule", warn)
        for vs in mesh:
            self._known(vs.hosts, vs.namespace, lambda i: f"{vs.where} spec.hosts[{i}]", "VirtualService", warn)
        for dr in config.destination_rules:
            self._known((dr.host,), dr.namespace, lambda i: f"{dr.where} spec.host", "DestinationRule", warn)

    def resolve(self, host: str, namespace: str) -> list[Service]:
        name = qualify(host, namespace)
        if name == "*":
            return list(self.by_host.values())
        if name.startswith("*."):
            return [s for h, s in self.by_host.items() if h.endswith(name[1:])]
        found = self.by_host.get(name)
        return [found] if found else []

    def _known(self, hosts: Iterable[str], namespace: str, where: Callable[[int], str], kind: str,
               warn: Callable[[ConfigError], None]) -> None:
        """A host that names no Service: the resource applies to no traffic for it."""
        for i, host in enumerate(hosts):
            if not self.resolve(host, namespace):
                warn(ConfigError(where(i), f"host {host!r} matches no Service ({qualify(host, namespace)}): this "
                                 f"{kind} applies to no traffic for it", "name a Service: <name> in this "
                                 "resource's namespace, or <name>.<namespace>.svc.cluster.local"))

    def virtual_service(self, service: Service) -> VirtualService | None:
        return self.virtual_services.get(service.hostname)

    def rule(self, service: Service) -> DestinationRule | None:
        return self.rules.get(service.hostname)

    def _assign(self, resources: Iterable[T], hosts: Callable[[T], Iterable[str]], kind: str,
                warn: Callable[[ConfigError], None]) -> dict[str, T]:
        candidates: dict[str, dict[str, tuple[tuple, T]]] = {}
        for resource in resources:
            for host in hosts(resource):
                for service in self.resolve(host, resource.namespace):
                    rank = ("*" in host, resource.namespace != service.namespace,
                            resource.namespace != self.root, resource.namespace, resource.name)
                    found = candidates.setdefault(service.hostname, {})
                    found[resource.key] = min(found.get(resource.key, (rank, resource)), (rank, resource),
                                              key=lambda pair: pair[0])
        chosen = {}
        for hostname, found in candidates.items():
            ranked = [resource for _, resource in sorted(found.values(), key=lambda pair: pair[0])]
            chosen[hostname] = ranked[0]
            for other in ranked[1:]:
                warn(ConfigError(other.where, f"{kind} {ranked[0].key} already applies to {hostname}; "
                                 f"this one is ignored for it", "keep one per host"))
        return chosen


def protocol(port: ServicePort, vs: VirtualService | None) -> str:
    known = PROTOCOLS.get(port.name.lower().split("-")[0])
    if known:
        return known
    if vs is not None and any(_http_applies(route, port.port) for route in vs.http):
        return HTTP
    return TCP


def _http_applies(route, port: int) -> bool:
    return not route.matches or any(m.port in (None, port) for m in route.matches)


def has_vip(service: Service) -> bool:
    return service.cluster_ip not in ("", "None")


def client_side(catalog: Catalog) -> list[Service]:
    """Services whose traffic needs the client-side waypoint: a VirtualService applies to
    them, or a DestinationRule with a traffic policy (connection pool, outlier detection,
    load balancing) does."""
    out = []
    for service in catalog.by_host.values():
        rule = catalog.rule(service)
        policy = rule is not None and (rule.policy is not None or any(s.policy for s in rule.subsets))
        if (catalog.virtual_service(service) or policy) and has_vip(service):
            out.append(service)
    return out
