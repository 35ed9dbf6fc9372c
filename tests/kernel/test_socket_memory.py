"""The memory guard reads the socket buffers the kernel charges to the agent's memory
cgroup (nodeagent/memory.py `socket_charge`), on a real kernel: a process in a throwaway
memory cgroup queues bytes nobody reads in loopback connections, and what it reads of its
own cgroup grows by at least those bytes; a guard whose limit the process's resident
memory alone stays under is overloaded once the socket buffers count, and not without
them. cgroup v2 where its hierarchy has the memory controller; else cgroup v1's, with TCP
accounting turned on for the throwaway cgroup (v1 charges sockets only then)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kernel_sandbox import FILL_SOURCE, socket_charging_cgroup

CHILD = FILL_SOURCE + r"""
import json, math, sys
from nodeagent.memory import MIB, MemoryGuard, socket_charge, tree_resident
import logging
where, read = socket_charge()
before = read()
pairs, queued = [], 0
listener = socket.create_server(("127.0.0.1", 0))
for _ in range(4):
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()  # never read
    outq = fill(client)
    inq = struct.unpack("i", fcntl.ioctl(server, termios.FIONREAD, b"\0" * 4))[0]
    queued += outq + inq
    pairs.append((client, server))
after = read()
resident = tree_resident()
limit_mib = math.ceil((resident + after) / MIB / 0.93)  # with the sockets: 93 % of it
log = logging.getLogger("child")
with_sockets = MemoryGuard(limit_mib, log).overloaded()
without = MemoryGuard(limit_mib, log, sockets=None).overloaded()
print(json.dumps({"where": where, "before": before, "after": after, "queued": queued, "resident": resident,
                  "with_sockets": with_sockets, "without": without}))
"""


def test_the_guard_counts_socket_buffers_charged_to_its_cgroup():
    with socket_charging_cgroup() as path:
        procs = os.path.join(path, "cgroup.procs")
        proc = subprocess.run(["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, sys.executable, "-c", CHILD],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout)
        assert seen["where"].startswith(path), seen  # its own cgroup's file
        assert seen["before"] < 1 << 20, seen
        assert seen["queued"] >= 4 << 20, seen  # four send queues full, nobody reading
        assert seen["after"] - seen["before"] >= seen["queued"], seen  # charged: the bytes and their skb overhead
        assert seen["with_sockets"] is True and seen["without"] is False, seen
