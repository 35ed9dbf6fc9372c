"""ctypes mirrors of bpf/nodeagent.h: structs, codes, counters and map definitions.

The one Python place that knows the kernel-side layout (STYLE.md rule 3);
tests/kernel/test_structs.py compiles the header and checks every size, offset and
map definition here against what clang and the kernel see. Same ABI rule as the
header: fields never move, codes and counters are never renumbered.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import socket
from dataclasses import dataclass

from nodeagent.addresses import unmapped

MAX_EXCLUDED_PORTS = 8  # NA_MAX_EXCLUDED_PORTS
POD_F_CAPTURE = 1 << 0  # NA_POD_F_CAPTURE


class Addr(ctypes.Structure):
    """struct na_addr: an IP address as a map key (IPv4 in addr[0])."""
    _fields_ = [("family", ctypes.c_uint16), ("_pad0", ctypes.c_uint16),
                ("addr", ctypes.c_uint32 * 4)]  # __be32: holds the raw network-order bytes

    @classmethod
    def of(cls, ip: str) -> "Addr":
        parsed = ipaddress.ip_address(ip)
        key = cls(family=socket.AF_INET if parsed.version == 4 else socket.AF_INET6)
        ctypes.memmove(key.addr, parsed.packed, len(parsed.packed))
        return key

    def ip(self) -> str:
        raw = bytes(self.addr)
        if self.family == socket.AF_INET:
            return socket.inet_ntoa(raw[:4])  # as ipaddress.IPv4Address formats it, at a tenth of the cost
        # connect6 sees IPv4 destinations of dual-stack sockets as ::ffff:a.b.c.d
        return str(unmapped(ipaddress.IPv6Address(raw)))


def _with_ports(ctype, exclude_ports: list[int], **fields):
    """A `ctype` value with `fields` set and `exclude_ports` (0-terminated) filled in."""
    value = ctype(**fields)
    for i, port in enumerate(exclude_ports):
        value.exclude_ports[i] = port
    return value


class Pod(ctypes.Structure):
    """struct na_pod: value of na_pods (one meshed netns)."""
    _fields_ = [("flags", ctypes.c_uint32),
                ("exclude_ports", ctypes.c_uint16 * MAX_EXCLUDED_PORTS)]

    @classmethod
    def of(cls, flags: int, exclude_ports: list[int]) -> "Pod":
        return _with_ports(cls, exclude_ports, flags=flags)


class PodIp(ctypes.Structure):
    """struct na_pod_ip: value of na_enrolled_ips (a steered pod IP)."""
    _fields_ = [("netns_cookie", ctypes.c_uint64),
                ("exclude_ports", ctypes.c_uint16 * MAX_EXCLUDED_PORTS)]

    @classmethod
    def of(cls, netns_cookie: int, exclude_ports: list[int]) -> "PodIp":
        return _with_ports(cls, exclude_ports, netns_cookie=netns_cookie)


class OrigDst(ctypes.Structure):
    """struct na_origdst: an original destination (port in network byte order)."""
    _fields_ = [("netns_cookie", ctypes.c_uint64), ("dst", Addr),
                ("port", ctypes.c_uint16), ("_pad0", ctypes.c_uint16)]

    def destination(self) -> tuple[str, int]:
        return self.dst.ip(), socket.ntohs(self.port)


class OrigDstKey(ctypes.Structure):
    """struct na_origdst_key: (netns cookie, family, client port in host order)."""
    _fields_ = [("netns_cookie", ctypes.c_uint64), ("family", ctypes.c_uint16),
                ("client_port", ctypes.c_uint16), ("_pad0", ctypes.c_uint32)]


class Code(enum.IntEnum):
    """enum na_code: why a program acted or not."""
    OK = 0
    SKIP_NOT_TCP = -1
    SKIP_NOT_MESHED = -2
    SKIP_MARK = -3
    SKIP_LOOPBACK = -4
    SKIP_EXCLUDED = -5
    SKIP_AGENT_PORT = -6
    ERR_ORIGDST_UPDATE = -7
    ERR_NO_LISTENER = -8
    ERR_SK_ASSIGN = -9


class Counter(enum.IntEnum):
    """enum na_counter: indexes into na_counters."""
    CAPTURED = 0
    SKIPPED_MARK = 1
    SKIPPED_LOOPBACK = 2
    SKIPPED_EXCLUDED = 3
    ORIGDST_RECORDED = 4
    STEERED = 5
    DROPPED_FAILCLOSED = 6
    INBOUND_EXCLUDED = 7
    ERR_ORIGDST = 8
    ERR_SK_ASSIGN = 9


COUNTERS_MAX = len(Counter)  # NA_CNT_MAX

# bpf_map_type values of the maps below
MAP_HASH, MAP_PERCPU_ARRAY, MAP_LRU_HASH, MAP_SOCKHASH = 1, 6, 9, 18


@dataclass(frozen=True)
class MapSpec:
    """One map of nodeagent.h: what a pinned map must look like to be adopted."""
    name: str
    type: int
    key: type[ctypes._CData]
    value: type[ctypes._CData]
    max_entries: int


MAPS = (
    MapSpec("na_pods", MAP_HASH, ctypes.c_uint64, Pod, 1024),
    MapSpec("na_origdst_ck", MAP_LRU_HASH, ctypes.c_uint64, OrigDst, 65536),
    MapSpec("na_origdst", MAP_LRU_HASH, OrigDstKey, OrigDst, 65536),
    MapSpec("na_inbound", MAP_SOCKHASH, Addr, ctypes.c_uint64, 2048),
    MapSpec("na_enrolled_ips", MAP_HASH, Addr, PodIp, 2048),
    MapSpec("na_counters", MAP_PERCPU_ARRAY, ctypes.c_uint32, ctypes.c_uint64, COUNTERS_MAX),
)
MAPS_BY_NAME = {spec.name: spec for spec in MAPS}
