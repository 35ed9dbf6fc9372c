"""Nagle off (TCP_NODELAY) on every TCP socket the agent relays on, below the relays and
the tunnel, which both call it on each socket they open or accept (issue 11).

asyncio turns Nagle off only for sockets whose Python `proto` is IPPROTO_TCP
(`base_events._set_nodelay`), and `socket.socket(family, SOCK_STREAM)`, as the agent makes
its sockets (in a pod's netns), and every socket accepted from such a listener say 0. With
Nagle on, a small write behind unacknowledged bytes waits for the peer's delayed ACK
(~40 ms on Linux): an HTTP/2 END_STREAM behind a response, then the next connection's
CONNECT behind it, cost a new connection per request ~45 ms twice.
"""

from __future__ import annotations

import socket


def set_nodelay(sock: socket.socket) -> None:
    """Send small writes at once on TCP socket `sock` (a socket that is no longer open, or
    not TCP, is left be: its own use reports the problem)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
