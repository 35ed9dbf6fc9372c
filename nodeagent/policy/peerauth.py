"""PeerAuthentication: the mTLS mode (STRICT, PERMISSIVE, DISABLE) for a pod's port.

Istio's composition, as istiod does it for sidecars and ambient alike: one mesh-level
policy (root namespace, no selector), one namespace-level (the pod's namespace, no
selector), one workload-level (the pod's namespace, a selector matching the pod); where
a level has several, the oldest wins (creation timestamp, then name). The narrowest set
mode wins, UNSET inherits, and the workload policy's `portLevelMtls` (keyed by the pod's
own port, not the Service port) overrides for that port. Nothing set means PERMISSIVE.
Like istiod, a policy with a selector in the root namespace takes part at no level. The
fail-closed stand-in of a refused policy whose selector cannot be read (failclosed.py)
is a workload-level policy of every pod of its namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable, Mapping

from nodeagent.model import Pod
from nodeagent.policy.scope import labels_match

UNSET, DISABLE, PERMISSIVE, STRICT = "UNSET", "DISABLE", "PERMISSIVE", "STRICT"
MODES = (UNSET, DISABLE, PERMISSIVE, STRICT)
DEFAULT_MODE = PERMISSIVE
_NEVER = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class PeerAuthentication:
    namespace: str
    name: str
    created: datetime | None  # metadata.creationTimestamp; None sorts after every time
    match_labels: Mapping[str, str] = field(default_factory=dict)  # empty: namespace/mesh
    mode: str = UNSET
    port_modes: Mapping[int, str] = field(default_factory=dict)
    fail_closed: bool = False  # a refused resource's stand-in (failclosed.py), not a version of it
    # A workload-level policy selecting every pod of its namespace: the stand-in of one
    # whose selector cannot be read (a namespace-level one would lose to an older one).
    every_workload: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def age(self) -> tuple[bool, datetime, str]:
        """Sort key: oldest first, undated last, then by name."""
        return (self.created is None, self.created or _NEVER, self.name)


def _oldest(policies: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    return min(policies, key=PeerAuthentication.age, default=None)


def levels(policies: Iterable[PeerAuthentication], root_namespace: str,
           pod: Pod) -> tuple[PeerAuthentication | None, ...]:
    """The (mesh, namespace, workload) policies in force for `pod`, each possibly None."""
    root, own, workload = [], [], []
    for p in policies:
        if p.namespace == root_namespace and not p.match_labels:
            root.append(p)
        elif p.namespace == pod.namespace != root_namespace:
            (workload if p.match_labels or p.every_workload else own).append(p)
    return (_oldest(root), _oldest(own),
            _oldest(p for p in workload if labels_match(p.match_labels, pod)))


def mtls_mode(policies: Iterable[PeerAuthentication], root_namespace: str, pod: Pod,
              port: int) -> str:
    """STRICT, PERMISSIVE or DISABLE for connections to `pod` on its port `port`."""
    mesh, namespace, workload = levels(policies, root_namespace, pod)
    mode = DEFAULT_MODE
    for level in (mesh, namespace, workload):
        if level is not None and level.mode != UNSET:
            mode = level.mode
    port_mode = workload.port_modes.get(port, UNSET) if workload is not None else UNSET
    return mode if port_mode == UNSET else port_mode
