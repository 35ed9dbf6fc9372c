"""The lab's nodes in the API, kept alive as their kubelets keep them.

Each node registers itself with its own credentials (`system:node:<node>`, from its
own netns, so the Node authorizer and NodeRestriction judge it as a kubelet): the Node
with kubelet's labels, `spec.podCIDR` from the lab's allocation, then its status (Ready
and the pressure conditions, InternalIP = its fabric address, capacity, node info); the
file's labels and annotations of the Node are set by the lab's admin, as NodeRestriction
refuses most labels from a kubelet. A
kubelet's two heartbeats follow: its Lease in `kube-node-lease` renewed every 10 s
(40 s lease), and the status every 5 minutes (kubelet's `nodeStatusReportFrequency`).
The node lifecycle controller marks a node NotReady when its lease goes stale, so a
stopped supervisor shows as it would in a cluster. Runs in a thread of the supervisor.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from nodeagent.backoff import Backoff
from nodeagent.lab.ipam import NodeAlloc
from nodeagent.lab.kube.api import MERGE_PATCH, STRATEGIC_PATCH, ApiClient, ApiError

LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
LEASE_RENEW = 10.0
STATUS_REPORT = 300.0
NOT_READY_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
RETRY = Backoff(first=0.5, maximum=5.0)
KUBELET_VERSION = "v1.34.4"  # the control plane's release (controlplane/go.mod)
RUNTIME = "nodeagent-lab://1"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def node_object(name: str, alloc: NodeAlloc) -> dict:
    """The Node as its kubelet creates it (with the labels kubelet sets)."""
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                                  "kubernetes.io/arch": ARCH}},
            "spec": {"podCIDR": alloc.pod_cidr, "podCIDRs": [alloc.pod_cidr]}}


def _condition(kind: str, status: str, reason: str, message: str, now: str) -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": now}


def node_status(name: str, alloc: NodeAlloc, boot_id: str, now: str) -> dict:
    """The status a healthy kubelet reports (pods: kubelet's default maximum)."""
    capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{_memory_kib()}Ki", "pods": "110",
                "ephemeral-storage": "10Gi"}
    return {"status": {
        "conditions": [
            _condition("MemoryPressure", "False", "KubeletHasSufficientMemory",
                       "kubelet has sufficient memory available", now),
            _condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure", now),
            _condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available", now),
            _condition("Ready", "True", "KubeletReady", "the nodeagent lab runs this node's pods", now)],
        "addresses": [{"type": "InternalIP", "address": alloc.fabric_ip}, {"type": "Hostname", "address": name}],
        "capacity": capacity, "allocatable": capacity,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {"machineID": uuid.uuid5(uuid.NAMESPACE_DNS, name).hex,
                     "systemUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
                     "bootID": boot_id, "kernelVersion": platform.release(), "osImage": "nodeagent lab",
                     "containerRuntimeVersion": RUNTIME, "kubeletVersion": KUBELET_VERSION,
                     "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": ARCH}}}


def _memory_kib() -> int:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1])


def lease_object(name: str, now: str) -> dict:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": LEASE_NAMESPACE},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now}}


@dataclass
class NodeHeartbeat:
    """One node's kubelet side: register, then keep lease and status fresh."""

    name: str
    alloc: NodeAlloc
    client: ApiClient  # as system:node:<name>
    admin: ApiClient  # sets the file's labels and annotations, as an operator would
    metadata: dict  # the file's Node labels/annotations
    boot_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    registered: bool = False
    last_status: float = float("-inf")
    owner_uid: str = ""

    def register(self) -> None:
        status, answer = self.client.request("POST", "/api/v1/nodes", node_object(self.name, self.alloc))
        if status not in (201, 409):  # 409: it exists (a restarted supervisor)
            message = answer.get("message") if isinstance(answer, dict) else answer
            raise ApiError(f"registering node {self.name}: {status} {message}", status)
        node = self.client.call("GET", f"/api/v1/nodes/{self.name}")
        self.owner_uid = node["metadata"]["uid"]
        if self.metadata:  # NodeRestriction refuses most labels from a kubelet: as the admin
            self.admin.call("PATCH", f"/api/v1/nodes/{self.name}", {"metadata": self.metadata}, MERGE_PATCH)
        self.report_status()
        self.registered = True

    def report_status(self) -> None:
        self.client.call("PATCH", f"/api/v1/nodes/{self.name}/status",
                         node_status(self.name, self.alloc, self.boot_id, _now()), STRATEGIC_PATCH)
        self.last_status = time.monotonic()

    def renew_lease(self) -> None:
        """Patch the lease's spec (no resourceVersion to track); create it when absent."""
        leases = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases"
        body = lease_object(self.name, _micro_now())
        status, _ = self.client.request("PATCH", f"{leases}/{self.name}", {"spec": body["spec"]}, MERGE_PATCH)
        if status == 404:
            body["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": self.name,
                                                    "uid": self.owner_uid}]
            self.client.call("POST", leases, body)
        elif status != 200:
            self.client.call("PATCH", f"{leases}/{self.name}", {"spec": body["spec"]}, MERGE_PATCH)  # raises

    def beat(self) -> None:
        if not self.registered:
            self.register()
        self.renew_lease()
        if time.monotonic() - self.last_status >= STATUS_REPORT:
            self.report_status()


@dataclass
class Heartbeats:
    """Every node's heartbeat in one thread: each node beats every LEASE_RENEW seconds;
    a failure (the API server not up yet, restarting) is retried with a short backoff
    and logged once per change of message."""

    nodes: list[NodeHeartbeat]
    log: logging.Logger
    stop: threading.Event = field(default_factory=threading.Event)
    clock: Callable[[], float] = time.monotonic
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="node-heartbeats", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def run(self) -> None:
        due = {n.name: 0.0 for n in self.nodes}
        failures = {n.name: 0 for n in self.nodes}
        said: dict[str, str] = {}
        while not self.stop.is_set():
            for node in self.nodes:
                if self.clock() < due[node.name]:
                    continue
                try:
                    was = node.registered
                    node.beat()
                    if not was:
                        self.log.info("node %s registered with the API server (podCIDR %s)", node.name,
                                      node.alloc.pod_cidr)
                    failures[node.name], said[node.name] = 0, ""
                    due[node.name] = self.clock() + LEASE_RENEW
                except ApiError as exc:
                    failures[node.name] += 1
                    if said.get(node.name) != str(exc):
                        self.log.warning("node %s heartbeat: %s (retrying)", node.name, exc)
                        said[node.name] = str(exc)
                    due[node.name] = self.clock() + RETRY.delay(failures[node.name])
            self.stop.wait(max(0.05, min(due.values()) - self.clock()))


def not_ready(client: ApiClient, names: list[str]) -> dict[str, str]:
    """node -> why it is not Ready for pods in the API (absent, its Ready condition, or the
    not-ready taint the node lifecycle controller has not lifted yet); {} when all are."""
    try:
        items = client.call("GET", "/api/v1/nodes").get("items", [])
    except ApiError as exc:
        return {name: str(exc) for name in names}
    found = {item["metadata"]["name"]: item for item in items}
    out = {}
    for name in names:
        if name not in found:
            out[name] = "not registered"
            continue
        conditions = {c["type"]: c for c in found[name].get("status", {}).get("conditions", [])}
        condition = conditions.get("Ready", {})
        taints = [t["key"] for t in found[name].get("spec", {}).get("taints", []) if t["key"] in NOT_READY_TAINTS]
        if condition.get("status") != "True":
            out[name] = f"Ready={condition.get('status', 'Unknown')} {condition.get('reason', '')}".strip()
        elif taints:  # the node lifecycle controller lifts it within its monitor period (5 s)
            out[name] = f"still tainted {', '.join(taints)}"
    return out


def wait_ready(client: ApiClient, names: list[str], out: Callable[[str], None], timeout: float,
               poll: float = 0.2) -> None:
    """Wait until every node in `names` is registered and Ready; ApiError after `timeout`."""
    deadline, shown = time.monotonic() + timeout, None
    while True:
        waiting = not_ready(client, names)
        progress = f"{len(names) - len(waiting)}/{len(names)} nodes Ready in the API"
        if progress != shown:
            out(progress)
            shown = progress
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise ApiError(f"nodes not Ready after {timeout:.0f}s: "
                           + "; ".join(f"{n}: {why}" for n, why in waiting.items()))
        time.sleep(poll)
