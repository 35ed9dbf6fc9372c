"""The lab's state directory, `/run/nodeagent/<lab>/`, and who may write what in it.

- `lab.json`: the lab's objects as given plus every allocation (nodes, pod UIDs/IPs,
  ClusterIPs) and the supervisor's pid. Written by `lab up`/`lab apply`.
- `runtime.json`: what runs (pids, restart counts, phases). Written by the supervisor.
- `cluster/<kind>/<ns>/<name>.yaml`: the Kubernetes-shaped state the agents' `files`
  source watches, with the lab's allocations and phases filled in, like an API server
  would. Only changed files are rewritten, by rename (nothing bind-mounts them).
- `logs/`: one log per container, per agent and for the supervisor.
Writers take an flock on the directory, so separate `nodeagent lab` invocations and the
supervisor never interleave; JSON files are replaced by rename, so readers need no lock.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

from nodeagent.errors import LabError
from nodeagent.kube.objects import KubeObject, dump_documents, object_from_dict
from nodeagent.lab import spec
from nodeagent.lab.ipam import Allocations
from nodeagent.lab.layout import Layout
from nodeagent.model import Model

FORMAT = 1


@dataclass
class LabRecord:
    """lab.json: what the lab was asked to run and what it allocated for it."""

    name: str
    cgroup_root: str
    agents: bool
    objects: list[KubeObject]
    alloc: Allocations
    supervisor_pid: int = 0
    controlplane: str = ""  # `--kube`: the control plane binary the lab runs; "" without

    @property
    def kube(self) -> bool:
        return bool(self.controlplane)

    @property
    def layout(self) -> Layout:
        return Layout(self.name, self.cgroup_root)

    @cached_property
    def desired(self) -> spec.DesiredState:
        return spec.load(self.objects)

    def to_json(self) -> dict:
        return {"format": FORMAT, "name": self.name, "cgroup_root": self.cgroup_root, "agents": self.agents,
                "supervisor_pid": self.supervisor_pid, "controlplane": self.controlplane, **self.alloc.to_json(),
                "objects": [{"source": o.source, "body": o.body} for o in self.objects]}

    @classmethod
    def from_json(cls, data: dict) -> "LabRecord":
        objects = [object_from_dict(o["body"], o["source"]) for o in data["objects"]]
        return cls(data["name"], data["cgroup_root"], data["agents"], objects,
                   Allocations.from_json(data), data.get("supervisor_pid", 0), data.get("controlplane", ""))


@dataclass
class Runtime:
    """runtime.json: per pod `{phase, reason, containers: {name: {pid, restarts, state, exit_code}}}`."""

    pods: dict[str, dict] = field(default_factory=dict)
    agents: dict[str, dict] = field(default_factory=dict)
    ca: dict = field(default_factory=dict)  # the mesh CA's {pid, restarts, state, exit_code}
    controlplane: dict[str, dict] = field(default_factory=dict)  # `--kube`: component -> the same

    def phase(self, key: str) -> str:
        return self.pods.get(key, {}).get("phase", "Pending")

    def shown_phase(self, key: str) -> str:
        """The phase `status` shows: a waiting reason such as CrashLoopBackOff wins."""
        pod = self.pods.get(key, {})
        return pod.get("reason") or pod.get("phase", "Pending")

    def restarts(self, key: str) -> int:
        return sum(c.get("restarts", 0) for c in self.pods.get(key, {}).get("containers", {}).values())

    def running(self) -> set[str]:
        return {k for k, p in self.pods.items() if p.get("phase") == "Running"}


def write_atomic(path: str, data: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(data)
    os.replace(tmp, path)


class StateDir:
    def __init__(self, layout: Layout):
        self.layout = layout
        self.path = layout.state_dir

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def create(self) -> None:
        os.makedirs(self.layout.run_root, exist_ok=True)
        try:
            os.mkdir(self.path, 0o755)
        except FileExistsError:
            raise LabError(f"lab {self.layout.name} is already up (state in {self.path})",
                           f"nodeagent lab down --name {self.layout.name}") from None
        for sub in (self.layout.cluster_dir, self.layout.logs_dir, self.layout.agents_dir):
            os.mkdir(sub)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive flock on the directory; fails if the lab is (or goes) down meanwhile."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self.missing() from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # `lab down` removed it while we waited
                raise self.missing()
            yield
        finally:
            os.close(fd)

    def missing(self) -> LabError:
        return LabError(f"no lab named {self.layout.name} is up",
                        f"start one with: nodeagent lab up --name {self.layout.name}")

    def load(self) -> LabRecord:
        try:
            with open(self.layout.lab_json) as f:
                return LabRecord.from_json(json.load(f))
        except FileNotFoundError:
            raise self.missing() from None
        except (ValueError, KeyError, TypeError) as exc:
            raise LabError(f"{self.layout.lab_json} is damaged ({exc})",
                           f"nodeagent lab down --name {self.layout.name} and start again") from None

    def save(self, record: LabRecord) -> None:
        write_atomic(self.layout.lab_json, json.dumps(record.to_json(), indent=1) + "\n")

    def load_runtime(self) -> Runtime:
        try:
            with open(self.layout.runtime_json) as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            return Runtime()
        return Runtime(data.get("pods", {}), data.get("agents", {}), data.get("ca", {}), data.get("controlplane", {}))

    def save_runtime(self, runtime: Runtime) -> None:
        write_atomic(self.layout.runtime_json,
                     json.dumps({"pods": runtime.pods, "agents": runtime.agents, "ca": runtime.ca,
                                 "controlplane": runtime.controlplane}, indent=1) + "\n")

    def export_cluster(self, record: LabRecord, runtime: Runtime) -> None:
        """Bring cluster/ in line with the lab: write changed files, drop stale ones."""
        wanted = {path: dump_documents([body]) for path, body in cluster_documents(record, runtime).items()}
        root = self.layout.cluster_dir
        for rel, text in wanted.items():
            path = os.path.join(root, rel)
            with contextlib.suppress(FileNotFoundError), open(path) as f:
                if f.read() == text:
                    continue
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, text)
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                if name.endswith(".yaml") and rel not in wanted:
                    os.unlink(os.path.join(dirpath, name))


def lab_model(record: LabRecord, runtime: Runtime) -> Model:
    """The model the agents read (the same cluster/ documents)."""
    return Model.build(object_from_dict(body, path) for path, body in cluster_documents(record, runtime).items())


def _relpath(obj: KubeObject) -> str:
    kind = obj.kind.lower() + (f".{obj.group}" if obj.group else "")
    return os.path.join(kind, obj.namespace, f"{obj.name}.yaml") if obj.namespace \
        else os.path.join(kind, f"{obj.name}.yaml")


def cluster_documents(record: LabRecord, runtime: Runtime) -> dict[str, dict[str, Any]]:
    """Every object as an API server would show it, by path below cluster/."""
    desired, alloc = record.desired, record.alloc
    out: dict[str, dict[str, Any]] = {}
    for obj in desired.objects:
        if obj.kind == "Pod" and obj.group == "":
            continue  # written below, with Deployment pods
        body = copy.deepcopy(obj.body)
        if obj.kind == "Node" and obj.group == "":
            node = alloc.nodes[obj.name]
            body.setdefault("spec", {}).update(podCIDR=node.pod_cidr, podCIDRs=[node.pod_cidr])
            body["status"] = {"addresses": [{"type": "InternalIP", "address": node.fabric_ip},
                                            {"type": "Hostname", "address": obj.name}]}
        elif obj.kind == "Service" and obj.group == "":
            ip = alloc.services[f"{obj.namespace}/{obj.name}"]
            body.setdefault("spec", {}).update(clusterIP=ip, clusterIPs=[ip])
        out[_relpath(obj)] = body
    for ns, obj in desired.namespaces.items():
        if obj is None:
            out[os.path.join("namespace", f"{ns}.yaml")] = {
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
    for pod in desired.pods.values():
        out[os.path.join("pod", pod.namespace, f"{pod.name}.yaml")] = pod_document(record, pod, runtime)
    return out


def pod_document(record: LabRecord, pod: spec.PodSpec, runtime: Runtime) -> dict[str, Any]:
    alloc, node = record.alloc.pods[pod.key], record.alloc.nodes[record.alloc.pods[pod.key].node]
    body = copy.deepcopy(dict(pod.body))
    meta = body.setdefault("metadata", {})
    meta.update(namespace=pod.namespace, uid=alloc.uid)
    if pod.owner:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": "Deployment", "name": pod.owner}]
    body.setdefault("spec", {})["nodeName"] = alloc.node
    phase = runtime.phase(pod.key)
    body["status"] = {"phase": phase, "podIP": alloc.ip, "podIPs": [{"ip": alloc.ip}], "hostIP": node.fabric_ip,
                      "containerStatuses": [_container_status(c.name, runtime.pods.get(pod.key, {}))
                                            for c in pod.containers]}
    return body


def _container_status(name: str, pod: dict) -> dict[str, Any]:
    c = pod.get("containers", {}).get(name, {})
    state = c.get("state", "waiting")
    detail = {"reason": pod.get("reason") or "ContainerCreating"} if state == "waiting" else {}
    if state == "terminated":
        detail = {"exitCode": c.get("exit_code")}
    return {"name": name, "ready": state == "running", "restartCount": c.get("restarts", 0),
            "state": {state: detail}}
