"""State of one translation: its inputs, the warnings it finds, and the outbound
clusters the routes reference (so exactly those are built).

A destination that names no known service, a port the service lacks or a subset no
DestinationRule defines is not an invalid resource (istiod accepts it too): the route
is kept, that destination goes to BlackHoleCluster (requests fail with 503, as they do
with Istio) and a warning names the field.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Iterator

from nodeagent.errors import ConfigError
from nodeagent.model import Model, Service, ServicePort
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.istio.fields import Destination
from nodeagent.xds.translate import names
from nodeagent.xds.translate.options import WaypointOptions
from nodeagent.xds.translate.services import Catalog


@dataclass(frozen=True)
class ClusterSpec:
    service: Service
    port: ServicePort
    subset: str = ""
    client_namespace: str = ""  # whose own DestinationRule applies ("": the rule of every client)
    enforced: str = ""  # the digest of the HTTP policy its routes enforce (outbound.py), or ""


@dataclass
class Context:
    model: Model
    config: IstioConfig
    options: WaypointOptions
    node: str
    warnings: list[ConfigError] = field(default_factory=list)
    clusters: dict[str, ClusterSpec] = field(default_factory=dict)
    blackhole: bool = False  # whether anything routes to BlackHoleCluster
    # The clients routes are being built for: a namespace with DestinationRules of its own
    # (Catalog.client_rules), or "" for every other client (see for_clients).
    client_namespace: str = ""
    # Per pod, what its server side enforces and its HTTP ports (inbound.server_side,
    # http_ports): read for every endpoint of every client-side route, made once.
    sides: dict = field(default_factory=dict)
    pod_http_ports: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.catalog = Catalog(self.model, self.config, self.warnings.append)

    def warn(self, where: str, message: str, hint: str | None = None) -> None:
        self.warnings.append(ConfigError(where, message, hint))

    def client_namespaces(self) -> list[str]:
        """The namespaces of this node's meshed pods whose own DestinationRules differ from
        every client's for some service: their clients get routes and clusters of their own."""
        here = {p.namespace for p in self.model.pods_on_node(self.node) if self.model.is_meshed(p)}
        return [namespace for namespace in self.catalog.client_namespaces() if namespace in here]

    @contextlib.contextmanager
    def for_clients(self, namespace: str) -> Iterator[None]:
        """Clusters and subsets as the clients of `namespace` see them, meanwhile."""
        self.client_namespace = namespace
        try:
            yield
        finally:
            self.client_namespace = ""

    def cluster(self, service: Service, port: ServicePort, subset: str = "") -> str:
        own = self.client_namespace if (self.client_namespace, service.hostname) in self.catalog.client_rules else ""
        name = names.outbound_cluster(service.hostname, port.port, subset, own)
        self.clusters.setdefault(name, ClusterSpec(service, port, subset, own))
        return name

    def enforced_cluster(self, name: str, digest: str) -> str:
        """The variant of cluster `name` for routes that enforce its endpoints' HTTP policy
        of digest `digest`: its connections say so (dataplane.TLV_ENFORCED)."""
        spec = replace(self.clusters[name], enforced=digest)
        enforced = names.outbound_cluster(spec.service.hostname, spec.port.port, spec.subset, spec.client_namespace,
                                          digest)
        self.clusters.setdefault(enforced, spec)
        return enforced

    def destination(self, dest: Destination, namespace: str, listener_port: int, where: str) -> str:
        """The cluster for a route destination (`where` names the field for warnings)."""
        found = self.catalog.resolve(dest.host, namespace)
        if len(found) != 1:
            what = "matches several services" if found else "is not a known service"
            return self._dangling(where, f"host {dest.host!r} {what}")
        service = found[0]
        number = dest.port or (service.ports[0].port if len(service.ports) == 1 else listener_port)
        port = next((p for p in service.ports if p.port == number), None)
        if port is None:
            return self._dangling(where, f"{service.hostname} has no port {number}")
        if dest.subset:
            rule = self.catalog.rule(service, self.client_namespace)
            if rule is None or rule.subset(dest.subset) is None:
                clients = f" (for the clients in namespace {self.client_namespace}, whose own DestinationRule " \
                          "applies)" if (self.client_namespace, service.hostname) in self.catalog.client_rules else ""
                return self._dangling(where, f"subset {dest.subset!r} of {service.hostname} is not defined "
                                             f"by any DestinationRule{clients}")
        return self.cluster(service, port, dest.subset)

    def _dangling(self, where: str, message: str) -> str:
        self.blackhole = True
        self.warn(where, message, "requests for it fail with 503 until it exists")
        return names.BLACKHOLE
