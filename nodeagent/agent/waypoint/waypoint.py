"""The node's waypoint, run by the agent: its xDS server, its Envoy, and the agent's two
listeners Envoy hands connections back on.

`Waypoint.update(model)` rebuilds the Istio configuration (an invalid resource keeps its
last good version, as IstioConfig.build does) and this node's snapshot, and publishes it
when it is consistent; an inconsistent one is logged and the previous stays. The AdsServer
(grpcio, its own threads) pushes it to Envoy; `dataplane()` is the DataPlane of the
snapshot Envoy last ACKed completely (handed to the agent's loop by `steer`, which
tells the agent when the steering changed), so the agent never steers a connection to a
listener Envoy does not have yet. Until then the agent's L4 handling (with its fail-safe
reading of HTTP-only policy) stays in force. When Envoy NACKs (`rejected`, on the loop),
the Istio resources to blame are found and held out (refusals.py) and the rest is
published again, so one resource Envoy refuses never holds back the others; status
shows in force only what Envoy ACKed, and each refused resource with Envoy's message.

Envoy runs as a child (EnvoySupervisor: restarted with backoff, stopped by PID, and
killed by the kernel if the agent dies, so a restarted agent never meets a stale Envoy
holding its base id). The agent serves `upstream.sock` (after client-side L7: on to
the endpoint Envoy picked) and `deliver.sock` (after server-side L7: into the pod); each
connection starts with a PROXY v2 header (dataplane.py) the handlers get decoded.
`open(kind, header)` connects to Envoy's `outbound.sock` / `inbound.sock` and writes the
header. Every file lives in the waypoint directory; `close()` removes the sockets.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import os
import signal
import socket
import struct
import time
from typing import Awaitable, Callable

from envoy_data_plane.envoy.config.cluster.v3 import ClusterDiscoveryType
from prometheus_client import CollectorRegistry, Counter

from nodeagent.agent.config import AgentConfig
from nodeagent.agent.proxy.policies import digests_in_force
from nodeagent.errors import ConfigError, EnvironmentProblem, NodeagentError
from nodeagent.model import Model, Pod
from nodeagent.xds import dataplane
from nodeagent.xds.accesslog import RequestMetrics
from nodeagent.xds.bootstrap import BootstrapSettings, bootstrap_json
from nodeagent.xds.cache import SnapshotCache
from nodeagent.xds.dataplane import DataPlane, ProxyHeader, Sockets
from nodeagent.xds.envoy import EnvoySupervisor, base_id_for
from nodeagent.policy.schema import resource_name
from nodeagent.xds.istio.config import READERS, IstioConfig
from nodeagent.xds.istio.refusals import Build, Refusals
from nodeagent.xds.server import AdsServer
from nodeagent.xds import resources as rt
from nodeagent.xds.snapshot import InconsistentSnapshot, Snapshot, eds_name
from nodeagent.xds.translate.build import translate
from nodeagent.xds.translate.options import WaypointOptions

Handler = Callable[[socket.socket, ProxyHeader], Awaitable[None]]
HEADER_TIMEOUT = 5.0  # seconds for Envoy to send the PROXY header of a connection
MAX_HEADER = 4096  # bytes of PROXY v2 body (addresses and TLVs) accepted
PR_SET_PDEATHSIG = 1
COLLECT_INTERVAL = 0.2  # seconds between checks for an ACK that lets dropped clusters go
MAX_REJECTIONS = 64  # contents Envoy refused, remembered so a snapshot carrying one is not waited on


def _now(fn: Callable[..., object], *args: object) -> None:
    fn(*args)


class WaypointUnavailable(NodeagentError):
    """Envoy's listener socket refused or is missing (Envoy down, restarting, or not yet configured)."""


class WaypointMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.connections = Counter("nodeagent_waypoint_connections",
                                   "Connections the agent sent through the node's waypoint Envoy, by direction",
                                   ["direction"], registry=registry)
        self.returned = Counter("nodeagent_waypoint_returned_connections",
                                "Connections Envoy handed back to the agent, by socket (upstream, deliver)",
                                ["socket"], registry=registry)
        self.errors = Counter("nodeagent_waypoint_errors",
                              "Waypoint failures: unavailable Envoy, bad PROXY headers, refused snapshots, "
                              "resources Envoy refused (envoy_refused)",
                              ["reason"], registry=registry)


class Waypoint:
    def __init__(self, config: AgentConfig, *, registry: CollectorRegistry, log: logging.Logger,
                 on_upstream: Handler, on_deliver: Handler, jwks_files: Callable[[], dict[str, str]] = dict,
                 principal_of: Callable[[Pod], str | None] | None = None, debounce: float = 0.1,
                 supervisor_options: dict | None = None, on_steering: Callable[[], object] = lambda: None,
                 defer: Callable[..., None] = _now):
        self.node = config.node
        self.root_namespace = config.root_namespace
        self.log = log
        self.directory = config.waypoint_dir
        self.sockets = Sockets(str(self.directory))
        self.admin_port = config.envoy_admin_port
        self.metrics = WaypointMetrics(registry)
        self.handlers = {"upstream": on_upstream, "deliver": on_deliver}
        self.jwks_files = jwks_files
        self.cache = SnapshotCache()
        self.requests = RequestMetrics(registry, lambda: self._model if self._model is not None else Model.empty(), log.getChild("requests"),
                                       principal_of)
        self.server = AdsServer(self.cache, registry, log.getChild("xds"), debounce=debounce,
                                access_log=self.requests, on_accepted=self._acked, on_rejected=self._nacked)
        self.on_steering = on_steering  # called on the loop when the steering changed
        # Runs a config step (rebuilds after an ACK or NACK, cluster collection): the agent
        # passes its config thread's submit (configwork.py), which is also where it calls
        # update(); by default, at once in the caller.
        self.defer = defer
        self._steering: Snapshot | None = None  # the ACKed snapshot the relays steer by
        self._loop: asyncio.AbstractEventLoop | None = None
        self.config = IstioConfig(root_namespace=config.root_namespace)  # validated
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
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task] = set()
        self.sent = {"outbound": 0, "inbound": 0}  # connections the agent sent to Envoy
        try:
            self.supervisor = EnvoySupervisor(str(self.directory / "bootstrap.json"), base_id_for(str(self.directory)),
                                              str(self.directory / "envoy.log"), log=log.getChild("envoy"),
                                              preexec_fn=_die_with_parent, **(supervisor_options or {}))
        except EnvironmentProblem as exc:
            raise EnvironmentProblem(exc.message, f"{exc.hint}, or run the agent with --no-waypoint "
                                     "(L4 only)") from None
        self._started = False
        self._cleanup: tuple[Snapshot, list, DataPlane] | None = None

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.server.start(unix_path=self.sockets.xds)
        for name in self.handlers:
            path = self.sockets.path(f"{name}.sock")
            if os.path.exists(path):
                os.unlink(path)  # left by a killed agent
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1024)
            listener.setblocking(False)
            self._listeners.append(listener)
            self._tasks.add(loop.create_task(self._serve(name, listener), name=f"waypoint-{name}"))
        bootstrap = self.directory / "bootstrap.json"
        bootstrap.write_text(bootstrap_json(BootstrapSettings(self.node, self.sockets.xds, self.admin_port)))
        self.supervisor.start()
        self._started = True
        self._tasks.add(loop.create_task(self._collect_loop(), name="waypoint-collect"))
        self.log.info("waypoint: envoy pid %s, admin 127.0.0.1:%d, xDS on %s",
                      self.supervisor.status().pid, self.admin_port, self.sockets.xds)

    async def close(self) -> None:
        if self._started:
            await asyncio.to_thread(self.supervisor.stop)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for listener in self._listeners:
            listener.close()
        await asyncio.to_thread(self.server.stop, 0.5)
        for name in ("upstream.sock", "deliver.sock", "outbound.sock", "inbound.sock"):
            try:
                os.unlink(self.sockets.path(name))
            except FileNotFoundError:
                pass

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
        """Translate the configuration less what Envoy refused (refusals.py) and publish it."""
        build = self.refusals.compose(self.config, self.digests, self._in_force)
        options = WaypointOptions(self.sockets, root_namespace=self.root_namespace, jwks_files=self.jwks_files())
        try:
            translation = translate(self._model, self.node, build.config, options)
            fresh = translation.messages()
            carried = self._unreferenced_clusters(fresh)
            snapshot = Snapshot.build(str(next(self._versions)), fresh + carried, translation.dataplane)
        except (InconsistentSnapshot, ConfigError, ValueError) as exc:
            self.metrics.errors.labels(reason="snapshot_refused").inc()
            if str(exc) != self.snapshot_error:
                self.log.error("waypoint snapshot refused, the previous one stays: %s", exc)
            self.snapshot_error = str(exc)
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

    def _unreferenced_clusters(self, fresh: list) -> list:
        """Make before break: clusters of the last published snapshot that the new one
        drops stay (with their endpoints) until Envoy has ACKed the new routes; otherwise
        a request routed by the old route table meets a missing cluster (503 NC)."""
        previous = self.cache.get(self.node)
        if previous is None:
            return []
        kept = {rt.name_of(m) for m in fresh if rt.type_of(m) == rt.CLUSTER}
        endpoints = previous.resources(rt.ENDPOINT)
        carried = []
        for name, cluster in previous.resources(rt.CLUSTER).items():
            if name not in kept:
                carried.append(cluster)
                assignment = endpoints.get(eds_name(cluster)) if cluster.type == ClusterDiscoveryType.EDS else None
                if assignment is not None:
                    carried.append(assignment)
        return carried

    def collect(self) -> bool:
        """Once Envoy ACKed a snapshot that carried dropped clusters, publish it without
        them. True when it did."""
        if self._cleanup is None or self.server.accepted(self.node) is not self._cleanup[0]:
            return False
        carrying, fresh, steering = self._cleanup
        self._cleanup = None
        clean = Snapshot.build(str(next(self._versions)), fresh, steering)
        if carrying.version in self._builds:
            self._builds[clean.version] = self._builds[carrying.version]
        self.cache.set_snapshot(self.node, clean)
        return True

    async def _collect_loop(self) -> None:
        while True:
            await asyncio.sleep(COLLECT_INTERVAL)
            try:
                self.defer(self.collect)
            except Exception:  # never end the loop; the clusters just stay a while longer
                self.log.exception("waypoint: cannot drop unreferenced clusters")

    def _report(self, what: str, before, after) -> None:
        known = {str(e) for e in before}
        for err in after:
            if str(err) not in known:
                self.log.warning("waypoint config %s: %s", what, err)

    def dataplane(self) -> DataPlane:
        """What Envoy has ACKed: the connections to steer through it."""
        return self._steering.dataplane if self._steering is not None else DataPlane(self.sockets)

    def _acked(self, node: str, snapshot: Snapshot) -> None:
        """In an xDS thread: Envoy ACKed `snapshot`; steer by it on the agent's loop."""
        loop = self._loop
        if node == self.node and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.steer, snapshot)

    def steer(self, snapshot: Snapshot) -> None:
        """Steer by the ACKed `snapshot` from now on; when what goes through Envoy changed,
        tell `on_steering` (which re-checks the connections delivered around it). Then,
        as a config step, its configuration is in force (and if it was a trial, the search
        for what Envoy refused goes on)."""
        previous = self.dataplane()
        self._steering = snapshot
        if snapshot.dataplane != previous:
            try:
                self.on_steering()
            except Exception:
                self.log.exception("waypoint: re-check after a steering change failed")
        self.defer(self._in_force_now, snapshot)

    def _in_force_now(self, snapshot: Snapshot) -> None:
        build = self._builds.get(snapshot.version)
        self._in_force_version = snapshot.version  # status: in sync only from here on
        if build is None:
            return
        self._in_force = build
        self._builds = {v: b for v, b in self._builds.items() if int(v) >= int(snapshot.version)}
        refused = self.refusals.accepted(build, self._where)
        if refused is not None:
            self._refused(refused)

    def _nacked(self, node: str, snapshot: Snapshot, type_url: str, message: str) -> None:
        """In an xDS thread: Envoy NACKed a response built from `snapshot`."""
        loop = self._loop
        if node == self.node and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.defer, self.rejected, snapshot, type_url, message)

    def rejected(self, snapshot: Snapshot, type_url: str, message: str) -> None:
        """Envoy refused `snapshot`'s resources of `type_url`. Envoy keeps refusing that
        content and the server never sends it again, so any snapshot carrying it (the
        current one may be newer) is refused too: isolate what is to blame."""
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
            self.metrics.errors.labels(reason="snapshot_refused").inc()
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
            self.metrics.errors.labels(reason="envoy_refused").inc()
            self.log.warning("waypoint config refused by Envoy, held out: %s: %s", refusal.where, refusal.message)
        search = self.refusals.search
        if search is not None:
            self.log.info("waypoint: Envoy refused one of %d changed resources; trying %s",
                          len(search.suspects), ", ".join(search.trial))
        self._publish()

    # --- connections to Envoy --------------------------------------------------------------
    async def open(self, kind: str, header: ProxyHeader) -> socket.socket:
        """A connection to Envoy's `outbound` or `inbound` listener, the header written."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, self.sockets.path(f"{kind}.sock"))
            await loop.sock_sendall(sock, header.encode())
        except OSError as exc:
            sock.close()
            self.metrics.errors.labels(reason="unavailable").inc()
            raise WaypointUnavailable(f"waypoint {kind} listener: {exc.strerror or exc}",
                                      "is Envoy running? see nodeagent status") from None
        self.metrics.connections.labels(direction=kind).inc()
        self.sent[kind] += 1
        return sock

    async def _serve(self, name: str, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                self.log.warning("waypoint %s.sock: accept failed: %s", name, exc)
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._accepted(name, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _accepted(self, name: str, raw: socket.socket) -> None:
        """A connection from Envoy on upstream.sock / deliver.sock: read its PROXY header
        (nothing after it), then hand the socket to the handler."""
        self.metrics.returned.labels(socket=name).inc()
        try:
            header = await asyncio.wait_for(read_header(raw), HEADER_TIMEOUT)
        except (ValueError, OSError, asyncio.TimeoutError) as exc:
            self.metrics.errors.labels(reason="bad_proxy_header").inc()
            self.log.warning("waypoint %s.sock: no valid PROXY v2 header (%s); closing", name,
                             exc or "timed out")
            raw.close()
            return
        if header is None:
            raw.close()  # a LOCAL command: Envoy's health check, nothing to relay
            return
        await self.handlers[name](raw, header)

    # --- status -------------------------------------------------------------------------
    def describe(self) -> dict:
        status = self.supervisor.status() if self._started else None
        current, accepted = self.cache.get(self.node), self.server.accepted(self.node)
        steering = self.dataplane()
        nacks = sum(s.value for m in self.server.metrics.nacks.collect() for s in m.samples
                    if s.name.endswith("_total"))
        return {
            "directory": str(self.directory),
            "envoy": {"running": bool(status and status.running), "pid": status.pid if status else None,
                      "restarts": status.restarts if status else 0,
                      "last_exit": status.last_exit if status else None,
                      "admin": f"127.0.0.1:{self.admin_port}", "log": str(self.directory / "envoy.log")},
            "xds": {"version": current.version if current else None,
                    "accepted": accepted.version if accepted else None,
                    # in sync: Envoy ACKed the latest snapshot, the relays steer by it and its config is in force
                    "in_sync": self.server.in_sync(self.node) and accepted is not None and accepted is self._steering
                    and self._in_force_version == accepted.version,
                    "connected": self.node in self.server.connected(),
                    "nacks": int(nacks), "snapshot_error": self.snapshot_error},
            "built_at": self.built_at,
            "resources": dict(sorted(self._in_force.digests.items())) if self._in_force else {},
            "errors": [str(e) for e in (*self.config.errors, *self.refusals.errors(self._in_force))],
            "warnings": list(self.warnings),
            "dataplane": {"outbound": sorted(dataplane.endpoint(*a) for a in steering.outbound),
                          "inbound": sorted(dataplane.endpoint(*a) for a in steering.inbound)},
            "connections": dict(self.sent),
        }


async def read_header(sock: socket.socket) -> ProxyHeader | None:
    """One PROXY v2 header read from a non-blocking socket, and not a byte more."""
    loop = asyncio.get_running_loop()

    async def read_exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await loop.sock_recv(sock, n - len(data))
            if not chunk:
                raise ValueError("connection closed inside the PROXY header")
            data += chunk
        return data

    head = await read_exact(16)
    length = struct.unpack("!H", head[14:16])[0]
    if head[:12] != dataplane.SIGNATURE:
        raise ValueError("not a PROXY protocol v2 header")
    if length > MAX_HEADER:
        raise ValueError(f"PROXY v2 header of {length} bytes")
    body = await read_exact(length)
    parts = iter((head, body))
    return dataplane.decode(lambda n: next(parts))


def _die_with_parent() -> None:
    """In the Envoy child before exec: SIGKILL it when the agent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
