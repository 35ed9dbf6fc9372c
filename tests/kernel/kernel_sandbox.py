"""Throwaway kernel resources for the kernel tests: cgroups, bpffs pin dirs, network
namespaces, and client processes running in them.

Every resource is uniquely named (`nodeagent-test-*` cgroups and pins, `natest-*`
namespaces) and removed by the context manager that made it, also when the test
fails. Namespaces get addresses only inside themselves; nothing is added to the
machine's own namespace. Processes are stopped by PID. conftest.py wraps these as
fixtures.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from nodeagent import netns
from nodeagent.capture.cgroup import attached
from nodeagent.capture.preflight import mount_table
from nodeagent.capture.programs import CGROUP_PROGRAMS

PIN_ROOT = "/sys/fs/bpf"
CONNECTOR = str(Path(__file__).with_name("connector.py"))


def unique(kind: str) -> str:
    return f"{kind}-{os.getpid()}-{secrets.token_hex(3)}"


# ---- cgroups and pin dirs ----

def _remove_cgroup(path: str) -> None:
    """rmdir depth-first; a cgroup whose last process is still exiting is briefly busy."""
    if not os.path.isdir(path):
        return
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            _remove_cgroup(entry.path)
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.05)
    os.rmdir(path)


@contextlib.contextmanager
def throwaway_cgroup(parent: str, name: str | None = None) -> Iterator[str]:
    path = os.path.join(parent, name or unique("nodeagent-test"))
    os.mkdir(path)
    try:
        yield path
    finally:
        _remove_cgroup(path)


@contextlib.contextmanager
def socket_charging_cgroup() -> Iterator[str]:
    """A throwaway memory cgroup that charges the socket buffers of the processes put in
    it (to its `cgroup.procs`), on the hierarchy that has the memory controller: cgroup
    v2's, which always charges them, else cgroup v1's with TCP accounting turned on for
    it (v1 charges sockets only then). Removed at the end, once its processes are gone."""
    path = version = None
    for point, kind in mount_table():
        if kind == "cgroup2" and "memory" in _read_words(os.path.join(point, "cgroup.controllers")):
            path, version = os.path.join(point, unique("nodeagent-test-sock")), "v2"
            if "memory" not in _read_words(os.path.join(point, "cgroup.subtree_control")):
                pytest.fail(f"{point} does not hand the memory controller to its children")
            break
    else:
        for point, kind in mount_table():
            if kind == "cgroup" and os.path.exists(os.path.join(point, "memory.kmem.tcp.usage_in_bytes")):
                path, version = os.path.join(point, unique("nodeagent-test-sock")), "v1"
                break
    if path is None:
        pytest.fail("no memory cgroup controller on this machine (neither cgroup v2's nor v1's)")
    os.mkdir(path)
    try:
        if version == "v1":
            with open(os.path.join(path, "memory.kmem.tcp.limit_in_bytes"), "w") as f:
                f.write("-1")  # turns TCP accounting on for this cgroup, without a limit
        yield path
    finally:
        _remove_cgroup(path)


def _read_words(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except OSError:
        return []


@contextlib.contextmanager
def throwaway_pin_dir() -> Iterator[str]:
    """A pin dir path under bpffs (not created: the loader makes it)."""
    path = os.path.join(PIN_ROOT, unique("nodeagent-test"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # unlinking a pin drops it


def our_programs(cgroup: str) -> dict[str, list[int]]:
    """Program ids attached to `cgroup` per program name (BPF_PROG_QUERY)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {spec.name: [pid for pid, name in attached(fd, spec.attach_type) if name == spec.name]
                for spec in CGROUP_PROGRAMS}
    finally:
        os.close(fd)


# ---- sockets ----

FILL_CHUNK = 65536  # bytes `fill` writes at a time


def fill(sock: socket.socket) -> int:
    """Write to `sock` (made non-blocking) until the kernel takes no more; what waits in
    its send queue. Child processes of the tests run it from FILL_SOURCE."""
    sock.setblocking(False)
    chunk = b"x" * FILL_CHUNK
    try:
        while True:
            sock.send(chunk)
    except BlockingIOError:
        pass
    return struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0]


# `fill` for a child process's source (`python -c`), with what it imports
FILL_SOURCE = f"import fcntl, socket, struct, termios\nFILL_CHUNK = {FILL_CHUNK}\n{inspect.getsource(fill)}"


# ---- network namespaces ----

def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Netns:
    name: str

    @property
    def path(self) -> str:
        return netns.named_path(self.name)

    @property
    def cookie(self) -> int:
        return netns.cookie(self.path)

    def ip(self, *args: str) -> None:
        ip("-n", self.name, *args)

    def new_socket(self, family: int = socket.AF_INET) -> socket.socket:
        sock = netns.socket_in(self.path, family)
        sock.settimeout(5)
        return sock

    def listener(self, addr: str, port: int, family: int = socket.AF_INET) -> socket.socket:
        sock = self.new_socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(256)
        return sock


@contextlib.contextmanager
def netns_factory() -> Iterator:
    """Yields make() -> a new Netns with lo up; every one is deleted on exit."""
    made: list[Netns] = []

    def make() -> Netns:
        ns = Netns(unique("natest"))
        ip("netns", "add", ns.name)
        made.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns
    try:
        yield make
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)


def link(a: Netns, b: Netns, a_addrs: list[str], b_addrs: list[str]) -> None:
    """A veth eth0<->eth0 between two namespaces (never the machine's), with addresses."""
    a.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b.name)
    for ns, addrs in ((a, a_addrs), (b, b_addrs)):
        for addr in addrs:
            ns.ip("addr", "add", addr, "dev", "eth0", *(["nodad"] if ":" in addr else []))
        ns.ip("link", "set", "eth0", "up")


# ---- sockets and client processes ----

@dataclass
class Connection:
    target: tuple[str, int]
    ok: bool
    local: tuple[str, int] | None
    peer: tuple[str, int] | None
    error: str | None


def _connection(raw: dict) -> Connection:
    return Connection(tuple(raw["target"]), raw["ok"], raw["local"] and tuple(raw["local"]),
                      raw["peer"] and tuple(raw["peer"]), raw["error"])


@contextlib.contextmanager
def connector(cgroup: str, ns: Netns, family: int, targets: list[tuple[str, int]],
              mark: int = 0) -> Iterator[list[Connection]]:
    """Run connector.py in `cgroup` and `ns`: it connects to every target and holds the
    sockets open until the body is done. Yields the outcomes."""
    spec = {"cgroup": cgroup, "netns": ns.path, "family": family, "mark": mark, "targets": targets}
    proc = subprocess.Popen([sys.executable, CONNECTOR, json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line, f"connector exited early (rc {proc.wait(5)})"
        yield [_connection(raw) for raw in json.loads(line)]
    finally:
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()  # ours, by PID
            proc.wait()
        proc.stdout.close()


def counted(capture, before: dict) -> dict:
    """Counters that changed since `before` (so `== {}` means nothing was counted)."""
    now = capture.stats()["counters"]
    return {name: now[name] - before[name] for name in now if now[name] != before[name]}


def accept_all(listener: socket.socket, count: int) -> list[socket.socket]:
    return [listener.accept()[0] for _ in range(count)]


def pending(listener: socket.socket) -> int:
    """Accept (and close) whatever is already queued on `listener`, without waiting."""
    listener.setblocking(False)
    count = 0
    try:
        while True:
            listener.accept()[0].close()
            count += 1
    except BlockingIOError:
        return count
    finally:
        listener.settimeout(5)
