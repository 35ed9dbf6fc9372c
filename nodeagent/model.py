"""The cluster model: the one view of cluster state every part of the agent reads.

Sources (`files`, later `kube`) turn what they see into KubeObjects; `Model.build`
turns those into namespaces, pods, services and the Istio resources. Redirection,
tunnel and xDS read a Model, never a source. A Model is immutable once built: a change
produces a new Model, so readers never see half an update. The fields of Pods and
Services the model reads are checked here (`check`), so a source can refuse a bad object
before it reaches a Model.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Iterable, Mapping

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject, string_map

DATAPLANE_LABEL = "istio.io/dataplane-mode"
AMBIENT = "ambient"
OPT_OUT = "none"
# Annotation listing destination ports a meshed pod's outbound traffic skips (comma list).
EXCLUDE_OUTBOUND_PORTS = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_INBOUND_PORTS = "traffic.sidecar.istio.io/excludeInboundPorts"
READ_ANNOTATIONS = frozenset({EXCLUDE_OUTBOUND_PORTS, EXCLUDE_INBOUND_PORTS})  # a Pod keeps only these
CRONJOB_RUN = re.compile(r"(.+)-[0-9]{8,10}")  # a CronJob's Job: <cronjob>-<scheduled time>, as Istio reads it
# Phases of a pod whose containers are done: it keeps its status.podIP, but kubelet may
# have given that IP to another pod already.
TERMINATED = ("Succeeded", "Failed")
# Phases of a pod the agent meshes once it has its status.podIP (its sandbox, and so its
# netns, exist): from Pending on, so its init containers and its app's first moments are
# captured, not only what runs after every container started (with no CNI plugin, the
# nearest the agent comes to Istio's capture at sandbox creation).
MESHED_PHASES = ("Pending", "Running")

# Istio API groups whose resources the model carries for the policy and xDS layers: every
# *.istio.io group and the Gateway API, so kinds the mesh does not implement are answered
# (xds/istio/kinds.py), never dropped unseen.
ISTIO_GROUPS = ("networking.istio.io", "security.istio.io", "telemetry.istio.io")
GATEWAY_API_GROUP = "gateway.networking.k8s.io"


def carries(group: str) -> bool:
    return group in ISTIO_GROUPS or group.endswith(".istio.io") or group == GATEWAY_API_GROUP


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
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports (targetPort names)
    workload: str = ""  # Istio's workload name: the owning controller's, else the pod's (see _workload)
    host_network: bool = False  # spec.hostNetwork: its IP is the node's, not one of its own
    # status.podIPs but `ip` (dual-stack: the other family's address); the mesh carries
    # only `ip`, and refuses these in the pod (enrolment.py), never leaves them open.
    other_ips: tuple[str, ...] = ()
    # The ports kubelet probes (containers' readiness, liveness and startup probes: httpGet,
    # tcpSocket, grpc), which take plaintext from the node around the mesh (admission.py).
    probe_ports: frozenset[int] = frozenset()
    terminating: bool = False  # metadata.deletionTimestamp is set: on its way out, its IP soon another's

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def ips(self) -> tuple[str, ...]:
        """status.podIP, then a dual-stack pod's other addresses."""
        return (self.ip, *self.other_ips) if self.ip else ()

    @property
    def workload_name(self) -> str:
        return self.workload or self.name

    @property
    def app(self) -> str | None:
        """Istio's app label of it (`app`, else `app.kubernetes.io/name`)."""
        return self.labels.get("app") or self.labels.get("app.kubernetes.io/name")

    @property
    def version(self) -> str | None:
        return self.labels.get("version") or self.labels.get("app.kubernetes.io/version")

    @property
    def canonical_service(self) -> str:
        """Istio's canonical service: its label, else app's, else the workload's name."""
        return self.labels.get("service.istio.io/canonical-name") or self.app or self.workload_name

    @property
    def canonical_revision(self) -> str:
        return self.labels.get("service.istio.io/canonical-revision") or self.version or "latest"

    def port_list(self, annotation: str) -> frozenset[int]:
        raw = self.annotations.get(annotation, "")
        return frozenset(int(p) for p in raw.replace(" ", "").split(",") if p.isdigit())


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int | str
    protocol: str = "TCP"
    name: str = ""
    app_protocol: str = ""  # spec.ports[].appProtocol: the protocol when set, before the name

    def target_on(self, pod: "Pod") -> int | None:
        """The pod's port for this service port: numeric as is, named via the pod's
        container ports (as kube-proxy does); None when the pod has no such port."""
        if isinstance(self.target_port, int):
            return self.target_port
        return pod.ports.get(self.target_port)


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
        """The model of `objects`; raises ConfigError for an invalid Pod or Service
        (sources call `check` per file first, so a bad object never gets this far)."""
        namespaces: dict[str, Namespace] = {}
        pods: dict[tuple[str, str], Pod] = {}
        services: dict[tuple[str, str], Service] = {}
        resources: dict[str, list[KubeObject]] = {}
        for obj in objects:
            if obj.kind == "Namespace" and obj.group == "":
                namespaces[obj.name] = Namespace(obj.name, _frozen(obj.labels))
            elif obj.kind == "Pod" and obj.group == "":
                pod = _pod(obj)
                pods[pod.key] = pod
            elif obj.kind == "Service" and obj.group == "":
                services[(obj.namespace, obj.name)] = _service(obj)
            elif carries(obj.group):
                resources.setdefault(obj.kind, []).append(obj)
        for ns in {p.namespace for p in pods.values()} - namespaces.keys():
            namespaces[ns] = Namespace(ns, _frozen({}))
        return cls(MappingProxyType(namespaces), MappingProxyType(pods), MappingProxyType(services),
                   MappingProxyType({k: tuple(sorted(v, key=lambda o: (o.namespace, o.name)))
                                     for k, v in resources.items()}))

    # --- queries -----------------------------------------------------------------
    def is_meshed(self, pod: Pod) -> bool:
        """Ambient enrolment: namespace label opts in, pod label `none` opts out; a
        hostNetwork pod never is (its address is the node's: nothing of it can be captured,
        and tunnelling to it as a meshed pod reached no pod's agent)."""
        return not pod.host_network and self.opted_in(pod)

    def opted_in(self, pod: Pod) -> bool:
        """Whether the labels mesh `pod`, whether or not it can be."""
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
        key = (service.namespace, tuple(sorted(service.selector.items())))
        found = self._endpoints.get(key)
        if found is None:
            found = self._endpoints[key] = tuple(sorted(
                (p for p in self.pods.values()
                 if p.namespace == service.namespace and p.ip and p.phase == "Running"
                 and all(p.labels.get(k) == v for k, v in service.selector.items())),
                key=lambda p: p.key))
        return list(found)

    def service_of(self, pod: Pod, port: int) -> Service | None:
        """The Service a connection to `pod`'s `port` most likely came through (the
        destination cannot know): the first, by namespace and name, selecting the pod with a
        TCP port whose target is `port`."""
        for key in sorted(self.services):
            service = self.services[key]
            if (service.namespace == pod.namespace and service.selector
                    and all(pod.labels.get(k) == v for k, v in service.selector.items())
                    and any(p.protocol == "TCP" and p.target_on(pod) == port for p in service.ports)):
                return service
        return None

    def service_by_ip(self, ip: str) -> Service | None:
        # headless services and unscheduled pods have no address to match
        return self._services_by_ip.get(ip) if ip else None

    def pod_by_ip(self, ip: str) -> Pod | None:
        return self._pods_by_ip.get(ip) if ip else None

    # Indexes, built on first use: the agent looks destinations up on every connection,
    # and a Model never changes once built, so they never go stale.
    @cached_property
    def _services_by_ip(self) -> dict[str, Service]:
        index: dict[str, Service] = {}
        for svc in self.services.values():
            index.setdefault(svc.cluster_ip, svc)  # first wins, as a scan would find it
        return index

    @cached_property
    def _pods_by_ip(self) -> dict[str, Pod]:
        """The pod an IP reaches: never a finished pod (a completed Job's IP, reused by a
        meshed pod, would send that pod's clients plaintext) nor a hostNetwork pod (the
        node's IP); of live pods claiming one IP, a Running one not being deleted, then a
        Running one, else the first found (a pod deleted with a finalizer left, or on a
        node that went away, can keep phase Running after its IP went to a new pod)."""
        def rank(pod: Pod) -> tuple[bool, bool]:
            return (pod.phase == "Running", not pod.terminating)

        index: dict[str, Pod] = {}
        for pod in self.pods.values():
            if not pod.ip or pod.host_network or pod.phase in TERMINATED:
                continue
            held = index.get(pod.ip)
            if held is None or rank(pod) > rank(held):
                index[pod.ip] = pod
        for pod in self.pods.values():  # a dual-stack pod's other address: never one a pod has as its own
            if pod.ip and not pod.host_network and pod.phase not in TERMINATED:
                for ip in pod.other_ips:
                    index.setdefault(ip, pod)
        return index

    @cached_property
    def _endpoints(self) -> dict[tuple, tuple[Pod, ...]]:
        return {}


def check(objects: Iterable[KubeObject]) -> None:
    """Raise ConfigError naming the object and field for the first Pod or Service the
    model could not read; other kinds are checked by the code that understands them."""
    for obj in objects:
        if obj.group == "" and obj.kind == "Pod":
            _pod(obj)
        elif obj.group == "" and obj.kind == "Service":
            _service(obj)


def _where(obj: KubeObject) -> str:
    return f"{obj.source} ({obj})" if obj.source else str(obj)


def _ip(value, where: str, field: str, allowed: tuple[str, ...] = ("",)) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):  # ip_address(10) would happily read an int
        raise ConfigError(where, f"{field} must be a string, not {type(value).__name__}")
    if value in allowed:
        return value
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ConfigError(where, f"{field} {value!r} is not an IP address") from None


def _port(value, where: str, field: str) -> int:
    # bool is an int subclass; `port: true` is a typo, not port 1.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(where, f"{field} must be a port number 1-65535, not {value!r}")
    return value


def _pod(obj: KubeObject) -> Pod:
    where, spec = _where(obj), obj.spec
    status = obj.body.get("status") or {}
    if not isinstance(status, dict):
        raise ConfigError(where, f"status must be a map, not {type(status).__name__}")
    uid = str((obj.body.get("metadata") or {}).get("uid") or "")
    return Pod(
        namespace=obj.namespace, name=obj.name, uid=uid,
        node=str(spec.get("nodeName") or ""), ip=_ip(status.get("podIP"), where, "status.podIP"),
        labels=_frozen(obj.labels),
        annotations=_frozen({k: v for k, v in obj.annotations.items() if k in READ_ANNOTATIONS}),
        service_account=str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"),
        phase=str(status.get("phase") or "Pending"),
        ports=_frozen(_container_ports(spec, where)), workload=_workload(obj),
        host_network=_flag(spec.get("hostNetwork"), where, "spec.hostNetwork"),
        other_ips=_other_ips(status, where),
        probe_ports=_probe_ports(spec, where),
        terminating=bool((obj.body.get("metadata") or {}).get("deletionTimestamp")),
    )


PROBES = ("readinessProbe", "livenessProbe", "startupProbe")
PROBE_HANDLERS = ("httpGet", "tcpSocket", "grpc")


def _probe_ports(spec: dict, where: str) -> frozenset[int]:
    """The ports kubelet probes, of the containers and of the init containers (a native
    sidecar, restartPolicy Always, has probes; the API refuses them on any other): a
    number, or a name of the same container's ports (as kubelet reads it; a name it has
    not is a probe that never connects)."""
    out: set[int] = set()
    for list_name in ("containers", "initContainers"):
        listed = spec.get(list_name) or []
        if not isinstance(listed, list):
            raise ConfigError(where, f"spec.{list_name} must be a list")
        for i, container in enumerate(listed):
            if not isinstance(container, dict):
                raise ConfigError(where, f"spec.{list_name}[{i}] must be a map")
            out |= _container_probe_ports(container, where, f"spec.{list_name}[{i}]")
    return frozenset(out)


def _container_probe_ports(container: dict, where: str, at: str) -> set[int]:
    """The ports one container's probes name (`at`: where it is, for errors)."""
    out: set[int] = set()
    ports = container.get("ports") or []
    named = {str(p.get("name")): p.get("containerPort") for p in (ports if isinstance(ports, list) else [])
             if isinstance(p, dict) and p.get("name") is not None}
    for probe_name in PROBES:
        probe = container.get(probe_name)
        if probe is None:
            continue
        if not isinstance(probe, dict):
            raise ConfigError(where, f"{at}.{probe_name} must be a map")
        for handler in PROBE_HANDLERS:
            action = probe.get(handler)
            if action is None:
                continue
            field_name = f"{at}.{probe_name}.{handler}"
            if not isinstance(action, dict):
                raise ConfigError(where, f"{field_name} must be a map")
            port = action.get("port")
            if isinstance(port, str) and not (port.isascii() and port.isdecimal()):
                if port in named:
                    out.add(_port(named[port], where, f"{field_name}.port ({port})"))
                continue
            out.add(_port(int(port) if isinstance(port, str) else port, where, f"{field_name}.port"))
    return out


def _other_ips(status: dict, where: str) -> tuple[str, ...]:
    """status.podIPs but status.podIP (its first entry, when both are set)."""
    entries = status.get("podIPs") or []
    if not isinstance(entries, list):
        raise ConfigError(where, f"status.podIPs must be a list, not {type(entries).__name__}")
    primary = _ip(status.get("podIP"), where, "status.podIP")
    ips: list[str] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(where, f"status.podIPs[{i}] must be a map with ip")
        ip = _ip(entry.get("ip"), where, f"status.podIPs[{i}].ip")
        if ip and ip != primary and ip not in ips:
            ips.append(ip)
    return tuple(ips)


def _flag(value, where: str, field: str) -> bool:
    # A string "false" is truthy: a typo must not read as its opposite.
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ConfigError(where, f"{field} must be true or false, not {value!r}")


def _container_ports(spec: dict, where: str) -> dict[str, int]:
    """Named ports of every container (what a Service's named targetPort refers to)."""
    out: dict[str, int] = {}
    containers = spec.get("containers") or []
    if not isinstance(containers, list):
        raise ConfigError(where, "spec.containers must be a list")
    for i, container in enumerate(containers):
        if not isinstance(container, dict):
            raise ConfigError(where, f"spec.containers[{i}] must be a map")
        ports = container.get("ports") or []
        if not isinstance(ports, list):
            raise ConfigError(where, f"spec.containers[{i}].ports must be a list")
        for j, port in enumerate(ports):
            field_name = f"spec.containers[{i}].ports[{j}]"
            if not isinstance(port, dict):
                raise ConfigError(where, f"{field_name} must be a map with name and containerPort")
            number = _port(port.get("containerPort"), where, f"{field_name}.containerPort")
            name = port.get("name")
            if name is not None:
                out.setdefault(str(name), number)  # the first container naming it wins, as kube-proxy
    return out


def _workload(obj: KubeObject) -> str:
    """Istio's workload name (GetDeployMetaFromPod): a controller owner's name; the
    Deployment's for a ReplicaSet named `<deployment>-<pod-template-hash>`, an Argo
    Rollout's for one named `<rollout>-<rollouts-pod-template-hash>`, an OpenShift
    DeploymentConfig's for a ReplicationController of the `deploymentconfig` label, a
    CronJob's for a Job named `<cronjob>-<8-10 digits>` (each run of a CronJob or a
    rollout's ReplicaSet was a workload, and metric series, of its own); empty (the pod's
    own name) without owner."""
    owners = (obj.body.get("metadata") or {}).get("ownerReferences") or []
    if not isinstance(owners, list):
        return ""
    owners = [o for o in owners if isinstance(o, dict) and o.get("name")]
    owner = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    if owner is None:
        return ""
    name, kind = str(owner["name"]), owner.get("kind")
    if kind == "ReplicaSet":
        for label in ("pod-template-hash", "rollouts-pod-template-hash"):
            template_hash = obj.labels.get(label)
            if template_hash and name.endswith(f"-{template_hash}"):
                return name[:-len(template_hash) - 1]
    if kind == "ReplicationController" and obj.labels.get("deploymentconfig"):
        return obj.labels["deploymentconfig"]
    if kind == "Job":
        cron = CRONJOB_RUN.fullmatch(name)
        if cron:
            return cron.group(1)
    return name


def _service_port(p, where: str, field: str) -> ServicePort:
    if not isinstance(p, dict):
        raise ConfigError(where, f"{field} must be a map with port, targetPort, protocol, name")
    port = _port(p.get("port"), where, f"{field}.port")
    target = p.get("targetPort")
    if target is None:
        target = port
    elif isinstance(target, str) and target.isdigit():
        target = _port(int(target), where, f"{field}.targetPort")
    elif not (isinstance(target, str) and target):  # a named container port
        target = _port(target, where, f"{field}.targetPort")
    return ServicePort(port=port, target_port=target, protocol=str(p.get("protocol") or "TCP"),
                       name=str(p.get("name") or ""), app_protocol=str(p.get("appProtocol") or ""))


def _service(obj: KubeObject) -> Service:
    where, spec = _where(obj), obj.spec
    ports = spec.get("ports") or []
    if not isinstance(ports, list):
        raise ConfigError(where, "spec.ports must be a list")
    selector = string_map(spec.get("selector"), where, "spec.selector")
    cluster_ip = _ip(spec.get("clusterIP"), where, "spec.clusterIP", ("", "None"))
    return Service(obj.namespace, obj.name, cluster_ip,
                   tuple(_service_port(p, where, f"spec.ports[{i}]") for i, p in enumerate(ports)),
                   _frozen(selector))
