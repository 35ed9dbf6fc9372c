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
import time
import uuid

import pytest

from nodeagent.capture.preflight import mount_table

CHILD = r"""
import fcntl, json, math, socket, struct, sys, termios
from nodeagent.memory import MIB, MemoryGuard, socket_charge, tree_resident
import logging
where, read = socket_charge()
before = read()
pairs, queued = [], 0
listener = socket.create_server(("127.0.0.1", 0))
for _ in range(4):
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()  # never read
    client.setblocking(False)
    try:
        while True:
            client.send(b"x" * 65536)
    except BlockingIOError:
        pass
    outq = struct.unpack("i", fcntl.ioctl(client, termios.TIOCOUTQ, b"\0" * 4))[0]
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


def _memory_cgroup() -> tuple[str, str]:
    """(a throwaway cgroup directory to make, "v2" or "v1") of the hierarchy that has the
    memory controller."""
    mounts = mount_table()
    for point, kind in mounts:
        if kind == "cgroup2":
            try:
                controllers = open(os.path.join(point, "cgroup.controllers")).read().split()
            except OSError:
                continue
            if "memory" in controllers:
                return os.path.join(point, f"nodeagent-test-sock-{uuid.uuid4().hex[:8]}"), "v2"
    for point, kind in mounts:
        if kind == "cgroup" and os.path.exists(os.path.join(point, "memory.kmem.tcp.usage_in_bytes")):
            return os.path.join(point, f"nodeagent-test-sock-{uuid.uuid4().hex[:8]}"), "v1"
    pytest.fail("no memory cgroup controller on this machine (neither cgroup v2's nor v1's)")


def test_the_guard_counts_socket_buffers_charged_to_its_cgroup():
    path, version = _memory_cgroup()
    os.mkdir(path)
    try:
        if version == "v2":
            parent = os.path.dirname(path)
            if "memory" not in open(os.path.join(parent, "cgroup.subtree_control")).read().split():
                pytest.fail(f"{parent} does not hand the memory controller to its children")
        else:
            with open(os.path.join(path, "memory.kmem.tcp.limit_in_bytes"), "w") as f:
                f.write("-1")  # turns TCP accounting on for this cgroup, without a limit
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
    finally:
        for _ in range(50):  # the child's sockets are freed as it exits
            try:
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.1)
        else:
            os.rmdir(path)
