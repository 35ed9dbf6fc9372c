"""Lab files → a typed desired state, validated as a whole before anything is made.

The lab runs `v1` Node, Namespace, Pod, Service and `apps/v1` Deployment and holds `v1`
ConfigMap, Secret and ServiceAccount (data, in the API with `--kube`); any other kind of
those two groups is an error (the lab would silently not run it), while kinds of other
groups (Istio resources, RBAC, CRDs…) are kept unchanged for the agents. Every error
is a ConfigError naming `file#doc (Kind ns/name) field`, what is wrong and what to do.
Pure: no kernel, no filesystem (`check_commands` takes the lookup function).
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import DNS_LABEL, KubeObject, object_from_dict, string_map
from nodeagent.model import Model, ServicePort

LAB_GROUPS = ("", "apps")
LAB_KINDS = {"Node": "v1", "Namespace": "v1", "Pod": "v1", "Service": "v1", "Deployment": "apps/v1",
             "ConfigMap": "v1", "Secret": "v1", "ServiceAccount": "v1"}
DEFAULT_NODES = ("node1", "node2")
DEFAULT_NAMESPACE = "default"
RESTART_POLICIES = ("Always", "OnFailure", "Never")
PROTOCOLS = ("TCP", "UDP")
PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?\Z")  # IANA_SVC_NAME
# Downward-API fields a container env var may reference (valueFrom.fieldRef.fieldPath).
FIELD_PATHS = ("metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName",
               "spec.serviceAccountName", "status.podIP", "status.hostIP")


@dataclass(frozen=True)
class EnvVar:
    name: str
    value: str = ""
    field_path: str = ""  # set for valueFrom.fieldRef; resolved when the process starts


@dataclass(frozen=True)
class ContainerPort:
    port: int
    name: str = ""
    protocol: str = "TCP"


@dataclass(frozen=True)
class Container:
    name: str
    command: tuple[str, ...]  # command + args: what runs (images are ignored)
    env: tuple[EnvVar, ...] = ()
    ports: tuple[ContainerPort, ...] = ()


@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    node: str  # "" = let the lab place it
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    containers: tuple[Container, ...]
    restart_policy: str = "Always"
    service_account: str = "default"
    owner: str = ""  # Deployment name for generated pods
    source: str = ""  # "file#doc" for messages
    body: Mapping[str, Any] = field(default_factory=dict, compare=False)  # Pod as exported

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def where(self) -> str:
        return f"{self.source} (Pod {self.key})" if not self.owner else \
            f"{self.source} (Deployment {self.namespace}/{self.owner}, pod {self.name})"

    def immutable(self) -> tuple:
        """What a running pod cannot change (labels and annotations can)."""
        return (self.containers, self.restart_policy, self.service_account, self.owner)


@dataclass(frozen=True)
class ServiceSpec:
    namespace: str
    name: str
    cluster_ip: str  # "" = allocate one
    ports: tuple[ServicePort, ...]
    selector: Mapping[str, str]
    source: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class DesiredState:
    nodes: list[KubeObject]  # in order: node i gets fabric .i+1 and pod CIDR 10.244.i.0/24
    namespaces: dict[str, KubeObject | None]  # None: implied by an object inside it
    pods: dict[str, PodSpec]  # "ns/name" -> spec, Deployment pods included
    services: dict[str, ServiceSpec]
    objects: list[KubeObject]  # everything, as given (default Nodes added)

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]


def _where(obj: KubeObject, path: str = "") -> str:
    ident = f"{obj.namespace}/{obj.name}" if obj.namespace else obj.name
    return f"{obj.source} ({obj.kind} {ident})" + (f" {path}" if path else "")


def _map(value: Any, obj: KubeObject, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(_where(obj, path), f"must be a map, not {type(value).__name__}")
    return value


def _list(value: Any, obj: KubeObject, path: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(_where(obj, path), f"must be a list, not {type(value).__name__}")
    return value


def _int(value: Any, obj: KubeObject, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(_where(obj, path), f"must be an integer from {low} to {high}, got {value!r}")
    return value


def _strings(value: Any, obj: KubeObject, path: str) -> tuple[str, ...]:
    items = _list(value, obj, path)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigError(_where(obj, f"{path}[{i}]"), f"must be a string, got {item!r}",
                              "quote it, as Kubernetes requires")
    return tuple(items)


def _check_kind(obj: KubeObject) -> None:
    if obj.group not in LAB_GROUPS:
        return
    wanted = LAB_KINDS.get(obj.kind)
    if wanted is None:
        raise ConfigError(_where(obj), f"the lab does not run {obj.api_version} {obj.kind}",
                          "the lab runs v1 Node, Namespace, Pod, Service and apps/v1 Deployment, and holds "
                          "v1 ConfigMap, Secret and ServiceAccount")
    if obj.api_version != wanted:
        raise ConfigError(_where(obj, "apiVersion"), f"{obj.kind} must be {wanted}, not {obj.api_version}")


def _env(raw: Any, obj: KubeObject, path: str) -> tuple[EnvVar, ...]:
    out = []
    for i, item in enumerate(_list(raw, obj, path)):
        item = _map(item, obj, f"{path}[{i}]")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(_where(obj, f"{path}[{i}].name"), "missing")
        if "valueFrom" in item:
            ref = _map(_map(item["valueFrom"], obj, f"{path}[{i}].valueFrom").get("fieldRef"),
                       obj, f"{path}[{i}].valueFrom.fieldRef").get("fieldPath")
            if ref not in FIELD_PATHS:
                raise ConfigError(_where(obj, f"{path}[{i}].valueFrom"), f"unsupported source for {name}",
                                  f"the lab supports fieldRef.fieldPath {', '.join(FIELD_PATHS)}")
            out.append(EnvVar(name, field_path=ref))
            continue
        value = item.get("value", "")
        if not isinstance(value, str):
            raise ConfigError(_where(obj, f"{path}[{i}].value"), f"must be a string, got {value!r}",
                              "quote it, as Kubernetes requires")
        out.append(EnvVar(name, value))
    return tuple(out)


def _ports(raw: Any, obj: KubeObject, path: str) -> tuple[ContainerPort, ...]:
    out = []
    for i, item in enumerate(_list(raw, obj, path)):
        item = _map(item, obj, f"{path}[{i}]")
        port = _int(item.get("containerPort"), obj, f"{path}[{i}].containerPort", 1, 65535)
        protocol = item.get("protocol", "TCP")
        if protocol not in PROTOCOLS:
            raise ConfigError(_where(obj, f"{path}[{i}].protocol"), f"must be TCP or UDP, got {protocol!r}")
        out.append(ContainerPort(port, str(item.get("name") or ""), protocol))
    return tuple(out)


def _container(raw: Any, obj: KubeObject, path: str) -> Container:
    raw = _map(raw, obj, path)
    name = raw.get("name")
    if not isinstance(name, str) or not DNS_LABEL.match(name):
        raise ConfigError(_where(obj, f"{path}.name"), f"{name!r} is not a valid container name")
    command = _strings(raw.get("command"), obj, f"{path}.command") + \
        _strings(raw.get("args"), obj, f"{path}.args")
    if not command or not command[0]:
        raise ConfigError(_where(obj, f"{path}.command"), f"container {name} has no command",
                          "the lab ignores images and runs command (+ args) as a process: add command: [...]")
    return Container(name, command, _env(raw.get("env"), obj, f"{path}.env"),
                     _ports(raw.get("ports"), obj, f"{path}.ports"))


def _pod_template(spec: dict, obj: KubeObject, path: str, nodes: list[str]) -> dict[str, Any]:
    """Fields of a pod spec the lab uses (shared by Pod and Deployment templates)."""
    raw = _list(spec.get("containers"), obj, f"{path}.containers")
    if not raw:
        raise ConfigError(_where(obj, f"{path}.containers"), "no containers",
                          "a pod needs at least one container with a command")
    containers = tuple(_container(c, obj, f"{path}.containers[{i}]") for i, c in enumerate(raw))
    names = [c.name for c in containers]
    if len(set(names)) != len(names):
        raise ConfigError(_where(obj, f"{path}.containers"), f"duplicate container names in {names}")
    node = spec.get("nodeName") or ""
    if node and node not in nodes:
        raise ConfigError(_where(obj, f"{path}.nodeName"), f"no node named {node!r}",
                          f"the lab's nodes are {', '.join(nodes)}")
    policy = spec.get("restartPolicy", "Always")
    if policy not in RESTART_POLICIES:
        raise ConfigError(_where(obj, f"{path}.restartPolicy"), f"must be one of {', '.join(RESTART_POLICIES)}")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return dict(node=str(node), containers=containers, restart_policy=policy, service_account=str(account))


def pod_of(obj: KubeObject, nodes: list[str]) -> PodSpec:
    """One Pod object as the lab runs it (the file's, or one the API bound to a lab node)."""
    return _pod(obj, nodes)


def _pod(obj: KubeObject, nodes: list[str]) -> PodSpec:
    fields = _pod_template(obj.spec, obj, "spec", nodes)
    return PodSpec(obj.namespace, obj.name, labels=obj.labels, annotations=obj.annotations,
                   source=obj.source, body=obj.body, **fields)


def _deployment_pods(obj: KubeObject, nodes: list[str]) -> list[PodSpec]:
    spec = obj.spec
    replicas = _int(spec.get("replicas", 1), obj, "spec.replicas", 0, 1000)
    template = _map(spec.get("template"), obj, "spec.template")
    meta = _map(template.get("metadata"), obj, "spec.template.metadata")
    where = _where(obj, "spec.template.metadata")
    labels = string_map(meta.get("labels"), where, "labels")
    annotations = string_map(meta.get("annotations"), where, "annotations")
    selector = string_map(_map(spec.get("selector"), obj, "spec.selector").get("matchLabels"),
                           _where(obj, "spec.selector"), "matchLabels")
    if any(labels.get(k) != v for k, v in selector.items()):
        raise ConfigError(_where(obj, "spec.selector"), "does not match spec.template.metadata.labels",
                          "every matchLabels entry must be a template label too")
    pod_spec = _map(template.get("spec"), obj, "spec.template.spec")
    fields = _pod_template(pod_spec, obj, "spec.template.spec", nodes)
    if fields["restart_policy"] != "Always":
        raise ConfigError(_where(obj, "spec.template.spec.restartPolicy"), "a Deployment's pods must use Always")
    pods = []
    for n in range(replicas):
        name = f"{obj.name}-{n}"
        node = fields["node"] or nodes[n % len(nodes)]  # round-robin over the nodes
        body = {"apiVersion": "v1", "kind": "Pod",
                "metadata": {**copy.deepcopy(meta), "name": name, "namespace": obj.namespace},
                "spec": copy.deepcopy(pod_spec)}
        pods.append(PodSpec(obj.namespace, name, **{**fields, "node": node}, labels=labels,
                            annotations=annotations, owner=obj.name, source=obj.source, body=body))
    return pods


def _service(obj: KubeObject) -> ServiceSpec:
    """The model's own reading of the Service (ports, selector, clusterIP), plus what the
    lab needs on top: a ClusterIP service with TCP/UDP ports, named when several."""
    svc = Model.build([obj]).services[(obj.namespace, obj.name)]
    spec = obj.spec
    if spec.get("type", "ClusterIP") != "ClusterIP":
        raise ConfigError(_where(obj, "spec.type"), f"{spec.get('type')!r} is not supported",
                          "the lab implements ClusterIP services; drop spec.type")
    if svc.cluster_ip == "None":
        raise ConfigError(_where(obj, "spec.clusterIP"), "headless services are not supported by the lab",
                          "drop spec.clusterIP to get a ClusterIP")
    if svc.cluster_ip and ":" in svc.cluster_ip:
        raise ConfigError(_where(obj, "spec.clusterIP"), "the lab has IPv4 ClusterIPs only")
    if not svc.ports:
        raise ConfigError(_where(obj, "spec.ports"), "no ports", "a ClusterIP service needs at least one port")
    seen: set = set()
    for i, p in enumerate(svc.ports):
        where = _where(obj, f"spec.ports[{i}]")
        if p.protocol not in PROTOCOLS:
            raise ConfigError(f"{where}.protocol", f"must be TCP or UDP, got {p.protocol!r}")
        if isinstance(p.target_port, str) and not PORT_NAME.match(p.target_port):
            raise ConfigError(f"{where}.targetPort", f"{p.target_port!r} is not a port number or port name")
        if len(svc.ports) > 1 and not p.name:
            raise ConfigError(f"{where}.name", "required when a service has several ports")
        for ident in ((p.port, p.protocol), ("name", p.name)):
            if ident in seen:
                raise ConfigError(where, f"duplicate {ident[0]} {ident[1]}")
            seen.add(ident)
    return ServiceSpec(obj.namespace, obj.name, svc.cluster_ip, svc.ports, svc.selector, obj.source)


def _data(obj: KubeObject) -> None:
    """A ConfigMap's or Secret's maps: strings, base64 where the API stores bytes."""
    encoded = {"ConfigMap": ("binaryData",), "Secret": ("data",)}[obj.kind]
    plain = {"ConfigMap": ("data",), "Secret": ("stringData",)}[obj.kind]
    for name in plain + encoded:
        values = string_map(obj.body.get(name), _where(obj), name)
        for key, value in values.items() if name in encoded else ():
            try:
                base64.b64decode(value, validate=True)
            except (ValueError, binascii.Error):
                raise ConfigError(_where(obj, f"{name}[{key!r}]"), "is not base64",
                                  f"encode it (base64 -w0), or put the text in "
                                  f"{'stringData' if obj.kind == 'Secret' else 'data'}") from None


def default_nodes() -> list[KubeObject]:
    return [object_from_dict({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n}}, "(default node)")
            for n in DEFAULT_NODES]


def check_unique(objects: Iterable[KubeObject]) -> None:
    seen: dict = {}
    for obj in objects:
        if obj.key in seen:
            raise ConfigError(_where(obj), f"defined twice (also at {seen[obj.key]})",
                              "give each object a unique name, or remove one")
        seen[obj.key] = obj.source


def load(objects: list[KubeObject]) -> DesiredState:
    """Validate every object and expand Deployments; raises the first ConfigError."""
    for obj in objects:
        _check_kind(obj)
    check_unique(objects)
    nodes = [o for o in objects if o.kind == "Node" and o.group == ""]
    if not nodes:
        nodes = default_nodes()
        objects = nodes + list(objects)
    names = [n.name for n in nodes]
    namespaces: dict[str, KubeObject | None] = {DEFAULT_NAMESPACE: None}
    pods: dict[str, PodSpec] = {}
    services: dict[str, ServiceSpec] = {}
    for obj in objects:
        if obj.namespace:
            namespaces.setdefault(obj.namespace, None)
        if obj.group not in LAB_GROUPS:
            continue
        if obj.kind == "Namespace":
            namespaces[obj.name] = obj
        elif obj.kind == "Service":
            services[f"{obj.namespace}/{obj.name}"] = _service(obj)
        elif obj.kind in ("ConfigMap", "Secret"):
            _data(obj)
        elif obj.kind in ("Pod", "Deployment"):
            made = [_pod(obj, names)] if obj.kind == "Pod" else _deployment_pods(obj, names)
            for pod in made:
                if pod.key in pods:
                    raise ConfigError(pod.where, f"pod name {pod.name} is already used by {pods[pod.key].where}",
                                      "rename one of them")
                pods[pod.key] = pod
    return DesiredState(nodes, namespaces, pods, services, list(objects))


def check_commands(state: DesiredState, which: Callable[[str], str | None]) -> None:
    """Every container's executable must resolve (`which` searches the containers' PATH)."""
    for pod in state.pods.values():
        for c in pod.containers:
            if which(c.command[0]) is None:
                raise ConfigError(f"{pod.where} container {c.name} command[0]", f"{c.command[0]!r} not found",
                                  "install it or give its full path (the lab runs host executables)")
