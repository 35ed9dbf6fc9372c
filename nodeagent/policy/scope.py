"""Which workloads a security.istio.io resource applies to.

Istio scopes AuthorizationPolicy and RequestAuthentication by the resource's namespace
and an optional `selector.matchLabels`: in the root namespace (default `istio-system`)
the resource applies mesh-wide, elsewhere to its own namespace; the selector narrows
that to the pods carrying all its labels. A resource bound with `targetRef(s)` to a
Service applies to the Service's pods (its namespace's pods carrying its selector's
labels), in the L4 engine as in the waypoint: the waypoint enforces it on the ports it
serves, the L4 engine everywhere else (before 2026-12-06 the L4 engine ignored such
resources, so they were enforced nowhere on a port the waypoint did not serve: an L4-only
DENY never, an ALLOW not before Envoy's first ACK). `bound` resolves the Services from the
model (PolicySet.build); a Gateway or ServiceEntry binds no pod here.
PeerAuthentication has its own levels and uses only `labels_match` (see peerauth.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping

from nodeagent.model import Pod, Service

DEFAULT_ROOT_NAMESPACE = "istio-system"


@dataclass(frozen=True)
class TargetRef:
    group: str
    kind: str
    name: str


@dataclass(frozen=True)
class Scope:
    namespace: str
    match_labels: Mapping[str, str] = field(default_factory=dict)  # empty: whole namespace
    target_refs: tuple[TargetRef, ...] = ()
    services: tuple[Mapping[str, str], ...] = ()  # the selectors of the Services named (bound)

    def selects(self, pod: Pod, root_namespace: str) -> bool:
        """Does this resource apply to `pod` in the L4 engine?"""
        if self.target_refs:
            return pod.namespace == self.namespace and any(labels_match(s, pod) for s in self.services)
        if self.namespace != root_namespace and self.namespace != pod.namespace:
            return False
        return labels_match(self.match_labels, pod)

    def bound(self, services: Mapping[tuple[str, str], Service]) -> "Scope":
        """This scope with the selectors of the Services its targetRefs name, as `services`
        has them (a Service without a selector, or missing, selects no pod)."""
        if not self.target_refs:
            return self
        found = []
        for ref in self.target_refs:
            service = services.get((self.namespace, ref.name))
            if ref.kind == "Service" and ref.group in ("", "core") and service is not None and service.selector:
                found.append(service.selector)
        return dataclasses.replace(self, services=tuple(found))


def labels_match(match_labels: Mapping[str, str], pod: Pod) -> bool:
    return all(pod.labels.get(k) == v for k, v in match_labels.items())
