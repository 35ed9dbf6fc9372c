"""The agent's memory limit: past it, no new connections (overload).

Once through TLS an inbound HBONE connection costs ~80 KiB until it closes (OpenSSL's
connection and the peer's certificates, nghttp2's session), and while it has streams
~80 KiB more of output buffers; the stream budgets (tunnel/budget.py) bound what the
streams' bytes hold, the accept budget (tunnel/limits.py) how many connections are
open, but 12288 connections of a peer with one stolen certificate (many pod IPs of a
node it owns) are ~1 GB: past the DaemonSet's 512 MiB the kernel kills the agent, and
with it every meshed connection of the node. Each relayed connection costs too: ~25 KiB
at the source agent and ~31 KiB at the destination's (measured with 10,000 idle
connections from one pod across nodes), so one pod holding ~15,000 connections took
both agents past 512 MiB. So, as Envoy's overload manager stops accepting connections
and requests at a heap threshold, `MemoryGuard` reads what the agent's container holds
and, while it is at OVERLOAD of the limit, the agent refuses what is new: inbound HBONE
connections (reset at accept, TLS never started:
`nodeagent_hbone_limit_hits_total{limit="memory_limit"}`), streams on the connections
already open (answered 503), captured outbound and plaintext inbound connections (reset:
`nodeagent_connection_failures_total{reason="memory_limit"}`), and takes them again
under RECOVER (hysteresis: no flapping at the edge). Open connections go on: the agent
keeps serving what it already serves instead of being killed with it.

What is read is the resident memory of the agent and every process under it (its
waypoint Envoy runs in the same container, under the same limit; the compile process
for the 1 s it lives): /proc/<pid>/statm of each, the children from
/proc/<pid>/task/<tid>/children. A reading is kept for INTERVAL, so a flood of accepts
costs one reading per INTERVAL, and an agent nobody connects to reads nothing. The
limit is the setting `memory_limit_mib` (the DaemonSet passes its container's limit
through the downward API); without one the guard is off and status says so.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

from nodeagent.throttle import LOG_INTERVAL, Throttle

MIB = 1 << 20
OVERLOAD = 0.90  # of the limit: from here new connections and streams are refused...
RECOVER = 0.85  # ...until the agent holds less than this again
INTERVAL = 0.05  # seconds a reading is used for
PAGE = os.sysconf("SC_PAGE_SIZE")
PROC = "/proc"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:  # the process or thread ended meanwhile
        return None


def tree_resident(root: int | None = None, proc: str = PROC) -> int:
    """Resident bytes of `root` (this process by default) and all its descendants."""
    total, todo, seen = 0, [os.getpid() if root is None else root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        statm = _read(f"{proc}/{pid}/statm")
        if statm is None:
            continue
        total += int(statm.split()[1]) * PAGE
        try:
            tids = os.listdir(f"{proc}/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            children = _read(f"{proc}/{pid}/task/{tid}/children")
            if children:
                todo.extend(int(c) for c in children.split())
    return total


class MemoryGuard:
    """Whether the agent is over its memory limit's OVERLOAD mark (see the module)."""

    def __init__(self, limit_mib: int | None, log: logging.Logger, *,
                 read: Callable[[], int] = tree_resident, clock: Callable[[], float] = time.monotonic):
        self.limit = limit_mib * MIB if limit_mib else None
        self.log = log
        self.read, self.clock = read, clock
        self.usage: int | None = None  # bytes at the last reading
        self.peak = 0
        self._read_at: float | None = None
        self.over = False
        self.episodes = 0  # times it went over OVERLOAD
        self._refusals = Throttle(LOG_INTERVAL, clock)  # log lines of `refused`

    def overloaded(self) -> bool:
        """At or over OVERLOAD of the limit (until under RECOVER again); False without a limit."""
        if self.limit is None:
            return False
        self._sample()
        return self.over

    def _sample(self) -> None:
        now = self.clock()
        if self._read_at is not None and now - self._read_at < INTERVAL:
            return
        self._read_at = now
        self.usage = usage = self.read()
        self.peak = max(self.peak, usage)
        if self.limit is None:
            return
        share = usage / self.limit
        if not self.over and share >= OVERLOAD:
            self.over = True
            self.episodes += 1
            self.log.warning("memory: the agent and its waypoint hold %d MiB, %.0f %% of the limit (%d MiB): new "
                             "connections and streams are refused until they hold less than %.0f %%; open connections "
                             "go on", usage // MIB, share * 100, self.limit // MIB, RECOVER * 100)
        elif self.over and share < RECOVER:
            self.over = False
            self.log.warning("memory: back to %d MiB, %.0f %% of the limit (%d MiB): new connections are "
                             "accepted again", usage // MIB, share * 100, self.limit // MIB)

    def refuse(self) -> bool:
        """Whether to refuse a new connection or stream now (overloaded); a refusal is
        logged at once, then at most every LOG_INTERVAL with how many there were (the
        caller counts it in its own metric)."""
        if not self.overloaded():
            return False
        refused = self._refusals.due()
        if refused:
            self.log.warning("memory: %d new connection(s) or stream(s) refused since the last report: the agent "
                             "holds %d MiB of its %d MiB limit (memory_limit_mib). Reported at most every %g s",
                             refused, (self.usage or 0) // MIB, self.limit // MIB, self._refusals.interval)
        return True

    def describe(self) -> dict:
        self._sample()  # a fresh reading (at most one per INTERVAL)
        return {"limit_bytes": self.limit, "usage_bytes": self.usage, "peak_bytes": self.peak,
                "overloaded": self.over, "overload_episodes": self.episodes,
                "overload_at": OVERLOAD, "recover_at": RECOVER}
