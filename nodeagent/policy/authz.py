"""L4 AuthorizationPolicy evaluation for one connection to a destination workload.

Istio's order: CUSTOM (refused at validation, there is no ext-authz provider) → DENY
(any matching DENY rule denies) → ALLOW (if an ALLOW policy applies to the workload, the
connection must match one of its rules, else it is denied; with none, it is allowed).
AUDIT and dry-run policies never change a decision. A rule is from (OR of sources) AND
to (OR of operations) AND when (every condition); inside a source or operation the fields
AND, the values of a field OR. Fields the L4 engine cannot see (HTTP ones, connection.sni)
fail safe as Istio documents for ztunnel: an ALLOW rule holding one matches nothing, a
DENY rule is enforced without them (broader). Types are built by validate.py; pure.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from nodeagent.addresses import unmapped
from nodeagent.model import Pod
from nodeagent.policy.scope import Scope

ALLOW, DENY, AUDIT, CUSTOM = "ALLOW", "DENY", "AUDIT", "CUSTOM"
ENFORCED_ACTIONS = (ALLOW, DENY)
SPIFFE = "spiffe://"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Text:
    """Istio's string match: exact, `prefix*`, `*suffix`, or `*` (any non-empty value)."""

    pattern: str

    def matches(self, value: str | None) -> bool:
        if not value:
            return False
        p = self.pattern
        if p == "*":
            return True
        if p.startswith("*"):
            return value.endswith(p[1:])
        if p.endswith("*"):
            return value.startswith(p[:-1])
        return value == p


@dataclass(frozen=True)
class Net:
    network: IPNetwork

    def matches(self, value: Any) -> bool:
        return value is not None and value.version == self.network.version and value in self.network


@dataclass(frozen=True)
class Port:
    port: int

    def matches(self, value: int | None) -> bool:
        return value == self.port


@dataclass(frozen=True)
class Condition:
    """`attribute` matches one of `patterns` (or, negated, none of them). A missing
    attribute (a plaintext peer has no principal) matches no pattern."""

    attribute: str  # source.principal, source.namespace, source.ip, destination.port...
    patterns: tuple[Text | Net | Port, ...]
    negate: bool = False

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        value = attrs.get(self.attribute)
        hit = any(p.matches(value) for p in self.patterns)
        return hit != self.negate


def _all(conditions: Iterable[Condition], attrs: Mapping[str, Any]) -> bool:
    return all(c.matches(attrs) for c in conditions)


def _any_entry(entries: tuple[tuple[Condition, ...], ...], attrs: Mapping[str, Any]) -> bool:
    """`from`/`to`: absent matches everything, else one entry must match."""
    return not entries or any(_all(e, attrs) for e in entries)


@dataclass(frozen=True)
class Rule:
    sources: tuple[tuple[Condition, ...], ...] = ()  # from: OR of ANDs
    operations: tuple[tuple[Condition, ...], ...] = ()  # to: OR of ANDs
    conditions: tuple[Condition, ...] = ()  # when: AND
    l7_fields: tuple[str, ...] = ()  # fields L4 cannot evaluate, left out of the above

    def matches(self, attrs: Mapping[str, Any], action: str, l7_checked: bool = False) -> bool:
        """Whether the rule matches what L4 sees. A rule with fields only HTTP can supply:
        an ALLOW one matches nothing, a DENY one is decided on the rest (fail safe); with
        `l7_checked` (a waypoint decided them for this connection already) the other way
        round: an ALLOW one is decided on the rest, a DENY one matches nothing here."""
        if self.l7_fields and (action == DENY) == l7_checked:
            return False  # fail safe: an ALLOW never widens to what L4 cannot check
        return (_any_entry(self.sources, attrs) and _any_entry(self.operations, attrs)
                and _all(self.conditions, attrs))


@dataclass(frozen=True)
class AuthorizationPolicy:
    name: str
    scope: Scope
    action: str  # ALLOW, DENY or AUDIT (CUSTOM is refused by validation)
    rules: tuple[Rule, ...]
    dry_run: bool = False  # istio.io/dry-run: evaluated by nobody, enforced never
    fail_closed: bool = False  # a refused resource's stand-in (failclosed.py), not a version of it

    @property
    def key(self) -> str:
        return f"{self.scope.namespace}/{self.name}"

    @property
    def enforced(self) -> bool:
        return self.action in ENFORCED_ACTIONS and not self.dry_run

    @property
    def has_l7(self) -> bool:
        return any(r.l7_fields for r in self.rules)

    def first_match(self, attrs: Mapping[str, Any], l7_checked: bool = False) -> int | None:
        """Index of the first matching rule; a policy without rules matches nothing."""
        for i, rule in enumerate(self.rules):
            if rule.matches(attrs, self.action, l7_checked):
                return i
        return None


@dataclass(frozen=True)
class Connection:
    source_ip: str
    source_principal: str | None  # full SPIFFE URI as verified by mTLS; None for plaintext
    source_namespace: str | None
    destination: Pod
    destination_ip: str
    destination_port: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    policy: str | None  # "ns/name" of the deciding policy
    rule: int | None
    reason: str  # for logs and the flow log


def attributes(conn: Connection) -> dict[str, Any]:
    """Istio's attribute names for what L4 knows. Principal, namespace and service account
    come only from a verified identity: a plaintext connection has none of them."""
    principal = conn.source_principal
    identity = principal[len(SPIFFE):] if principal and principal.startswith(SPIFFE) else None
    namespace = service_account = None
    parts = identity.split("/") if identity else []
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":  # td/ns/<ns>/sa/<sa>
        namespace, service_account = parts[2], f"{parts[2]}/{parts[4]}"
    elif identity:  # an identity of another shape: the namespace the tunnel gives
        namespace = conn.source_namespace
    source_ip = _ip(conn.source_ip)
    return {
        "source.principal": identity,
        "source.namespace": namespace,
        "source.serviceAccount": service_account,
        "source.ip": source_ip,
        "destination.ip": _ip(conn.destination_ip),
        "destination.port": conn.destination_port,
    }


@functools.lru_cache(maxsize=4096)  # per connection twice; the addresses are the pods' (immutable results)
def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address, IPv4-mapped IPv6 (a dual-stack listener's view) read as IPv4."""
    return unmapped(ipaddress.ip_address(text))


def authorize(policies: Sequence[AuthorizationPolicy], root_namespace: str,
              conn: Connection, l7_checked: bool = False) -> Decision:
    """Decide `conn` against the policies (only those that apply to its destination count).
    `l7_checked`: a waypoint decided the rules' HTTP fields for it already (Rule.matches):
    what is left is what L4 can still hold it to (its source, its port)."""
    applying = [p for p in policies
                if p.enforced and p.scope.selects(conn.destination, root_namespace)]
    attrs = attributes(conn)
    for policy in (p for p in applying if p.action == DENY):
        rule = policy.first_match(attrs, l7_checked)
        if rule is not None:
            return Decision(False, policy.key, rule, _denied(policy, rule))
    allows = [p for p in applying if p.action == ALLOW]
    if not allows:
        return Decision(True, None, None, "no ALLOW policy applies")
    for policy in allows:
        rule = policy.first_match(attrs, l7_checked)
        if rule is not None:
            return Decision(True, policy.key, rule, f"allowed by ALLOW policy {policy.key} rule {rule}")
    return Decision(False, None, None, f"no ALLOW policy matched ({len(allows)} apply)")


def _denied(policy: AuthorizationPolicy, rule: int) -> str:
    reason = f"denied by DENY policy {policy.key} rule {rule}"
    if policy.fail_closed:
        return f"{reason} (the policy is invalid and enforced fail-closed; see the agent's policy errors)"
    ignored = policy.rules[rule].l7_fields
    return f"{reason} (ignoring {', '.join(ignored)}, which L4 cannot see)" if ignored else reason
