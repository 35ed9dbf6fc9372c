"""The cluster model: the one view of cluster state every part of the agent reads.

Sources (`files`, later `kube`) turn what they see into KubeObjects; `Model.build`
turns those into namespaces, pods, services and the Istio resources. Redirection,
tunnel and xDS read a Model, never a source. A Model is immutable once built: a change
produces a new Model, so readers never see half an update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from nodeagent.kube.objects import KubeObject

DATAPLANE_LABEL = "istio.io/dataplane-mode"
AMBIENT = "ambient"
OPT_OUT = "none"
# Annotation listing destination ports a meshed pod's outbound traffic skips (comma list).
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"

# Istio API groups whose resources the model carries for the policy and xDS layers.
ISTIO_GROUPS = ("networking.istio.io", "security.istio.io", "telemetry.istio.io")


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    uid: str
    node: str
    ip: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    service_account: str = "default"
    phase: str = "Running"

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def port_list(self, annotation: str) -> frozenset[int]:
        raw = self.annotations.get(annotation, "")
        return frozenset(int(p) for p in raw.replace(" ", "").split(",") if p.isdigit())


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str
    protocol: str = "TCP"
    name: str = ""


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    cluster_ip: str
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str]

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


def _int_or_name(value) -> int | str:
    if isinstance(value, int):
        return value
    return int(value) if isinstance(value, str) and value.isdigit() else str(value)


def _frozen(d: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Model:
    namespaces: Mapping[str, Namespace]
    pods: Mapping[tuple[str, str], Pod]
    services: Mapping[tuple[str, str], Service]
    # Istio (and other non-core) resources, by kind, in a stable order.
    resources: Mapping[str, tuple[KubeObject, ...]]

    @classmethod
    def empty(cls) -> "Model":
        return cls.build([])

    @classmethod
    def build(cls, objects: Iterable[KubeObject]) -> "Model":
        namespaces: dict[str, Namespace] = {}
        pods: dict[tuple[str, str], Pod] = {}
        services: dict[tuple[str, str], Service] = {}
        resources: dict[str, list[KubeObject]] = {}
        for obj in objects:
            if obj.kind == "Namespace" and obj.group == "":
                namespaces[obj.name] = Namespace(obj.name, _frozen(obj.labels))
            elif obj.kind == "Pod" and obj.group == "":
                pod = _pod(obj)
                if pod is not None:
                    pods[pod.key] = pod
            elif obj.kind == "Service" and obj.group == "":
                services[(obj.namespace, obj.name)] = _service(obj)
            elif obj.group in ISTIO_GROUPS:
                resources.setdefault(obj.kind, []).append(obj)
        for ns in {p.namespace for p in pods.values()} - namespaces.keys():
            namespaces[ns] = Namespace(ns, _frozen({}))
        return cls(MappingProxyType(namespaces), MappingProxyType(pods), MappingProxyType(services),
                   MappingProxyType({k: tuple(sorted(v, key=lambda o: (o.namespace, o.name)))
                                     for k, v in resources.items()}))

    # --- queries -----------------------------------------------------------------
    def is_meshed(self, pod: Pod) -> bool:
        """Ambient enrolment: namespace label opts in, pod label `none` opts out."""
        if pod.labels.get(DATAPLANE_LABEL) == OPT_OUT:
            return False
        ns = self.namespaces.get(pod.namespace)
        return ns is not None and ns.labels.get(DATAPLANE_LABEL) == AMBIENT

    def pods_on_node(self, node: str) -> list[Pod]:
        return sorted((p for p in self.pods.values() if p.node == node), key=lambda p: p.key)

    def endpoints(self, service: Service) -> list[Pod]:
        """Ready pods selected by the service (a service without selector has none)."""
        if not service.selector:
            return []
        return sorted((p for p in self.pods.values()
                       if p.namespace == service.namespace and p.ip and p.phase == "Running"
                       and all(p.labels.get(k) == v for k, v in service.selector.items())),
                      key=lambda p: p.key)

    def service_by_ip(self, ip: str) -> Service | None:
        for svc in self.services.values():
            if svc.cluster_ip == ip:
                return svc
        return None

    def pod_by_ip(self, ip: str) -> Pod | None:
        for pod in self.pods.values():
            if pod.ip == ip:
                return pod
        return None


def _pod(obj: KubeObject) -> Pod | None:
    spec, status = obj.spec, obj.body.get("status") or {}
    uid = str((obj.body.get("metadata") or {}).get("uid") or "")
    return Pod(
        namespace=obj.namespace, name=obj.name, uid=uid,
        node=str(spec.get("nodeName") or ""), ip=str(status.get("podIP") or ""),
        labels=_frozen(obj.labels), annotations=_frozen(obj.annotations),
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
        phase=str(status.get("phase") or "Pending"),
    )


def _service(obj: KubeObject) -> Service:
    spec = obj.spec
    ports = tuple(
        ServicePort(port=int(p.get("port", 0)), target_port=_int_or_name(p.get("targetPort", p.get("port", 0))),
                    protocol=str(p.get("protocol", "TCP")), name=str(p.get("name", "")))
        for p in spec.get("ports") or [] if isinstance(p, dict))
    selector = spec.get("selector") or {}
    return Service(obj.namespace, obj.name, str(spec.get("clusterIP") or ""), ports,
                   _frozen({str(k): str(v) for k, v in selector.items()}))
