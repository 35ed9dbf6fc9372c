"""nodeagent/memory.py: what the agent's process tree holds, the overload mark with its
hysteresis (the accept path's use of it: test_agent_hbone_engines.py), and shedding the
sockets holding the most at FULL (on real sockets: tests/kernel/test_socket_memory.py)."""

from __future__ import annotations

import asyncio
import errno
import logging
import subprocess
import sys
from contextlib import ExitStack

from nodeagent.agent import status
from nodeagent.memory import FAIR_FLOOR, INTERVAL, MIB, Holdings, MemoryGuard, socket_charge, tree_resident

LOG = logging.getLogger("test.memory")
CHILD = """
import sys
held = bytearray(96 << 20)  # written by bytearray, so resident
for i in range(0, len(held), 4096):
    held[i] = 1
print("ready", flush=True)
sys.stdin.read()
"""


def test_the_tree_counts_what_a_child_holds_until_it_exits():
    """A child of this process holding 96 MiB counts in tree_resident(); once it has
    exited it no longer does."""
    before = tree_resident()
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        with_child = tree_resident()
        assert with_child - before >= 96 * MIB
        assert tree_resident(child.pid) >= 96 * MIB
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert tree_resident() - before < 96 * MIB


def test_overloaded_from_90_percent_until_under_85(caplog):
    readings = []
    now = [0.0]
    guard = MemoryGuard(100, LOG, read=lambda: readings.pop(0), sockets=None, clock=lambda: now[0])

    def at(mib: float) -> bool:
        readings.append(int(mib * MIB))
        now[0] += 2 * INTERVAL
        return guard.overloaded()
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert [at(m) for m in (50, 89.9, 90, 95, 86, 85.1, 84.9, 89, 91)] == \
            [False, False, True, True, True, True, False, False, True]
    assert guard.episodes == 2 and guard.peak == 95 * MIB
    assert [r.getMessage().split(":")[1].split(",")[0].strip() for r in caplog.records] == [
        "the agent and its waypoint hold 90 MiB", "back to 84 MiB", "the agent and its waypoint hold 91 MiB"]


def test_a_reading_serves_for_its_interval():
    """Accepts within INTERVAL of a reading use it (one /proc walk per INTERVAL under a
    flood); the next one reads again."""
    count = [0]
    now = [10.0]

    def read() -> int:
        count[0] += 1
        return 95 * MIB
    guard = MemoryGuard(100, LOG, read=read, sockets=None, clock=lambda: now[0])
    assert all(guard.overloaded() for _ in range(1000)) and count[0] == 1
    now[0] += INTERVAL
    assert guard.overloaded() and count[0] == 2


def test_socket_buffers_count_with_resident_memory(caplog):
    """Bytes the kernel charges for the agent's socket buffers (an app that does not read
    leaves them in the agent's send queues) add to what the guard reads."""
    sockets = [40 * MIB]
    guard = MemoryGuard(100, LOG, read=lambda: 52 * MIB, sockets=("memory.stat (sock)", lambda: sockets[0]))
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert guard.overloaded()
    assert guard.usage == 92 * MIB and guard.socket_usage == 40 * MIB
    assert "hold 92 MiB (40 MiB of it socket buffers), 92 % of the limit" in caplog.records[0].getMessage()
    assert guard.describe()["socket_source"] == "memory.stat (sock)"


def _tree(tmp_path, cgroup: str, mounts: list[str], files: dict[str, str]) -> str:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text("".join(line.replace("@", str(tmp_path)) + "\n" for line in mounts))
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    return str(proc)


def test_socket_charge_reads_the_own_memory_cgroup(tmp_path):
    """cgroup v2: `sock` of the process's memory.stat; v1 (its memory hierarchy):
    memory.kmem.tcp.usage_in_bytes; in a cgroup namespace (the process's cgroup is "/")
    and with its own cgroup bound at the mount point; in a cgroup namespace with the host's
    hierarchy mounted (the cgroup listing the process); no memory cgroup: None."""
    v2 = _tree(tmp_path / "a", "0::/kubepods/pod1/agent\n",
               ["30 25 0:26 / @/sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw"],
               {"sys/fs/cgroup/kubepods/pod1/agent/memory.stat": "anon 1000\nfile 5\nsock 123456\nshmem 0\n"})
    where, read = socket_charge(v2)
    assert where.endswith("sys/fs/cgroup/kubepods/pod1/agent/memory.stat (sock)") and read() == 123456
    ns = _tree(tmp_path / "b", "0::/\n", ["30 25 0:26 / @/sys/fs/cgroup rw - cgroup2 cgroup2 rw"],
               {"sys/fs/cgroup/memory.stat": "sock 7\n"})
    assert socket_charge(ns)[1]() == 7
    bound = _tree(tmp_path / "e", "0::/kubepods/pod1/agent\n",
                  ["30 25 0:26 /kubepods/pod1/agent @/sys/fs/cgroup rw - cgroup2 cgroup2 rw"],
                  {"sys/fs/cgroup/memory.stat": "sock 8\n"})
    assert socket_charge(bound)[1]() == 8
    # its own cgroup namespace, the host's hierarchy mounted from above its root (the DaemonSet's hostPath):
    # found by the cgroup that lists the process
    hosted = _tree(tmp_path / "f", "0::/\n", ["30 25 0:26 /../../.. @/sys/fs/cgroup rw - cgroup2 cgroup2 rw"],
                   {"sys/fs/cgroup/memory.stat": "sock 999999\n", "sys/fs/cgroup/cgroup.procs": "1\n",
                    "sys/fs/cgroup/kubepods/pod0/ctr/cgroup.procs": "4242\n",
                    "sys/fs/cgroup/kubepods/pod1/ctr/cgroup.procs": "17\n424\n",
                    "sys/fs/cgroup/kubepods/pod1/ctr/memory.stat": "sock 9\n"})
    where, read = socket_charge(hosted, pid=424)
    assert where.endswith("sys/fs/cgroup/kubepods/pod1/ctr/memory.stat (sock)") and read() == 9
    v1 = _tree(tmp_path / "c", "12:pids:/x\n4:memory:/process_api/abc\n0::/\n",
               ["30 25 0:26 / @/sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw",
                "31 25 0:27 / @/sys/fs/cgroup/memory rw - cgroup cgroup rw,memory"],
               {"sys/fs/cgroup/memory/process_api/abc/memory.kmem.tcp.usage_in_bytes": "65536\n"})
    where, read = socket_charge(v1)  # the v2 mount has no memory controller here: no memory.stat
    assert where.endswith("memory/process_api/abc/memory.kmem.tcp.usage_in_bytes") and read() == 65536
    none = _tree(tmp_path / "d", "0::/\n", ["30 25 0:26 / @/sys/fs/cgroup rw - cgroup2 cgroup2 rw"], {})
    assert socket_charge(none) is None


def test_without_a_limit_nothing_is_refused_and_status_still_reads():
    count = [0]

    def read() -> int:
        count[0] += 1
        return 10 << 30
    guard = MemoryGuard(None, LOG, read=read, sockets=None)
    assert not guard.overloaded() and count[0] == 0
    assert guard.describe() == {"limit_bytes": None, "usage_bytes": 10 << 30, "peak_bytes": 10 << 30,
                                "socket_bytes": None, "socket_source": None, "pipe_bytes": 0,
                                "overloaded": False, "overload_episodes": 0, "overload_at": 0.9,
                                "recover_at": 0.85, "full_at": 0.95, "connections_held": 0, "per_pod_cap": None,
                                "shedding": None, "shed_sockets": 0, "shed_bytes": 0}


def test_a_pod_is_over_its_share_past_the_mean_of_the_holders_and_the_floor():
    holdings = Holdings()
    with ExitStack() as held:
        for _ in range(FAIR_FLOOR + 1):
            held.enter_context(holdings.held("10.0.0.1"))
        assert not holdings.over_share("10.0.0.1")  # the only holder: nobody to be fair to
        held.enter_context(holdings.held("10.0.0.2"))
        assert holdings.over_share("10.0.0.1") and not holdings.over_share("10.0.0.2")
        assert not holdings.over_share("10.0.0.3")  # holds nothing
        for _ in range(FAIR_FLOOR):
            held.enter_context(holdings.held("10.0.0.2"))
        assert not holdings.over_share("10.0.0.1") and not holdings.over_share("10.0.0.2")  # 65 each: the mean
        assert (holdings.total, holdings.of("10.0.0.1")) == (2 * FAIR_FLOOR + 2, FAIR_FLOOR + 1)
        held.enter_context(holdings.held("10.0.0.2"))
        assert holdings.most(1) == [("10.0.0.2", FAIR_FLOOR + 2)]
        assert holdings.most(5) == [("10.0.0.2", FAIR_FLOOR + 2), ("10.0.0.1", FAIR_FLOOR + 1)]
    assert holdings.total == 0 and holdings.of("10.0.0.1") == 0


def test_under_the_floor_no_pod_is_over_its_share():
    holdings = Holdings()
    with ExitStack() as held:
        for _ in range(FAIR_FLOOR - 1):
            held.enter_context(holdings.held("10.0.0.1"))
        held.enter_context(holdings.held("10.0.0.2"))
        assert not holdings.over_share("10.0.0.1")


def test_between_the_marks_only_pods_over_their_share_are_refused_and_from_full_all(caplog):
    usage = [0]
    clock = iter(range(10**6))  # a second passes between readings: each call reads again
    guard = MemoryGuard(100, LOG, read=lambda: usage[0], sockets=None, clock=lambda: float(next(clock)))
    with ExitStack() as held:
        for _ in range(FAIR_FLOOR):
            held.enter_context(guard.holdings.held("10.0.0.1"))
        held.enter_context(guard.holdings.held("10.0.0.2"))
        usage[0] = 89 * MIB
        assert not guard.refuses("10.0.0.1") and not guard.refuses(None)
        usage[0] = 92 * MIB
        assert guard.refuses("10.0.0.1") and not guard.refuses("10.0.0.2") and guard.refuses(None)
        usage[0] = 95 * MIB
        assert guard.refuses("10.0.0.1") and guard.refuses("10.0.0.2")
        caplog.clear()
        assert guard.refuse("10.0.0.2", "mesh/b")
        assert "the last for mesh/b, which holds 1 of the 65 connections the agent relays" in caplog.text
        usage[0] = 84 * MIB
        assert not guard.refuses("10.0.0.1")


TRIMMED = """
import sys
from nodeagent.memory import Trimmer, tree_resident
held = []
for i in range(400):  # 100 KB blocks (under glibc's mmap threshold: on the heap), each pinned behind
    block = bytearray(100_000)
    for j in range(0, len(block), 4096):
        block[j] = 1
    held.append(block)
    held.append(bytes(64) + bytes([i % 256]))  # a small object after it, so no freed block is the heap's top
del held[::2]  # 40 MB freed in holes
before = tree_resident()
trimmer = Trimmer()
assert trimmer.available
trimmer.trim()
after = tree_resident()
print(before >> 20, after >> 20)
"""


def test_the_trimmer_gives_freed_heap_memory_back():
    """40 MB freed in holes of the heap stay resident until malloc_trim: glibc trims only
    the heap's top by itself."""
    proc = subprocess.run([sys.executable, "-c", TRIMMED], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    before, after = map(int, proc.stdout.split())
    assert before - after >= 30, (before, after)


# --- shedding at FULL ------------------------------------------------------------------------------
def holder(kib: int, port: int):
    from nodeagent.sockdiag import Holder
    return Holder(kib << 10, 2, bytes(48), f"10.0.0.9:{port}")


class Sockets:
    """Stand-in for sockdiag over this process's sockets: what they hold, and the resets
    asked for, which free what the socket held from the reading."""

    def __init__(self, usage: list[int], kib: list[int], answer: int = 0):
        self.usage, self.answer = usage, answer
        self.held = [holder(k, 1000 + i) for i, k in enumerate(kib)]
        self.reset: list[int] = []

    def holders(self):
        return sorted(self.held, key=lambda h: h.bytes, reverse=True)

    def destroy(self, h) -> int:
        if self.answer:
            return self.answer
        self.reset.append(int(h.peer.rsplit(":", 1)[1]))
        self.held.remove(h)
        self.usage[0] -= h.bytes
        return 0


def test_at_full_the_sockets_holding_the_most_are_reset_until_the_agent_is_under_overload(caplog):
    usage = [int(0.97 * (100 << 20))]  # 97 MiB of 100: 7 MiB over OVERLOAD
    socks = Sockets(usage, [4096, 100, 3072, 2048, 2048, 200])
    guard = MemoryGuard(100, LOG, read=lambda: usage[0], sockets=None, holders=socks.holders, destroy=socks.destroy)
    with caplog.at_level(logging.WARNING):
        reset = guard.shed()
    # 4 + 3 MiB cover the 7 MiB over the mark; the small ones are never candidates
    assert socks.reset == [1000, 1002] and [h.bytes >> 10 for h in reset] == [4096, 3072]
    assert guard.describe()["shed_sockets"] == 2 and guard.describe()["shed_bytes"] == 7 << 20
    assert "reset 2 connection(s) holding the most socket memory (7168 KiB, the largest 4096 KiB to " \
           "10.0.0.9:1000)" in caplog.text
    assert guard.shed() == [] and socks.reset == [1000, 1002]  # now at 90 %: under FULL, nothing more


def test_under_full_nothing_is_shed_and_small_sockets_never_are():
    usage = [int(0.94 * (100 << 20))]
    socks = Sockets(usage, [8192])
    guard = MemoryGuard(100, LOG, read=lambda: usage[0], sockets=None, holders=socks.holders, destroy=socks.destroy)
    assert guard.shed() == [] and socks.reset == []
    usage[0] = 99 << 20
    small = Sockets(usage, [255, 100, 10])  # under SHED_FLOOR each: the memory is elsewhere
    guard = MemoryGuard(100, LOG, read=lambda: usage[0], sockets=None, holders=small.holders, destroy=small.destroy)
    assert guard.shed() == [] and small.reset == []


def test_a_kernel_that_refuses_sock_destroy_turns_shedding_off_and_says_so(caplog):
    usage = [99 << 20]
    socks = Sockets(usage, [8192, 8192], answer=errno.EOPNOTSUPP)
    guard = MemoryGuard(100, LOG, read=lambda: usage[0], sockets=None, holders=socks.holders, destroy=socks.destroy)
    with caplog.at_level(logging.WARNING):
        assert guard.shed() == []
    assert guard.describe()["shedding"].startswith("off: the kernel refused SOCK_DESTROY")
    assert caplog.text.count("cannot reset the sockets holding the most memory") == 1
    assert guard.shed() == []  # off for good: not asked again
    text = "\n".join(status._shed_line(guard.describe()))
    assert text.startswith("  SHEDDING OFF: THE KERNEL REFUSED SOCK_DESTROY")


def test_without_a_limit_nothing_is_watched():
    guard = MemoryGuard(None, LOG, read=lambda: 1, sockets=None, holders=lambda: 1 / 0)
    asyncio.run(asyncio.wait_for(guard.watch(0.01), 1))  # returns at once: no limit, no task left running


def test_watch_sheds_what_grew_past_full_while_nothing_new_came():
    """No accept asks for a reading while open connections grow: the watch does."""
    usage = [80 << 20]
    socks = Sockets(usage, [4096, 4096, 4096])
    guard = MemoryGuard(100, LOG, read=lambda: usage[0], sockets=None, holders=socks.holders, destroy=socks.destroy)

    async def main():
        watching = asyncio.create_task(guard.watch(0.01))
        await asyncio.sleep(0.05)
        assert socks.reset == []  # 80 %: nothing to shed
        usage[0] = 98 << 20  # the open connections' send queues filled
        for _ in range(200):
            if socks.reset:
                break
            await asyncio.sleep(0.01)
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
    asyncio.run(main())
    assert socks.reset == [1000, 1001] and usage[0] == 90 << 20  # 8 MiB over the 90 % mark: two 4 MiB ones


def test_when_the_resident_part_is_what_is_high_only_what_sockets_hold_is_shed():
    """At 98 % with 3 MiB of it in socket buffers: resets cover those 3 MiB, not the 8
    over the mark, which no reset can free."""
    resident = 95 << 20
    socks = Sockets([0], [2048, 2048, 2048, 2048])
    guard = MemoryGuard(100, LOG, read=lambda: resident, sockets=("test", lambda: 3 << 20),
                        holders=socks.holders, destroy=socks.destroy)
    assert [h.bytes >> 10 for h in guard.shed()] == [2048, 2048] and len(socks.reset) == 2


def test_a_kernel_that_will_not_name_a_sockets_netns_turns_shedding_off_and_says_so(monkeypatch, caplog):
    """sockdiag finds each socket's netns with SIOCGSKNS, which needs CAP_NET_ADMIN: refused,
    no socket would ever be found and shedding would do nothing without a word. The
    watch turns it off with a warning instead, and no netns descriptor is left open."""
    import os
    import socket
    from nodeagent import sockdiag

    def refuse(fd, request, *args):
        if request == sockdiag.SIOCGSKNS:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        raise AssertionError(f"unexpected ioctl {request:#x}")
    monkeypatch.setattr(sockdiag.fcntl, "ioctl", refuse)
    usage = [99 << 20]
    guard = MemoryGuard(100, LOG, read=lambda: usage[0], sockets=None)

    async def main():
        watching = asyncio.create_task(guard.watch(0.01))
        for _ in range(200):
            if guard.shedding != "on":
                break
            await asyncio.sleep(0.01)
        await asyncio.wait_for(watching, 1)  # off: the watch ends
    pair = socket.socketpair()  # a socket to find the netns of, whatever else the process holds
    try:
        with caplog.at_level(logging.WARNING):
            before = len(os.listdir("/proc/self/fd"))
            asyncio.run(main())
            assert len(os.listdir("/proc/self/fd")) == before
    finally:
        for sock in pair:
            sock.close()
    assert guard.shedding.startswith("off: cannot find the network namespace of a socket (SIOCGSKNS: "
                                     "Operation not permitted; the agent needs CAP_NET_ADMIN)"), guard.shedding
    assert caplog.text.count("cannot read the sockets' memory (sock_diag)") == 1
    assert guard.shed_sockets == 0


def test_what_the_relays_hold_in_pipes_counts_toward_the_limit():
    """The native relay engine splices each direction through a pipe whose pages are the
    kernel's: neither resident memory nor the socket charge shows them, and a same-node
    connection to an app that stopped reading keeps its pipe full. 80 MiB resident and
    6 MiB in sockets are under the 90 % mark of 100 MiB; 4 MiB more in pipes are not."""
    pipes = [0]
    guard = MemoryGuard(100, LOG, read=lambda: 80 << 20, sockets=("test", lambda: 6 << 20), pipes=lambda: pipes[0],
                        clock=iter(range(0, 10**6, 1)).__next__)
    assert not guard.overloaded()
    pipes[0] = 4 << 20
    assert guard.overloaded()
    memory = guard.describe()
    assert (memory["usage_bytes"], memory["socket_bytes"], memory["pipe_bytes"]) == (90 << 20, 6 << 20, 4 << 20)
    assert "MEMORY: OVERLOADED, 90 MiB of the 100 MiB limit (90 %, 6 MiB of it socket buffers, 4096 KiB in relay " \
           "pipes, peak 90)" in "\n".join(status._memory_line(memory))
