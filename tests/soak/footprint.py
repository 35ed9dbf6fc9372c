"""What an agent holds, as the soak measures it: resident memory (VmRSS in
/proc/PID/status) and open descriptors (entries of /proc/PID/fd), and whether it is
quiet — nothing relayed, delivered or tunnelled but the pools' idle connections, by its
own admin status — so samples taken then compare like with like.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nodeagent.admin import fetch_status
from nodeagent.errors import NodeagentError


FD_SLACK = 2  # descriptors an agent may hold beyond its baseline at a quiet moment (soak.py Caveats)


@dataclass(frozen=True)
class Sample:
    pid: int
    rss_kib: int
    fds: int

    @property
    def rss_mib(self) -> float:
        return self.rss_kib / 1024


def sample(pid: int) -> Sample:
    """RSS and descriptors of `pid` now; OSError if it is gone."""
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return Sample(pid, rss, len(os.listdir(f"/proc/{pid}/fd")))


def connections(socket_path: str) -> dict[str, int] | str:
    """The agent's connections now, by its admin status — relayed inbound and outbound,
    tunnelled inbound, delivered to pods, and `pooled` (HBONE client connections its pool
    keeps, idle ones included) — or why it cannot say."""
    try:
        status = fetch_status(socket_path, timeout=5.0)
    except (NodeagentError, OSError, ValueError) as exc:
        return f"admin socket: {exc}"
    counters, tunnel = status.get("counters", {}), status.get("tunnel") or {}
    return {"relayed inbound": int(counters.get("active_connections{direction=inbound}", 0)),
            "relayed outbound": int(counters.get("active_connections{direction=outbound}", 0)),
            "tunnel inbound": int(tunnel.get("inbound_connections", 0)),
            "delivered": int(status.get("delivered_connections", 0)),
            "pooled": int(tunnel.get("pooled_connections", 0))}


def in_flight(found: dict[str, int] | str, pooled_anywhere: int) -> dict[str, int] | str:
    """What of `connections` is still in flight: {} when the agent is quiet. Pools keep
    idle HBONE connections, and each is a tunnel inbound connection at its destination, so
    up to `pooled_anywhere` (all agents' pools) tunnel inbound connections are idle ones."""
    if isinstance(found, str):
        return found
    busy = {name: n for name, n in found.items() if n and name not in ("pooled", "tunnel inbound")}
    if found["tunnel inbound"] > pooled_anywhere:
        busy["tunnel inbound"] = found["tunnel inbound"]
    return busy


@dataclass(frozen=True)
class Snapshot:
    """Every agent at one moment: node -> Sample (None: the process is gone), node ->
    pooled HBONE connections (None: its admin socket did not say)."""

    samples: dict[str, Sample | None]
    pools: dict[str, int | None]


def fd_limits(base: Snapshot, now_pools: dict[str, int | None]) -> dict[str, int]:
    """node -> most descriptors its agent may hold when quiet: the baseline, plus one per
    connection its HBONE pool grew by since, plus FD_SLACK."""
    return {node: s.fds + max(0, (now_pools.get(node) or 0) - (base.pools.get(node) or 0)) + FD_SLACK
            for node, s in base.samples.items() if s is not None}
