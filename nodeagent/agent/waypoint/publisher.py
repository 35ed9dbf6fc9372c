"""What the node's waypoint Envoy is told over xDS, and what it took.

`update(model)` rebuilds the Istio configuration (an invalid resource keeps its last good
version, as IstioConfig.build does) and this node's snapshot, and puts it in the
SnapshotCache when it is consistent; an inconsistent one is logged and the previous stays.
Clusters the new snapshot drops are carried (make before break) until Envoy ACKed it,
then `collect()` (a config step after each ACK) publishes it without them. `steer(snapshot)` takes in an ACK (on the
agent's loop): `dataplane()` is from then on that snapshot's steering, so the agent never
steers a connection to a listener Envoy does not have yet, and its configuration is in
force. `rejected(...)` takes in a NACK: the Istio resources to blame are found and held
out (xds/istio/refusals.py) and the rest is published again, so one resource Envoy
refuses never holds back the others. No sockets, threads or processes here: the xDS
server is known only by its answers about what Envoy ACKed (`Acks`); the Waypoint
(waypoint.py) feeds ACKs and NACKs in from the server's threads.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Callable, Protocol

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from prometheus_client import Counter

from nodeagent.digests import digests_in_force
from nodeagent.errors import ConfigError
from nodeagent.model import Model
from nodeagent.policy.schema import resource_name
from nodeagent.xds import dataplane
from nodeagent.xds import resources as rt
from nodeagent.xds.cache import SnapshotCache
from nodeagent.xds.dataplane import DataPlane, Sockets
from nodeagent.xds.istio.config import READERS, IstioConfig
from nodeagent.xds.istio.refusals import Build, Refusal, Refusals
from nodeagent.xds.snapshot import InconsistentSnapshot, Snapshot, eds_name, internal_listeners
from nodeagent.xds.translate.build import translate
from nodeagent.xds.translate.options import WaypointOptions

MAX_REJECTIONS = 64  # contents Envoy refused, remembered so a snapshot carrying one is not waited on
# What a translation raises on a value validation let through (a bug of ours, but one
# resource's, never a reason to stop publishing every other change).
UNTRANSLATABLE = (ConfigError, ArithmeticError, LookupError, TypeError, ValueError)


class Acks(Protocol):
    """What the xDS server (AdsServer) knows of a node's proxy."""

    def accepted(self, node: str) -> Snapshot | None:
        """The snapshot the proxy last ACKed completely."""

    def in_sync(self, node: str) -> bool:
        """The proxy ACKed the cache's latest snapshot."""


def at_once(fn: Callable[..., object], *args: object) -> None:
    fn(*args)


class Publisher:
    def __init__(self, node: str, sockets: Sockets, *, cache: SnapshotCache, acks: Acks, errors: Counter,
                 log: logging.Logger, root_namespace: str, jwks_files: Callable[[], dict[str, str]] = dict,
                 on_steering: Callable[[], object] = lambda: None, defer: Callable[..., None] = at_once):
        self.node = node
        self.sockets = sockets
        self.cache = cache
        self.acks = acks
        self.errors = errors  # nodeagent_waypoint_errors, by reason
        self.log = log
        self.root_namespace = root_namespace
        self.jwks_files = jwks_files
        self.on_steering = on_steering  # called on the loop when the steering changed
        # Runs a config step (rebuilds after an ACK or NACK): the agent passes its config
        # thread's submit (configwork.py), which is also where it calls update(); by
        # default, at once in the caller.
        self.defer = defer
        self._steering: Snapshot | None = None  # the ACKed snapshot the relays steer by
        self.config = IstioConfig(root_namespace=root_namespace)  # validated
        self.digests: dict[str, str] = {}  # "Kind ns/name" → digest of its spec in self.config
        self.refusals = Refusals()  # what Envoy refused, held out of what is published
        self._builds: dict[str, Build] = {}  # snapshot version → its configuration (the accepted and newer)
        self._in_force: Build | None = None  # the configuration of the ACKed snapshot the relays steer by
        self._in_force_version: str | None = None  # the snapshot whose ACK the config thread has taken in
        self.built_at: float | None = None  # wall clock of the last update(): its errors are in status
        self._rejections: dict[tuple[str, str], str] = {}  # (type URL, content version) → Envoy's message
        self._where: dict[str, str] = {}  # "Kind ns/name" → how errors name it (file#n (Kind ns/name))
        self.warnings: tuple[str, ...] = ()
        self.snapshot_error: str | None = None
        self._versions = itertools.count(1)
        self._model: Model | None = None
        self._cleanup: tuple[Snapshot, list, DataPlane] | None = None

    @property
    def model(self) -> Model:
        """The model last built from (an empty one before the first)."""
        return self._model if self._model is not None else Model.empty()

    # --- configuration -------------------------------------------------------------------
    def update(self, model: Model | None = None) -> None:
        """Rebuild from `model` (or the last one, e.g. when JWKS files changed) and publish."""
        model = model or self._model
        if model is None:
            return
        self._model = model
        previous = self.config
        config = IstioConfig.build(model, previous, self.root_namespace)
        self._report("refused", previous.errors, config.errors)
        self.digests = digests_in_force(model, READERS, config.entries.get, previous.entries.get, self.digests)
        self.config = config
        self._where = {f"{obj.kind} {obj.namespace}/{obj.name}": resource_name(obj)
                       for kind in READERS for obj in model.resources.get(kind, ())}
        self._publish()
        self.built_at = time.time()  # this model's verdicts (errors, snapshot) are out: status shows when

    def _publish(self) -> None:
        """Translate the configuration less what Envoy refused (refusals.py) and publish it.
        A resource the translation fails on is held out as one Envoy refused (_untranslatable)."""
        options = WaypointOptions(self.sockets, root_namespace=self.root_namespace, jwks_files=self.jwks_files())
        while True:
            build = self.refusals.compose(self.config, self.digests, self._in_force)
            try:
                translation = translate(self._model, self.node, build.config, options)
                fresh = translation.messages()
                break
            except UNTRANSLATABLE as exc:
                if not self._untranslatable(build, options, exc):  # else composed again without it
                    self._snapshot_refused(exc)
                    return
        try:
            carried = self._unreferenced_clusters(fresh)
            snapshot = Snapshot.build(str(next(self._versions)), fresh + carried, translation.dataplane)
        except (InconsistentSnapshot, ConfigError, ValueError) as exc:
            self._snapshot_refused(exc)
            return
        self.snapshot_error = None
        warnings = tuple(sorted({str(w) for w in (*self.config.warnings, *translation.warnings)}))
        for text in sorted(set(warnings) - set(self.warnings)):
            self.log.warning("waypoint: %s", text)
        self.warnings = warnings
        self._builds[snapshot.version] = build
        self.cache.set_snapshot(self.node, snapshot)
        self._cleanup = (snapshot, fresh, translation.dataplane) if carried else None
        self._check_rejected(snapshot)

    def _snapshot_refused(self, exc: Exception) -> None:
        self.errors.labels(reason="snapshot_refused").inc()
        if str(exc) != self.snapshot_error:
            self.log.error("waypoint snapshot refused, the previous one stays: %s", exc)
        self.snapshot_error = str(exc)

    def _untranslatable(self, build: Build, options: WaypointOptions, exc: Exception) -> bool:
        """The translation of `build` failed (a value validation let through that it cannot
        express): find a changed resource to blame and hold it out, as one Envoy refused
        (its last accepted version stays, or it is left out: a server-side one's pods go to
        L4), so it cannot freeze every later change. Holding out the first k changed
        resources succeeds from some k on (once every culprit is among them): that k is
        found by bisection (log2 of the changed ones, translations each), and the k-th is
        to blame; another culprit is found on the next pass. False when none is to blame
        (nothing changed, or holding them all out fails too)."""
        suspects = build.changed(self._in_force)
        message = f"{type(exc).__name__}: {exc}"
        refusals = {name: Refusal(build.digests[name], message, self._where.get(name, name),
                                  "nodeagent cannot translate it") for name in suspects}

        def fixed_by_holding(count: int) -> bool:
            held = suspects[:count]
            for name in held:
                self.refusals.refused[name] = refusals[name]
            try:
                trial = self.refusals.compose(self.config, self.digests, self._in_force)
                translate(self._model, self.node, trial.config, options).messages()
                return True
            except UNTRANSLATABLE:
                return False
            finally:
                for name in held:
                    del self.refusals.refused[name]

        if not suspects or not fixed_by_holding(len(suspects)):
            return False
        low, high = 1, len(suspects)  # holding `high` fixes it; holding `low - 1` does not
        while low < high:
            middle = (low + high) // 2
            if fixed_by_holding(middle):
                high = middle
            else:
                low = middle + 1
        culprit = suspects[high - 1]
        self.refusals.refused[culprit] = refusals[culprit]
        self.errors.labels(reason="untranslatable").inc()
        self.log.warning("waypoint config held out: %s: nodeagent cannot translate it: %s",
                         self._where.get(culprit, culprit), message)
        return True

    def _unreferenced_clusters(self, fresh: list) -> list:
        """Make before break: clusters of the last published snapshot that the new one
        drops stay (with their endpoints) until Envoy has ACKed the new routes; otherwise
        a request routed by the old route table meets a missing cluster (503 NC)."""
        previous = self.cache.get(self.node)
        if previous is None:
            return []
        kept = {rt.name_of(m) for m in fresh if rt.type_of(m) == rt.CLUSTER}
        listeners = {rt.name_of(m) for m in fresh if rt.type_of(m) == rt.LISTENER}
        endpoints = previous.resources(rt.ENDPOINT)
        carried, internal = [], set()
        for name, cluster in previous.resources(rt.CLUSTER).items():
            if name not in kept:
                carried.append(cluster)
                assignment = endpoints.get(eds_name(cluster)) if cluster.type == Cluster.DiscoveryType.EDS \
                    else cluster.load_assignment
                if assignment is not None and cluster.type == Cluster.DiscoveryType.EDS:
                    carried.append(assignment)
                internal |= internal_listeners(assignment)
        # The internal listeners the carried clusters send to stay too: when the last L7
        # resource goes (lab delete), the new snapshot has none, and the carried clusters
        # would dangle (Snapshot.build refused it: the old configuration stayed in force).
        carried += [listener for name, listener in previous.resources(rt.LISTENER).items()
                    if name in internal - listeners]
        return carried

    def collect(self) -> bool:
        """Once Envoy ACKed a snapshot that carried dropped clusters, publish it without
        them (a config step after each ACK: _in_force_now). True when it did."""
        if self._cleanup is None or self.acks.accepted(self.node) is not self._cleanup[0]:
            return False
        carrying, fresh, steering = self._cleanup
        self._cleanup = None
        clean = Snapshot.build(str(next(self._versions)), fresh, steering)
        if carrying.version in self._builds:
            self._builds[clean.version] = self._builds[carrying.version]
        self.cache.set_snapshot(self.node, clean)
        return True

    def _report(self, what: str, before, after) -> None:
        known = {str(e) for e in before}
        for err in after:
            if str(err) not in known:
                self.log.warning("waypoint config %s: %s", what, err)

    # --- Envoy's answers -----------------------------------------------------------------
    def dataplane(self) -> DataPlane:
        """What Envoy has ACKed: the connections to steer through it."""
        return self._steering.dataplane if self._steering is not None else DataPlane(self.sockets)

    def steer(self, snapshot: Snapshot) -> None:
        """On the agent's loop: steer by the ACKed `snapshot` from now on; when what goes
        through Envoy changed, tell `on_steering` (which re-checks the connections
        delivered around it). Then, as a config step, its configuration is in force (and
        if it was a trial, the search for what Envoy refused goes on)."""
        previous = self.dataplane()
        self._steering = snapshot
        if snapshot.dataplane != previous:
            try:
                self.on_steering()
            except Exception:
                self.log.exception("waypoint: re-check after a steering change failed")
        self.defer(self._in_force_now, snapshot)

    def _in_force_now(self, snapshot: Snapshot) -> None:
        self._take_in(snapshot)
        self.collect()  # this ACK may be the one that lets carried clusters go

    def _take_in(self, snapshot: Snapshot) -> None:
        build = self._builds.get(snapshot.version)
        self._in_force_version = snapshot.version  # status: in sync only from here on
        if build is None:
            return
        self._in_force = build
        self._builds = {v: b for v, b in self._builds.items() if int(v) >= int(snapshot.version)}
        refused = self.refusals.accepted(build, self._where)
        if refused is not None:
            self._refused(refused)

    def rejected(self, snapshot: Snapshot, type_url: str, message: str) -> None:
        """A config step: Envoy refused `snapshot`'s resources of `type_url`. Envoy keeps
        refusing that content and the server never sends it again, so any snapshot
        carrying it (the current one may be newer) is refused too: isolate what is to blame."""
        self._rejections[(type_url, snapshot.version_of(type_url))] = message
        while len(self._rejections) > MAX_REJECTIONS:
            del self._rejections[next(iter(self._rejections))]
        current = self.cache.get(self.node)
        if current is not None:
            self._check_rejected(current)

    def _check_rejected(self, snapshot: Snapshot) -> None:
        rejected = [(t, self._rejections.get((t, snapshot.version_of(t)))) for t in rt.PUSH_ORDER]
        message = next((m for _, m in rejected if m is not None), None)
        build = self._builds.get(snapshot.version)
        if message is None or build is None:
            return
        refused = self.refusals.rejected(build, self._in_force, message, self._where)
        if refused is None:  # nothing changed since the accepted snapshot: a translation bug
            self.errors.labels(reason="snapshot_refused").inc()
            text = f"Envoy refused snapshot {snapshot.version}: {message}"
            if text != self.snapshot_error:
                self.log.error("waypoint: %s; no Istio resource is to blame, the accepted one stays", text)
            self.snapshot_error = text
            return
        self._refused(refused)

    def _refused(self, names: list[str]) -> None:
        """Resources Envoy refused (or a search step done): publish without them."""
        for name in names:
            refusal = self.refusals.refused[name]
            self.errors.labels(reason="envoy_refused").inc()
            self.log.warning("waypoint config refused by Envoy, held out: %s: %s", refusal.where, refusal.message)
        search = self.refusals.search
        if search is not None:
            self.log.info("waypoint: Envoy refused one of %d changed resources; trying %s",
                          len(search.suspects), ", ".join(search.trial))
        self._publish()

    # --- status -------------------------------------------------------------------------
    def describe(self) -> dict:
        """The published and the accepted: `xds` (versions; in sync when Envoy ACKed the
        latest snapshot, the relays steer by it and its configuration is in force), the
        resources in force with their digests, errors (validation's and Envoy's),
        warnings, and the steering. The snapshot error is `snapshot_error`."""
        current, accepted = self.cache.get(self.node), self.acks.accepted(self.node)
        steering = self.dataplane()
        return {
            "xds": {"version": current.version if current else None,
                    "accepted": accepted.version if accepted else None,
                    "in_sync": self.acks.in_sync(self.node) and accepted is not None and accepted is self._steering
                    and self._in_force_version == accepted.version},
            "built_at": self.built_at,
            "resources": dict(sorted(self._in_force.digests.items())) if self._in_force else {},
            "errors": [str(e) for e in (*self.config.errors, *self.refusals.errors(self._in_force))],
            "warnings": list(self.warnings),
            "dataplane": {"outbound": sorted(dataplane.endpoint(*a) for a in steering.outbound),
                          "inbound": sorted(dataplane.endpoint(*a) for a in steering.inbound),
                          # one waypoint per request: what the outbound chains' routes enforce
                          "enforced": {dataplane.endpoint(*vip): sorted(dataplane.endpoint(*e) for e in endpoints)
                                       for vip, endpoints in sorted(steering.enforced.items())}},
        }
