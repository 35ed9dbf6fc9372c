"""Which way an inbound connection to a meshed pod goes, and the re-check of every one
the agent sent on whenever what decided it changes.

`admit` is the one decision, from the policies in force and the waypoint's ACKed
steering: refused (PeerAuthentication STRICT for plaintext, else AuthorizationPolicy),
through the waypoint (the pod's port has server-side L7 policy, which Envoy enforces in
full), or delivered by the agent. The plaintext relay and the HBONE server ask it when a
connection arrives. `InboundConnections` keeps the connections they sent on, delivered
or through the waypoint, and asks again when the policies or the steering change (as
ztunnel's connection manager does). One the new state would send another way (now
denied, now behind the waypoint, no longer behind it) is reset, and so is one held on a
waypoint filter chain that changed: Envoy keeps a connection on the chain it was
accepted on until that chain's drain ends, so without the reset a pooled HTTP connection
would keep a withdrawn JWT requirement or rate limit, or miss a new rule. The client's
next connection meets the policy in force, applied and withdrawn alike.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter

from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.splice import Abort
from nodeagent.agent.proxy.steering import WaypointHandle
from nodeagent.policy import Connection, PolicySet
from nodeagent.policy.peerauth import STRICT

Address = tuple[str, int]
STRICT_POLICY = "peer-authentication-strict"  # the `policy` label of a STRICT refusal
NO_ALLOW_MATCH = "no-allow-match"  # ... of a denial because no ALLOW policy matched
DELIVER, WAYPOINT, DENY = "deliver", "waypoint", "deny"
ENFORCED = "enforced:"  # an Admission's chain when a routing waypoint enforced its HTTP policy


@dataclass(frozen=True)
class Admission:
    route: str  # DELIVER, WAYPOINT or DENY
    policy: str = ""  # DENY: the label of what refused it (a policy's ns/name, STRICT_POLICY, NO_ALLOW_MATCH)
    reason: str = ""  # DENY: why, for logs and the flow log
    chain: str = ""  # WAYPOINT: the digest of the Envoy filter chain that serves it


def admit(policies: PolicySet, waypoint: WaypointHandle, conn: Connection, plaintext: bool,
          probe: bool = False, enforced: str | None = None) -> Admission:
    """The route of `conn` under `policies` and the waypoint's steering. PeerAuthentication
    is checked first and by the agent even for a port behind the waypoint (Envoy gets no
    say about plaintext); AuthorizationPolicy is the waypoint's there, else the agent's.
    A `probe` (plaintext from a socket of the node to a port the pod's probes name:
    kubelet's; inbound.py tells) is delivered around both, as Istio's ambient mode lets kubelet's probes
    past ztunnel: else STRICT or an ALLOW would fail every probe and take the pod out of
    its Services. `enforced`: a routing waypoint enforced the HTTP policy of that digest
    for this connection (one waypoint per request: the source's node vouches for it); when
    it is what the pod port's chain enforces now (DataPlane.enforceable), the connection is
    delivered (every policy of the pod was the waypoint's to enforce, as here), tracked
    under that digest (`chain` "enforced:<digest>"), else it goes through the chain."""
    if probe and plaintext:
        return Admission(DELIVER)
    port = conn.destination_port
    if plaintext and policies.mtls_mode(conn.destination, port) == STRICT:
        return Admission(DENY, STRICT_POLICY, f"PeerAuthentication STRICT on port {port}: plaintext refused")
    # The digest of the waypoint's filter chain for the pod port: server-side L7 in force and ACKed.
    steering = waypoint.dataplane()
    chain = steering.inbound.get((conn.destination_ip, port))
    if chain is not None:
        if enforced is not None and not plaintext and \
                steering.enforceable.get((conn.destination_ip, port)) == enforced:
            # What the router decided is taken, but for what L4 can still check itself: the
            # source (its principal, namespace and address) and the port. A node vouching for
            # one of its pods cannot so send it where its policy's sources keep it out.
            decision = policies.authorize(conn, l7_checked=True)
            if not decision.allowed:
                return Admission(DENY, decision.policy or NO_ALLOW_MATCH, decision.reason)
            return Admission(DELIVER, chain=f"{ENFORCED}{enforced}")
        return Admission(WAYPOINT, chain=chain)
    decision = policies.authorize(conn)
    if decision.allowed:
        return Admission(DELIVER)
    return Admission(DENY, decision.policy or NO_ALLOW_MATCH, decision.reason)


@dataclass(eq=False)
class Delivered:
    """A connection the agent sent on to a pod, itself or through the waypoint: what it
    was admitted as, and how to end it."""

    conn: Connection
    src: Address  # the client's address and port
    plaintext: bool
    admission: Admission  # DELIVER, or WAYPOINT with the chain it was sent to
    abort: Abort
    probe: bool = False  # kubelet's probe (admit's `probe`)
    enforced: str | None = None  # the digest a routing waypoint enforced for it (admit's `enforced`)
    revoked: Admission | None = None  # set when a re-check ended it
    ends: ExitStack = field(default_factory=ExitStack)  # closed once it is no longer tracked


def still_admitted(entry: Delivered, now: Admission) -> bool:
    """Whether `entry` may live on under the admission `now` of its connection: the same
    route, and for the waypoint the same filter chain."""
    return now.route == entry.admission.route and now.chain == entry.admission.chain


class InboundConnections:
    def __init__(self, policies: Callable[[], PolicySet], pod_at: Callable[[str], PodContext | None],
                 waypoint: WaypointHandle, registry: CollectorRegistry, log: logging.Logger):
        self.policies = policies
        self.pod_at = pod_at  # enrolled pod by IP: the pod as the model has it now
        self.waypoint = waypoint  # the node's waypoint (or NoWaypoint): its ACKed steering
        self.log = log
        self._delivered: set[Delivered] = set()
        # called first thing by every recheck: what decides admission changed (routes.py)
        self.changing: list[Callable[[], None]] = []
        self.revoked = Counter("nodeagent_inbound_connections_revoked",
                               "Inbound connections the agent sent on (delivered or through the waypoint) reset "
                               "because a policy or waypoint change sends them another way, by that way "
                               "(deny, waypoint, deliver)", ["reason"], registry=registry)

    def __len__(self) -> int:
        return len(self._delivered)

    @contextmanager
    def delivering(self, conn: Connection, src: Address, plaintext: bool,
                   admission: Admission = Admission(DELIVER), probe: bool = False,
                   enforced: str | None = None) -> Iterator[Delivered]:
        """Track a connection while the agent relays it to the pod or the waypoint."""
        entry = self.track(Delivered(conn, src, plaintext, admission, Abort(), probe, enforced))
        try:
            yield entry
        finally:
            self.untrack(entry)

    def track(self, entry: Delivered) -> Delivered:
        """Track `entry` until `untrack` (what `delivering` does around a block)."""
        self._delivered.add(entry)
        return entry

    def untrack(self, entry: Delivered) -> None:
        self._delivered.discard(entry)
        entry.ends.close()

    def recheck(self) -> int:
        """Admit every tracked connection again; reset those that would now go another
        way or meet another waypoint filter chain. Returns how many were reset."""
        for changing in self.changing:
            changing()
        policies, ended = self.policies(), 0
        for entry in list(self._delivered):
            if entry.revoked is not None:
                continue
            ctx = self.pod_at(entry.conn.destination_ip)
            conn = replace(entry.conn, destination=ctx.pod) if ctx is not None else entry.conn
            admission = admit(policies, self.waypoint, conn, entry.plaintext, entry.probe, entry.enforced)
            if still_admitted(entry, admission):
                continue
            entry.revoked = admission
            entry.abort()
            ended += 1
            self.revoked.labels(reason=admission.route).inc()
            self.log.info("inbound %s:%d -> %s:%d (%s): reset, %s", *entry.src, conn.destination_ip,
                          conn.destination_port, conn.source_principal or "plaintext", describe(admission, entry))
        return ended


def describe(admission: Admission, entry: Delivered) -> str:
    """Why the tracked connection `entry` was reset under `admission`, for the log and the
    flow log."""
    if admission.route == DENY:
        return f"no longer allowed: {admission.reason}"
    if entry.admission.chain.startswith(ENFORCED):
        return ("the HTTP policy its routing waypoint enforced changed; the client reconnects under the one in "
                "force")
    if entry.admission.route == DELIVER:
        return "the port is now behind the waypoint (server-side L7 policy); the client reconnects through it"
    if admission.route == DELIVER:
        return "the port's server-side L7 policy was withdrawn; the client reconnects without the waypoint"
    return "the port's server-side L7 policy changed; the client reconnects under the new one"
