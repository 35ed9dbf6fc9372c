"""The `kube` source: cluster state from the Kubernetes API (list + watch).

Same contract as the `files` source (sources/files.py), so the daemon uses either:
`poll()` returns a new Model when anything changed since the last one, else None;
`errors` maps what is wrong (a kind, an object) to a one-line message for status;
`scan_error` says why the state cannot be trusted yet. A source that cannot be read is
never an empty cluster: until every kind has been listed once `poll()` returns None and
`scan_error` says what is missing (the agent is not ready); later, a kind whose watch
broke keeps its objects as last read until a relist replaces them.

One reflector per kind (as client-go's): discover the version to read (networking.istio.io
v1, else v1beta1, else v1alpha3, as the server serves them), list (paginated), watch
from the list's resourceVersion with bookmarks, watch again from the last version seen
when the server ends a watch or the connection breaks (backing off with jitter), and
list again on 410 Gone or after a failed list. A kind the
server does not serve (its CRD not installed) holds no objects, is reported in `errors`
and is looked up again every `rediscover_seconds`: a cluster without Istio's CRDs is a
cluster without Istio resources, not a failure. Only discovery says a kind is not
served, and a kind holding objects keeps them until it said so UNSERVED_LOOKUPS times in
a row: a 404 while an API server syncs its CRD handlers, or while a CRD is updated, would
otherwise drop every AuthorizationPolicy and PeerAuthentication (the agent failing open).
A list's or a watch's 404 is a failure like any other: objects kept, looked up again.

Every object goes through the checks the files source makes (object_from_dict, then
model.check for Pods and Services); an invalid one is refused alone: its last good
version stays and `errors` names it and the field; `refused()` gives their bodies'
metadata, so the agent's Events (kube/events.py, written by `events` on this source's
loop) can name them with their uid and resourceVersion. The agent's exit watch (`owner`,
kube/owner.py) runs on that loop too; `run_here` awaits a coroutine there from the
daemon's loop. Pods keep only the fields the model reads; every object
loses metadata.managedFields (the server's bookkeeping): a 10k-pod cluster is held in a
fraction of the memory the API's objects take.

The reflectors run on an event loop of their own in a thread of their own, so decoding
a busy cluster's events never takes the relays' loop; `poll()` is called from the
agent's config thread; the two share the stores under one lock. A burst of events
(kubectl apply -f of many objects) wakes the agent once: the wake-up waits until no
event came for BURST_QUIET (at most BURST_MAX) — one model per change burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable

from nodeagent.backoff import Backoff
from nodeagent.errors import ConfigError
from nodeagent.kube.client import (TOO_DEEP, ClusterConfig, Gone, KubeApiError, KubeClient, NotFound, Resource,
                                   of_kind)
from nodeagent.kube.events import EventWriter
from nodeagent.kube.objects import KubeObject, object_from_dict
from nodeagent.kube.owner import OwnerWatch
from nodeagent.model import PROBE_HANDLERS, PROBES, READ_ANNOTATIONS, Model, check
from nodeagent.policy.validate import DRY_RUN_ANNOTATION

SOURCE = "kube"  # KubeObject.source of every object read here: messages say "kube (Pod ns/name)"
BURST_QUIET = 0.02  # seconds without an event that end a burst
BURST_MAX = 0.25  # a steady stream of events still wakes the agent this often
RETRY = Backoff(0.5, 30.0)  # after a failed list or watch (jittered)
REDISCOVER_SECONDS = 30.0  # a kind not served yet is looked up again this often
# Discovery's "not served" answers in a row (REDISCOVER_SECONDS apart) before a kind that
# holds objects is taken for uninstalled and its objects dropped: about a minute.
UNSERVED_LOOKUPS = 3
# What the source keeps of a kind other than Pod: the metadata the model and the readers
# use (status writers and Events read the API, not the store) and one annotation.
OTHER_META = ("name", "namespace", "uid", "labels", "annotations", "ownerReferences", "deletionTimestamp",
              "creationTimestamp", "resourceVersion", "generation")
OTHER_ANNOTATIONS = frozenset({DRY_RUN_ANNOTATION})
SECURITY_GROUP = "security.istio.io"  # its kinds' absence would open what their objects close
# How long close() waits for the source's thread. The daemon closes the source on its
# way out, before it removes capture (--on-exit=remove): a wait as long as the
# DaemonSet's grace period (30 s) would let the kubelet's SIGKILL come first and leave
# the programs attached with no agent. The thread is a daemon thread: it cannot keep
# the process alive.
CLOSE_SECONDS = 5.0
WATCH_SECONDS = (300, 600)  # a watch's timeoutSeconds, drawn in this range (client-go's 5-10 min)


@dataclass(frozen=True)
class Kind:
    """A kind the model reads, and the versions to read it at, most preferred first."""

    kind: str
    group: str
    versions: tuple[str, ...]
    plural: str

    def resource(self, version: str) -> Resource:
        if not self.group:
            return Resource(f"/api/{version}/{self.plural}", self.plural)
        return Resource(f"/apis/{self.group}/{version}/{self.plural}", f"{self.plural}.{self.group}")

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    def __str__(self) -> str:
        return f"{self.kind} ({self.group})" if self.group else self.kind


NETWORKING, SECURITY = "networking.istio.io", "security.istio.io"
ISTIO_NETWORKING = ("v1", "v1beta1", "v1alpha3")
ISTIO_SECURITY = ("v1", "v1beta1")
# What Model.build and the xDS/policy layers read (xds/istio/kinds.py IMPLEMENTED), and
# the Istio kinds they answer as not supported or not applicable (kinds.py ANSWERS), so a
# user's ServiceEntry gets its verdict in status as with the files source. Every
# Pod, not only this node's: the model resolves a Service to its endpoint pods (their IP,
# labels for DestinationRule subsets, service account for the peer's identity) on every
# node. EndpointSlices are not read: the model derives endpoints from pods and selectors.
KINDS: tuple[Kind, ...] = (
    Kind("Namespace", "", ("v1",), "namespaces"),
    Kind("Pod", "", ("v1",), "pods"),
    Kind("Service", "", ("v1",), "services"),
    Kind("VirtualService", NETWORKING, ISTIO_NETWORKING, "virtualservices"),
    Kind("DestinationRule", NETWORKING, ISTIO_NETWORKING, "destinationrules"),
    Kind("EnvoyFilter", NETWORKING, ("v1alpha3",), "envoyfilters"),
    Kind("AuthorizationPolicy", SECURITY, ISTIO_SECURITY, "authorizationpolicies"),
    Kind("PeerAuthentication", SECURITY, ISTIO_SECURITY, "peerauthentications"),
    Kind("RequestAuthentication", SECURITY, ISTIO_SECURITY, "requestauthentications"),
    Kind("Gateway", NETWORKING, ISTIO_NETWORKING, "gateways"),
    Kind("ServiceEntry", NETWORKING, ISTIO_NETWORKING, "serviceentries"),
    Kind("Sidecar", NETWORKING, ISTIO_NETWORKING, "sidecars"),
    Kind("WorkloadEntry", NETWORKING, ISTIO_NETWORKING, "workloadentries"),
    Kind("WorkloadGroup", NETWORKING, ISTIO_NETWORKING, "workloadgroups"),
    Kind("ProxyConfig", NETWORKING, ("v1beta1",), "proxyconfigs"),
    Kind("Telemetry", "telemetry.istio.io", ("v1", "v1alpha1"), "telemetries"),
    Kind("WasmPlugin", "extensions.istio.io", ("v1alpha1",), "wasmplugins"),
)


# --- pure parts: what one object, one list, one event does to a kind's store ----------
def trimmed(kind: Kind, body: dict[str, Any]) -> dict[str, Any]:
    """The object as the source keeps it: a Pod with only the fields and annotations
    model.py reads (and its resourceVersion, for change detection); any other kind without
    its status and with only the metadata and annotations read (the dry-run one): every
    agent keeps every object of the cluster, and a tenant's 250 KB annotations (a
    controller's last-applied configuration) were kept whole. Trimming twice is trimming once."""
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    if kind.kind != "Pod" or kind.group:
        kept = {k: meta[k] for k in OTHER_META if k in meta}
        if isinstance(kept.get("annotations"), dict):
            kept["annotations"] = {k: v for k, v in kept["annotations"].items() if k in OTHER_ANNOTATIONS}
        return {**{k: v for k, v in body.items() if k != "status"}, "metadata": kept}
    spec, status = body.get("spec") or {}, body.get("status") or {}
    spec = spec if isinstance(spec, dict) else {}
    keep_meta = ("name", "namespace", "uid", "labels", "annotations", "ownerReferences", "deletionTimestamp",
                 "creationTimestamp", "resourceVersion")
    kept = {k: meta[k] for k in keep_meta if k in meta}
    if isinstance(kept.get("annotations"), dict):  # only those read: every pod of the cluster is kept
        kept["annotations"] = {k: v for k, v in kept["annotations"].items() if k in READ_ANNOTATIONS}
    out = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
           "metadata": kept,
           "spec": {k: spec[k] for k in ("nodeName", "serviceAccountName", "serviceAccount", "hostNetwork")
                    if k in spec}}
    for list_name in ("containers", "initContainers"):  # init: a native sidecar's probes
        listed = spec.get(list_name)
        if listed is not None:
            out["spec"][list_name] = ([_container(c) if isinstance(c, dict) else c for c in listed]
                                      if isinstance(listed, list) else listed)
    out["status"] = ({k: status[k] for k in ("podIP", "podIPs", "phase") if k in status}
                     if isinstance(status, dict) else status)
    return out


def _container(container: dict[str, Any]) -> dict[str, Any]:
    """What the model reads of a container: its name, ports and probes' ports."""
    kept = {k: container[k] for k in ("name", "ports") if k in container}
    for probe in PROBES:
        value = container.get(probe)
        if isinstance(value, dict):
            kept[probe] = {h: ({"port": value[h]["port"]} if isinstance(value[h], dict) and "port" in value[h]
                               else value[h]) for h in PROBE_HANDLERS if h in value}
        elif probe in container:
            kept[probe] = value  # not a map: the model says so
    return kept


def admit(kind: Kind, api_version: str, body: Any) -> KubeObject:
    """The KubeObject of one API object, checked as the files source checks a file's
    (ConfigError naming the object and field). List items carry no apiVersion and kind:
    they are the list's."""
    if not isinstance(body, dict):
        raise ConfigError(f"{SOURCE} ({kind.kind})", f"expected an object, got {type(body).__name__}")
    if TOO_DEEP in body:  # kube.client.loads cut it: refused alone, its last good version kept
        raise ConfigError(f"{SOURCE} ({object_name(kind, body)})", f"{body[TOO_DEEP]}, deeper than nodeagent reads",
                          "flatten it; the API server takes up to 10000 levels, nodeagent refuses such an object")
    body = trimmed(kind, {**body, "apiVersion": api_version, "kind": kind.kind})
    obj = object_from_dict(body, SOURCE)
    check([obj])
    return obj


def _trimmed_item(kind: Kind, body: Any) -> Any:
    """A list item trimmed as its page arrives (admit trims it again, to the same): a
    relist held every page's whole objects until the last (~400 MiB for 1000 pods with a
    tenant's 200 KB annotations, where the store keeps 2.4 MiB)."""
    return trimmed(kind, body) if isinstance(body, dict) else body


def object_name(kind: Kind, body: Any) -> str:
    """How errors name an object that may not even parse: `Pod ns/name`."""
    meta = body.get("metadata") if isinstance(body, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    where = "/".join(str(p) for p in (meta.get("namespace"), meta.get("name")) if p)
    return f"{kind.kind} {where or '?'}"


class NotServed(NotFound):
    """Discovery does not list the kind (its group, version or resource): its CRD is not
    installed, or not served yet. A list's or a watch's 404 is not this answer."""


def next_step(exc: BaseException) -> str:
    """What a reflector does after its discovery, list or watch ended with `exc`:
    "relist" at once (410 Gone: the version is too old to watch from); "not served"
    (discovery does not list the kind: look again every rediscover_seconds);
    "rediscover" (another 404: the served version may have changed, or the server is
    still syncing its handlers: back off, look the kind up again); else "backoff"."""
    if isinstance(exc, Gone):
        return "relist"
    if isinstance(exc, NotServed):
        return "not served"
    if isinstance(exc, NotFound):
        return "rediscover"
    return "backoff"


@dataclass
class Store:
    """One kind's objects as last read (invalid versions refused alone) and the
    resourceVersion to watch from. Methods return whether the objects changed."""

    kind: Kind
    api_version: str = ""
    objects: dict[str, KubeObject] = field(default_factory=dict)  # "Pod ns/name" -> object
    errors: dict[str, str] = field(default_factory=dict)  # "Pod ns/name" -> why its last version was refused
    refused: dict[str, dict] = field(default_factory=dict)  # "Pod ns/name" -> the refused version's identity
    resource_version: str = ""
    on_error: Callable[[ConfigError], None] | None = None

    def __post_init__(self) -> None:
        self.api_version = self.api_version or self.kind.api_version(self.kind.versions[0])  # until discovered

    def replace(self, items: Iterable[Any], resource_version: str) -> bool:
        """A complete list: what it holds is the kind's state (an object missing from it is gone)."""
        before = {name: _version(obj) for name, obj in self.objects.items()}
        kept, errors = {}, {}
        for body in items:
            name = object_name(self.kind, body)
            try:
                kept[name] = admit(self.kind, self.api_version, body)
            except ConfigError as exc:
                errors[name] = str(exc)
                self.refused[name] = _identity(self.kind, self.api_version, body)
                if name in self.objects:
                    kept[name] = self.objects[name]  # the last good version stays
                self._refused(exc)
        self.objects, self.errors, self.resource_version = kept, errors, resource_version
        self.refused = {name: ref for name, ref in self.refused.items() if name in errors}
        return {name: _version(obj) for name, obj in kept.items()} != before

    def apply(self, event: dict[str, Any]) -> bool:
        """One watch event (ADDED, MODIFIED, DELETED or BOOKMARK)."""
        kind, body = event.get("type"), event.get("object") or {}
        version = str((body.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            self.resource_version = version or self.resource_version
            return False
        name = object_name(self.kind, body)
        self.resource_version = version or self.resource_version
        if kind == "DELETED":
            self.errors.pop(name, None)
            self.refused.pop(name, None)
            return self.objects.pop(name, None) is not None
        if kind not in ("ADDED", "MODIFIED"):
            return False
        try:
            obj = admit(self.kind, self.api_version, body)
        except ConfigError as exc:
            self.errors[name] = str(exc)
            self.refused[name] = _identity(self.kind, self.api_version, body)
            self._refused(exc)
            return False
        self.errors.pop(name, None)
        self.refused.pop(name, None)
        previous = self.objects.get(name)
        self.objects[name] = obj
        return previous is None or _version(previous) != _version(obj) or previous.body != obj.body

    def clear(self) -> bool:
        changed = bool(self.objects)
        self.objects, self.errors, self.resource_version, self.refused = {}, {}, "", {}
        return changed

    def _refused(self, exc: ConfigError) -> None:
        if self.on_error:
            self.on_error(exc)


def _identity(kind: Kind, api_version: str, body: Any) -> dict:
    """What an Event needs of a refused object (it may not even parse)."""
    meta = body.get("metadata") if isinstance(body, dict) and isinstance(body.get("metadata"), dict) else {}
    return {"apiVersion": api_version, "kind": kind.kind,
            "metadata": {k: meta[k] for k in ("namespace", "name", "uid", "resourceVersion") if k in meta}}


def _version(obj: KubeObject) -> str:
    return str((obj.body.get("metadata") or {}).get("resourceVersion") or "")


# --- the source -------------------------------------------------------------------
class KubeSource:
    """The Kubernetes API as the agent's source; `start()` runs its reflectors."""

    def __init__(self, config: ClusterConfig, log: logging.Logger | None = None, *,
                 kinds: tuple[Kind, ...] = KINDS, timeout: float = 10.0,
                 watch_seconds: tuple[int, int] = WATCH_SECONDS,
                 rediscover_seconds: float = REDISCOVER_SECONDS, rng: random.Random | None = None,
                 on_error: Callable[[ConfigError], None] | None = None, retry: Backoff = RETRY,
                 client: KubeClient | None = None):
        self.config = config
        self.log = log or logging.getLogger("nodeagent.sources.kube")
        self.client = client or KubeClient(config, timeout=timeout)  # tests give a scripted API
        self.watch_seconds, self.rediscover_seconds, self.retry = watch_seconds, rediscover_seconds, retry
        self.rng = rng or random.Random()
        self._lock = threading.Lock()
        self._stores = [Store(k, on_error=on_error) for k in kinds]
        self._synced: set[Kind] = set()  # listed at least once (or known not served)
        self._failing: dict[Kind, str] = {}  # kind -> why its reflector is retrying
        self._missing: dict[Kind, str] = {}  # kind -> why it is not served
        self._unserved: dict[Kind, int] = {}  # kind -> discovery's "not served" in a row (reflectors only)
        self._generation = 0  # bumped by every change of the stores
        self._built = -1  # generation of the last model poll() returned (-1: none yet)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._subscribers: list[Callable[[], None]] = []
        # Totals since start, for status and tests: complete lists, watches opened, 410s
        # that made a kind list again, failed lists/watches (backed off).
        self.counts = {"lists": 0, "watches": 0, "gone": 0, "failures": 0}
        self.events: EventWriter | None = None  # set before start(): its task runs on this source's loop
        self.owner: OwnerWatch | None = None  # set before start(): the agent's exit watch, on this loop too

    # --- what the daemon reads --------------------------------------------------------
    @property
    def location(self) -> str:
        return f"kube ({self.config.origin}, {self.config.url})"

    @property
    def errors(self) -> dict[str, str]:
        with self._lock:
            out = {str(k): v for k, v in {**self._missing, **self._failing}.items()}
            for store in self._stores:
                out.update({f"{SOURCE} ({name})": why for name, why in store.errors.items()})
            return out

    def refused(self) -> list[tuple[dict, str]]:
        """(identity: apiVersion, kind, metadata; why) of every object whose last version was refused."""
        with self._lock:
            return [(ref, store.errors[name]) for store in self._stores for name, ref in store.refused.items()
                    if name in store.errors]

    @property
    def scan_error(self) -> str | None:
        with self._lock:
            if self._failing:
                kind, why = next(iter(self._failing.items()))
                return f"{kind}: {why}"
            waiting = [str(s.kind) for s in self._stores if s.kind not in self._synced]
            if waiting:
                return f"waiting for the first list of {', '.join(waiting)}"
            # Listed, but poll() has not handed out the first model: until it has, the
            # daemon must not take its empty model for the cluster (stale capture is
            # dropped against it).
            return "the first model is not read yet" if self._built < 0 else None

    def poll(self) -> Model | None:
        """A new Model when anything changed since the last one; None before every kind
        was listed once, and when nothing changed."""
        with self._lock:
            if len(self._synced) < len(self._stores) or self._generation == self._built:
                return None
            generation = self._generation
            objects = [o for store in self._stores for o in store.objects.values()]
        model = Model.build(objects)
        self._built = generation
        return model

    # --- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            started = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(started,), name="nodeagent-kube", daemon=True)
            self._thread.start()
            started.wait()

    def wakeup(self) -> "KubeWakeup":
        """A wake-up for the caller's loop that fires once per change burst (starts the source)."""
        wake = KubeWakeup(self, asyncio.get_running_loop())
        with self._lock:
            self._subscribers.append(wake.notify)
        self.start()
        return wake

    async def run_here(self, coro: Any) -> Any:
        """Await `coro` on the source's loop from another loop (its client's requests run
        there); RuntimeError when the source is not running."""
        loop = self._loop
        if self._thread is None or loop is None or loop.is_closed():
            coro.close()
            raise RuntimeError("the kube source is not running")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def close(self, timeout: float = CLOSE_SECONDS) -> None:
        """Stop the reflectors and wait for their thread, at most `timeout` seconds."""
        if self._thread is not None and self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=timeout)
            if self._thread.is_alive():
                self.log.warning("the kube source's thread did not stop within %gs; going on without it", timeout)
        self._thread = None

    def _run(self, started: threading.Event) -> None:
        async def main() -> None:
            self._loop, self._stop, self._changed = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
            if self.events is not None:
                self.events.bind(self._loop)  # takes writes from now on
            started.set()
            tasks = [asyncio.create_task(self._reflect(store)) for store in self._stores]
            tasks.append(asyncio.create_task(self._notifier()))
            if self.events is not None:
                tasks.append(asyncio.create_task(self.events.run()))
            if self.owner is not None:
                tasks.append(asyncio.create_task(self.owner.run()))
            try:
                await self._stop.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run(main())

    # --- reflectors (on the source's own loop) ----------------------------------------
    async def _reflect(self, store: Store) -> None:
        """List, then watch from the last version seen, for ever. A broken watch is
        watched again from that version (as client-go does: a restarted API server is
        not a reason for every agent to list everything again); a 410 lists again; any
        other 404 looks the kind up again after a backoff, keeping its objects (only
        discovery says a kind is not served: `_not_served`)."""
        kind, attempt, resource = store.kind, 0, None
        hasty = 0  # 410s and empty watches that ended at once, in a row: backed off from the second
        while True:
            if hasty > 1:  # a server (or proxy) answering so every time is not asked in a tight loop
                await asyncio.sleep(self.retry.jittered(hasty - 1, self.rng))
            try:
                if resource is None:
                    found = await self._discover(kind, store)
                    items, version = await self.client.list(found, each=partial(_trimmed_item, store.kind))
                    self.counts["lists"] += 1
                    self._update(store, store.replace, items, version, synced=True)
                    self._unserved.pop(kind, None)  # listed: a later "not served" counts from one
                    resource, attempt = found, 0  # from now on watch from the store's version
                self.counts["watches"] += 1
                seconds = self.rng.randint(*self.watch_seconds)
                started, events_seen = time.monotonic(), 0
                async with contextlib.aclosing(self.client.watch(resource, store.resource_version,
                                                                 timeout_seconds=seconds)) as events:
                    async for event in events:
                        events_seen += 1
                        hasty = 0
                        self._update(store, store.apply, event)
                        if attempt:
                            attempt = 0
                            self._recovered(kind)
                if attempt:  # a watch that ended as the server ends them: the kind is read again
                    attempt = 0
                    self._recovered(kind)
                hasty = hasty + 1 if not events_seen and time.monotonic() - started < 1.0 else 0
            except asyncio.CancelledError:
                raise
            except KubeApiError as exc:
                step = next_step(exc)
                if step != "backoff":
                    resource = None  # list (and look the kind up) again
                if step == "relist":
                    self.counts["gone"] += 1
                    hasty += 1
                    self.log.info("%s: %s; listing again", kind, exc)
                    continue
                if step == "not served":
                    await asyncio.sleep(self._not_served(store, f"{exc.detail}: is its CRD installed?"))
                    continue
                attempt += 1
                self.counts["failures"] += 1
                delay = self.retry.jittered(attempt, self.rng)
                self._fail(kind, str(exc), delay)
                await asyncio.sleep(delay)
            except Exception as exc:  # a bug must not end the reflector: keep the state, list again
                attempt, resource = attempt + 1, None
                self.counts["failures"] += 1
                delay = self.retry.jittered(attempt, self.rng)
                self.log.exception("%s: reflector failed; retrying", kind)
                self._fail(kind, f"internal error: {exc!r}", delay)
                await asyncio.sleep(delay)

    async def _discover(self, kind: Kind, store: Store) -> Resource:
        """The resource to read `kind` from: its most preferred version the server serves
        with this kind in it; NotServed when none."""
        if not kind.group:
            store.api_version = kind.api_version(kind.versions[0])
            return kind.resource(kind.versions[0])
        try:
            group = of_kind(await self.client.get(f"/apis/{kind.group}", f"group {kind.group}"),
                            "APIGroup", f"group {kind.group}")
        except NotFound:
            raise NotServed(str(kind), f"not served: the API server has no group {kind.group}", 404) from None
        served = {v.get("version") for v in group.get("versions") or [] if isinstance(v, dict)}
        wanted = [v for v in kind.versions if v in served]
        for version in wanted:
            where = f"{kind.group}/{version}"
            listing = of_kind(await self.client.get(f"/apis/{where}", where), "APIResourceList", where)
            if any(r.get("name") == kind.plural for r in listing.get("resources") or [] if isinstance(r, dict)):
                store.api_version = kind.api_version(version)
                return kind.resource(version)
        if wanted:
            raise NotServed(str(kind), f"not served: {kind.group} {', '.join(wanted)} has no {kind.plural}", 404)
        raise NotServed(str(kind), f"not served: {kind.group} has versions {', '.join(sorted(served))}, "
                       f"not {', '.join(kind.versions)}", 404)

    def _update(self, store: Store, change: Callable[..., bool], *args: Any, synced: bool = False) -> None:
        """Apply `change` to `store` under the lock; a change (or a kind's first list) wakes the agent."""
        with self._lock:
            changed = change(*args)
            first = synced and store.kind not in self._synced
            if synced:
                self._synced.add(store.kind)
                if self._failing.pop(store.kind, None) is not None or self._missing.pop(store.kind, None):
                    self.log.info("%s: listed again (%d objects)", store.kind, len(store.objects))
            if changed or first:
                self._generation += 1
        if changed or first:
            self._signal()

    def _not_served(self, store: Store, why: str) -> float:
        """Discovery does not list `store`'s kind; the seconds to wait before looking again.
        One that holds objects keeps them, failing, until discovery said so UNSERVED_LOOKUPS
        times in a row, with a successful list resetting the count (a transient 404 must not
        take the policies away); so does a security kind never read yet, looked up again
        after the retry's short delays (an API server whose CRD handlers are not synced yet
        answers 404 for a while: an agent starting then became ready with no policy at all,
        STRICT read as PERMISSIVE). Another kind that holds none is at once a cluster
        without it."""
        lookups = self._unserved[store.kind] = self._unserved.get(store.kind, 0) + 1
        starting = store.kind.group == SECURITY_GROUP and store.kind not in self._synced
        if (store.objects or starting) and lookups < UNSERVED_LOOKUPS:
            # A starting security kind's lookups span rediscover_seconds (30 s), not the
            # retry's 0.25-1.5 s: a control plane's CRD handlers take longer than that to sync.
            delay = max(self.retry.jittered(lookups, self.rng), self.rediscover_seconds / (UNSERVED_LOOKUPS - 1)) \
                if starting else self.rediscover_seconds
            self._fail(store.kind, f"{why} ({lookups} of {UNSERVED_LOOKUPS} lookups in a row; "
                       f"{'not read until' if starting else 'its objects are kept until'} {UNSERVED_LOOKUPS})",
                       delay)
            return delay
        with self._lock:
            if self._missing.get(store.kind) != why:
                self.log.warning("%s: %s; its objects are not read, looking again every %gs",
                                 store.kind, why, self.rediscover_seconds)
            self._missing[store.kind] = why
            self._failing.pop(store.kind, None)
            first = store.kind not in self._synced
            self._synced.add(store.kind)
            changed = store.clear()
            if changed or first:
                self._generation += 1
        if changed or first:
            self._signal()
        return self.rediscover_seconds

    def _signal(self) -> None:
        """Tell the notifier (on the source's loop, the only caller's) that the stores changed."""
        if self._changed is not None:
            self._changed.set()

    def _recovered(self, kind: Kind) -> None:
        with self._lock:
            if self._failing.pop(kind, None) is not None:
                self.log.info("%s: watching again", kind)

    def _fail(self, kind: Kind, why: str, delay: float) -> None:
        with self._lock:
            if self._failing.get(kind) != why:
                self.log.error("%s: %s; keeping the objects last read, retrying in %.1fs", kind, why, delay)
            self._failing[kind] = why

    async def _notifier(self) -> None:
        """Wake the subscribers once per burst of changes."""
        while True:
            await self._changed.wait()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + BURST_MAX
            while loop.time() < deadline:
                self._changed.clear()
                await asyncio.sleep(BURST_QUIET)
                if not self._changed.is_set():
                    break
            self._changed.clear()
            with self._lock:
                subscribers = list(self._subscribers)
            for notify in subscribers:
                notify()


class KubeWakeup:
    """The daemon's wake-up for the kube source (DirectoryWatch's shape): `wait` returns
    on a change burst, on `stop`, or after `timeout`. `reliable`: the watches report
    every change, so the daemon only re-polls at the resync interval (a no-op poll
    costs a lock and a comparison). `close` stops the source."""

    reliable = True

    def __init__(self, source: KubeSource, loop: asyncio.AbstractEventLoop):
        self.source, self.loop = source, loop
        self._changed = asyncio.Event()

    def notify(self) -> None:
        """From the source's thread."""
        with contextlib.suppress(RuntimeError):  # the daemon's loop is closed: nobody waits
            self.loop.call_soon_threadsafe(self._changed.set)

    async def wait(self, stop: asyncio.Event, timeout: float) -> None:
        waiters = [asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self._changed.clear()

    def close(self) -> None:
        self.source.close()
