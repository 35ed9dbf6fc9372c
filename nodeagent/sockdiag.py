"""The TCP sockets of this process that hold the most kernel memory, and resetting them
(sock_diag netlink: inet_diag dumps with SK_MEMINFO, SOCK_DESTROY).

The memory guard (memory.py) sheds with this when the agent's memory reaches FULL of its
limit: a peer that stops reading makes the kernel queue what the agent sends it, up to
tcp_wmem's 4 MiB on a socket that crosses the network (an HBONE connection, a
passthrough upstream), and 512 connections of one source IP that each do so hold 2 GiB
of socket memory charged to the agent's container, while the guard only refuses new
work. Shedding resets the sockets holding the most, as Envoy's overload manager resets
the streams using the most memory, until the agent holds what it may again. Only this
process's sockets are seen (their inodes from /proc/self/fd), in every network namespace
they live in: the agent's own (its HBONE connections to other nodes' agents) and each
meshed pod's, where the agent listens and connects in-pod (the HBONE connections a pod's
port 15008 accepted, the deliveries to its app). A socket's netns comes from the socket
itself (SIOCGSKNS), and each netns is dumped by a netlink socket made in it. SOCK_DESTROY
needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY; the socket's owner sees ECONNABORTED
and its peer an RST, as for any reset connection.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from contextlib import contextmanager
from typing import Iterator, NamedTuple

from nodeagent import netns

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_SKMEMINFO = 7
TCP_LISTEN = 10
TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2 = 1, 4, 5
CLIENT_STATES = (TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2)  # open, or closed by its side only
ALL_BUT_LISTEN = 0xFFFFFFFF & ~(1 << TCP_LISTEN)
NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
REQ = struct.Struct("=BBBxI")  # family, protocol, ext, (pad), states; then the sockid
SOCKID = struct.Struct(">HH16s16sI8s")  # sport, dport (network order), src, dst, if, cookie (host order)
MSG = struct.Struct("=BBBB")  # family, state, timer, retrans; then the sockid, then:
MSG_TAIL = struct.Struct("=IIIII")  # expires, rqueue, wqueue, uid, inode
RTA = struct.Struct("=HH")
# SK_MEMINFO_*: rmem_alloc, rcvbuf, wmem_alloc, sndbuf, fwd_alloc, wmem_queued, ...
RMEM_ALLOC, WMEM_QUEUED = 0, 5
SIOCGSKNS = 0x894C  # a socket's netns, as a new descriptor


class Holder(NamedTuple):
    """One of this process's TCP sockets and the kernel memory its queues hold."""
    bytes: int  # receive queue (rmem_alloc) and send queue (wmem_queued), as charged
    family: int
    sockid: bytes  # inet_diag_sockid as the kernel gave it, to name the socket again
    peer: str  # "ip:port"
    inode: int = 0  # the socket's, and a descriptor of this process for it when found,
    fd: int = -1    # through which `destroy` finds its netns again


def connected_here(local: tuple[str, int], remote: tuple[str, int]) -> bool:
    """Whether this thread's netns holds a TCP client socket connected from `local` to
    `remote` and still open: a socket of this node, not a connection that only passes
    through it (forwarded, NATed). What does not count, as each was a way past a check
    that only asked whether some socket had the addresses: a socket in TIME_WAIT (the
    client's connection being admitted holds the 4-tuple on the far side until it
    closes, so a TIME_WAIT one is an earlier connection's, whose tuple a spoofer may
    take again), a listener (which the kernel answers when no connection matches), and a
    socket this node accepted (a spoofer that reaches a listener of the node with the
    far side's address as its source makes one; its local port is a listener's, or not
    an ephemeral one)."""
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    low, high = _ephemeral_ports()
    if not low <= local[1] <= high:
        return False
    if _lookup(family, local, remote, lambda state, tuple_: state in CLIENT_STATES and tuple_ == (local, remote)):
        return not _lookup(family, local, ("::" if family == socket.AF_INET6 else "0.0.0.0", 0),
                           lambda state, _: state == TCP_LISTEN)
    return False


def _lookup(family: int, local: tuple[str, int], remote: tuple[str, int], accept) -> bool:
    """One exact inet_diag lookup in this thread's netns; whether its answer (the socket
    with that 4-tuple, else a listener of `local`) passes `accept(state, (local, remote))`."""
    def packed(ip: str) -> bytes:
        raw = socket.inet_pton(family, ip)
        return raw + bytes(16 - len(raw))

    def address(raw: bytes) -> str:
        return socket.inet_ntop(family, raw[:4] if family == socket.AF_INET else raw)

    sockid = SOCKID.pack(local[1], remote[1], packed(local[0]), packed(remote[0]), 0, b"\xff" * 8)
    try:
        with _netlink(None) as nl:
            nl.settimeout(1.0)  # answered within send(); never a wait on the loop
            answers = list(_ask(nl, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                                REQ.pack(family, socket.IPPROTO_TCP, 0, ALL_BUT_LISTEN) + sockid))
    except OSError:
        return False  # ENOENT: no such socket (or no answer)
    for payload in answers:
        sport, dport, src, dst, _, _ = SOCKID.unpack_from(payload, MSG.size)
        if accept(payload[1], ((address(src), sport), (address(dst), dport))):
            return True
    return False


def _ephemeral_ports(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """This netns's ephemeral port range (its IPv4 sysctl applies to IPv6 too)."""
    try:
        with open(path) as f:
            low, high = (int(n) for n in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 1, 0  # unreadable: no port is one


def own_sockets(proc: str = "/proc/self/fd") -> dict[int, int]:
    """The sockets this process holds: inode -> a descriptor of it."""
    found = {}
    for name in os.listdir(proc):
        try:
            target = os.readlink(f"{proc}/{name}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            found[int(target[8:-1])] = int(name)
    return found


def holders(sockets: dict[int, int] | None = None) -> list[Holder]:
    """This process's TCP sockets (of `sockets`, own_sockets()'s by default) in every
    netns they live in, most memory first."""
    sockets = own_sockets() if sockets is None else sockets
    out, spaces = [], _namespaces(sockets)
    try:
        for ns in spaces:
            with _netlink(ns) as nl:
                out += _dump(nl, sockets)
    finally:
        for ns in spaces:
            os.close(ns)
    out.sort(key=lambda h: h.bytes, reverse=True)
    return out


def destroy(holder: Holder) -> int:
    """Reset the socket (SOCK_DESTROY) in the netns it lives in; 0, or the errno the
    kernel answered (ENOENT: it closed meanwhile; EOPNOTSUPP: a kernel without
    CONFIG_INET_DIAG_DESTROY; EPERM)."""
    try:
        ns = _netns_of(holder.fd, holder.inode) if holder.fd >= 0 else None
    except OSError as exc:
        return exc.errno or errno.EIO
    if holder.fd >= 0 and ns is None:
        return errno.ENOENT  # its descriptor is closed, or names another socket now
    request = REQ.pack(holder.family, socket.IPPROTO_TCP, 0, ALL_BUT_LISTEN) + holder.sockid
    try:
        with _netlink(ns) as nl:
            list(_ask(nl, SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, request))
    except OSError as exc:
        return exc.errno or errno.EIO
    finally:
        if ns is not None:
            os.close(ns)
    return 0


def _netns_of(fd: int, inode: int) -> int | None:
    """A new descriptor of the netns of socket `fd`, when `fd` is still socket `inode`
    (None when it was closed meanwhile). OSError when the kernel refuses to say (SIOCGSKNS
    needs CAP_NET_ADMIN): without it no socket would be found, and shedding would do
    nothing without a word."""
    try:
        if os.fstat(fd).st_ino != inode:
            return None
    except OSError:
        return None  # closed meanwhile
    try:
        return fcntl.ioctl(fd, SIOCGSKNS)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return None  # closed meanwhile
        raise OSError(exc.errno, f"cannot find the network namespace of a socket (SIOCGSKNS: "
                                 f"{os.strerror(exc.errno or errno.EIO)}; the agent needs CAP_NET_ADMIN)") from None


def _namespaces(sockets: dict[int, int]) -> list[int]:
    """A descriptor of each netns `sockets` live in (the caller closes them)."""
    seen: dict[tuple[int, int], int] = {}
    try:
        for inode, fd in sockets.items():
            ns = _netns_of(fd, inode)
            if ns is None:
                continue  # closed meanwhile
            st = os.fstat(ns)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                os.close(ns)
            else:
                seen[key] = ns
    except OSError:
        for ns in seen.values():
            os.close(ns)
        raise
    return list(seen.values())


@contextmanager
def _netlink(ns: int | None) -> Iterator[socket.socket]:
    """A sock_diag netlink socket in netns `ns` (this thread's when None)."""
    if ns is None:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    else:
        with netns.entered(ns):
            nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
    with nl:
        yield nl


def _dump(nl: socket.socket, sockets: dict[int, int]) -> list[Holder]:
    out = []
    for family in (socket.AF_INET, socket.AF_INET6):
        request = REQ.pack(family, socket.IPPROTO_TCP, 1 << (INET_DIAG_SKMEMINFO - 1), ALL_BUT_LISTEN)
        for payload in _ask(nl, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, request + bytes(SOCKID.size)):
            holder = _holder(payload, sockets)
            if holder is not None:
                out.append(holder)
    return out


def _ask(nl: socket.socket, kind: int, flags: int, body: bytes):
    """Send one request; yield the payload of each answer until done (OSError for an
    error answer other than an ACK)."""
    nl.send(NLMSG.pack(NLMSG.size + len(body), kind, flags, 1, 0) + body)
    while True:
        data = nl.recv(1 << 16)
        at = 0
        while at + NLMSG.size <= len(data):
            length, kind_got, _, _, _ = NLMSG.unpack_from(data, at)
            if length < NLMSG.size:
                return
            payload = data[at + NLMSG.size:at + length]
            at += (length + 3) & ~3
            if kind_got == NLMSG_DONE:
                return
            if kind_got == NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0]
                if code:
                    raise OSError(code, os.strerror(code))
                return  # the ACK
            yield payload
        if not flags & NLM_F_DUMP:
            return


def _holder(payload: bytes, sockets: dict[int, int]) -> Holder | None:
    family = payload[0]
    sockid = payload[MSG.size:MSG.size + SOCKID.size]
    _, _, _, _, inode = MSG_TAIL.unpack_from(payload, MSG.size + SOCKID.size)
    if inode not in sockets:
        return None
    at = MSG.size + SOCKID.size + MSG_TAIL.size
    memory = None
    while at + RTA.size <= len(payload):
        length, kind = RTA.unpack_from(payload, at)
        if length < RTA.size:
            break
        if kind == INET_DIAG_SKMEMINFO:
            memory = struct.unpack_from(f"={(length - RTA.size) // 4}I", payload, at + RTA.size)
        at += (length + 3) & ~3
    if memory is None:
        return None
    _, dport, _, dst, _, _ = SOCKID.unpack(sockid)
    address = socket.inet_ntop(family, dst[:4] if family == socket.AF_INET else dst)
    peer = f"{address}:{dport}" if family == socket.AF_INET else f"[{address}]:{dport}"
    return Holder(memory[RMEM_ALLOC] + memory[WMEM_QUEUED], family, sockid, peer, inode, sockets[inode])
