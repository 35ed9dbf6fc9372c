"""cgroup v2 directories of a lab: find the root, make, join, kill, remove.

The lab puts every process it starts in a cgroup below `<cg2>/nodeagent-<lab>/` (pods
as kubelet names them, agents in `<node>/system/`, the supervisor in `supervisor/`), so
`lab down` can find and kill them all through the cgroup tree, even after a crash that
lost the recorded pids. No controllers are enabled, so processes may sit in inner
cgroups. The first `cgroup2` mount is the root (hybrid machines mount it at
`/sys/fs/cgroup/unified`).
"""

from __future__ import annotations

import errno
import os
import signal
import time

from nodeagent.errors import EnvironmentProblem


def cgroup2_root(mounts: str = "/proc/self/mounts") -> str:
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return fields[1]
    raise EnvironmentProblem("no cgroup v2 hierarchy is mounted",
                             "run scripts/setup (it mounts cgroup2), or mount -t cgroup2 none /sys/fs/cgroup/unified")


def make(path: str) -> None:
    os.makedirs(path, exist_ok=True)


def join(path: str, pid: int = 0) -> None:
    """Move `pid` (0: the calling process) into cgroup `path`."""
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(pid))


def _tree(path: str) -> list[str]:
    """`path` and every cgroup below it, deepest first."""
    return [root for root, _dirs, _files in os.walk(path, topdown=False)]


def procs(path: str) -> list[int]:
    """Pids in `path` and below."""
    out = []
    for cg in _tree(path):
        try:
            with open(os.path.join(cg, "cgroup.procs")) as f:
                out.extend(int(line) for line in f if line.strip())
        except FileNotFoundError:
            continue
    return out


def populated(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return any(line.split() == ["populated", "1"] for line in f)
    except FileNotFoundError:
        return False


def kill_tree(path: str, timeout: float = 5.0) -> bool:
    """SIGKILL every process in `path` and below; True when the tree is empty after."""
    if not os.path.isdir(path):
        return True
    kill_file = os.path.join(path, "cgroup.kill")
    deadline = time.monotonic() + timeout
    while populated(path) and time.monotonic() < deadline:
        if os.path.exists(kill_file):  # Linux >= 5.14 kills the whole tree, forks included
            with open(kill_file, "w") as f:
                f.write("1")
        else:
            for pid in procs(path):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.05)
    return not populated(path)


def remove_tree(path: str) -> list[str]:
    """rmdir `path` and everything below, deepest first; returns what could not go."""
    left = []
    for cg in _tree(path) if os.path.isdir(path) else []:
        try:
            os.rmdir(cg)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                left.append(f"{cg}: {exc.strerror}")
    return left
