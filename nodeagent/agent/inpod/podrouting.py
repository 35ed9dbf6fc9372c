"""In-pod policy routing that lets the agent deliver inbound connections with the
client's source address (design.md, "Delivery with the client's address").

In the pod netns: `net.ipv4.tcp_fwmark_accept=1` (the app's accepted socket inherits
the mark of the agent's delivery socket), `ip rule fwmark DELIVERY_MARK lookup TABLE`
and `local 0.0.0.0/0 dev lo table TABLE` (and the IPv6 pair for IPv6 pods), so the
app's replies to the client address are delivered locally to the agent's transparent
socket. The delivery mark differs from the mark on the agent's outbound sockets: with
one mark the rule would deliver the agent's own outbound connections locally too.
Also `net.ipv4.tcp_migrate_req=1` (Linux 5.14): when an agent closes its in-pod
listeners at a rolling update, the connections queued on them move to the next agent's
listener of the same reuseport group instead of being reset (sockets.py).

These are four fixed rtnetlink messages, so they are built here rather than through
pyroute2, whose per-request overhead (~1 ms of CPU each) would dominate enrolment
time. The thread enters the pod netns only to open the netlink socket and the sysctl
file, which then keep addressing that netns. Install and remove are idempotent, so a
restarted agent re-applies them and removal works after a crash.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

from nodeagent import netns

TABLE = 539
RULE_PRIORITY = 32764  # before `main` (32766), after `local` (0)
FWMARK_ACCEPT = "/proc/sys/net/ipv4/tcp_fwmark_accept"
MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"
LOOPBACK_IFINDEX = 1  # lo is always ifindex 1 in its netns

# rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/fib_rules.h)
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE = 24, 25, 32, 33
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK, NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x100, 0x200, 0x400
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE = 6, 10, 15
RTA_OIF, RTA_TABLE = 4, 15
FR_ACT_TO_TBL, RTN_LOCAL, RT_SCOPE_HOST, RTPROT_STATIC = 1, 2, 254, 4
_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid


@dataclass(frozen=True)
class RoutingSpec:
    mark: int
    families: tuple[int, ...] = (socket.AF_INET,)
    table: int = TABLE
    priority: int = RULE_PRIORITY


def _attr(kind: int, value: int) -> bytes:
    return struct.pack("=HHI", 8, kind, value)  # every attribute here is a u32


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HDR.pack(_HDR.size + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


def rule_body(family: int, spec: RoutingSpec) -> bytes:
    """fib_rule_hdr + attributes of `fwmark MARK lookup TABLE pref PRIORITY`."""
    header = struct.pack("=BBBBBBBBI", family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0)  # ..., action, flags
    return header + _attr(FRA_PRIORITY, spec.priority) + _attr(FRA_FWMARK, spec.mark) + _attr(FRA_TABLE, spec.table)


def route_body(family: int, spec: RoutingSpec) -> bytes:
    """rtmsg + attributes of `local default dev lo table TABLE scope host`."""
    header = struct.pack("=BBBBBBBBI", family, 0, 0, 0, 0, RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL, 0)
    return header + _attr(RTA_TABLE, spec.table) + _attr(RTA_OIF, LOOPBACK_IFINDEX)


def acks(data: bytes) -> dict[int, int]:
    """seq -> errno (0 = done) of every NLMSG_ERROR (ack) in a netlink reply."""
    out, offset = {}, 0
    while offset + _HDR.size <= len(data):
        length, kind, _flags, seq, _pid = _HDR.unpack_from(data, offset)
        if length < _HDR.size:
            break
        if kind == NLMSG_ERROR:
            out[seq] = -struct.unpack_from("=i", data, offset + _HDR.size)[0]
        offset += (length + 3) & ~3
    return out


class _Netlink:
    """A route netlink socket of the pod netns (opened while the thread is in it)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.seq = 0

    def request(self, kind: int, flags: int, body: bytes) -> int:
        """Send one request; its errno (0 on success)."""
        self.seq += 1
        self.sock.send(message(kind, flags, self.seq, body))
        while True:
            result = acks(self.sock.recv(65536)).get(self.seq)
            if result is not None:
                return result

    def check(self, kind: int, flags: int, body: bytes, ok: tuple[int, ...] = ()) -> None:
        err = self.request(kind, flags, body)
        if err and err not in ok:
            raise OSError(err, f"rtnetlink request {kind} in the pod netns: {os.strerror(err)}")


def _open(netns_fd: int) -> tuple[_Netlink, list[int]]:
    """The pod netns' netlink socket and its tcp_fwmark_accept and tcp_migrate_req
    files (read-write fds)."""
    with netns.entered(netns_fd):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        sysctls: list[int] = []
        try:
            for path in (FWMARK_ACCEPT, MIGRATE_REQ):
                sysctls.append(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        except BaseException:
            sock.close()
            for fd in sysctls:
                os.close(fd)
            raise
    return _Netlink(sock), sysctls


def _write_sysctls(fds: list[int], value: str) -> None:
    for fd in fds:
        os.pwrite(fd, value.encode(), 0)


def install(netns_fd: int, spec: RoutingSpec) -> None:
    """Apply the pod's delivery routing."""
    nl, sysctls = _open(netns_fd)
    try:
        _write_sysctls(sysctls, "1")
        for family in spec.families:
            nl.check(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, rule_body(family, spec), ok=(errno.EEXIST,))
            nl.check(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, route_body(family, spec))
    finally:
        nl.sock.close()
        for fd in sysctls:
            os.close(fd)


def remove(netns_fd: int, spec: RoutingSpec) -> None:
    """Undo `install` (missing pieces are fine). tcp_fwmark_accept and tcp_migrate_req
    go back to the kernel default 0: after a restart the agent cannot know an earlier value."""
    nl, sysctls = _open(netns_fd)
    try:
        for family in spec.families:
            for _ in range(16):  # a duplicate rule (added by hand?) goes too
                if nl.request(RTM_DELRULE, 0, rule_body(family, spec)) != 0:
                    break
            nl.check(RTM_DELROUTE, 0, route_body(family, spec), ok=(errno.ENOENT, errno.ESRCH))
        _write_sysctls(sysctls, "0")
    finally:
        nl.sock.close()
        for fd in sysctls:
            os.close(fd)
