"""Which way an inbound connection to a meshed pod goes, and the re-check of the ones
the agent delivered itself whenever what decided them changes.

`admit` is the one decision, from the policies in force and the waypoint's ACKed
steering: refused (PeerAuthentication STRICT for plaintext, else AuthorizationPolicy),
through the waypoint (the pod's port has server-side L7 policy, which Envoy enforces in
full), or delivered by the agent. The plaintext relay and the HBONE server ask it when a
connection arrives. `InboundConnections` keeps the delivered ones and asks again when
the policies or the steering change (as ztunnel's connection manager does): one the new
state would not deliver (now denied, or now behind the waypoint) is reset, and its
report says why. The client's next connection meets the policy in force, so a pooled
HTTP connection cannot keep requests out of a new policy's reach. Connections through
the waypoint are not tracked: Envoy applies every change to them itself.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter

from nodeagent.agent.inpod import PodContext
from nodeagent.agent.splice import Abort
from nodeagent.policy import Connection, PolicySet
from nodeagent.policy.peerauth import STRICT

Address = tuple[str, int]
STRICT_POLICY = "peer-authentication-strict"  # the `policy` label of a STRICT refusal
NO_ALLOW_MATCH = "no-allow-match"  # ... of a denial because no ALLOW policy matched
DELIVER, WAYPOINT, DENY = "deliver", "waypoint", "deny"


@dataclass(frozen=True)
class Admission:
    route: str  # DELIVER, WAYPOINT or DENY
    policy: str = ""  # DENY: the label of what refused it (a policy's ns/name, STRICT_POLICY, NO_ALLOW_MATCH)
    reason: str = ""  # DENY: why, for logs and the flow log


def through_waypoint(waypoint, dst: Address) -> bool:
    """Whether the waypoint (when the agent runs one) has server-side L7 for `dst`."""
    return waypoint is not None and dst in waypoint.dataplane().inbound


def admit(policies: PolicySet, waypoint, conn: Connection, plaintext: bool) -> Admission:
    """The route of `conn` under `policies` and the waypoint's steering. PeerAuthentication
    is checked first and by the agent even for a port behind the waypoint (Envoy gets no
    say about plaintext); AuthorizationPolicy is the waypoint's there, else the agent's."""
    port = conn.destination_port
    if plaintext and policies.mtls_mode(conn.destination, port) == STRICT:
        return Admission(DENY, STRICT_POLICY, f"PeerAuthentication STRICT on port {port}: plaintext refused")
    if through_waypoint(waypoint, (conn.destination_ip, port)):
        return Admission(WAYPOINT)
    decision = policies.authorize(conn)
    if decision.allowed:
        return Admission(DELIVER)
    return Admission(DENY, decision.policy or NO_ALLOW_MATCH, decision.reason)


@dataclass(eq=False)
class Delivered:
    """A connection the agent delivered to a pod: what it was admitted as, and how to end it."""

    conn: Connection
    src: Address  # the client's address and port
    plaintext: bool
    abort: Abort
    revoked: Admission | None = None  # set when a re-check ended it


class InboundConnections:
    def __init__(self, policies: Callable[[], PolicySet], pod_at: Callable[[str], PodContext | None],
                 registry: CollectorRegistry, log: logging.Logger):
        self.policies = policies
        self.pod_at = pod_at  # enrolled pod by IP: the pod as the model has it now
        self.log = log
        self.waypoint = None  # the node's Waypoint, when the agent runs one
        self._delivered: set[Delivered] = set()
        self.revoked = Counter("nodeagent_inbound_connections_revoked",
                               "Delivered inbound connections reset because a policy or waypoint change "
                               "no longer lets the agent deliver them, by reason (deny, waypoint)",
                               ["reason"], registry=registry)

    def __len__(self) -> int:
        return len(self._delivered)

    @contextmanager
    def delivering(self, conn: Connection, src: Address, plaintext: bool) -> Iterator[Delivered]:
        """Track a connection while the agent relays it to the pod."""
        entry = Delivered(conn, src, plaintext, Abort())
        self._delivered.add(entry)
        try:
            yield entry
        finally:
            self._delivered.discard(entry)

    def recheck(self) -> int:
        """Admit every delivered connection again; reset those that would no longer be
        delivered. Returns how many were reset."""
        policies, ended = self.policies(), 0
        for entry in list(self._delivered):
            if entry.revoked is not None:
                continue
            ctx = self.pod_at(entry.conn.destination_ip)
            conn = replace(entry.conn, destination=ctx.pod) if ctx is not None else entry.conn
            admission = admit(policies, self.waypoint, conn, entry.plaintext)
            if admission.route == DELIVER:
                continue
            entry.revoked = admission
            entry.abort()
            ended += 1
            self.revoked.labels(reason=admission.route).inc()
            self.log.info("inbound %s:%d -> %s:%d (%s): reset, %s", *entry.src, conn.destination_ip,
                          conn.destination_port, conn.source_principal or "plaintext", describe(admission))
        return ended


def describe(admission: Admission) -> str:
    """Why a delivered connection was reset, for the log and the flow log."""
    if admission.route == WAYPOINT:
        return "the port is now behind the waypoint (server-side L7 policy); the client reconnects through it"
    return f"no longer allowed: {admission.reason}"
