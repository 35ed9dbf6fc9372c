"""The same-node fast path's in-kernel join (bpf/samenode.c): two connected TCP sockets
whose segments the kernel moves from one to the other, counted, with no wake-up of the
agent per segment.

`SockmapJoin.load(...)` has the compile child build and load `na_sn_verdict` alone
(compiler.load_programs with programs.SAMENODE), opens the maps it pinned
(`na_sn_peers`, `na_sn_bytes`) and attaches the program to `na_sn_peers`
(BPF_SK_SKB_VERDICT, target: the map); a failure raises CaptureError saying why, and
the caller falls back to splice. `close()` detaches and closes what it holds.

For one pair: `insert(a, b)` puts each socket under its own cookie with the other as
value, holding both sockets' data_ready meanwhile, then kicks both (SO_RCVLOWAT 1: runs
the socket's data_ready, so bytes queued before the insert go through at once instead
of at the next segment); `redirected(s)`
is what the program counted for the segments `s` received; `taken(s)` is what was
written into `s` (tcp_info: sent minus retransmitted, plus not yet sent), so a FIN read
on one socket may be passed on to the other once `taken(other) >= redirected(one)`;
`forget(a, b)` deletes both counts (the kernel drops the sockhash entries of closed
sockets itself). See docs/design.md, "Same-node fast path".
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import struct

from nodeagent.capture import bpfsys
from nodeagent.capture.compiler import COMPILE_TIMEOUT, load_programs
from nodeagent.capture.errors import CaptureError
from nodeagent.capture.programs import SAMENODE

PEERS, BYTES = "na_sn_peers", "na_sn_bytes"
SO_COOKIE = 57  # socket.SO_COOKIE is missing from some Python builds
_HOLD = 1 << 30  # SO_RCVLOWAT while inserting (the kernel caps it at half the largest receive buffer)
SO_SNDBUFFORCE = 32  # SO_SNDBUF past net.core.wmem_max (CAP_NET_ADMIN)
SNDBUF = 8 << 20  # each joined socket's send buffer (the kernel doubles it): see insert
_TCP_INFO_SIZE = 216  # through tcpi_bytes_retrans
_NOTSENT, _BYTES_SENT = 144, 200  # offsets of tcpi_notsent_bytes (u32), tcpi_bytes_sent, tcpi_bytes_retrans (u64)


def cookie(sock: socket.socket) -> int:
    return struct.unpack("Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def taken(sock: socket.socket) -> int:
    """Bytes written into `sock` so far: sent once (retransmissions not counted) plus
    queued and not yet sent."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    if len(info) < _TCP_INFO_SIZE:
        raise OSError(f"tcp_info of {len(info)} bytes: this kernel has no tcpi_bytes_sent")
    sent, retransmitted = struct.unpack_from("QQ", info, _BYTES_SENT)
    return sent - retransmitted + struct.unpack_from("I", info, _NOTSENT)[0]


class SockmapJoin:
    """The loaded verdict program and its maps (see the module's text)."""

    def __init__(self, prog_fd: int, peers_fd: int, bytes_fd: int, log: logging.Logger):
        self.prog_fd, self.peers_fd, self.bytes_fd = prog_fd, peers_fd, bytes_fd
        self.log = log

    @classmethod
    def load(cls, bpf_dir: str, flags: list[str], maps_dir: str, log: logging.Logger,
             timeout: float = COMPILE_TIMEOUT) -> "SockmapJoin":
        programs = load_programs(bpf_dir, flags, log, timeout, programs=(SAMENODE,))
        prog_fd = programs.fds.pop(SAMENODE.name)
        fds = [prog_fd]
        try:
            fds.append(bpfsys.obj_get(os.path.join(maps_dir, PEERS)))
            fds.append(bpfsys.obj_get(os.path.join(maps_dir, BYTES)))
            bpfsys.prog_attach(prog_fd, fds[1], bpfsys.ATTACH_SK_SKB_VERDICT, 0, f"{SAMENODE.name} to {PEERS}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return cls(*fds, log)

    def insert(self, a: socket.socket, b: socket.socket) -> tuple[int, int]:
        """Join `a` and `b` (established TCP sockets); their cookies. Refused (EOPNOTSUPP)
        when one is no longer established (its FIN came): nothing of either is lost then,
        the caller relays them itself.

        The first insert gives `b` the verdict program before `b`'s own entry exists, and
        a segment `b` received in between would be dropped (no peer to redirect to). So
        both sockets stop waking their data_ready (SO_RCVLOWAT as high as the kernel
        allows) until both entries are in; then SO_RCVLOWAT 1 runs data_ready, and what
        queued meanwhile goes through in order.

        Each socket gets a send buffer of SNDBUF (16 MiB once the kernel doubles it)
        instead of autotuning's (at most tcp_wmem's 4 MiB): a segment redirected to a
        socket whose send buffer is full waits in the kernel's psock worker, which tries
        again one jiffy later (4 ms at HZ=250), so the buffer per jiffy bounds a joined
        connection's rate. One stream on a 6.18 kernel with HZ=250: 4.1-6.2 Gbit/s with
        autotuning, 7.4-8.6 with 4 MiB, 11.3-11.9 with 8 MiB and 11.2-11.6 with 32 MiB,
        direct 13.6-14.1. Memory is the connection's own data queued there, as a
        direct connection holds it in its receive buffer (tcp_rmem: 6 MiB)."""
        keys = cookie(a), cookie(b)
        for sock in (a, b):
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, SNDBUF)
            except PermissionError:  # no CAP_NET_ADMIN: as much as net.core.wmem_max allows
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _HOLD)
        inserted = []
        try:
            for key, peer in ((keys[0], b), (keys[1], a)):
                bpfsys.map_update(self.peers_fd, ctypes.c_uint64(key), ctypes.c_uint64(peer.fileno()), PEERS)
                inserted.append(key)
        except BaseException:
            for key in inserted:
                bpfsys.map_delete(self.peers_fd, ctypes.c_uint64(key))
            raise
        finally:
            for sock in (a, b):  # bytes queued before (or during) the insert: through now, in order
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return keys

    def redirected(self, key: int) -> int:
        value = ctypes.c_uint64()
        return value.value if bpfsys.map_lookup(self.bytes_fd, ctypes.c_uint64(key), value) else 0

    def forget(self, *keys: int) -> None:
        for key in keys:
            bpfsys.map_delete(self.peers_fd, ctypes.c_uint64(key))
            bpfsys.map_delete(self.bytes_fd, ctypes.c_uint64(key))

    def close(self) -> None:
        try:
            bpfsys.prog_detach(self.prog_fd, self.peers_fd, bpfsys.ATTACH_SK_SKB_VERDICT,
                               f"{SAMENODE.name} from {PEERS}")
        except CaptureError as exc:
            self.log.warning("%s", exc)
        finally:
            for fd in (self.prog_fd, self.peers_fd, self.bytes_fd):
                os.close(fd)
