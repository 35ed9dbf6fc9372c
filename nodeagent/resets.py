"""Ending a TCP connection with a reset (RST) instead of a clean close (FIN), which a
peer would read as a complete answer. Below the agent's relays and the tunnel, which
both refuse and abort connections this way."""

from __future__ import annotations

import socket
import struct

LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
LINGER_DEFAULT = struct.pack("ii", 0, 0)  # SO_LINGER off: close() sends FIN


def linger_reset(sock) -> None:
    """Make the next close of `sock` send RST; a socket already closed or reset is left be."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    except OSError:
        pass


def linger_default(sock: socket.socket) -> None:
    """Undo linger_reset: the last close of `sock` sends FIN again. For a socket whose
    copy was reset (a native HBONE stream that was refused) and that is offered again."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_DEFAULT)


def reset(sock: socket.socket) -> None:
    """Close `sock` with a RST, so the peer sees the failure at once (and no TIME_WAIT stays)."""
    linger_reset(sock)
    sock.close()
