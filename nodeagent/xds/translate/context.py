"""State of one translation: its inputs, the warnings it finds, and the outbound
clusters the routes reference (so exactly those are built).

A destination that names no known service, a port the service lacks or a subset no
DestinationRule defines is not an invalid resource (istiod accepts it too): the route
is kept, that destination goes to BlackHoleCluster (requests fail with 503, as they do
with Istio) and a warning names the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class Context:
    model: Model
    config: IstioConfig
    options: WaypointOptions
    node: str
    warnings: list[ConfigError] = field(default_factory=list)
    clusters: dict[str, ClusterSpec] = field(default_factory=dict)
    blackhole: bool = False  # whether anything routes to BlackHoleCluster

    def __post_init__(self) -> None:
        self.catalog = Catalog(self.model, self.config, self.warnings.append)

    def warn(self, where: str, message: str, hint: str | None = None) -> None:
        self.warnings.append(ConfigError(where, message, hint))

    def cluster(self, service: Service, port: ServicePort, subset: str = "") -> str:
        name = names.outbound_cluster(service.hostname, port.port, subset)
        self.clusters.setdefault(name, ClusterSpec(service, port, subset))
        return name

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
            rule = self.catalog.rule(service)
            if rule is None or rule.subset(dest.subset) is None:
                return self._dangling(where, f"subset {dest.subset!r} of {service.hostname} is not defined "
                                             "by any DestinationRule")
        return self.cluster(service, port, dest.subset)

    def _dangling(self, where: str, message: str) -> str:
        self.blackhole = True
        self.warn(where, message, "requests for it fail with 503 until it exists")
        return names.BLACKHOLE
