"""The four rtnetlink messages of in-pod routing, byte for byte (what `ip rule add
fwmark 0x1539 lookup 539 pref 32764` and `ip route add local default dev lo table 539`
send), and ack parsing. The kernel tests apply them for real."""

from __future__ import annotations

import socket
import struct

from nodeagent.agent.inpod import podrouting as pr

SPEC = pr.RoutingSpec(0x1539)


def attrs(data: bytes) -> dict[int, int]:
    out, offset = {}, 0
    while offset < len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        out[kind] = struct.unpack_from("=I", data, offset + 4)[0]
        offset += (length + 3) & ~3
    return out


def test_rule_body_matches_iproute2():
    body = pr.rule_body(socket.AF_INET, SPEC)
    # struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags (u32)
    assert body[:12] == b"\x02\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00"
    assert attrs(body[12:]) == {pr.FRA_PRIORITY: 32764, pr.FRA_FWMARK: 0x1539, pr.FRA_TABLE: 539}


def test_route_body_matches_iproute2():
    body = pr.route_body(socket.AF_INET6, SPEC)
    # struct rtmsg: family, dst_len, src_len, tos, table, protocol (static), scope (host), type (local), flags
    assert body[:12] == b"\x0a\x00\x00\x00\x00\x04\xfe\x02\x00\x00\x00\x00"
    assert attrs(body[12:]) == {pr.RTA_TABLE: 539, pr.RTA_OIF: 1}


def test_message_header():
    msg = pr.message(pr.RTM_NEWRULE, pr.NLM_F_CREATE | pr.NLM_F_EXCL, 7, b"x" * 12)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq, pid) == (28, 32, 7, 0)
    assert flags == pr.NLM_F_REQUEST | pr.NLM_F_ACK | 0x600


def test_acks():
    def ack(seq: int, err: int) -> bytes:
        return struct.pack("=IHHII", 36, pr.NLMSG_ERROR, 0, seq, 0) + struct.pack("=i", -err) + b"\0" * 16

    other = struct.pack("=IHHII", 20, 16, 0, 9, 0) + b"\0" * 4  # not an ack
    assert pr.acks(other + ack(1, 0) + ack(2, 17)) == {1: 0, 2: 17}
    assert pr.acks(b"") == {} and pr.acks(b"\0" * 16) == {}
