"""The lab's network: fabric, node and pod namespaces, veths, addresses, routes.

Nodes hang off a bridge in the fabric netns (`<lab>-fabric`), one veth each; nothing
is added to the machine's own netns. Pod networking is routed, Calico style: a pod has
`eth0` with a /32 and a default route via 169.254.1.1, whose neighbour entry is the
node side of its veth (all such veths share one MAC, so the entry is static and proxy
ARP is only a fallback); the node has a /32 route to each pod and routes other nodes'
pod CIDRs via their fabric addresses. All pod traffic, same-node included, is routed
by the node netns, so conntrack sees both directions of DNATed service traffic.
Namespaces are made with `ip netns add` (pinned under /run/netns); links, addresses
and routes with pyroute2 from this thread entered into the namespace.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Iterator

from pyroute2 import IPRoute

from nodeagent import netns
from nodeagent.errors import LabError
from nodeagent.lab.ipam import FABRIC_CIDR, POD_GATEWAY, SERVICE_CIDR, NodeAlloc, PodAlloc
from nodeagent.lab.layout import Layout, fabric_veth, host_veth

BRIDGE = "br0"
GATEWAY_MAC = "ee:ee:ee:ee:ee:ee"  # node side of every pod veth, as in Calico
NUD_PERMANENT = 0x80
SCOPE_LINK = 253


def create_netns(name: str) -> None:
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"cannot create network namespace {name}: {proc.stderr.strip()}",
                       "a previous lab may be left over: nodeagent lab down --name <lab>")


def delete_netns(name: str) -> str | None:
    """Remove a named netns; returns the error text, None when it went (or was gone)."""
    if not os.path.exists(netns.named_path(name)):
        return None
    proc = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    return proc.stderr.strip() or f"ip netns delete {name} failed"


def list_netns(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(netns.NETNS_RUN_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


@contextlib.contextmanager
def rtnl(name: str) -> Iterator[IPRoute]:
    """An IPRoute whose netlink socket lives in netns `name`."""
    with netns.entered(netns.named_path(name)):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def sysctl(name: str, key: str, value: str) -> None:
    """Write /proc/sys/<key> as seen from netns `name` (net sysctls are per netns)."""
    with netns.entered(netns.named_path(name)):
        with open(os.path.join("/proc/sys", key), "w") as f:
            f.write(value)


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} vanished while the lab was being built")
    return found[0]


def _up(ipr: IPRoute, ifname: str) -> int:
    index = _index(ipr, ifname)
    ipr.link("set", index=index, state="up")
    return index


def build_fabric(layout: Layout, nodes: dict[str, NodeAlloc]) -> None:
    """The fabric netns with its bridge and every node netns linked to it."""
    create_netns(layout.fabric_netns)
    for node in nodes:
        create_netns(layout.node_netns(node))
    with rtnl(layout.fabric_netns) as fab:
        _up(fab, "lo")
        fab.link("add", ifname=BRIDGE, kind="bridge")
        bridge = _up(fab, BRIDGE)
        for node, alloc in nodes.items():
            peer = {"ifname": "eth0", "net_ns_fd": netns.named_path(layout.node_netns(node))}
            fab.link("add", ifname=fabric_veth(alloc.index), kind="veth", peer=peer)
            fab.link("set", index=_index(fab, fabric_veth(alloc.index)), master=bridge, state="up")
    for node, alloc in nodes.items():
        _node(layout.node_netns(node), alloc, [a for n, a in nodes.items() if n != node])


def _node(name: str, alloc: NodeAlloc, others: list[NodeAlloc]) -> None:
    with rtnl(name) as ipr:
        _up(ipr, "lo")
        eth0 = _up(ipr, "eth0")
        ipr.addr("add", index=eth0, address=alloc.fabric_ip, prefixlen=FABRIC_CIDR.prefixlen)
        for other in others:
            ipr.route("add", dst=other.pod_cidr, gateway=other.fabric_ip, oif=eth0)
        # Host-network processes (the agent) need a route to ClusterIPs for connect() to
        # reach the nat output hook; unserved ones are rejected by the service table.
        ipr.route("add", dst=str(SERVICE_CIDR), oif=eth0, scope=SCOPE_LINK)
    sysctl(name, "net/ipv4/ip_forward", "1")


def add_pod(layout: Layout, namespace: str, pod: str, alloc: PodAlloc) -> None:
    """The pod's netns, its veth to the node and the routes both ways."""
    pod_ns, node_ns, veth = layout.pod_netns(namespace, pod), layout.node_netns(alloc.node), host_veth(namespace, pod)
    create_netns(pod_ns)
    with rtnl(node_ns) as ipr:
        ipr.link("add", ifname=veth, kind="veth", address=GATEWAY_MAC,
                 peer={"ifname": "eth0", "net_ns_fd": netns.named_path(pod_ns)})
        index = _up(ipr, veth)
        ipr.route("add", dst=f"{alloc.ip}/32", oif=index, scope=SCOPE_LINK)
    sysctl(node_ns, f"net/ipv4/conf/{veth}/proxy_arp", "1")
    with rtnl(pod_ns) as ipr:
        _up(ipr, "lo")
        eth0 = _up(ipr, "eth0")
        ipr.addr("add", index=eth0, address=alloc.ip, prefixlen=32)
        ipr.neigh("add", dst=POD_GATEWAY, lladdr=GATEWAY_MAC, ifindex=eth0, state=NUD_PERMANENT)
        ipr.route("add", dst=f"{POD_GATEWAY}/32", oif=eth0, scope=SCOPE_LINK)
        ipr.route("add", dst="0.0.0.0/0", gateway=POD_GATEWAY, oif=eth0)
