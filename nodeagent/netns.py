"""Network namespaces from Python: enter one on this thread, make sockets in it, read
its cookie.

`setns(2)` moves only the calling thread, and a socket keeps the netns it was created
in, so the agent opens its in-pod listeners by briefly entering the pod's netns on the
current thread and returning (ztunnel's in-pod mode does the same). Python 3.11 has no
`os.setns`, hence ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import threading
from typing import Iterator

from nodeagent.errors import NodeagentError

CLONE_NEWNET = 0x40000000
SO_NETNS_COOKIE = 71  # Linux >= 5.14
NETNS_RUN_DIR = "/run/netns"  # where `ip netns add NAME` pins namespaces
OWN_NETNS = "/proc/thread-self/ns/net"  # the calling thread's netns

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(NodeagentError):
    """A network namespace could not be opened or entered."""


def named_path(name: str) -> str:
    """Path of a namespace made by `ip netns add NAME`."""
    return os.path.join(NETNS_RUN_DIR, name)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns failed: {os.strerror(err)}",
                         "entering a network namespace needs CAP_SYS_ADMIN" if err == errno.EPERM else None)


def open_netns(path: str) -> int:
    """Open a netns file (`/proc/PID/ns/net` or `/run/netns/NAME`); caller closes the fd."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(f"cannot open network namespace {path}: {exc.strerror}") from None


class _Own:
    """A thread's own netns, opened once (the thread keeps it until it ends)."""

    def __init__(self):
        self.fd = os.open(OWN_NETNS, os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self):
        os.close(self.fd)


class _Thread(threading.local):
    own: _Own | None = None
    depth = 0  # entered() bodies this thread is in


_thread = _Thread()


@contextlib.contextmanager
def entered(target: str | int) -> Iterator[None]:
    """Run the body with this thread in `target` (a path or an open netns fd).

    Keep the body short and free of awaits: only this thread moves, and it always moves
    back, even when the body raises. Outside any entered() body a thread is in its own
    netns (no code of ours moves a thread otherwise), which it returns to by a descriptor
    kept per thread; a nested body returns to where it was by one opened for it (every
    delivery socket is made in a pod's netns: the open and close were ~1/20 of a new
    connection's work in the agent).
    """
    state = _thread
    if state.depth:
        back, opened = os.open(OWN_NETNS, os.O_RDONLY | os.O_CLOEXEC), True
    else:
        if state.own is None:
            state.own = _Own()
        back, opened = state.own.fd, False
    fd = open_netns(target) if isinstance(target, str) else target
    try:
        _setns(fd)
        state.depth += 1
        try:
            yield
        finally:
            state.depth -= 1
            _setns(back)
    finally:
        if isinstance(target, str):
            os.close(fd)
        if opened:
            os.close(back)


def socket_in(target: str | int, family: int = socket.AF_INET,
              type: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket that lives in netns `target` (`type` may carry SOCK_NONBLOCK)."""
    return sockets_in(target, 1, family, type)[0]


def sockets_in(target: str | int, count: int, family: int = socket.AF_INET,
               type: int = socket.SOCK_STREAM) -> list[socket.socket]:
    """`count` new sockets that live in netns `target`, made in one entry into it."""
    made: list[socket.socket] = []
    try:
        with entered(target):
            for _ in range(count):
                made.append(socket.socket(family, type))
    except BaseException:
        for sock in made:
            sock.close()
        raise
    return made


def cookie_of_socket(sock: socket.socket) -> int:
    """The netns cookie of the namespace `sock` lives in (what eBPF's bpf_get_netns_cookie sees)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError as exc:
        raise NetnsError(f"SO_NETNS_COOKIE unsupported ({exc.strerror})",
                         "nodeagent needs Linux >= 5.14") from None
    return int.from_bytes(raw, "little")


def cookie(target: str | int) -> int:
    """The netns cookie of `target` (a path or an open netns fd)."""
    with socket_in(target, socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return cookie_of_socket(probe)


def current_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        return cookie_of_socket(probe)
