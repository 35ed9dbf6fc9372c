"""The HBONE `:authority`: the original destination as `ip:port` (`[v6]:port`).

Only IP literals are accepted (as ztunnel does for workload traffic); the address is
returned canonical (`str(ipaddress.ip_address(...))`) so policy lookups match.
"""

from __future__ import annotations

import ipaddress

Address = tuple[str, int]


def format_authority(addr: Address) -> str:
    ip = ipaddress.ip_address(addr[0])
    return f"[{ip}]:{addr[1]}" if ip.version == 6 else f"{ip}:{addr[1]}"


def parse_authority(raw: bytes | str | None) -> Address | None:
    """`(ip, port)` for a well-formed IP authority, else None."""
    if raw is None:
        return None
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:  # ('²' is a digit)
        return None
    if host.startswith("[") and host.endswith("]"):
        host, want = host[1:-1], 6
    else:
        want = 4  # a bare IPv6 literal is ambiguous next to the port
    if "%" in host:  # a zone (fe80::1%eth0): no pod's address has one, and its text is anybody's
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (str(ip), int(port)) if ip.version == want else None
