"""CPU time and memory of a process and everything it started, read from /proc.

A mesh component is a process tree: a node agent and the waypoint Envoy it runs (and
any helper process it may start), or one sidecar Envoy. `tree(root)` is the root and
its live descendants (by the ppid in /proc/<pid>/stat); `cpu_seconds` adds utime+stime
of each (all threads of a process are in its own stat line); `rss_bytes` adds VmRSS.
`proc` is a parameter so tests read a directory of their own.
"""

from __future__ import annotations

import os

PROC = "/proc"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def parse_stat(text: str) -> tuple[int, int, int]:
    """(ppid, utime, stime) in clock ticks of one /proc/<pid>/stat line. The command
    name (field 2) may hold spaces and parentheses, so split after its last ')'."""
    rest = text.rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[11]), int(rest[12])


def parse_rss(status: str) -> int:
    """VmRSS of one /proc/<pid>/status, in bytes (0 for a kernel thread or a zombie)."""
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            return int(value) * {"kB": 1024, "mB": 1 << 20}[unit]
    return 0


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None


def parents(proc: str = PROC) -> dict[int, int]:
    """pid -> ppid of every process now."""
    out = {}
    for name in os.listdir(proc):
        if name.isdigit():
            text = _read(os.path.join(proc, name, "stat"))
            if text is not None:
                out[int(name)] = parse_stat(text)[0]
    return out


def tree(root: int, proc: str = PROC) -> list[int]:
    """`root` and its live descendants, root first; [] when root is gone."""
    children: dict[int, list[int]] = {}
    table = parents(proc)
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    if root not in table:
        return []
    found, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        found.append(pid)
        todo.extend(sorted(children.get(pid, ())))
    return found


def cpu_seconds(pids: list[int], proc: str = PROC) -> float:
    """utime+stime of `pids` (a process gone meanwhile counts 0)."""
    ticks = 0
    for pid in pids:
        text = _read(os.path.join(proc, str(pid), "stat"))
        if text is not None:
            _, utime, stime = parse_stat(text)
            ticks += utime + stime
    return ticks / CLOCK_TICKS


def rss_bytes(pid: int, proc: str = PROC) -> int:
    text = _read(os.path.join(proc, str(pid), "status"))
    return parse_rss(text) if text is not None else 0


def cpu_snapshot(roots: list[int], proc: str = PROC) -> dict[int, float]:
    """CPU seconds of every process in the trees of `roots`, by pid: take one before and
    one after a run; `cpu_delta` of the two is what the trees used in between."""
    return {pid: cpu_seconds([pid], proc) for root in roots for pid in tree(root, proc)}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two snapshots; a process started in between counts from 0."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
