"""Is the agent's stop an uninstall? What it has seen of its own DaemonSet and Namespace.

An agent stopping for a rolling update, a pod deleted by hand or a node drain must keep
capture for the next agent (meshed pods fail closed, never plaintext); an agent stopping
because `kubectl delete -k daemonset/` removes the mesh must leave nothing on its node.
SIGTERM looks the same in both cases, so the agent (`--on-exit=owner`) watches, from its
start, the three things that tell them apart:

- its own Pod (by name, in its namespace): the controlling ownerReference, i.e. which
  DaemonSet (by UID) owns it now;
- the DaemonSets of its namespace: a UID seen deleted (DELETED event), being deleted
  (deletionTimestamp, e.g. a foreground cascade) or absent from a later complete list;
- its Namespace (by name): Terminating or deleted takes everything in it.

`decide(seen)` is the pure decision: remove capture only on positive evidence that the
installation is going away — the Namespace ending, or the owning DaemonSet's UID ended
(a DaemonSet of the same name with another UID is a new installation: the owner is still
gone). Everything else keeps capture: owner in place (a rolling update, a pod deleted by
hand), the pod never read, no DaemonSet owner, API unreachable or refusing (401/403).
Deletion is permanent (a UID never comes back), so evidence, once seen, stays true even
when a watch later breaks; doubt never removes.

At SIGTERM the agent may ask once more (`confirm`, bounded by the caller): the pod, then
the DaemonSets, read fresh in that order; the owner's UID missing from a list taken after
the pod named it means it was deleted in between (the DaemonSet's DELETED event may
still be on its way: the garbage collector deletes the pods as soon as it sees it).

RBAC: pods and namespaces list/watch (the kube source's grants), daemonsets list/watch in
the agent's namespace (a Role: daemonset/mesh/rbac-agent.yaml).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from nodeagent.backoff import Backoff
from nodeagent.kube.client import Gone, KubeApiError, KubeClient, Resource

RETRY = Backoff(0.5, 30.0)
WATCH_SECONDS = (300, 600)
CONFIRM_SECONDS = 3.0  # at SIGTERM: how long the agent waits for the fresh look (of its 30 s grace)


@dataclass(frozen=True)
class Owner:
    """The controlling ownerReference of the agent's pod."""

    kind: str
    name: str
    uid: str


@dataclass
class Seen:
    """Everything the decision reads, as the watches (and the fresh look) left it."""

    namespace: str  # the agent's pod's
    pod: str
    pod_read: bool = False  # the pod was read at least once
    owner: Owner | None = None  # as last read (None: no controller, or not read)
    namespace_ending: str = ""  # why the Namespace is going away ("" while it is not)
    ended: dict[str, str] = field(default_factory=dict)  # DaemonSet UID -> how it was seen ending
    confirmed_absent: str = ""  # the owner UID a fresh list taken after the pod read did not hold
    error: str = ""  # the API failures not recovered from yet, for the reason of a kept capture


@dataclass(frozen=True)
class ExitDecision:
    remove: bool
    reason: str

    def __str__(self) -> str:
        return ("removing capture (as `nodeagent uninstall`): " if self.remove
                else "keeping capture for the next agent: ") + self.reason


def decide(seen: Seen) -> ExitDecision:
    """Remove capture at exit only on evidence that the installation is going away."""
    if seen.namespace_ending:
        return ExitDecision(True, seen.namespace_ending)
    doubt = f" (last API error: {seen.error})" if seen.error else ""
    if not seen.pod_read:
        return ExitDecision(False, f"own pod {seen.namespace}/{seen.pod} never read from the API{doubt}")
    owner = seen.owner
    if owner is None:
        return ExitDecision(False, f"pod {seen.namespace}/{seen.pod} has no controlling owner{doubt}")
    if owner.kind != "DaemonSet":
        return ExitDecision(False, f"pod {seen.namespace}/{seen.pod} is owned by {owner.kind} {owner.name}, "
                                   f"not a DaemonSet{doubt}")
    what = f"DaemonSet {seen.namespace}/{owner.name} (uid {owner.uid})"
    if owner.uid in seen.ended:
        return ExitDecision(True, f"{what} {seen.ended[owner.uid]}")
    if seen.confirmed_absent == owner.uid:
        return ExitDecision(True, f"{what} was deleted (absent from a list read after the pod)")
    return ExitDecision(False, f"{what} is in place (a rolling update, or the pod deleted by hand){doubt}")


# --- what one object or event tells -----------------------------------------------
def controller_of(pod: dict[str, Any]) -> Owner | None:
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    for ref in refs if isinstance(refs, list) else []:
        if isinstance(ref, dict) and ref.get("controller") and ref.get("uid"):
            return Owner(str(ref.get("kind") or ""), str(ref.get("name") or ""), str(ref["uid"]))
    return None


def namespace_ending(namespace: dict[str, Any], deleted: bool = False) -> str:
    """Why this Namespace is going away ("" if it is not)."""
    name = (namespace.get("metadata") or {}).get("name") or "?"
    if deleted:
        return f"Namespace {name} was deleted"
    if (namespace.get("metadata") or {}).get("deletionTimestamp") or \
            (namespace.get("status") or {}).get("phase") == "Terminating":
        return f"Namespace {name} is Terminating"
    return ""


def daemonset_ending(daemonset: dict[str, Any], deleted: bool = False) -> str:
    """How this DaemonSet is seen ending ("" if it is not)."""
    if deleted:
        return "was deleted"
    stamp = (daemonset.get("metadata") or {}).get("deletionTimestamp")
    return f"is being deleted (deletionTimestamp {stamp})" if stamp else ""


def _uid(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


# --- the watch ----------------------------------------------------------------------
class OwnerWatch:
    """Follows the agent's pod, its namespace's DaemonSets and its Namespace (`run`, on
    the kube source's loop); `decision()` from any thread."""

    def __init__(self, client: KubeClient, namespace: str, pod: str, log: logging.Logger | None = None,
                 rng: random.Random | None = None, watch_seconds: tuple[int, int] = WATCH_SECONDS):
        self.client, self.log = client, log or logging.getLogger("nodeagent.kube.owner")
        self.rng, self.watch_seconds = rng or random.Random(), watch_seconds
        self._lock = threading.Lock()
        self.seen = Seen(namespace, pod)
        self._present: set[str] = set()  # DaemonSet UIDs of the last list plus what the watch added since
        self._errors: dict[str, str] = {}  # resource -> its failure until it answers again
        by_name = {"fieldSelector": f"metadata.name={pod}"}
        self.pods = (Resource(f"/api/v1/namespaces/{namespace}/pods", f"pod {namespace}/{pod}"), by_name)
        self.namespaces = (Resource("/api/v1/namespaces", f"namespace {namespace}"),
                           {"fieldSelector": f"metadata.name={namespace}"})
        self.daemonsets = (Resource(f"/apis/apps/v1/namespaces/{namespace}/daemonsets",
                                    f"daemonsets.apps in {namespace}"), {})

    def decision(self) -> ExitDecision:
        with self._lock:
            return decide(self.seen)

    def describe(self) -> dict[str, Any]:
        """For status: the owner as read and what exit would do now."""
        with self._lock:
            owner = self.seen.owner
            return {"owner": None if owner is None else f"{owner.kind} {owner.name} (uid {owner.uid})",
                    "at_exit": str(decide(self.seen))}

    async def run(self) -> None:
        """Follow the three until cancelled."""
        await asyncio.gather(self._follow(*self.pods, self._pods, self._pod_event),
                             self._follow(*self.daemonsets, self._daemonsets, self._daemonset_event),
                             self._follow(*self.namespaces, self._namespaces, self._namespace_event))

    async def confirm(self) -> None:
        """A fresh look, pod first, then the DaemonSets and the Namespace (the caller bounds it)."""
        try:
            items, _ = await self.client.list(self.pods[0], self.pods[1])
            self._pods(items)
            self._answered(self.pods[0].name)
            with self._lock:
                owner = self.seen.owner
            items, _ = await self.client.list(self.daemonsets[0], self.daemonsets[1])
            self._daemonsets(items)
            self._answered(self.daemonsets[0].name)
            if owner is not None and owner.uid not in {_uid(d) for d in items}:
                with self._lock:
                    self.seen.confirmed_absent = owner.uid
            items, _ = await self.client.list(self.namespaces[0], self.namespaces[1])
            self._namespaces(items)
            self._answered(self.namespaces[0].name)
        except KubeApiError as exc:
            self._failed(exc)

    # --- applying what was read -------------------------------------------------------
    def _pods(self, items: list[dict]) -> None:
        with self._lock:
            mine = [p for p in items if (p.get("metadata") or {}).get("name") == self.seen.pod]
            if mine:
                self.seen.pod_read, self.seen.owner = True, controller_of(mine[0])

    def _pod_event(self, kind: str, pod: dict) -> None:
        if kind in ("ADDED", "MODIFIED"):
            self._pods([pod])  # a DELETED pod keeps its last owner: the pod is going, its owner may not be

    def _daemonsets(self, items: list[dict]) -> None:
        """A complete list: a UID present before and absent now was deleted."""
        with self._lock:
            now = {_uid(d) for d in items}
            for uid in self._present - now:
                self.seen.ended.setdefault(uid, "was deleted (absent from a later list)")
            self._present = now
            for d in items:
                self._daemonset(d, deleted=False)

    def _daemonset_event(self, kind: str, daemonset: dict) -> None:
        with self._lock:
            if kind == "DELETED":
                self._present.discard(_uid(daemonset))
            elif kind in ("ADDED", "MODIFIED"):
                self._present.add(_uid(daemonset))
            self._daemonset(daemonset, deleted=kind == "DELETED")

    def _daemonset(self, daemonset: dict, deleted: bool) -> None:
        uid, why = _uid(daemonset), daemonset_ending(daemonset, deleted)
        if uid and why and uid not in self.seen.ended:
            self.seen.ended[uid] = why
            self.log.info("DaemonSet %s/%s (uid %s) %s", self.seen.namespace,
                          (daemonset.get("metadata") or {}).get("name"), uid, why)

    def _namespaces(self, items: list[dict]) -> None:
        for ns in items:
            self._namespace(ns, deleted=False)

    def _namespace_event(self, kind: str, namespace: dict) -> None:
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._namespace(namespace, deleted=kind == "DELETED")

    def _namespace(self, namespace: dict, deleted: bool) -> None:
        why = namespace_ending(namespace, deleted)
        with self._lock:
            if why and not self.seen.namespace_ending:
                self.seen.namespace_ending = why
                self.log.info("%s", why)

    def _failed(self, exc: KubeApiError) -> None:
        self._answered(exc.resource, str(exc))

    def _answered(self, resource: str, error: str = "") -> None:
        with self._lock:
            if error:
                self._errors[resource] = error
            else:
                self._errors.pop(resource, None)
            self.seen.error = "; ".join(self._errors.values())

    # --- list + watch of one resource -------------------------------------------------
    async def _follow(self, resource: Resource, params: dict[str, str], on_list: Callable[[list[dict]], None],
                      on_event: Callable[[str, dict], None]) -> None:
        """List, then watch from the list's version (from the last event's after a broken
        watch), list again on 410, back off with jitter on anything else."""
        attempt, version = 0, ""
        while True:
            try:
                if not version:
                    items, version = await self.client.list(resource, params)
                    on_list(items)
                    self._answered(resource.name)
                seconds = self.rng.randint(*self.watch_seconds)
                async with contextlib.aclosing(self.client.watch(resource, version, params, seconds)) as events:
                    async for event in events:
                        if attempt:
                            attempt = 0
                            self._answered(resource.name)
                        obj = event["object"]
                        version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                        if event.get("type") != "BOOKMARK":
                            on_event(str(event.get("type")), obj)
            except asyncio.CancelledError:
                raise
            except Gone:
                version = ""
            except KubeApiError as exc:
                attempt += 1
                self._failed(exc)
                delay = RETRY.jittered(attempt, self.rng)
                self.log.warning("%s: %s; retrying in %.1fs (capture is kept at exit while in doubt)",
                                 resource.name, exc, delay)
                await asyncio.sleep(delay)
            except Exception:  # a bug must not end the watch: list again after a pause
                attempt, version = attempt + 1, ""
                self.log.exception("%s: watch failed; retrying", resource.name)
                await asyncio.sleep(RETRY.jittered(attempt, self.rng))
