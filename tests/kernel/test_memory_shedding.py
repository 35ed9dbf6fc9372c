"""The memory guard sheds at FULL on real sockets (nodeagent/memory.py `shed`,
nodeagent/sockdiag.py): this process holds three loopback connections whose peers never
read, with ~3 MB, ~1 MB and a few KB queued; a guard at 97 % of its limit resets the
sockets holding the most (sock_diag's memory counts, SOCK_DESTROY) until what they held
covers the excess over OVERLOAD: the 3 MB one, whose owner then sees ECONNABORTED and
whose peer an RST, and no other. sock_diag sees only this process's sockets: a socket of
another process (a child) holding more is never a candidate."""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from kernel_sandbox import FILL_SOURCE
from nodeagent import sockdiag
from nodeagent.memory import MIB, SHED_FLOOR, MemoryGuard

LOG = logging.getLogger("test.shedding")
OTHER = FILL_SOURCE + r"""
import sys
client = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
fill(client)
print("full", flush=True)
sys.stdin.read()
"""


def filled(listener: socket.socket, size: int, make=socket.socket) -> tuple[socket.socket, socket.socket]:
    """A connection to `listener` with `size` bytes sent that its peer never reads; the
    client from `make()` (in `listener`'s netns)."""
    client = make()
    client.setblocking(True)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    client.connect(listener.getsockname())
    peer, _ = listener.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # the rest waits in the client's send queue
    client.setblocking(False)
    sent = 0
    while sent < size:
        try:
            sent += client.send(b"x" * min(65536, size - sent))
        except BlockingIOError:
            time.sleep(0.01)
    return client, peer


def ports(holders: list[sockdiag.Holder]) -> set[tuple[int, int]]:
    """(local port, remote port) of each socket."""
    return {sockdiag.SOCKID.unpack(h.sockid)[:2] for h in holders}


def test_at_full_the_socket_holding_the_most_is_reset_and_no_other():
    listener = socket.create_server(("127.0.0.1", 0))
    other = subprocess.Popen([sys.executable, "-c", OTHER, str(listener.getsockname()[1])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        outsider, _ = listener.accept()  # another process's client: more queued than any of ours
        assert other.stdout.readline() == "full\n"
        big, small, tiny = (filled(listener, size) for size in (3_000_000, 1_000_000, 4_000))
        mine = sockdiag.holders()  # the three clients, their peers, the outsider's peer
        assert len(mine) == 7 and mine[0].bytes >= 2_500_000 and mine[1].bytes >= 800_000 > mine[2].bytes, mine
        assert mine[0].peer == mine[1].peer == "127.0.0.1:%d" % listener.getsockname()[1]
        # 97 % of a limit whose excess over OVERLOAD (90 %) is 2 MB: the 3 MB socket covers it
        limit_mib = 2_000_000 * 100 // 7 // MIB + 1
        usage = [int(0.97 * limit_mib * MIB)]
        guard = MemoryGuard(limit_mib, LOG, read=lambda: usage[0], sockets=None)
        reset = guard.shed()
        assert reset == [mine[0]] and mine[0].bytes >= SHED_FLOOR
        with pytest.raises(OSError) as aborted:
            big[0].send(b"y")
        assert aborted.value.errno == errno.ECONNABORTED
        with pytest.raises(ConnectionResetError):
            while big[1].recv(1 << 20):  # what arrived before the reset, then the RST
                pass
        for client, peer in (small, tiny, (outsider, outsider)):
            assert (client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR),
                    peer.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)) == (0, 0)
        # the reset one and its peer (closed by the RST) are gone, the others are not; the
        # outsider's client, the child's, queued the most of all and was never a candidate
        port, gone = listener.getsockname()[1], big[0].getsockname()[1]
        assert ports(sockdiag.holders()) == ports(mine) - {(gone, port), (port, gone)}
    finally:
        other.stdin.close()
        other.wait(timeout=10)
        listener.close()


def test_sockets_in_a_pods_netns_are_found_and_reset(make_netns):
    """The agent's in-pod sockets (HBONE connections a pod's port 15008 accepted, the
    deliveries to its app) live in the pod's netns, not the agent's: a socket there
    holding the most is the one reset."""
    pod = make_netns()
    inside = pod.listener("127.0.0.1", 15008)
    here = socket.create_server(("127.0.0.1", 0))
    try:
        big = filled(inside, 3_000_000, pod.new_socket)
        small = filled(here, 1_000_000)
        mine = sockdiag.holders()
        assert mine[0].inode == os.fstat(big[0].fileno()).st_ino and mine[0].bytes >= 2_500_000, mine
        assert os.fstat(small[0].fileno()).st_ino in {h.inode for h in mine[1:]}, mine
        limit_mib = 2_000_000 * 100 // 7 // MIB + 1  # 97 %: an excess over OVERLOAD of 2 MB
        guard = MemoryGuard(limit_mib, LOG, read=lambda: int(0.97 * limit_mib * MIB), sockets=None)
        assert guard.shed() == [mine[0]]
        with pytest.raises(OSError) as aborted:
            big[0].send(b"y")
        assert aborted.value.errno == errno.ECONNABORTED
        assert small[0].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
    finally:
        inside.close()
        here.close()
