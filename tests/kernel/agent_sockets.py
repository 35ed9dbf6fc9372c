"""The live agent's own connected TCP sockets, read through copies of its descriptors
(pidfd_getfd), whatever netns each lives in: what a test checks of the sockets the agent
relays on (Nagle off, the same-node join's send buffer)."""

from __future__ import annotations

import ctypes
import os
import socket
from typing import Callable, TypeVar

T = TypeVar("T")
PIDFD_GETFD = 438  # syscall number, the same on every architecture (Linux >= 5.6)
_libc = ctypes.CDLL(None, use_errno=True)


def connected_tcp_sockets(pid: int, read: Callable[[socket.socket], T]
                          ) -> list[tuple[tuple[str, int], tuple[str, int], T]]:
    """(local, peer, read(socket)) of every connected TCP socket process `pid` holds."""
    found = []
    pidfd = os.pidfd_open(pid)
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue  # closed meanwhile
            fd = _libc.syscall(PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                assert ctypes.get_errno() == 9, os.strerror(ctypes.get_errno())  # EBADF: closed meanwhile
                continue
            with socket.socket(fileno=fd) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
                    continue
                try:
                    peer = sock.getpeername()[:2]
                except OSError:
                    continue  # a listener
                found.append((sock.getsockname()[:2], peer, read(sock)))
    finally:
        os.close(pidfd)
    return found
