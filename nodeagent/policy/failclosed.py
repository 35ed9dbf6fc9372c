"""What a security resource that fails validation enforces when it has no last good version.

PolicySet.build keeps the last good version of a resource that turns invalid (but not
one refused only for an action nodeagent does not implement: `unimplemented`). One with
none (created invalid, or first seen invalid after a restart: the sources check only an
object's envelope) was left out until 2026-12-07, which opened what it was there to
close: a DENY's workloads were not denied, an ALLOW's were open to everybody (no ALLOW
applied), a STRICT PeerAuthentication's took plaintext. It fails closed instead, as
`stand_in` says: an AuthorizationPolicy whose action is DENY, CUSTOM or unreadable
denies every connection to its workloads (a CUSTOM one whose rules can be read denies
what they match, `custom_as_deny`); an ALLOW is an ALLOW without rules, which matches
nothing; a PeerAuthentication is STRICT on every port. Its workloads are those its
selector or targetRefs select, as the policy would apply; when those cannot be read,
every workload of its namespace (of the mesh in the root namespace), the widest it
could have meant. AUDIT and dry-run policies enforce nothing, valid or not, and a
RequestAuthentication nothing at L4. Pure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Callable, TypeVar

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject
from nodeagent.policy.authz import ALLOW, AUDIT, CUSTOM, DENY, AuthorizationPolicy, Rule
from nodeagent.policy.peerauth import STRICT, PeerAuthentication
from nodeagent.policy.schema import Field, all_errors, created, resource_name
from nodeagent.policy.scope import Scope
from nodeagent.policy.validate import (ACTIONS, AUTHORIZATION_POLICY, GROUP, PEER_AUTHENTICATION, Policy,
                                       authorization_policy, dry_run, match_labels, read_scope)

T = TypeVar("T")
# The fate each error of a refused resource ends with (policyset.with_fate).
REFUSED = "the whole resource is refused"
KEPT = f"{REFUSED}; its last good version stays in force"
FAIL_CLOSED = f"{REFUSED}; with no last good version to keep, it is enforced fail-closed"
AS_DENY = (f"{REFUSED}; its rules are enforced as a DENY, as istiod enforces a CUSTOM policy whose "
           "provider it cannot use")
AUTHZ_FIELDS = ("selector", "targetRef", "targetRefs", "rules", "action", "provider")
PEERAUTH_FIELDS = ("selector", "mtls", "portLevelMtls")
OLDEST = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class StandIn:
    """What a refused resource with no last good version enforces (its `fail_closed` is
    set: never taken for a last good version) and how, for its errors."""

    policy: Policy
    fate: str


def stand_in(obj: KubeObject, root_namespace: str) -> StandIn | None:
    """The fail-closed stand-in of `obj`, which validation refused and which has no last
    good version; None when it enforces nothing (AUDIT, a dry run, RequestAuthentication,
    a root-namespace PeerAuthentication with a selector, another API group)."""
    if obj.group != GROUP:
        return None
    if obj.kind == AUTHORIZATION_POLICY:
        return _authorization(obj, root_namespace)
    if obj.kind == PEER_AUTHENTICATION:
        return _peer_authentication(obj, root_namespace)
    return None


def unimplemented(obj: KubeObject) -> bool:
    """An AuthorizationPolicy whose action Istio takes and nodeagent does not (AUDIT,
    CUSTOM): refused for that alone, it is no bad edit to ride out with the last good
    version (a DENY edited into a CUSTOM one would keep the old DENY's narrower rules on a
    running agent, and a fresh one would enforce the new rules: one policy, two verdicts).
    Its reading is the stand-in's, with a last good version or not."""
    return obj.group == GROUP and obj.kind == AUTHORIZATION_POLICY and obj.spec.get("action") in (AUDIT, CUSTOM)


def custom_as_deny(obj: KubeObject) -> AuthorizationPolicy | None:
    """A CUSTOM AuthorizationPolicy (refused: nodeagent has no ext-authz provider) read as a
    DENY of its rules, as istiod enforces a CUSTOM policy whose provider it cannot use
    (its "bad custom" deny rules): refused alone, what it would send to the provider went
    through unchecked. None when `obj` is no CUSTOM policy or its rules are invalid too."""
    spec = obj.spec
    if obj.kind != AUTHORIZATION_POLICY or spec.get("action") != CUSTOM:
        return None
    body = {**obj.body, "spec": {**{k: v for k, v in spec.items() if k != "provider"}, "action": DENY}}
    denying = _read(lambda: authorization_policy(dataclasses.replace(obj, body=body)))
    return dataclasses.replace(denying, fail_closed=True) if denying is not None else None


def _authorization(obj: KubeObject, root_namespace: str) -> StandIn | None:
    if dry_run(obj):
        return None
    parts = _spec_fields(obj, AUTHZ_FIELDS)
    action = _read(lambda: parts["action"].enum(ACTIONS, ALLOW)) if parts is not None else None
    if action == AUDIT:
        return None
    if action == CUSTOM:
        denying = custom_as_deny(obj)
        if denying is not None:
            return StandIn(denying, AS_DENY)
    scope, workloads = _scope(obj, parts, root_namespace)
    if action == ALLOW:
        return StandIn(AuthorizationPolicy(obj.name, scope, ALLOW, (), fail_closed=True),
                       f"{FAIL_CLOSED} as an ALLOW policy without rules for {workloads}: what no other "
                       "ALLOW policy allows is denied")
    why = {DENY: "", CUSTOM: " (a CUSTOM policy whose rules cannot be read either)"}.get(
        action, " (its action cannot be read)")
    return StandIn(AuthorizationPolicy(obj.name, scope, DENY, (Rule(),), fail_closed=True),
                   f"{FAIL_CLOSED}{why}: every connection to {workloads} is denied")


def _peer_authentication(obj: KubeObject, root_namespace: str) -> StandIn | None:
    parts = _spec_fields(obj, PEERAUTH_FIELDS)
    labels = _read(lambda: match_labels(parts["selector"])) if parts is not None else None
    root = obj.namespace == root_namespace
    if root and (labels or (parts is not None and parts["selector"].value is not None)):
        return None  # as istiod, a root-namespace policy with a selector (read or not) applies at no level
    try:
        when = created(obj)
    except ConfigError:
        when = OLDEST  # its age unknown: it wins its level, as the oldest does
    policy = PeerAuthentication(obj.namespace, obj.name, when, MappingProxyType(labels or {}), STRICT,
                                MappingProxyType({}), fail_closed=True,
                                every_workload=labels is None and not root)
    if labels is None:
        workloads = f"{_everyone(obj, root_namespace)} (its selector cannot be read)"
    else:
        workloads = "the workloads it selects" if labels else _everyone(obj, root_namespace)
    return StandIn(policy, f"{FAIL_CLOSED} as mode STRICT on every port of {workloads}: plaintext is refused")


def _scope(obj: KubeObject, parts: dict[str, Field] | None, root_namespace: str) -> tuple[Scope, str]:
    """The scope `obj` would apply to and its words; every workload of its namespace (of
    the mesh in the root namespace) when its selector or targetRefs cannot be read."""
    scope = _read(lambda: read_scope(obj, Field.spec_of(obj), parts)) if parts is not None else None
    if scope is not None and (scope.match_labels or scope.target_refs):
        return scope, "the workloads it selects"
    everyone = _everyone(obj, root_namespace)
    if scope is None:
        everyone += " (its selector or targetRefs cannot be read)"
    return Scope(obj.namespace), everyone


def _everyone(obj: KubeObject, root_namespace: str) -> str:
    if obj.namespace == root_namespace:
        return f"every workload of the mesh (root namespace {root_namespace})"
    return f"every workload of namespace {obj.namespace}"


def _spec_fields(obj: KubeObject, names: tuple[str, ...]) -> dict[str, Field] | None:
    """The spec's fields `names`, unknown ones let be (the refusal names them); None when
    the spec is no map."""
    spec = obj.body.get("spec")
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        return None
    return {name: Field(resource_name(obj), f"spec.{name}", spec.get(name)) for name in names}


def _read(read: Callable[[], T]) -> T | None:
    """read(), or None when it finds any problem."""
    try:
        return all_errors(read)
    except ConfigError:
        return None
