"""Which workloads a security.istio.io resource applies to.

Istio scopes AuthorizationPolicy and RequestAuthentication by the resource's namespace
and an optional `selector.matchLabels`: in the root namespace (default `istio-system`)
the resource applies mesh-wide, elsewhere to its own namespace; the selector narrows
that to the pods carrying all its labels. A resource bound with `targetRef(s)` (a
Gateway, Service or ServiceEntry) is for a waypoint or gateway, never for the L4 engine.
PeerAuthentication has its own levels and uses only `labels_match` (see peerauth.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from nodeagent.model import Pod

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

    def selects(self, pod: Pod, root_namespace: str) -> bool:
        """Does this resource apply to `pod` in the L4 engine?"""
        if self.target_refs:
            return False
        if self.namespace != root_namespace and self.namespace != pod.namespace:
            return False
        return labels_match(self.match_labels, pod)


def labels_match(match_labels: Mapping[str, str], pod: Pod) -> bool:
    return all(pod.labels.get(k) == v for k, v in match_labels.items())
