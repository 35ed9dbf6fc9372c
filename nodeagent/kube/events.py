"""Kubernetes Events for refused or unsupported Istio resources (issues 13 and 14).

The agents' verdicts on Istio resources (refused by validation, a kind not supported in
ambient mode, not applicable to ambient) are shown where users look: a Warning Event
on the resource, as istiod's validation and client-go's event recorder write them.

- `Problem`: one resource's reference (uid, resourceVersion), a reason (`Refused`,
  `NotSupportedInAmbient`, `NotApplicable`, `NotInForce`) and the message; the
  verdicts become Problems in xds/istio/problems.py (this package stays below xds).
- `event_name(ref, reason)`: deterministic, from the object (and its uid) and the
  reason, so every agent that finds the same problem writes the same Event: the first
  creates it, the others get 409 AlreadyExists and PATCH its count and lastTimestamp
  (client-go's aggregation, across agents). Never N events for one problem.
- `Reporter`: what to write for a new set of problems — a problem is written when it
  appears, and again only when it is re-reported (the resource changed, still with a
  problem, or the message changed); a fixed problem is forgotten (no write), so it is
  reported again if it comes back. Bounded: a token bucket per resource (PER_OBJECT) and
  one for the agent (GLOBAL); what either refuses is dropped and counted (a later set of
  problems tries it again). Pure (its clock is given).
- `EventWriter`: the Reporter under a lock plus a bounded queue drained by its own task
  on the kube source's loop: `submit()` (from the agent's config thread) never waits for
  the API; a full queue drops and counts; an API error is logged once per kind of error,
  counted, and never raised.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from nodeagent.kube.objects import KubeObject

COMPONENT = "nodeagent"  # source.component and reportingController
REFUSED, NOT_SUPPORTED, NOT_APPLICABLE, NOT_IN_FORCE = (
    "Refused", "NotSupportedInAmbient", "NotApplicable", "NotInForce")
MAX_MESSAGE = 1024  # events.k8s.io's limit on a note; core Events are kept to it too
QUEUE = 256  # writes waiting for the API at most
PER_OBJECT = (3.0, 1 / 60)  # (burst, tokens per second) for one resource's writes
GLOBAL = (25.0, 1.0)  # (burst, tokens per second) for all of the agent's writes


@dataclass(frozen=True)
class Ref:
    """An Event's involvedObject."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str = ""
    resource_version: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def as_dict(self) -> dict[str, str]:
        out = {"apiVersion": self.api_version, "kind": self.kind, "namespace": self.namespace, "name": self.name}
        if self.uid:
            out["uid"] = self.uid
        if self.resource_version:
            out["resourceVersion"] = self.resource_version
        return out


def ref_of(obj: KubeObject | dict) -> Ref:
    """The reference of a KubeObject or of an API object's body."""
    body = obj.body if isinstance(obj, KubeObject) else obj
    meta = body.get("metadata") if isinstance(body.get("metadata"), dict) else {}
    return Ref(str(body.get("apiVersion") or ""), str(body.get("kind") or ""), str(meta.get("namespace") or ""),
               str(meta.get("name") or ""), str(meta.get("uid") or ""), str(meta.get("resourceVersion") or ""))


@dataclass(frozen=True)
class Problem:
    ref: Ref
    reason: str
    message: str

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        """One Event per (object, reason)."""
        r = self.ref
        return (r.api_version.split("/")[0] if "/" in r.api_version else "", r.kind, r.namespace, r.name, r.uid,
                self.reason)


def one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", "; ", text.strip())


def clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def event_name(ref: Ref, reason: str) -> str:
    """The Event's name: the object's name (cut to keep within 253 characters) and a
    digest of the object's identity (kind, namespace, name, uid) and the reason."""
    digest = hashlib.sha256("/".join((ref.api_version.split("/")[0], ref.kind, ref.namespace, ref.name,
                                      ref.uid, reason)).encode()).hexdigest()[:16]
    return f"{ref.name[:200]}.{digest}"


def timestamp(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def event_body(problem: Problem, node: str, now: float) -> dict[str, Any]:
    """A core/v1 Event (count 1) for `problem` as reported by the agent of `node`."""
    ref = problem.ref
    stamp = timestamp(now)
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": event_name(ref, problem.reason), "namespace": ref.namespace or "default"},
        "involvedObject": ref.as_dict(), "reason": problem.reason, "message": problem.message, "type": "Warning",
        "source": {"component": COMPONENT, "host": node}, "count": 1,
        "firstTimestamp": stamp, "lastTimestamp": stamp,
        "reportingComponent": COMPONENT, "reportingInstance": node, "action": "Validate",
    }


def repeat_patch(problem: Problem, node: str, now: float) -> dict[str, Any]:
    """The merge patch of an existing Event re-reported (count set from the answer)."""
    return {"message": problem.message, "lastTimestamp": timestamp(now),
            "involvedObject": {"resourceVersion": problem.ref.resource_version},
            "source": {"component": COMPONENT, "host": node}, "reportingInstance": node}


@dataclass
class TokenBucket:
    burst: float
    rate: float  # tokens per second
    tokens: float = -1.0
    at: float = 0.0

    def take(self, now: float) -> bool:
        if self.tokens < 0:
            self.tokens, self.at = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def full(self, now: float) -> bool:
        return self.tokens < 0 or self.tokens + (now - self.at) * self.rate >= self.burst


@dataclass
class Reporter:
    """What to write for each new set of problems (see the module's docstring)."""

    per_object: tuple[float, float] = PER_OBJECT
    overall: tuple[float, float] = GLOBAL
    reported: dict[tuple, tuple[str, str]] = field(default_factory=dict)  # key -> (message, resourceVersion)
    buckets: dict[tuple, TokenBucket] = field(default_factory=dict)  # (kind, ns, name) -> its bucket
    counts: dict[str, int] = field(default_factory=lambda: {"reported": 0, "dropped_rate": 0})

    def __post_init__(self) -> None:
        self.bucket = TokenBucket(*self.overall)

    def report(self, found: Iterable[Problem], now: float) -> list[Problem]:
        found = list(found)
        current = {p.key for p in found}
        for key in [k for k in self.reported if k not in current]:  # fixed (or deleted): forget it
            del self.reported[key]
        out = []
        for problem in found:
            seen = (problem.message, problem.ref.resource_version)
            if self.reported.get(problem.key) == seen:
                continue
            obj = problem.key[1:4]
            bucket = self.buckets.setdefault(obj, TokenBucket(*self.per_object))
            if not bucket.take(now) or not self.bucket.take(now):
                self.counts["dropped_rate"] += 1
                continue
            self.reported[problem.key] = seen
            self.counts["reported"] += 1
            out.append(problem)
        for obj in [o for o, b in self.buckets.items() if b.full(now)]:  # idle buckets cost nothing to forget
            if not any(k[1:4] == obj for k in self.reported):
                del self.buckets[obj]
        return out


class EventWriter:
    """Writes the Reporter's Events through `client` (KubeClient) on the loop `run()`
    runs on; `submit` is called from any thread."""

    def __init__(self, client: Any, node: str, log: logging.Logger | None = None, *,
                 reporter: Reporter | None = None, queue_size: int = QUEUE,
                 clock: Callable[[], float] = time.time):
        self.client, self.node = client, node
        self.log = log or logging.getLogger("nodeagent.kube.events")
        self.reporter = reporter or Reporter()
        self.clock = clock
        self._lock = threading.Lock()
        self._queue_size = queue_size
        self._queue: asyncio.Queue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._logged: set[str] = set()  # kinds of API errors logged once
        self.counts = {"created": 0, "patched": 0, "dropped_queue": 0, "failures": 0}

    def describe(self) -> dict[str, int]:
        with self._lock:  # open: problems reported and not fixed yet
            return {"open": len(self.reporter.reported), **self.reporter.counts, **self.counts}

    def submit(self, found: Iterable[Problem]) -> None:
        """The problems of the agent's latest verdicts (all of them, each time)."""
        with self._lock:
            writes = self.reporter.report(found, self.clock())
        for problem in writes:
            self._enqueue(problem)

    def _enqueue(self, problem: Problem) -> None:
        loop, queue = self._loop, self._queue
        if loop is None or queue is None:
            self._dropped(problem)
            return

        def put() -> None:
            try:
                queue.put_nowait(problem)
            except asyncio.QueueFull:
                self._dropped(problem)

        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # its loop is closed
            self._dropped(problem)

    def _dropped(self, problem: Problem) -> None:
        with self._lock:
            self.counts["dropped_queue"] += 1
            self.reporter.reported.pop(problem.key, None)  # tried again with the next verdicts

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take writes for `loop`, whose task runs `run()`."""
        self._queue, self._loop = asyncio.Queue(self._queue_size), loop

    async def run(self) -> None:
        """Drain the queue for ever (cancel to stop)."""
        if self._loop is not asyncio.get_running_loop():
            self.bind(asyncio.get_running_loop())
        while True:
            problem = await self._queue.get()
            try:
                await self.write(problem)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # never ends the writer
                self._failed(problem, exc)

    async def write(self, problem: Problem) -> None:
        """Create the Event; when it exists (another agent, or an earlier report), add one
        to its count: a merge patch of its lastTimestamp answers the count it has, a
        second one sets that plus one (two agents at once may lose one increment)."""
        from nodeagent.kube.client import Conflict  # the client imports nothing of this module

        body = event_body(problem, self.node, self.clock())
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        collection = f"/api/v1/namespaces/{namespace}/events"
        what = f"Event {namespace}/{name}"
        try:
            await self.client.post(collection, what, body)
            self.counts["created"] += 1
            return
        except Conflict:
            pass
        path = f"{collection}/{name}"
        current = await self.client.patch(path, what, repeat_patch(problem, self.node, self.clock()))
        count = current.get("count") if isinstance(current.get("count"), int) else 1
        await self.client.patch(path, what, {"count": count + 1})
        self.counts["patched"] += 1

    def _failed(self, problem: Problem, exc: Exception) -> None:
        with self._lock:
            self.counts["failures"] += 1
            self.reporter.reported.pop(problem.key, None)  # tried again with the next verdicts (rate-limited)
        kind = f"{type(exc).__name__} {getattr(exc, 'status', '')}"
        if kind not in self._logged:
            self._logged.add(kind)
            self.log.warning("cannot write the Event on %s (%s): %s; further errors like it are only counted",
                             problem.ref.label, problem.reason, exc)
