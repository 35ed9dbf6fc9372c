"""The node's waypoint, run by the agent: its Envoy, the sockets between the agent and
that Envoy, and the xDS publisher (publisher.py) composed with them.

Envoy runs as a child (EnvoySupervisor: restarted with backoff, stopped by PID, and
killed by the kernel if the agent dies, so a restarted agent never meets a stale Envoy
holding its base id), bootstrapped to the agent's xDS server (AdsServer, grpcio, its own
threads) on `xds.sock`. The server's ACKs and NACKs are handed to the publisher on the
agent's loop; `update(model)`, `config`, `dataplane()` and the rest of the configuration
side are the publisher's. The agent serves `upstream.sock` (after client-side L7: on to
the endpoint Envoy picked) and `deliver.sock` (after server-side L7: into the pod); each
connection starts with a PROXY v2 header (dataplane.py) the handlers get decoded.
`open(kind, header)` connects to Envoy's `outbound.sock` / `inbound.sock` and writes the
header. Every file lives in the waypoint directory; `close()` removes the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import socket
import stat
import struct
from pathlib import Path
from typing import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter

from nodeagent.agent.config import AgentConfig
from nodeagent.agent.inpod.sockets import ACCEPT_PAUSE
from nodeagent.agent.waypoint.publisher import Publisher, at_once
from nodeagent.errors import EnvironmentProblem, NodeagentError
from nodeagent.model import Model, Pod
from nodeagent.resets import reset
from nodeagent.throttle import Throttle
from nodeagent.xds.accesslog import AccessLogPipe, RequestMetrics
from nodeagent.xds.bootstrap import BootstrapSettings, bootstrap_json
from nodeagent.xds.cache import SnapshotCache
from nodeagent.xds.dataplane import DataPlane, HandOffs, HeaderReader, ProxyHeader, Sockets
from nodeagent.xds.envoy import PR_SET_PDEATHSIG, EnvoySupervisor, described, untraversable, writable_parent
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.server import AdsServer
from nodeagent.xds.snapshot import Snapshot

Handler = Callable[[socket.socket, ProxyHeader], Awaitable[None]]
HEADER_TIMEOUT = 5.0  # seconds for Envoy to send the PROXY header of a connection


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
                              "resources Envoy refused (envoy_refused), connections handed back for none the agent "
                              "sent it (unsolicited) or by another user than Envoy's (not_envoy)",
                              ["reason"], registry=registry)


class Waypoint:
    def __init__(self, config: AgentConfig, *, registry: CollectorRegistry, log: logging.Logger,
                 on_upstream: Handler, on_deliver: Handler, jwks_files: Callable[[], dict[str, str]] = dict,
                 principal_of: Callable[[Pod], str | None] | None = None, debounce: float = 0.1,
                 supervisor_options: dict | None = None, on_steering: Callable[[], object] = lambda: None,
                 defer: Callable[..., None] = at_once):
        self.node = config.node
        self.log = log
        self.directory = config.waypoint_dir
        self.sockets = Sockets(str(self.directory))
        # Envoy's own uid and gid (no capability, no_new_privs: envoy.py), when the agent may
        # switch to them; else Envoy runs as the agent.
        self.user = config.envoy_user if config.envoy_user is not None and os.geteuid() == 0 else None
        self.metrics = WaypointMetrics(registry)
        self.handlers = {"upstream": on_upstream, "deliver": on_deliver}
        # Runs a config step (the publisher's rebuilds after an ACK or NACK, cluster
        # collection): the agent passes its config thread's submit (configwork.py), which
        # is also where it calls update(); by default, at once in the caller.
        self.defer = defer
        self.cache = SnapshotCache()
        # The access log names workloads by the model the publisher last built from.
        self.requests = RequestMetrics(registry, lambda: self.publisher.model, log.getChild("requests"), principal_of)
        self.access_log = AccessLogPipe(self.sockets.access_log, self.requests, log.getChild("requests"))
        self.server = AdsServer(self.cache, registry, log.getChild("xds"), debounce=debounce,
                                on_accepted=self._acked, on_rejected=self._nacked)
        self.publisher = Publisher(self.node, self.sockets, cache=self.cache, acks=self.server,
                                   errors=self.metrics.errors, log=log, root_namespace=config.root_namespace,
                                   jwks_files=jwks_files, on_steering=on_steering, defer=defer)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task] = set()
        self.sent = {"outbound": 0, "inbound": 0}  # connections the agent sent to Envoy
        self.handoffs = HandOffs()  # those still relayed: what Envoy may hand back
        self.unsolicited = {"upstream": 0, "deliver": 0}
        self._unsolicited_reports = Throttle()
        try:
            self.supervisor = EnvoySupervisor(str(self.directory / "bootstrap.json"),
                                              str(self.directory / "envoy.log"), log=log.getChild("envoy"),
                                              preexec_fn=_die_with_parent, user=self.user,
                                              **(supervisor_options or {}))
        except EnvironmentProblem as exc:
            raise EnvironmentProblem(exc.message, f"{exc.hint}, or run the agent with --no-waypoint "
                                     "(L4 only)") from None
        self._started = False

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._prepare_directories()
        for name in ("outbound.sock", "inbound.sock", "admin.sock"):
            for stale in (self.sockets.path(name), self.sockets.path(f"envoy/{name}")):  # the latter: a previous
                with contextlib.suppress(FileNotFoundError):  # Envoy's, maybe another uid's (the former: an
                    os.unlink(stale)  # agent that kept Envoy's sockets in its own directory)
        self.server.start(unix_path=self.sockets.xds)
        self._share(self.sockets.xds, 0o660)
        self.access_log.open()  # before Envoy opens it for writing
        self._share(self.sockets.access_log, 0o620)
        for name in self.handlers:
            path = self.sockets.path(f"{name}.sock")
            if os.path.lexists(path):
                os.unlink(path)  # left by a killed agent
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            self._share(path, 0o660)
            listener.listen(1024)
            listener.setblocking(False)
            self._listeners.append(listener)
            self._tasks.add(loop.create_task(self._serve(name, listener), name=f"waypoint-{name}"))
        bootstrap = self.directory / "bootstrap.json"
        bootstrap.write_text(bootstrap_json(BootstrapSettings(self.node, self.sockets.xds, self.sockets.admin)))
        self._share(str(bootstrap), 0o640)
        self.supervisor.start()
        self._started = True
        self.log.info("waypoint: envoy pid %s as %s, admin %s, xDS on %s", self.supervisor.status().pid,
                      self.user or "the agent", self.sockets.admin, self.sockets.xds)

    def _prepare_directories(self) -> None:
        """The waypoint directory, the agent's, which Envoy may enter and read but not write
        (0700, or with Envoy as its own user 0750 in Envoy's group: everything the agent
        opens by name is there, so Envoy can plant no symlink or FIFO for the agent, root,
        to open), and in it `envoy/`, the one directory Envoy may write (01770: its
        listeners' sockets; sticky, it removes nothing of the agent's)."""
        self._own_directory(self.directory, make_parents=True)
        envoy = Path(self.sockets.envoy_directory)
        if self.user is None:
            os.chmod(self.directory, 0o700)
            self._own_directory(envoy)
            os.chmod(envoy, 0o700)
            return
        blocked = untraversable(self.directory.parent, self.user)
        if blocked:
            raise EnvironmentProblem(f"the waypoint Envoy runs as {self.user} and cannot reach {self.directory}: "
                                     f"it may not enter {blocked}",
                                     "choose a --waypoint-dir whose parents every user may enter (the default "
                                     "/run/nodeagent/waypoint), or --envoy-user root (not recommended: an Envoy "
                                     "bug reached by a pod's HTTP would be root on the node)")
        writable = writable_parent(self.directory, self.user)
        info = os.stat(writable) if writable is not None else None
        if info is not None and info.st_uid == os.geteuid() and info.st_mode & stat.S_IWOTH:
            # A directory of the agent's anybody may write, such as the DaemonSet's emptyDir
            # (kubelet makes them 0777): sticky, Envoy's uid can remove or rename nothing of
            # the agent's in it (what it may still make there the agent opens by no fixed name).
            os.chmod(writable, stat.S_IMODE(info.st_mode) | stat.S_ISVTX)
            self.log.info("made %s sticky (mode %04o): the waypoint Envoy, uid %d, may write it", writable,
                          stat.S_IMODE(info.st_mode) | stat.S_ISVTX, self.user.uid)
            writable = writable_parent(self.directory, self.user)
        if writable is not None:
            raise EnvironmentProblem(f"the waypoint Envoy runs as {self.user} and could replace {self.directory}: "
                                     f"it may write {described(writable)}",
                                     "choose a --waypoint-dir whose parents only root may write (sticky ones, "
                                     "like /tmp, are fine)")
        os.chown(self.directory, -1, self.user.gid)
        os.chmod(self.directory, 0o750)
        self._own_directory(envoy)
        os.chown(envoy, -1, self.user.gid)
        os.chmod(envoy, 0o1770)

    def _own_directory(self, path: Path, make_parents: bool = False) -> None:
        """`path` a directory of the agent's uid, made if missing. In the waypoint
        directory anything else at the name (what an Envoy left when that directory was
        its to write) is removed first; the waypoint directory itself is refused."""
        if make_parents:
            os.makedirs(path, mode=0o700, exist_ok=True)
        elif os.path.lexists(path):
            info = os.lstat(path)
            if not stat.S_ISDIR(info.st_mode):
                os.unlink(path)
            elif info.st_uid != os.geteuid():
                shutil.rmtree(path)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise EnvironmentProblem(f"waypoint directory {path} is not a directory of the agent's uid "
                                     f"{os.geteuid()} (a symlink, or another user's)",
                                     "remove it, or choose another --waypoint-dir")

    def _share(self, path: str, mode: int) -> None:
        """Give a file of the agent's in the waypoint directory to Envoy's group."""
        if self.user is not None:
            os.chown(path, -1, self.user.gid)
            os.chmod(path, mode)

    async def close(self) -> None:
        if self._started:
            await asyncio.to_thread(self.supervisor.stop)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for listener in self._listeners:
            listener.close()
        await asyncio.to_thread(self.server.stop, 0.5)
        self.access_log.close()  # after Envoy: it writes what it buffered when it stops
        for path in (self.sockets.upstream, self.sockets.deliver, self.sockets.outbound, self.sockets.inbound):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _acked(self, node: str, snapshot: Snapshot) -> None:
        """In an xDS thread: Envoy ACKed `snapshot`; steer by it on the agent's loop."""
        loop = self._loop
        if node == self.node and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.publisher.steer, snapshot)

    def _nacked(self, node: str, snapshot: Snapshot, type_url: str, message: str) -> None:
        """In an xDS thread: Envoy NACKed a response built from `snapshot`."""
        loop = self._loop
        if node == self.node and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.defer, self.publisher.rejected, snapshot, type_url, message)

    # --- configuration: the publisher's, as the data path uses it ---------------------------
    @property
    def config(self) -> IstioConfig:
        """The validated Istio configuration in force (last good version of each resource)."""
        return self.publisher.config

    def update(self, model: Model | None = None) -> None:
        """Rebuild from `model` (or the last one, e.g. when JWKS files changed) and publish."""
        self.publisher.update(model)

    def dataplane(self) -> DataPlane:
        """What Envoy has ACKed: the connections to steer through it."""
        return self.publisher.dataplane()

    # --- connections to Envoy --------------------------------------------------------------
    def expecting(self, kind: str, header: ProxyHeader) -> contextlib.AbstractContextManager:
        """While this lasts, Envoy may hand back connections for what `header` opens."""
        return self.handoffs.expecting(kind, header)

    async def open(self, kind: str, header: ProxyHeader) -> socket.socket:
        """A connection to Envoy's `outbound` or `inbound` listener, the header written."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, self.sockets.outbound if kind == "outbound" else self.sockets.inbound)
            self._check_peer(sock)
            await loop.sock_sendall(sock, header.encode())
        except OSError as exc:
            sock.close()
            self.metrics.errors.labels(reason="unavailable").inc()
            raise WaypointUnavailable(f"waypoint {kind} listener: {exc.strerror or exc}",
                                      "is Envoy running? see nodeagent status") from None
        self.metrics.connections.labels(direction=kind).inc()
        self.sent[kind] += 1
        return sock

    def _check_peer(self, sock: socket.socket) -> None:
        """With Envoy as its own user, the socket reached in its directory must be its: a
        path there is Envoy's to make, a symlink to another socket of the node included."""
        if self.user is None:
            return
        uid = _peer_uid(sock)
        if uid != self.user.uid:
            raise OSError(errno.EPERM, f"the listener is not Envoy's (its peer is uid {uid}, not {self.user.uid})")

    async def _serve(self, name: str, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        failures = Throttle()  # at the descriptor limit accept fails ten times a second
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                count = failures.due()
                if count:
                    self.log.warning("waypoint %s.sock: %d accept(s) failed since the last report, the last: %s; "
                                     "retrying every %g s, reported at most every %g s", name, count, exc,
                                     ACCEPT_PAUSE, failures.interval)
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            conn.setblocking(False)
            task = loop.create_task(self._accepted(name, conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _accepted(self, name: str, raw: socket.socket) -> None:
        """A connection from Envoy on upstream.sock / deliver.sock: read its PROXY header
        (nothing after it), then hand the socket to the handler."""
        self.metrics.returned.labels(socket=name).inc()
        if self.user is not None:  # the sockets are Envoy's group's to reach: its user's, or root's (ours)
            uid = _peer_uid(raw)
            if uid not in (self.user.uid, os.geteuid()):
                self.metrics.errors.labels(reason="not_envoy").inc()
                self.log.warning("waypoint %s.sock: a connection from uid %d, not Envoy's %d; closing", name, uid,
                                 self.user.uid)
                reset(raw)
                return
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
        if not self.handoffs.solicited(name, header):
            self._refuse_unsolicited(name, raw, header)
            return
        await self.handlers[name](raw, header)

    def _refuse_unsolicited(self, name: str, raw: socket.socket, header: ProxyHeader) -> None:
        """A connection Envoy hands back for none the agent sent it and still relays
        (HandOffs): reset, counted, and reported at most every few seconds."""
        reset(raw)
        self.unsolicited[name] += 1
        self.metrics.errors.labels(reason="unsolicited").inc()
        count = self._unsolicited_reports.due()
        if count:
            self.log.warning("waypoint %s.sock: refused %d connection(s) Envoy handed back for no connection the "
                             "agent sent it (the last: from %s to %s port %d); Envoy acts only for connections "
                             "the agent relays through it: a compromised or misbehaving Envoy?", name, count,
                             header.source[0], header.destination[0], header.destination[1])

    # --- status -------------------------------------------------------------------------
    def describe(self) -> dict:
        status = self.supervisor.status() if self._started else None
        published = self.publisher.describe()  # its xDS versions, then what is in force
        xds = published.pop("xds")
        nacks = sum(s.value for m in self.server.metrics.nacks.collect() for s in m.samples
                    if s.name.endswith("_total"))
        return {
            "directory": str(self.directory),
            "envoy": {"running": bool(status and status.running), "pid": status.pid if status else None,
                      "restarts": status.restarts if status else 0,
                      "last_exit": status.last_exit if status else None,
                      "user": str(self.user) if self.user else f"{os.geteuid()}:{os.getegid()} (the agent's)",
                      "admin": self.sockets.admin, "log": str(self.directory / "envoy.log")},
            "xds": {**xds, "connected": self.node in self.server.connected(), "nacks": int(nacks),
                    "snapshot_error": self.publisher.snapshot_error},
            **published,  # built_at, resources, errors, warnings, dataplane
            "connections": dict(self.sent),
            "unsolicited": dict(self.unsolicited),
            "access_log": {"path": self.access_log.path, "lines": self.access_log.lines,
                           "unreadable": self.requests.unread},
        }


async def read_header(sock: socket.socket) -> ProxyHeader | None:
    """One PROXY v2 header read from a non-blocking socket on the running loop, and not a
    byte more (as dataplane.read_header does from a blocking one)."""
    loop = asyncio.get_running_loop()
    reader = HeaderReader()
    while reader.missing:
        reader.feed(await loop.sock_recv(sock, reader.missing))
    return reader.header()


def _die_with_parent() -> None:
    """In the Envoy child before exec: SIGKILL it when the agent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of unix socket `sock` (SO_PEERCRED)."""
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid
