"""A lab node's own view of the machine's paths (hostPath volumes of API pods, `--kube`).

A lab node is a machine whose cgroup v2 root is `Layout.node_cgroup(node)` and whose
bpffs is `Layout.node_bpffs(node)`: the subtrees the lab made for it. So a hostPath at or
below `/sys/fs/cgroup` (or the machine's cgroup2 mount, `/sys/fs/cgroup/unified` on a
hybrid machine: a lab node is a cgroup v2 node) is that path in the node's cgroup
directory, and one at or below `/sys/fs/bpf` is that path in the node's bpffs
directory; every other path is the machine's own. A DaemonSet's `--cgroup=/sys/fs/cgroup`
thus attaches at its node's cgroup, never at the machine's root, and its pins under
`/sys/fs/bpf` land in the node's bpffs directory, which `lab down` removes. Pure.
"""

from __future__ import annotations

import os

from nodeagent.lab.layout import Layout

CGROUP = "/sys/fs/cgroup"  # where a node has its cgroup2 root (kubelet's default, cgroup v2)
BPFFS = "/sys/fs/bpf"


def _under(path: str, root: str) -> str | None:
    """`path` relative to `root` ("" for root itself), None when it is not below it."""
    if path == root:
        return ""
    if path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1:]
    return None


def host_path(layout: Layout, node: str, path: str) -> str:
    """What the machine path `path` is on node `node` (see the module docstring)."""
    path = os.path.normpath(path)
    views = ((layout.node_cgroup(node), (layout.cgroup_root, CGROUP)),
             (layout.node_bpffs(node), (layout.bpffs_root, BPFFS)))
    for node_root, roots in views:
        for root in sorted({r for r in roots if r}, key=len, reverse=True):  # the longest root first
            rest = _under(path, os.path.normpath(root))
            if rest is not None:
                return os.path.join(node_root, rest) if rest else node_root
    return path

