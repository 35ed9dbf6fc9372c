"""Placement and addresses: which node a pod runs on, and every IP the lab hands out.

Fabric `172.30.0.0/24` (node number i, from 1, is `.i+1`), pod CIDR `10.244.<i>.0/24`
per node (pods from `.2`), ClusterIPs from `10.96.0.10` in `10.96.0.0/16`. `allocate`
is pure: it takes the desired state and the previous allocations (a running lab's) and
returns new ones, keeping what exists and refusing changes a running pod or service
cannot take. Everything is allocated in memory before the kernel is touched, so an
exhausted range fails before anything is made.
"""

from __future__ import annotations

import ipaddress
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

from nodeagent.errors import ConfigError
from nodeagent.lab.spec import DesiredState, PodSpec, ServiceSpec

FABRIC_CIDR = ipaddress.IPv4Network("172.30.0.0/24")
POD_SUPERNET = ipaddress.IPv4Network("10.244.0.0/16")
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/16")
FIRST_CLUSTER_IP = ipaddress.IPv4Address("10.96.0.10")
FIRST_POD_HOST = 2  # .1 of a pod CIDR is left unused, as in the design
POD_GATEWAY = "169.254.1.1"  # every pod's default gateway (the node side of its veth answers)
MAX_NODES = 253  # fabric .2 .. .254


@dataclass(frozen=True)
class NodeAlloc:
    index: int  # 1-based
    fabric_ip: str
    pod_cidr: str


@dataclass(frozen=True)
class PodAlloc:
    uid: str
    node: str
    ip: str


@dataclass
class Allocations:
    nodes: dict[str, NodeAlloc] = field(default_factory=dict)
    pods: dict[str, PodAlloc] = field(default_factory=dict)  # "ns/name"
    services: dict[str, str] = field(default_factory=dict)  # "ns/name" -> ClusterIP

    def to_json(self) -> dict:
        return {"nodes": {k: asdict(v) for k, v in self.nodes.items()},
                "pods": {k: asdict(v) for k, v in self.pods.items()},
                "services": dict(self.services)}

    @classmethod
    def from_json(cls, data: dict) -> "Allocations":
        return cls({k: NodeAlloc(**v) for k, v in data.get("nodes", {}).items()},
                   {k: PodAlloc(**v) for k, v in data.get("pods", {}).items()},
                   dict(data.get("services", {})))


def node_addresses(index: int) -> NodeAlloc:
    return NodeAlloc(index, str(FABRIC_CIDR.network_address + index + 1),
                     str(ipaddress.IPv4Network((int(POD_SUPERNET.network_address) + (index << 8), 24))))


def _nodes(state: DesiredState, previous: Allocations | None) -> dict[str, NodeAlloc]:
    if previous is None:
        if len(state.nodes) > MAX_NODES:
            raise ConfigError(f"{state.nodes[-1].source} (Node {state.nodes[-1].name})",
                              f"the lab has room for {MAX_NODES} nodes, this file has {len(state.nodes)}")
        return {n.name: node_addresses(i) for i, n in enumerate(state.nodes, start=1)}
    for node in state.nodes:
        if node.name not in previous.nodes:
            raise ConfigError(f"{node.source} (Node {node.name})", "adding a node to a running lab is not supported",
                              "lab down, then lab up with the new file")
    return dict(previous.nodes)


def _place(pod: PodSpec, nodes: dict[str, NodeAlloc], placed: dict[str, PodAlloc]) -> str:
    """The pod's own nodeName, else the node with the fewest pods (first wins a tie)."""
    if pod.node:
        return pod.node
    counts = {name: 0 for name in nodes}
    for alloc in placed.values():
        counts[alloc.node] += 1
    return min(counts, key=lambda name: counts[name])


def _pod_ip(pod: PodSpec, node: str, nodes: dict[str, NodeAlloc], placed: dict[str, PodAlloc]) -> str:
    cidr = ipaddress.IPv4Network(nodes[node].pod_cidr)
    used = {a.ip for a in placed.values()}
    for host in range(FIRST_POD_HOST, cidr.num_addresses - 1):
        ip = str(cidr.network_address + host)
        if ip not in used:
            return ip
    raise ConfigError(pod.where, f"no free pod IP on node {node}: {cidr} is full",
                      "put the pod on another node (spec.nodeName) or add nodes")


def _pods(state: DesiredState, nodes: dict[str, NodeAlloc], previous: Allocations | None,
          new_uid: Callable[[], str]) -> dict[str, PodAlloc]:
    placed: dict[str, PodAlloc] = {}
    for key, pod in state.pods.items():
        old = previous.pods.get(key) if previous else None
        if old is not None:
            if pod.node and pod.node != old.node:
                raise ConfigError(f"{pod.where} spec.nodeName", f"cannot move a running pod to {pod.node} "
                                  f"(it runs on {old.node})", "lab down and up to re-place pods")
            placed[key] = old
    for key, pod in state.pods.items():
        if key not in placed:
            node = _place(pod, nodes, placed)
            placed[key] = PodAlloc(new_uid(), node, _pod_ip(pod, node, nodes, placed))
    return {key: placed[key] for key in state.pods}


def _cluster_ip(svc: ServiceSpec, taken: set[str]) -> str:
    if svc.cluster_ip:
        ip = ipaddress.IPv4Address(svc.cluster_ip)
        if ip not in SERVICE_CIDR or ip in (SERVICE_CIDR.network_address, SERVICE_CIDR.broadcast_address):
            raise ConfigError(f"{svc.source} (Service {svc.key}) spec.clusterIP",
                              f"{ip} is outside the service range {SERVICE_CIDR}", "drop it to get one allocated")
        if str(ip) in taken:
            raise ConfigError(f"{svc.source} (Service {svc.key}) spec.clusterIP", f"{ip} is already in use",
                              "drop it to get a free one allocated")
        return str(ip)
    ip = FIRST_CLUSTER_IP
    while str(ip) in taken:
        ip += 1
    if ip >= SERVICE_CIDR.broadcast_address:
        raise ConfigError(f"{svc.source} (Service {svc.key})", f"no free ClusterIP in {SERVICE_CIDR}")
    return str(ip)


def _services(state: DesiredState, previous: Allocations | None) -> dict[str, str]:
    kept = {k: v for k, v in (previous.services if previous else {}).items() if k in state.services}
    for key, svc in state.services.items():
        if key in kept and svc.cluster_ip and svc.cluster_ip != kept[key]:
            raise ConfigError(f"{svc.source} (Service {key}) spec.clusterIP",
                              f"cannot change a running service's ClusterIP ({kept[key]})", "drop spec.clusterIP")
    out = dict(kept)
    # Services asking for a specific address first, so an automatic one never takes it.
    for key, svc in sorted(state.services.items(), key=lambda kv: not kv[1].cluster_ip):
        if key not in out:
            out[key] = _cluster_ip(svc, set(out.values()))
    return {key: out[key] for key in state.services}


def allocate(state: DesiredState, previous: Allocations | None = None,
             new_uid: Callable[[], str] = lambda: str(uuid.uuid4())) -> Allocations:
    nodes = _nodes(state, previous)
    return Allocations(nodes, _pods(state, nodes, previous, new_uid), _services(state, previous))
