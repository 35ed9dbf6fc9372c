"""The agent's memory limit: past it, no new connections (overload).

Once through TLS an inbound HBONE connection costs ~80 KiB until it closes (OpenSSL's
connection and the peer's certificates, nghttp2's session), and while it has streams
~80 KiB more of output buffers; the stream budgets (tunnel/budget.py) bound what the
streams' bytes hold, the accept budget (tunnel/limits.py) how many connections are
open, but 12288 connections of a peer with one stolen certificate (many pod IPs of a
node it owns) are ~1 GB: past the DaemonSet's 512 MiB the kernel kills the agent, and
with it every meshed connection of the node. Each relayed connection costs too: ~10 KiB
at the source agent and ~13 KiB at the destination's once idle (measured with 5,000
idle connections from one pod across nodes; 25 and 31 KiB before idle streams gave
their buffers back), so one pod holding ~30,000 connections takes both agents past
512 MiB. So, as Envoy's overload manager stops accepting connections
and requests at a heap threshold, `MemoryGuard` reads what the agent's container holds
and, while it is at OVERLOAD of the limit, the agent refuses what is new: inbound HBONE
connections (reset at accept, TLS never started:
`nodeagent_hbone_limit_hits_total{limit="memory_limit"}`), streams on the connections
already open (answered 503), captured outbound and plaintext inbound connections (reset:
`nodeagent_connection_failures_total{reason="memory_limit"}`), and takes them again
under RECOVER (hysteresis: no flapping at the edge). Open connections go on: the agent
keeps serving what it already serves instead of being killed with it.

What is already open can still grow past the limit: a peer that stops reading makes
the kernel queue what the agent sends it, up to 4 MiB on a socket that crosses the
network, and 512 HBONE connections of one source IP each doing so hold 2 GiB. So at FULL
the guard sheds (`watch`, every SHED_INTERVAL; `shed`): it resets the agent's TCP sockets
holding the most kernel memory, SHED_FLOOR or more each, until what they held brings the
agent under OVERLOAD, or covers what the socket buffers hold if that is less
(sockdiag.py: sock_diag's memory counts in every netns the agent's sockets live in, the
pods' included, and SOCK_DESTROY), as Envoy's overload manager
resets the streams using the most memory; each is logged (throttled) and counted in
`describe()`. A kernel without SOCK_DESTROY (or a process without
CAP_NET_ADMIN) turns shedding off with one warning; status shows it.

Refusing everything would let one pod that fills the agent shut every other pod of the
node out of new connections. So between OVERLOAD and FULL only the work of local pods
over their share is refused: `Holdings` counts the connections the agent relays for
each local pod (outbound: its app's; inbound: to it), and a pod holding more than the
mean of the pods holding any (and at least FAIR_FLOOR) is over its share, as Envoy's
overload manager resets the streams using the most memory first. At FULL everything new
is refused, whichever pod it is for.

What is read is the resident memory of the agent and every process under it (its
waypoint Envoy runs in the same container, under the same limit; the compile process
for the 1 s it lives): /proc/<pid>/statm of each, the children from
/proc/<pid>/task/<tid>/children; and the socket buffers the kernel charges to the
agent's memory cgroup (`socket_charge`), which no process's RSS shows: bytes a slow or
stalled app has not read wait in the agent's send queues (20 connections to an app that
never reads held 70.7 MiB in the destination agent's delivery sockets while autotuning
grew them to 4 MiB each; those toward a pod's app now hold at most 512 KiB: inpod's
LOCAL_BUFFER), and under cgroup v2 they count against the container's limit like any
other memory; and what the relays hold in pipes (the native engine splices each
direction through a pipe of up to 256 KiB, whose pages are the kernel's: a same-node
connection to an app that stopped reading keeps its pipe full). A reading is kept for
INTERVAL, so a flood of accepts
costs one reading per INTERVAL, and an agent nobody connects to reads nothing. The
limit is the setting `memory_limit_mib` (the DaemonSet passes its container's limit
through the downward API); without one the guard is off and status says so.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from nodeagent import sockdiag
from nodeagent.throttle import LOG_INTERVAL, Throttle

MIB = 1 << 20
OVERLOAD = 0.90  # of the limit: from here new connections and streams of pods over their share are refused...
RECOVER = 0.85  # ...until the agent holds less than this again
FULL = 0.95  # and from here everything new is, whichever pod it is for
FAIR_FLOOR = 64  # a pod holding fewer connections than this is never over its share
INTERVAL = 0.05  # seconds a reading is used for
SHED_INTERVAL = 1.0  # seconds between two checks of whether to shed (`watch`)
SHED_FLOOR = 256 << 10  # bytes a socket must hold in the kernel to be reset to free memory
TRIM_INTERVAL = 10.0  # seconds between two returns of freed heap memory (Trimmer)
PAGE = os.sysconf("SC_PAGE_SIZE")
DISCOVER = object()  # MemoryGuard(sockets=...): find this process's memory cgroup (socket_charge)
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


def _mounts(proc: str) -> list[tuple[str, str, str, str]]:
    """(root, mount point, fs type, super options) of each mount of this process."""
    out = []
    for line in (_read(f"{proc}/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and len(tail) >= 3:
            out.append((fields[3], fields[4], tail[0], tail[2]))
    return out


def _under(mount_root: str, point: str, path: str) -> str | None:
    """`path` (a cgroup path of /proc/self/cgroup) inside the mount of `mount_root` at `point`."""
    if path != mount_root and not path.startswith(mount_root.rstrip("/") + "/"):
        return None
    rel = os.path.relpath(path, mount_root)
    return point if rel == "." else os.path.join(point, rel)


def _holding(point: str, pid: int, most: int = 20000) -> str | None:
    """The cgroup under `point` whose cgroup.procs lists `pid`, found by walking the
    hierarchy (at most `most` directories): in its own cgroup namespace the agent sees
    its cgroup as "/", and the host's hierarchy (the DaemonSet mounts it) as mounted
    from above that root, so its path there is not known otherwise."""
    todo, seen = [point], 0
    while todo and seen < most:
        here = todo.pop()
        seen += 1
        procs = _read(os.path.join(here, "cgroup.procs"))
        if procs is not None and str(pid) in procs.split():
            return here
        try:
            todo.extend(e.path for e in os.scandir(here) if e.is_dir(follow_symlinks=False))
        except OSError:
            pass
    return None


def socket_charge(proc: str = PROC, pid: int | None = None) -> tuple[str, Callable[[], int | None]] | None:
    """What the kernel charges this process's memory cgroup for socket buffers, which
    resident memory does not show: (where it is read, a reader of bytes), or None when
    this process has no memory cgroup to read. cgroup v2: `sock` of memory.stat (always
    charged); cgroup v1: memory.kmem.tcp.usage_in_bytes (charged only once the cgroup's
    TCP accounting is on; else 0, and the limit does not count them either). `pid`: whose
    cgroup to look for when the mount does not show the path (this process's)."""
    groups = {}
    for line in (_read(f"{proc}/self/cgroup") or "").splitlines():
        _, controllers, path = line.split(":", 2)
        for c in (controllers.split(",") if controllers else ["unified"]):
            groups[c] = path
    mounts = _mounts(proc)
    for root, point, kind, options in mounts:
        if kind == "cgroup2" and "unified" in groups:
            where = _under(root, point, groups["unified"]) or _holding(point, pid or os.getpid())
            stat = os.path.join(where, "memory.stat") if where else None
            if stat and _read(stat) is not None:
                return f"{stat} (sock)", lambda: _stat_field(stat, "sock")
    for root, point, kind, options in mounts:
        if kind == "cgroup" and "memory" in options.split(",") and "memory" in groups:
            where = _under(root, point, groups["memory"])
            tcp = os.path.join(where, "memory.kmem.tcp.usage_in_bytes") if where else None
            if tcp and _read(tcp) is not None:
                return tcp, lambda: _int(_read(tcp))
    return None


def _stat_field(path: str, name: str) -> int | None:
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return _int(value)
    return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


class Holdings:
    """The connections the agent relays now, per local pod IP, and the most one pod may
    hold at once (`cap`, the setting max_connections_per_pod; None: no cap)."""

    def __init__(self, cap: int | None = None, log: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._by: dict[str, int] = {}  # no entry at 0
        self.total = 0
        self.cap, self.log = cap, log
        self._capped = Throttle(LOG_INTERVAL, clock)  # log lines of `capped`

    @contextmanager
    def held(self, ip: str) -> Iterator[None]:
        """One connection of the pod at `ip`, for the `with` block."""
        self.take(ip)
        try:
            yield
        finally:
            self.give(ip)

    def take(self, ip: str) -> None:
        """One more connection of the pod at `ip` (until `give`)."""
        self._by[ip] = self._by.get(ip, 0) + 1
        self.total += 1

    def give(self, ip: str) -> None:
        left = self._by.pop(ip) - 1
        if left:
            self._by[ip] = left
        self.total -= 1

    def of(self, ip: str) -> int:
        return self._by.get(ip, 0)

    def most(self, n: int) -> list[tuple[str, int]]:
        """The `n` pod IPs holding the most, with what they hold, most first."""
        return sorted(self._by.items(), key=lambda item: (-item[1], item[0]))[:n]

    def room(self, ip: str) -> int | None:
        """How many more connections the pod at `ip` may hold (None: no cap)."""
        return None if self.cap is None else max(0, self.cap - self._by.get(ip, 0))

    def capped(self, ip: str, pod: object) -> bool:
        """Whether the pod at `ip` holds `cap` connections, so a new one is refused; the
        refusals are logged at once, then at most every LOG_INTERVAL with how many there
        were (the caller counts each in its own metric)."""
        if self.cap is None or self._by.get(ip, 0) < self.cap:
            return False
        refused = self._capped.due()
        if refused and self.log is not None:
            self.log.warning("%d new connection(s) or stream(s) refused since the last report: %s holds %d "
                             "connections, the most one pod may (max_connections_per_pod). Reported at most "
                             "every %g s", refused, pod, self._by[ip], self._capped.interval)
        return True

    def over_share(self, ip: str) -> bool:
        """More than the mean of the pods holding any, and at least FAIR_FLOOR."""
        mine = self._by.get(ip, 0)
        return mine >= FAIR_FLOOR and mine * len(self._by) > self.total


class MemoryGuard:
    """Whether the agent is over its memory limit's OVERLOAD mark (see the module)."""

    def __init__(self, limit_mib: int | None, log: logging.Logger, *, per_pod: int | None = None,
                 read: Callable[[], int] = tree_resident, sockets: object = DISCOVER,
                 clock: Callable[[], float] = time.monotonic,
                 holders: Callable[[], list[sockdiag.Holder]] | None = None,
                 destroy: Callable[[sockdiag.Holder], int] = sockdiag.destroy,
                 pipes: Callable[[], int] | None = None):
        """`sockets`: socket_charge()'s (where, reader), None for none; by default found.
        `holders`, `destroy`: the TCP sockets to shed, most memory first, and how to
        reset one (sockdiag's for this process, by default). `pipes`: bytes the relays hold
        in pipes (the native engine's splice), which are kernel pages neither resident
        memory nor the socket charge shows (the DataPath passes its relay engine's count, 0
        until that engine runs)."""
        self.holdings = Holdings(per_pod, log, clock)
        self.limit = limit_mib * MIB if limit_mib else None
        self.log = log
        self.read, self.clock = read, clock
        self.sockets = socket_charge() if sockets is DISCOVER else sockets
        self.usage: int | None = None  # bytes at the last reading: resident and socket buffers
        self.socket_usage: int | None = None  # ... of which socket buffers (None: not read)
        self.pipes = pipes
        self.pipe_usage = 0  # ... and of which relay pipes
        self.peak = 0
        self._read_at: float | None = None
        self.over = False
        self.episodes = 0  # times it went over OVERLOAD
        # called when a reading finds the agent newly over OVERLOAD, or newly at FULL: what
        # was decided for new work without asking the guard stops (agent/proxy/routes.py)
        self.tightening: list[Callable[[], None]] = []
        self._full = False
        self._refusals = Throttle(LOG_INTERVAL, clock)  # log lines of `refused`
        self.holders = holders or sockdiag.holders
        self.destroy = destroy
        self.shed_sockets = 0  # sockets reset to free memory
        self.shed_bytes = 0  # ... and the kernel memory they held then
        self.shedding: str | None = "on"  # "on", or why not
        self._sheds = Throttle(LOG_INTERVAL, clock)  # log lines of `shed`

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
        self.socket_usage = self.sockets[1]() if self.sockets else None
        self.pipe_usage = self.pipes() if self.pipes else 0
        self.usage = usage = self.read() + (self.socket_usage or 0) + self.pipe_usage
        self.peak = max(self.peak, usage)
        if self.limit is None:
            return
        share = usage / self.limit
        tighter = (share >= OVERLOAD and not self.over) or (share >= FULL and not self._full)
        self._full = share >= FULL
        if not self.over and share >= OVERLOAD:
            self.over = True
            self.episodes += 1
            self.log.warning("memory: the agent and its waypoint hold %s, %.0f %% of the limit (%d MiB): new "
                             "connections and streams of pods over their share (from %.0f %%: of every pod) are "
                             "refused until they hold less than %.0f %%; open connections go on", self._held(),
                             share * 100, self.limit // MIB, FULL * 100, RECOVER * 100)
        elif self.over and share < RECOVER:
            self.over = False
            self.log.warning("memory: back to %d MiB, %.0f %% of the limit (%d MiB): new connections are "
                             "accepted again", usage // MIB, share * 100, self.limit // MIB)
        if tighter:
            for tightening in self.tightening:
                tightening()

    def _held(self) -> str:
        if self.socket_usage is None:
            return f"{self.usage // MIB} MiB"
        return f"{self.usage // MIB} MiB ({self.socket_usage // MIB} MiB of it socket buffers)"

    def refuses(self, ip: str | None) -> bool:
        """Whether new work for the local pod at `ip` (None: not known) is refused now:
        overloaded and the pod over its share, or (also for None) at FULL."""
        if not self.overloaded():
            return False
        if ip is None or self.usage >= FULL * self.limit:
            return True
        return self.holdings.over_share(ip)

    def refuse(self, ip: str, pod: object) -> bool:
        """`refuses`, with a refusal logged at once, then at most every LOG_INTERVAL with
        how many there were (the caller counts it in its own metric)."""
        if not self.refuses(ip):
            return False
        refused = self._refusals.due()
        if refused:
            self.log.warning("memory: %d new connection(s) or stream(s) refused since the last report: the agent "
                             "holds %d MiB of its %d MiB limit (memory_limit_mib); the last for %s, which holds %d of "
                             "the %d connections the agent relays. Reported at most every %g s", refused,
                             (self.usage or 0) // MIB, self.limit // MIB, pod, self.holdings.of(ip),
                             self.holdings.total, self._refusals.interval)
        return True

    def refusal(self, ip: str, pod: object) -> str | None:
        """Why new work for the local pod at `ip` is refused now, logged by the check
        that says so: "pod_connection_limit" (it holds its cap), "memory_limit" (`refuse`),
        or None."""
        if self.holdings.capped(ip, pod):
            return "pod_connection_limit"
        return "memory_limit" if self.refuse(ip, pod) else None

    def shed(self) -> list[sockdiag.Holder]:
        """At FULL of the limit (a fresh reading): reset the TCP sockets holding the most
        kernel memory, SHED_FLOOR or more each, until what they held covers `_excess`;
        the sockets reset. Blocking (a sock_diag dump): run it off the loop."""
        excess = self._excess()
        return self._reset(excess) if excess else []

    def _excess(self) -> int:
        """Bytes over OVERLOAD when a fresh reading is at FULL or more, else 0; at most
        what the socket buffers hold when that is read (resetting sockets cannot free the
        resident part, and would only cost honest connections)."""
        if self.limit is None or self.shedding != "on":
            return 0
        self._read_at = None
        self._sample()
        if self.usage < FULL * self.limit:
            return 0
        excess = self.usage - int(OVERLOAD * self.limit)
        return excess if self.socket_usage is None else min(excess, self.socket_usage)

    def _reset(self, excess: int) -> list[sockdiag.Holder]:
        reset: list[sockdiag.Holder] = []
        for holder in self.holders():
            if excess <= 0 or holder.bytes < SHED_FLOOR:
                break
            failed = self.destroy(holder)
            if failed in (errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.EPROTONOSUPPORT, errno.EINVAL):
                self.shedding = f"off: the kernel refused SOCK_DESTROY ({os.strerror(failed)})"
                self.log.warning("memory: cannot reset the sockets holding the most memory: %s (a kernel "
                                 "without CONFIG_INET_DIAG_DESTROY, or no CAP_NET_ADMIN); open connections "
                                 "can take the agent past its limit", os.strerror(failed))
                break
            if failed:
                continue  # closed meanwhile
            reset.append(holder)
            excess -= holder.bytes
        if reset:
            self.shed_sockets += len(reset)
            self.shed_bytes += sum(h.bytes for h in reset)
            if self._sheds.due():
                self.log.warning("memory: the agent held %s of its %d MiB limit: reset %d connection(s) holding "
                                 "the most socket memory (%d KiB, the largest %d KiB to %s); %d reset so far. "
                                 "Reported at most every %g s", self._held(), self.limit // MIB, len(reset),
                                 sum(h.bytes for h in reset) >> 10, reset[0].bytes >> 10, reset[0].peer,
                                 self.shed_sockets, self._sheds.interval)
            self._read_at = None  # what they held is freed: read again
        return reset

    async def watch(self, interval: float = SHED_INTERVAL) -> None:
        """`shed` every `interval` seconds until cancelled (the reading on the loop, the
        sockets' dump and resets in a thread); nothing without a limit."""
        while self.limit is not None and self.shedding == "on":
            await asyncio.sleep(interval)
            excess = self._excess()  # read on the loop, which reads for the accept path too
            if not excess:
                continue
            try:
                await asyncio.to_thread(self._reset, excess)
            except OSError as exc:  # sock_diag itself failed: say so and keep the agent going
                self.shedding = f"off: {exc.strerror or exc}"
                self.log.warning("memory: cannot read the sockets' memory (sock_diag): %s; shedding is off",
                                 exc.strerror or exc)

    def describe(self) -> dict:
        self._sample()  # a fresh reading (at most one per INTERVAL)
        return {"limit_bytes": self.limit, "usage_bytes": self.usage, "peak_bytes": self.peak,
                "socket_bytes": self.socket_usage, "socket_source": self.sockets[0] if self.sockets else None,
                "pipe_bytes": self.pipe_usage,
                "overloaded": self.over, "overload_episodes": self.episodes,
                "overload_at": OVERLOAD, "recover_at": RECOVER, "full_at": FULL,
                "connections_held": self.holdings.total, "per_pod_cap": self.holdings.cap,
                "shedding": self.shedding if self.limit else None, "shed_sockets": self.shed_sockets,
                "shed_bytes": self.shed_bytes}


class Trimmer:
    """Gives the heap memory the agent freed back to the system. glibc returns only the
    top of a heap by itself: what a burst allocated and freed in between (a handshake
    flood: OpenSSL's objects of every pending handshake; streams and their tasks) stayed
    resident at its peak for good. In the 30-minute soak the attacked node's agent went
    66 → 77 MiB in the first minute of the attacks and stayed at ~79 until the end,
    after the attacks and the drain, flat all along: a high-water mark, not a leak, and
    more than the soak's 10 %. `trim()` is malloc_trim(0), which madvises the free pages
    of every arena away (~1-4 µs when there is nothing to give back); `run` does it every
    TRIM_INTERVAL. Without glibc it does nothing (`available` False)."""

    def __init__(self):
        name = ctypes.util.find_library("c")
        try:
            self._trim = ctypes.CDLL(name).malloc_trim if name else None
        except (OSError, AttributeError):
            self._trim = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def trim(self) -> bool:
        """Return freed heap pages now; True when glibc says some were."""
        if self._trim is None:
            return False
        return bool(self._trim(0))

    async def run(self, interval: float = TRIM_INTERVAL) -> None:
        """Trim every `interval` seconds until cancelled."""
        while self._trim is not None:
            await asyncio.sleep(interval)
            self.trim()
