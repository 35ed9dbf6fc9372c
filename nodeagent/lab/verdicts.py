"""What the agents made of the Istio resources `lab apply` wrote: in force, or refused
and why, as `kubectl apply` answers with a webhook's validation (istiod's). Without
this, apply said "configured" for a VirtualService whose regex the agents refused, and
the old version silently stayed in force.

An agent's verdict on a resource counts once it has rebuilt its policies (and, when it
runs a waypoint, the waypoint's configuration) since the apply began and Envoy is in
sync with that: then the
resource is in force if its spec's digest is among the agent's resources in force
(policy or waypoint), refused if an error of the agent names it, not in force (without
being refused) if only a warning names it (a VirtualService bound to gateways only).
Istio kinds the agents do not read get their verdict at once, without asking an agent
(xds/istio/kinds.py: "not supported in ambient mode", "not applicable to ambient",
"unknown kind"); Kubernetes' own kinds get none.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from nodeagent.digests import spec_digest
from nodeagent.kube.objects import KubeObject
from nodeagent.xds.istio import kinds

KINDS = {("security.istio.io", "AuthorizationPolicy"), ("security.istio.io", "PeerAuthentication"),
         ("security.istio.io", "RequestAuthentication"), ("networking.istio.io", "VirtualService"),
         ("networking.istio.io", "DestinationRule"), ("networking.istio.io", "EnvoyFilter")}
POLL = 0.1


@dataclass(frozen=True)
class Verdict:
    obj: KubeObject
    nodes: tuple[str, ...]  # whose agents said so; () for a kind judged without them
    error: str | None  # None: in force; several problems one per line
    severity: str = kinds.ERROR  # of `error`: an error refuses, a warning only says it is not in force

    @property
    def refused(self) -> bool:
        return self.error is not None and self.severity == kinds.ERROR

    def line(self) -> str:
        if self.error is None:
            return f"{self.obj} in force"
        if not self.nodes:
            return f"{self.obj} {self.error}"
        if self.refused:
            head = f"{self.obj} refused by the agent of {', '.join(self.nodes)}:"
            problems = self.error.split("\n")
            return f"{head} {problems[0]}" if len(problems) == 1 else "\n  ".join([head, *problems])
        return f"{self.obj} not in force (agent of {', '.join(self.nodes)}): {self.error}"


def of_kind(obj: KubeObject) -> Verdict | None:
    """The verdict on an Istio kind the agents do not read, or None."""
    answer = kinds.answer(obj)
    if answer is None:
        return None
    return Verdict(obj, (), f"{answer.message} ({answer.hint})", answer.severity)


def judged(obj: KubeObject, node: str, status: dict | None, since: float) -> Verdict | None:
    """The agent's verdict on `obj` from its status, or None while it has none yet."""
    if not status or (status.get("policy", {}).get("built_at") or 0) < since:
        return None
    waypoint = status.get("waypoint")
    if waypoint is not None and ((waypoint.get("built_at") or 0) < since or not waypoint.get("xds", {}).get("in_sync")):
        return None
    key, name = f"{obj.kind} {obj.namespace}/{obj.name}", f"({obj.kind} {obj.namespace}/{obj.name})"
    errors = [*status.get("policy", {}).get("errors", []), *(waypoint or {}).get("errors", []),
              *status.get("source", {}).get("errors", {}).values()]
    named = list(dict.fromkeys(e for e in errors if name in e))  # policy and waypoint give the same once
    if named:
        return Verdict(obj, (node,), "\n".join(named))
    digest = spec_digest(obj.body.get("spec"))
    in_force = (status.get("policy", {}).get("resources", {}), (waypoint or {}).get("resources", {}))
    if any(resources.get(key) == digest for resources in in_force):
        return Verdict(obj, (node,), None)
    warned = [w for w in (waypoint or {}).get("warnings", []) if name in w and "not in force" in w]
    if warned:
        return Verdict(obj, (node,), warned[0], kinds.WARNING)
    return None


def held_by_agents(obj: KubeObject) -> bool:
    """Whether the agents' status may name `obj`: an Istio resource they read (in force or
    refused), or one of a kind they answer for (kinds.py)."""
    return kinds.is_istio(obj)


def held(keys: list[str], pods: set[str], status: dict | None, since: float) -> list[str]:
    """What an agent's status still holds of deleted resources (`keys`, "Kind ns/name":
    in force, or named by an error or warning) and deleted `pods` ("ns/name": enrolled or
    waiting); a reason in parentheses while its configuration is not rebuilt since
    `since` (and, with a waypoint, Envoy not in sync with it)."""
    if not keys and not pods:
        return []
    if not status:
        return ["(its status: the agent does not answer)"]
    policy, waypoint = status.get("policy", {}), status.get("waypoint") or {}
    rebuilt = (policy.get("built_at") or 0) >= since and (not waypoint or (
        (waypoint.get("built_at") or 0) >= since and waypoint.get("xds", {}).get("in_sync")))
    if not rebuilt:
        return ["(its configuration, not rebuilt since the delete yet)"]
    texts = [*policy.get("errors", []), *policy.get("kinds", {}).get("errors", []),
             *policy.get("kinds", {}).get("warnings", []), *waypoint.get("errors", []), *waypoint.get("warnings", [])]
    found = [key for key in keys if key in policy.get("resources", {}) or key in waypoint.get("resources", {})
             or any(f"({key})" in text for text in texts)]
    enrolled = {f"{p['namespace']}/{p['name']}" for p in [*status.get("pods", []), *status.get("waiting", [])]}
    return found + [f"Pod {key}" for key in sorted(pods & enrolled)]


def wait(objects: list[KubeObject], nodes: list[str], status_of: Callable[[str], dict | None], since: float,
         timeout: float, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> tuple[list[Verdict], list[tuple[KubeObject, str]]]:
    """(each resource's refusals, or one in-force verdict per resource; the (resource,
    node) pairs still without a verdict at the timeout)."""
    local = [v for v in map(of_kind, objects) if v is not None]
    pending = {(o.key, n): o for o in objects if (o.group, o.kind) in KINDS for n in nodes}
    verdicts: dict[tuple, Verdict] = {}
    deadline = clock() + timeout
    while pending and clock() < deadline:
        for node in sorted({n for _, n in pending}):
            status = status_of(node)
            for (key, n), obj in list(pending.items()):
                if n == node and (v := judged(obj, node, status, since)) is not None:
                    verdicts[(key, n)] = v
                    del pending[(key, n)]
        if pending:
            sleep(POLL)
    merged: dict[tuple, Verdict] = {}  # one line per resource and answer, naming the nodes
    for (key, node), v in sorted(verdicts.items(), key=lambda kv: kv[0][1]):
        seen = merged.get((key, v.error))
        merged[(key, v.error)] = Verdict(v.obj, (*seen.nodes, node) if seen else (node,), v.error, v.severity)
    refused = {key for key, error in merged if error is not None}
    found = [v for (key, error), v in merged.items() if error is not None or key not in refused]
    return local + found, [(o, n) for (_, n), o in pending.items()]
