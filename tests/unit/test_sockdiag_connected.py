"""sockdiag.connected_here: the kubelet-probe exemption's proof that a connection was
made by a socket of this node (inbound.py), checked on loopback with real sockets: only
an open client socket of that exact 4-tuple counts; the kernel's other answers (a
listener, an accepted socket, TIME_WAIT, a client bound outside the ephemeral range) do
not, as each was a way for a spoofer to borrow the node's address."""

from __future__ import annotations

import socket
import time

import pytest

from nodeagent import sockdiag


def _pair(family: int = socket.AF_INET, bind_port: int = 0):
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    listener = socket.socket(family)
    listener.bind((host, 0))
    listener.listen()
    client = socket.socket(family)
    if bind_port:
        client.bind((host, bind_port))
    client.connect(listener.getsockname()[:2])
    accepted, _ = listener.accept()
    return listener, client, accepted


def _ends(sock: socket.socket):
    return sock.getsockname()[:2], sock.getpeername()[:2]


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_an_open_client_socket_counts_and_nothing_else_of_the_kernels_answers(family):
    listener, client, accepted = _pair(family)
    with listener, client, accepted:
        local, remote = _ends(client)
        assert sockdiag.connected_here(local, remote)
        assert not sockdiag.connected_here(*_ends(accepted))  # the node's accepted socket: a listener's port
        assert not sockdiag.connected_here(local, (remote[0], remote[1] + 1))  # another 4-tuple
        # nothing connected from the listener's address: the kernel answers the listener itself
        assert not sockdiag.connected_here(listener.getsockname()[:2], ("::2" if family == socket.AF_INET6
                                                                         else "127.0.0.9", 5555))
        client.shutdown(socket.SHUT_WR)  # FIN_WAIT: closed by its own side only, the far side holds the tuple
        assert sockdiag.connected_here(local, remote)
        accepted.close()
        client.close()
        # TIME_WAIT: an earlier connection's, its 4-tuple free on the far side again
        _until(lambda: not sockdiag.connected_here(local, remote), "the closed client to stop counting")


def test_a_client_bound_outside_the_ephemeral_range_does_not_count():
    low, _ = sockdiag._ephemeral_ports()
    port = next(p for p in range(low - 2000, low - 1000) if _free(p))
    listener, client, accepted = _pair(bind_port=port)
    with listener, client, accepted:
        assert not sockdiag.connected_here(*_ends(client))
    listener, client, accepted = _pair()
    with listener, client, accepted:
        assert sockdiag.connected_here(*_ends(client))  # the same, from an ephemeral port


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
