"""Name resolution in the lab: one hosts file per pod instead of a DNS server.

`ip netns exec <pod-netns>` bind-mounts `/etc/netns/<pod-netns>/hosts` over
`/etc/hosts`, so every process of a pod reads its own file. It names the services of
the pod's own namespace by short name, every service as `name.ns`, `name.ns.svc` and
`name.ns.svc.cluster.local`, and every pod as `pod.ns`. Files are rewritten in place
(same inode): a rename would leave running processes looking at the old bind mount.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nodeagent.lab.ipam import Allocations
from nodeagent.lab.layout import Layout
from nodeagent.lab.spec import DesiredState

HEADER = "# nodeagent lab {lab}: {pod}. Rewritten in place when the lab changes.\n"
LOCAL = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
DOMAIN = "svc.cluster.local"


@dataclass(frozen=True)
class Name:
    namespace: str
    name: str
    ip: str


def hosts_text(lab: str, namespace: str, pod: str, services: list[Name], pods: list[Name]) -> str:
    """The hosts file of pod `namespace/pod` (services and pods in a stable order)."""
    lines = [HEADER.format(lab=lab, pod=f"{namespace}/{pod}"), LOCAL]
    for svc in sorted(services, key=lambda s: (s.namespace, s.name)):
        short = [svc.name] if svc.namespace == namespace else []
        names = short + [f"{svc.name}.{svc.namespace}", f"{svc.name}.{svc.namespace}.svc",
                         f"{svc.name}.{svc.namespace}.{DOMAIN}"]
        lines.append(f"{svc.ip}\t{' '.join(names)}\n")
    for p in sorted(pods, key=lambda p: (p.namespace, p.name)):
        lines.append(f"{p.ip}\t{p.name}.{p.namespace}\n")
    return "".join(lines)


def write_in_place(path: str, text: str) -> bool:
    """Replace the content of `path` keeping its inode; True when it changed."""
    data = text.encode()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if os.pread(fd, len(data) + 1, 0) == data:
            return False
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        return True
    finally:
        os.close(fd)


def sync(layout: Layout, state: DesiredState, alloc: Allocations, extra: tuple[Name, ...] = ()) -> None:
    """(Re)write the hosts file of every pod (`extra`: services not in the file)."""
    svcs = [Name(*key.split("/"), ip) for key, ip in alloc.services.items()] + list(extra)
    pods = [Name(*key.split("/"), a.ip) for key, a in alloc.pods.items()]
    for pod in state.pods.values():
        path = layout.hosts_file(layout.pod_netns(pod.namespace, pod.name))
        write_in_place(path, hosts_text(layout.name, pod.namespace, pod.name, svcs, pods))
