"""Services as the client side sees them: host names, the VirtualService and
DestinationRule in force for each, the protocol of each port, and which services need
the client-side waypoint at all.

Host names resolve as istiod resolves them: a name without dots is a Service in the
resource's namespace (`reviews` → `reviews.<ns>.svc.cluster.local`), any other name is
taken as fully qualified, `*` and `*.suffix` match by suffix.

Several resources for one service are resolved as istiod resolves them:
- VirtualServices: the most specific host wins (exact over wildcard, as Envoy picks a
  virtual host), then the oldest (creationTimestamp, then name, then namespace: istiod's
  order); the others get a warning (Istio's analyzer calls it a conflict, IST0109).
- DestinationRules are merged (istiod's mergeDestinationRule): among the rules of the
  nearest namespace (the service's, then the root namespace, then any other) with the
  most specific host, the oldest is the base; each younger one adds the subsets whose
  names are new (a duplicate name is ignored, with a warning) and gives its
  trafficPolicy only if no older rule had one. That is the rule of every client; but
  the rules a client's own namespace has for the service take precedence for the
  clients of that namespace, as istiod looks in the client's namespace first
  (`client_rules`, merged the same way; the translation gives those clients routes and
  clusters of their own). Rules with a less specific host than another of their
  namespace are ignored for the service, with a warning.
A port's protocol comes from its name (Istio's `<protocol>[-suffix]` convention); an
unnamed or unknown one is HTTP if the VirtualService has http routes for it, else TCP.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Callable, Iterable

from nodeagent.errors import ConfigError
from nodeagent.model import Model, Service, ServicePort
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.istio.destinationrule import DestinationRule
from nodeagent.xds.istio.fields import Note
from nodeagent.xds.istio.virtualservice import VirtualService

HTTP, HTTP2, TCP = "http", "http2", "tcp"
PROTOCOLS = {"http": HTTP, "http2": HTTP2, "grpc": HTTP2, "h2c": HTTP2,
             "tcp": TCP, "tls": TCP, "https": TCP, "mongo": TCP, "mysql": TCP, "redis": TCP}
APP_PROTOCOLS = {**PROTOCOLS, "kubernetes.io/h2c": HTTP2, "kubernetes.io/ws": HTTP, "kubernetes.io/wss": TCP}
DOMAIN = "svc.cluster.local"
_NEVER = datetime.max.replace(tzinfo=timezone.utc)
Warn = Callable[[ConfigError], None]


def qualify(host: str, namespace: str) -> str:
    return f"{host}.{namespace}.{DOMAIN}" if "." not in host and host != "*" else host


class Catalog:
    """Lookups over a Model's services and the config's VirtualServices and rules."""

    def __init__(self, model: Model, config: IstioConfig, warn: Callable[[ConfigError], None]):
        self.model = model
        self.by_host = {s.hostname: s for s in sorted(model.services.values(), key=lambda s: s.hostname)}
        self.root = config.root_namespace
        mesh = [vs for vs in config.virtual_services if vs.mesh]
        self.virtual_services = self._routes(mesh, warn)
        # The rule of every client, and (client namespace, host) -> the rule of that
        # namespace's clients where their namespace's own rules differ from it.
        self.rules, self.client_rules = self._rules(config.destination_rules, warn)
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
        """A host that names no Service, or only a headless one (the client side steers by
        a Service's cluster IP: a headless Service has none): the resource applies to no
        traffic for it."""
        for i, host in enumerate(hosts):
            found = self.resolve(host, namespace)
            if not found:
                warn(ConfigError(where(i), f"host {host!r} matches no Service ({qualify(host, namespace)}): this "
                                 f"{kind} applies to no traffic for it", "name a Service: <name> in this "
                                 "resource's namespace, or <name>.<namespace>.svc.cluster.local"))
            elif not host.startswith("*") and all(s.cluster_ip == "None" for s in found):  # "": not assigned yet
                warn(ConfigError(where(i), f"Service {found[0].namespace}/{found[0].name} is headless (clusterIP "
                                 f"None): nodeagent applies a {kind} to traffic sent to a Service's cluster IP, so "
                                 "this one applies to no traffic for it", "give the Service a cluster IP"))

    def virtual_service(self, service: Service) -> VirtualService | None:
        return self.virtual_services.get(service.hostname)

    def rule(self, service: Service, client_namespace: str = "") -> DestinationRule | None:
        """The DestinationRule for `service` as the clients of `client_namespace` see it
        ("": the clients without a rule of their own)."""
        return self.client_rules.get((client_namespace, service.hostname)) or self.rules.get(service.hostname)

    def client_namespaces(self) -> list[str]:
        """The namespaces whose clients have rules of their own for some service."""
        return sorted({namespace for namespace, _ in self.client_rules})

    def _routes(self, resources: Iterable[VirtualService], warn: Warn) -> dict[str, VirtualService]:
        candidates: dict[str, dict[str, tuple[tuple, VirtualService]]] = {}
        for vs in resources:
            for host in vs.hosts:
                for service in self.resolve(host, vs.namespace):
                    rank = (specificity(qualify(host, vs.namespace)), age(vs))
                    found = candidates.setdefault(service.hostname, {})
                    found[vs.key] = min(found.get(vs.key, (rank, vs)), (rank, vs), key=lambda pair: pair[0])
        chosen = {}
        for hostname, found in candidates.items():
            ranked = [vs for _, vs in sorted(found.values(), key=lambda pair: pair[0])]
            chosen[hostname] = ranked[0]
            for other in ranked[1:]:
                warn(ConfigError(other.where, f"VirtualService {ranked[0].key} also routes {hostname} and wins (a "
                                 "more specific host, or older): this one is ignored for it, as istiod does",
                                 "merge them into one VirtualService"))
        return chosen

    def _rules(self, resources: Iterable[DestinationRule],
               warn: Warn) -> tuple[dict[str, DestinationRule], dict[tuple[str, str], DestinationRule]]:
        candidates: dict[str, list[tuple[tuple, DestinationRule]]] = {}
        for dr in resources:
            for service in self.resolve(dr.host, dr.namespace):
                tier = 0 if dr.namespace == service.namespace else 1 if dr.namespace == self.root else 2
                rank = (tier, specificity(qualify(dr.host, dr.namespace)), dr.namespace if tier == 2 else "")
                candidates.setdefault(service.hostname, []).append((rank, dr))
        chosen, clients = {}, {}
        for hostname, found in candidates.items():
            # every client's: the service's namespace, else the root's, as istiod looks no
            # further; a rule of a third namespace is only its own clients' (below)
            nearer = [(rank, dr) for rank, dr in found if rank[0] < 2]
            same = _nearest(nearer) if nearer else []
            if same:
                chosen[hostname] = merge(same, hostname, warn)
            used = {dr.key for dr in same}
            for namespace in sorted({dr.namespace for _, dr in found} - {self.by_host[hostname].namespace}):
                own = _nearest([(rank, dr) for rank, dr in found if dr.namespace == namespace])
                used |= {dr.key for dr in own}
                if [dr.key for dr in own] != [dr.key for dr in same]:
                    clients[(namespace, hostname)] = merge(own, hostname, warn)
                    others = f"DestinationRule {same[0].key}" if same else "none (a rule in a namespace other " \
                        "than the service's or the root's applies to its own clients only, as istiod's)"
                    warn(Note(own[0].where, f"applies to {hostname} for the clients in namespace {namespace}, whose "
                                            f"own rules take precedence as istiod's do; other clients get {others}"))
            for _, other in found:
                if other.key not in used:
                    warn(ConfigError(other.where, f"another DestinationRule of namespace {other.namespace} has a more "
                                     f"specific host for {hostname}: this one is ignored for it, as istiod does",
                                     "keep one rule per host and namespace"))
        return chosen, clients


def _nearest(found: list[tuple[tuple, DestinationRule]]) -> list[DestinationRule]:
    """The rules of the best rank (nearest namespace, most specific host), oldest first."""
    best = min(rank for rank, _ in found)
    return sorted((dr for rank, dr in found if rank == best), key=age)


def age(resource: VirtualService | DestinationRule) -> tuple:
    """istiod's order of resources: oldest first (undated last), then name, then namespace."""
    return (resource.created is None, resource.created or _NEVER, resource.name, resource.namespace)


def specificity(host: str) -> tuple[bool, int]:
    """Sort key of a host: exact first, then the longest wildcard suffix."""
    return (host.startswith("*"), -len(host))


def merge(rules: list[DestinationRule], hostname: str, warn: Warn) -> DestinationRule:
    """Rules of one host, oldest first, merged as istiod merges them: the oldest is the
    base, younger ones add subsets of new names and a trafficPolicy only where none was."""
    base, subsets, policy = rules[0], list(rules[0].subsets), rules[0].policy
    for younger in rules[1:]:
        for subset in younger.subsets:
            owner = next((s for s in subsets if s.name == subset.name), None)
            if owner is None:
                subsets.append(subset)
            else:
                warn(ConfigError(subset.where, f"subset {subset.name!r} of {hostname} is defined by the older "
                                 f"{owner.where.split(' spec.')[0]} too: this definition is ignored, as istiod does",
                                 "give the subset another name, or remove it here"))
        if younger.policy is not None and policy is None:
            policy = younger.policy
        elif younger.policy is not None:
            warn(ConfigError(f"{younger.where} spec.trafficPolicy", f"an older DestinationRule for {hostname} has a "
                             "trafficPolicy, so this one is ignored, as istiod does (only subsets are merged)",
                             "move the trafficPolicy into the oldest rule, or remove it here"))
        warn(Note(younger.where, f"merged into the older DestinationRule {base.key} for {hostname}: istiod "
                                 "merges the rules of one host (subsets of new names are added)"))
    if len(rules) == 1:
        return base
    return dataclasses.replace(base, subsets=tuple(subsets), policy=policy,
                               merged=tuple(r.key for r in rules[1:]))


def protocol(port: ServicePort, vs: VirtualService | None) -> str:
    """As istiod: the port's appProtocol when it names a known protocol, else its name's
    prefix, else HTTP when the VirtualService has HTTP routes for it, else TCP."""
    known = APP_PROTOCOLS.get(port.app_protocol.lower()) or PROTOCOLS.get(port.name.lower().split("-")[0])
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
        rules = [catalog.rule(service, namespace) for namespace in ["", *catalog.client_namespaces()]]
        policy = any(r is not None and (r.policy is not None or any(s.policy for s in r.subsets)) for r in rules)
        if (catalog.virtual_service(service) or policy) and has_vip(service):
            out.append(service)
    return out
