"""The security policies in force, and the questions the data path asks of them.

`PolicySet.build(model, previous)` validates every AuthorizationPolicy,
PeerAuthentication and RequestAuthentication of a Model one by one: an invalid resource
is reported as a ConfigError and, if `previous` held a good version of it, that version
stays in force (a bad edit never opens or closes traffic by itself); one with no good
version (new, or first seen after a restart) is enforced fail-closed by its stand-in
(failclosed.py: a DENY of everything it may select, an ALLOW without rules, STRICT),
which is never taken for a good version. A PolicySet is immutable: a change builds a
new one. Root namespace (mesh-wide policies) is `istio-system` unless the caller's
configuration says otherwise.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType
from typing import Mapping

from nodeagent.errors import ConfigError
from nodeagent.model import Model, Pod
from nodeagent.policy import authz, failclosed, peerauth
from nodeagent.policy.authz import Connection, Decision
from nodeagent.policy.failclosed import KEPT, REFUSED
from nodeagent.policy.schema import all_errors, resource_name
from nodeagent.policy.scope import DEFAULT_ROOT_NAMESPACE, Scope
from nodeagent.policy.validate import (AUTHORIZATION_POLICY, KINDS, PEER_AUTHENTICATION,
                                       REQUEST_AUTHENTICATION, Policy, validate)

Key = tuple[str, str, str]  # (kind, namespace, name)


class PolicySet:
    def __init__(self, entries: Mapping[Key, Policy], root_namespace: str = DEFAULT_ROOT_NAMESPACE):
        self.root_namespace = root_namespace
        self._entries = MappingProxyType(dict(sorted(entries.items())))
        by_namespace: dict[tuple[str, str], list[Policy]] = {}
        for (kind, namespace, _), policy in self._entries.items():
            by_namespace.setdefault((kind, namespace), []).append(policy)
        self._by_namespace = MappingProxyType({k: tuple(v) for k, v in by_namespace.items()})

    @classmethod
    def build(cls, model: Model, previous: PolicySet | None = None,
              root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> tuple[PolicySet, list[ConfigError]]:
        entries: dict[Key, Policy] = {}
        errors: list[ConfigError] = []
        seen: set[Key] = set()
        for kind in KINDS:
            for obj in model.resources.get(kind, ()):
                key = (kind, obj.namespace, obj.name)
                if key in seen:
                    errors.append(ConfigError(resource_name(obj), "defined twice; the first one is used",
                                              "remove or rename one of them"))
                    continue
                seen.add(key)
                try:
                    entries[key] = all_errors(lambda: validate(obj), resource_name(obj))
                except ConfigError as err:
                    kept = previous.last_good(*key) if previous is not None and \
                        not failclosed.unimplemented(obj) else None
                    if kept is not None:
                        entries[key] = kept
                        errors.extend(with_fate(err, KEPT))
                        continue
                    stand_in = failclosed.stand_in(obj, root_namespace)
                    if stand_in is not None:
                        entries[key] = stand_in.policy
                    errors.extend(with_fate(err, stand_in.fate if stand_in is not None else REFUSED))
        return cls({key: _bound(p, model) for key, p in entries.items()}, root_namespace), errors

    def get(self, kind: str, namespace: str, name: str) -> Policy | None:
        """The resource as enforced: a version of it, or its fail-closed stand-in."""
        return self._entries.get((kind, namespace, name))

    def last_good(self, kind: str, namespace: str, name: str) -> Policy | None:
        """The version of the resource in force; None when none is, or only its stand-in."""
        policy = self.get(kind, namespace, name)
        return None if policy is None or getattr(policy, "fail_closed", False) else policy

    def keys(self) -> list[Key]:
        return list(self._entries)

    # --- what the data path asks ------------------------------------------------
    def authorize(self, conn: Connection, l7_checked: bool = False) -> Decision:
        """AuthorizationPolicy decision for a connection to `conn.destination` (authz.authorize)."""
        return authz.authorize(self._around(AUTHORIZATION_POLICY, conn.destination),
                               self.root_namespace, conn, l7_checked)

    def mtls_mode(self, pod: Pod, port: int) -> str:
        """"STRICT", "PERMISSIVE" or "DISABLE" for connections to `pod` on its port `port`."""
        return peerauth.mtls_mode(self._around(PEER_AUTHENTICATION, pod), self.root_namespace, pod, port)

    def workload_has_l7_policy(self, pod: Pod) -> bool:
        """True when `pod`'s traffic needs a waypoint for policy: an enforced ALLOW/DENY
        policy applying to it has fields only HTTP can evaluate, or a
        RequestAuthentication selects it."""
        root = self.root_namespace
        if any(p.enforced and p.has_l7 and p.scope.selects(pod, root)
               for p in self._around(AUTHORIZATION_POLICY, pod)):
            return True
        return any(r.scope.selects(pod, root) for r in self._around(REQUEST_AUTHENTICATION, pod))

    def _around(self, kind: str, pod: Pod) -> list:
        """Resources of `kind` that may apply to `pod`: its namespace's and the root's."""
        namespaces = dict.fromkeys((self.root_namespace, pod.namespace))
        return [p for ns in namespaces for p in self._by_namespace.get((kind, ns), ())]


def _bound(policy: Policy, model: Model) -> Policy:
    """`policy` with the Services its targetRefs name resolved in `model` (Scope.bound)."""
    scope = getattr(policy, "scope", None)
    if not isinstance(scope, Scope) or not scope.target_refs:
        return policy
    return dataclasses.replace(policy, scope=scope.bound(model.services))


def with_fate(err: ConfigError, fate: str) -> list[ConfigError]:
    """Each problem of a refused resource (ConfigErrors: all of them) with its fate
    (failclosed.py's REFUSED, KEPT, or a stand-in's) added to its hint."""
    return [_with_fate(one, fate) for one in getattr(err, "errors", (err,))]


def _with_fate(err: ConfigError, fate: str) -> ConfigError:
    message = err.message.removeprefix(f"{err.where}: ")
    return ConfigError(err.where, message, f"{err.hint}; {fate}" if err.hint else fate)

