"""In-pod policy routing that lets the agent deliver inbound connections with the
client's source address (design.md, "Delivery with the client's address").

In the pod netns: `net.ipv4.tcp_fwmark_accept=1` (the app's accepted socket inherits
the mark of the agent's delivery socket), `ip rule fwmark DELIVERY_MARK lookup TABLE` and
`local 0.0.0.0/0 dev lo table TABLE` (and the IPv6 pair for IPv6 pods), so the app's
replies to the client address are delivered locally to the agent's transparent socket.
The delivery mark differs from the mark on the agent's outbound sockets: with one mark
the rule would deliver the agent's own outbound connections locally too. Install and remove are
idempotent, so a restarted agent can re-apply them. They block (netlink, /proc/sys),
so callers run them in a worker thread: the thread enters the pod netns to open the
netlink socket and the sysctl file, which then keep addressing that netns.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodeagent import netns

TABLE = 539
RULE_PRIORITY = 32764  # before `main` (32766), after `local` (0)
FWMARK_ACCEPT = "/proc/sys/net/ipv4/tcp_fwmark_accept"
ENOENT, EEXIST, ESRCH = 2, 17, 3
DEFAULT = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}


@dataclass(frozen=True)
class RoutingSpec:
    mark: int
    families: tuple[int, ...] = (socket.AF_INET,)
    table: int = TABLE
    priority: int = RULE_PRIORITY


def _open(netns_fd: int) -> tuple[IPRoute, int]:
    """A netlink socket and the loopback ifindex, both of the pod netns."""
    with netns.entered(netns_fd):
        ipr = IPRoute()
    try:
        lo = ipr.link_lookup(ifname="lo")
        if not lo:
            raise OSError("the pod network namespace has no loopback interface")
        return ipr, lo[0]
    except BaseException:
        ipr.close()
        raise


def _write_sysctl(netns_fd: int, value: str) -> str:
    """Set tcp_fwmark_accept in the pod netns; return the previous value."""
    with netns.entered(netns_fd):
        with open(FWMARK_ACCEPT, "r+") as f:
            previous = f.read().strip()
            if previous != value:
                f.seek(0)
                f.write(value)
    return previous


def _has_rule(ipr: IPRoute, spec: RoutingSpec, family: int) -> bool:
    for rule in ipr.get_rules(family=family):
        if (rule.get("priority") == spec.priority and rule.get("fwmark") == spec.mark
                and rule.get("table") == spec.table):
            return True
    return False


def install(netns_fd: int, spec: RoutingSpec) -> str:
    """Apply the pod's delivery routing; returns the previous tcp_fwmark_accept value."""
    previous = _write_sysctl(netns_fd, "1")
    ipr, lo = _open(netns_fd)
    with ipr:
        for family in spec.families:
            if not _has_rule(ipr, spec, family):
                ipr.rule("add", family=family, table=spec.table, fwmark=spec.mark, priority=spec.priority)
            ipr.route("replace", family=family, type="local", dst=DEFAULT[family], dst_len=0, oif=lo,
                      table=spec.table, scope="host")
    return previous


def remove(netns_fd: int, spec: RoutingSpec, fwmark_accept: str = "0") -> None:
    """Undo `install` (missing pieces are fine: removal must work after a crash)."""
    ipr, lo = _open(netns_fd)
    with ipr:
        for family in spec.families:
            while _has_rule(ipr, spec, family):
                ipr.rule("del", family=family, table=spec.table, fwmark=spec.mark, priority=spec.priority)
            try:
                ipr.route("del", family=family, type="local", dst=DEFAULT[family], dst_len=0, oif=lo,
                          table=spec.table, scope="host")
            except NetlinkError as exc:
                if exc.code not in (ENOENT, ESRCH):
                    raise
    _write_sysctl(netns_fd, fwmark_accept)
