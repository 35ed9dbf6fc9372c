"""`lab down`: remove everything a lab made, found by name prefix, not only by record.

Order matters: stop the supervisor (by its recorded pid, checked against its command
line) so nothing restarts, then the control plane of a `--kube` lab by its recorded
pids; kill every process in the lab's cgroup tree (`cgroup.kill`, else SIGKILL per pid)
so nothing holds a namespace; delete the service tables and the namespaces (their veths,
addresses and routes go with them); then the hosts files, cgroups, pinned bpf objects
and the state directory. It works after a crash or a half-finished `up`, which is why
`up` also uses it to roll back.
"""

from __future__ import annotations

import os
import shutil
import signal
import time

from nodeagent.errors import LabError, NodeagentError
from nodeagent.lab import cgroups, services, supervisor, topology
from nodeagent.lab.kube import controlplane, kubelet
from nodeagent.lab.layout import Layout
from nodeagent.lab.state import StateDir

SUPERVISOR_GRACE = 5.0  # it stops its children (agents unpin) before exiting


def stop_supervisor(pid: int, name: str) -> bool:
    """SIGTERM lab `name`'s supervisor, SIGKILL it if it lingers; True if it was running."""
    if not supervisor.is_supervisor(pid, name):
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + SUPERVISOR_GRACE
    while supervisor.is_supervisor(pid, name):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)
    return True


def _recorded_pid(state: StateDir) -> int:
    try:
        return state.load().supervisor_pid
    except NodeagentError:
        return 0  # no or damaged lab.json: the cgroup kill below still gets it


def _remove_netns(layout: Layout, left: list[str]) -> int:
    names = topology.list_netns(layout.netns_prefix)
    for name in names:
        if name.startswith(f"{layout.name}-n-"):
            services.remove(name)
    for name in names:
        error = topology.delete_netns(name)
        if error:
            left.append(f"netns {name}: {error}")
    return len(names)


def _remove_paths(paths: list[str], left: list[str]) -> int:
    """rm -r each path (a stray file where a directory belongs included)."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=lambda _f, p, exc: left.append(f"{p}: {exc[1]}"))
        else:
            try:
                os.unlink(path)
            except OSError as exc:
                left.append(f"{path}: {exc.strerror}")
    return len(paths)


def _hosts_dirs(layout: Layout) -> list[str]:
    try:
        return sorted(os.path.join(layout.etc_netns, n) for n in os.listdir(layout.etc_netns)
                      if n.startswith(layout.netns_prefix))
    except FileNotFoundError:
        return []


def down(layout: Layout) -> list[str]:
    """Remove lab `layout.name`; returns what was removed (empty: there was no such lab)."""
    state, done, left = StateDir(layout), [], []
    if stop_supervisor(_recorded_pid(state), layout.name):
        done.append("supervisor")
    # The supervisor stops the control plane with its children; a supervisor that died
    # left it running: stop it by its recorded pids, so etcd and the apiserver end cleanly.
    if controlplane.stop(layout, [c.get("pid") or 0 for c in state.load_runtime().controlplane.values()]):
        done.append("control plane")
    if state.exists():
        with state.lock():
            _remove_kernel_side(layout, done, left)
            _remove_paths([layout.state_dir], left)
            done.append("state")
    else:
        _remove_kernel_side(layout, done, left)
    for path in kubelet.release_mount_points(layout):  # mount points and hostPaths its pods needed
        left.append(f"{path}: could not be removed")
    if left:
        raise LabError(f"lab {layout.name} was not removed completely: " + "; ".join(left),
                       "a process outside the lab may hold one of these; run lab down again once it is gone")
    return done


def _remove_kernel_side(layout: Layout, done: list[str], left: list[str]) -> None:
    if os.path.isdir(layout.lab_cgroup):
        count = len(cgroups.procs(layout.lab_cgroup))
        if not cgroups.kill_tree(layout.lab_cgroup):
            left.append(f"processes still in {layout.lab_cgroup}: {cgroups.procs(layout.lab_cgroup)}")
        if count:
            done.append(f"{count} leftover processes")
    count = _remove_netns(layout, left)
    if count:
        done.append(f"{count} network namespaces")
    count = _remove_paths(_hosts_dirs(layout), left)
    if count:
        done.append(f"{count} hosts files")
    if os.path.isdir(layout.lab_cgroup):
        left.extend(cgroups.remove_tree(layout.lab_cgroup))
        done.append("cgroups")
    if os.path.isdir(layout.bpffs_dir):
        _remove_paths([layout.bpffs_dir], left)
        done.append("pinned bpf objects")
