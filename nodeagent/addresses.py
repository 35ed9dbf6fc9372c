"""IP addresses as the mesh compares them."""

from __future__ import annotations

import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmapped(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d, how a dual-stack socket sees an IPv4
    peer) as the IPv4 address it stands for; any other address as it is."""
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address
