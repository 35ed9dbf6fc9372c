"""The agent's admin endpoints (and the CA's `/metrics`: identity/ca/server.py): a small
HTTP/1.1 server on the admin address (default 127.0.0.1:15020 in the agent's netns) and
on the admin unix socket: `/metrics`
(Prometheus text), `/healthz/ready` (200 when the agent can serve; 503 naming everything
missing, from a `Readiness`) on both, and `/debug/status` (JSON, what `nodeagent status`
renders) on the socket only. `fetch` and `fetch_status` are the client side over the unix
socket. One request per connection; nothing here can block the agent's event loop.

The admin address is the node's in the DaemonSet (Prometheus scrapes it there, as
ztunnel's :15020), so every pod of the cluster can reach it: status (the node's pods,
identities, policies, config) stays on the socket, which only root on the node reaches,
as ztunnel keeps its config dump on localhost. And a pod opening connections there and
never finishing a request (slowloris) must not take the agent's descriptors or memory:
at most MAX_TCP_CONNECTIONS are served at once, each has HEAD_TIMEOUT for its request
head of at most MAX_REQUEST bytes and RESPONSE_TIMEOUT to take the response (a client
that never reads is aborted, not left holding its slot and the page), and one more is
closed at accept, counted (`nodeagent_admin_connections_refused_total`) and logged at
most every LOG_INTERVAL. The /metrics page is built in a thread of the server's own;
on the admin address one build at a time, and a built page answers every request for
METRICS_FRESH: its size grows with the label sets (tens of MB for thousands), and built
on the loop, one request from any pod held every new connection of the node for as
long. Over the socket it is built for each request (what just happened is in it).
Readiness does not depend on it (the probe reads the ReadinessFile), nor does `nodeagent
status` (the socket has no such limit).

The admin TCP port is shared (SO_REUSEPORT) by the old and the new agent of a node
during a rolling update, so a probe there may reach either: kubelet's readiness probe
reads `ReadinessFile` instead, this agent's own verdict in its pod's own directory
(beside the admin socket), rewritten every second so a stalled agent reads as not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.throttle import LOG_INTERVAL, Throttle

MAX_REQUEST = 16 * 1024  # bytes of a request head
MAX_TCP_CONNECTIONS = 32  # served at once on the admin address (Prometheus scrapes one at a time)
HEAD_TIMEOUT = 5.0  # seconds for a request head to arrive
RESPONSE_TIMEOUT = 10.0  # seconds for the client to take the response, then the connection is aborted
METRICS_FRESH = 1.0  # seconds one built /metrics page answers every request
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
           503: "Service Unavailable"}


@dataclass(frozen=True)
class Readiness:
    """Whether the agent can serve: true when nothing is missing; else each thing missing,
    in words (what `/healthz/ready` answers and `nodeagent status` shows)."""

    missing: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return not self.missing


READINESS_EVERY = 1.0  # seconds between rewrites; the DaemonSet's probe wants one newer than 5 s


def readiness_path(socket_path: Path) -> Path:
    """Beside the admin socket and named after it (agent.sock: agent.readiness), so the
    agents of a lab, whose sockets share one directory, never write one another's."""
    return socket_path.with_name(socket_path.stem + ".readiness")


def readiness_text(verdict: Readiness | bool) -> str:
    """`ready`, or one `not ready: …` line per thing missing (what the probe prints)."""
    if verdict:
        return "ready\n"
    return "\n".join([f"not ready: {m}" for m in getattr(verdict, "missing", ())] or ["not ready"]) + "\n"


class ReadinessFile:
    """The agent's readiness in a file, for an exec probe that must reach this agent and
    no other (the DaemonSet's: daemonset/mesh/agent.yaml). Rewritten (atomically) every
    `every` seconds while the event loop runs; removed at start and at close."""

    def __init__(self, path: Path, ready: Callable[[], Readiness | bool], log: logging.Logger,
                 every: float = READINESS_EVERY):
        self.path, self.ready, self.log, self.every = path, ready, log, every
        self._task: asyncio.Task | None = None

    def clear(self) -> None:
        """Forget what an earlier agent (a crashed container of this pod) wrote."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="readiness-file")

    def write(self) -> None:
        try:
            text = readiness_text(self.ready())
        except Exception as exc:  # a bug in a readiness source reads as not ready, never as ready
            text = f"not ready: cannot tell: {exc}\n"
        # A new name each time (O_EXCL), never a fixed one: in a directory others may write
        # (the DaemonSet's emptyDir is 1777, and the waypoint Envoy runs as another uid) a
        # FIFO planted at a fixed name hung the agent's loop, a symlink redirected the write.
        fd, temporary = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                self.write()
            except OSError as exc:
                self.log.warning("cannot write %s: %s", self.path, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.clear()


class AdminServer:
    def __init__(self, *, registry: CollectorRegistry, status: Callable[[], dict[str, Any]],
                 ready: Callable[[], Readiness | bool], log: logging.Logger):
        self.registry = registry
        self.status = status
        self.ready = ready
        self.log = log
        self._servers: list[asyncio.AbstractServer] = []
        self._socket_path: Path | None = None
        self._readiness_file: ReadinessFile | None = None
        self.tcp_open = 0  # connections being served on the admin address
        self.refused = Counter("nodeagent_admin_connections_refused",
                               f"Connections to the admin address closed at accept: {MAX_TCP_CONNECTIONS} were "
                               "being served", registry=registry)
        self._refusals = Throttle()  # their log lines
        self._page: bytes | None = None  # /metrics, let go METRICS_FRESH after its build began
        self._building: asyncio.Task | None = None
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="metrics")

    async def start(self, address: tuple[str, int] | None, socket_path: Path | None,
                    reuse_port: bool = True, setting: str = "admin_address") -> None:
        """Serve on `address` (the setting named `setting`: a refused listen names it) and
        on the unix socket `socket_path`."""
        if address is not None:
            try:
                # SO_REUSEPORT: a rolling update's new agent binds the node's admin port
                # beside the old one (so readiness is probed through ReadinessFile).
                self._servers.append(await asyncio.start_server(self._serve_tcp, address[0], address[1],
                                                                reuse_address=True, reuse_port=reuse_port,
                                                                limit=MAX_REQUEST))
            except OSError as exc:
                raise ConfigError(f"setting {setting}", f"cannot listen on {address[0]}:{address[1]}: "
                                  f"{exc.strerror}", "is another process (another agent?) listening there? "
                                  f"pick another --{setting.replace('_', '-')}") from None
        if socket_path is not None:
            _clear_stale_socket(socket_path)
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            self._servers.append(await asyncio.start_unix_server(self._serve_local, str(socket_path),
                                                                 limit=MAX_REQUEST))
            self._socket_path = socket_path
            self._readiness_file = ReadinessFile(readiness_path(socket_path), self.ready, self.log)
            self._readiness_file.start()

    async def close(self) -> None:
        self._builder.shutdown(wait=False, cancel_futures=True)
        if self._readiness_file is not None:
            await self._readiness_file.close()
            self._readiness_file = None
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self._socket_path is not None:
            try:
                self._socket_path.unlink()
            except FileNotFoundError:
                pass

    def respond(self, method: str, path: str, local: bool = True) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request; `local`: it came over the socket."""
        if method != "GET":
            return 405, "text/plain", b"only GET\n"
        path = path.split("?", 1)[0]  # (/metrics: metrics_page, off the loop)
        if path == "/debug/status":
            if not local:
                return 404, "text/plain", b"/debug/status is served on the agent's admin socket only: nodeagent status\n"
            return 200, "application/json", json.dumps(self.status(), indent=1, sort_keys=True).encode() + b"\n"
        if path == "/healthz/ready":
            return self._readiness(local)
        return 404, "text/plain", (b"try /metrics, /debug/status or /healthz/ready\n" if local
                                   else b"try /metrics or /healthz/ready\n")

    def _readiness(self, local: bool) -> tuple[int, str, bytes]:
        """Why not ready names pods and says what failed: on the socket only (any pod can
        reach the admin address; the probes read the readiness file)."""
        verdict = self.ready()
        if not local:
            return (200, "text/plain", b"ready\n") if verdict else \
                (503, "text/plain", b"not ready (why: nodeagent status, on the node)\n")
        return (200 if verdict else 503), "text/plain", readiness_text(verdict).encode()

    async def _serve_local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve(reader, writer, True)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.tcp_open >= MAX_TCP_CONNECTIONS:
            writer.transport.abort()
            self._refused()
            return
        self.tcp_open += 1
        try:
            await self._serve(reader, writer, False)
        finally:
            self.tcp_open -= 1

    def _refused(self) -> None:
        self.refused.inc()
        count = self._refusals.due()
        if count and self.log is not None:
            self.log.warning("admin: %d connection(s) to the admin address closed at accept since the last report: "
                             "%d are being served, at most %d, each for at most %g s (a client opening connections "
                             "without sending requests?). Reported at most every %g s", count, self.tcp_open,
                             MAX_TCP_CONNECTIONS, HEAD_TIMEOUT, LOG_INTERVAL)

    async def metrics_page(self, local: bool = False) -> bytes:
        """The Prometheus page, built in the admin server's thread: for the admin address
        (any pod reaches it) one build at a time, a page answering every request for
        METRICS_FRESH after its build began; over the socket (root on the node: the CLI,
        tests reading what just happened) built after the request came, every time."""
        if local:
            return await asyncio.get_running_loop().run_in_executor(self._builder, generate_latest, self.registry)
        if self._page is not None:
            return self._page
        if self._building is None or self._building.done():
            self._building = asyncio.get_running_loop().create_task(self._build_page())
        return await asyncio.shield(self._building)

    async def _build_page(self) -> bytes:
        """In the admin server's own thread (never a thread of the loop's default pool, which
        others need), kept METRICS_FRESH and then let go (a page may be tens of MB)."""
        loop, began = asyncio.get_running_loop(), time.monotonic()
        body = await loop.run_in_executor(self._builder, generate_latest, self.registry)
        self._page = body
        loop.call_later(max(0.0, began + METRICS_FRESH - time.monotonic()), self._let_go, body)
        return body

    def _let_go(self, page: bytes) -> None:
        if self._page is page:
            self._page = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, local: bool) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=HEAD_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(parts) != 3:
                code, ctype, body = 400, "text/plain", b""
            elif parts[0] == "GET" and parts[1].split("?", 1)[0] == "/metrics":
                code, ctype, body = 200, CONTENT_TYPE_LATEST, await self.metrics_page(local)
            else:
                code, ctype, body = self.respond(parts[0], parts[1], local)
            writer.write(f"HTTP/1.1 {code} {REASONS[code]}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await asyncio.wait_for(writer.drain(), timeout=RESPONSE_TIMEOUT)
        except asyncio.TimeoutError:
            writer.transport.abort()  # a client that stopped reading keeps nothing of ours
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except Exception:  # a bug in a status provider must not take the admin server down
            self.log.exception("admin request failed")
        finally:
            writer.close()


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a killed agent; refuse to replace one that is answering."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError("setting admin_socket", f"{path} exists and is not a socket", "choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise ConfigError("setting admin_socket", f"another agent is serving {path}",
                      "stop it first, or pass another --admin-socket")


def fetch(socket_path: str | os.PathLike, path: str, timeout: float = 5.0) -> bytes:
    """GET `path` (/metrics, /debug/status) over the admin unix socket; the body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(socket_path))
        except OSError as exc:
            raise NodeagentError(f"cannot reach the agent at {socket_path}: {exc.strerror}",
                                 "is `nodeagent run` running on this node? check --socket/--node") from None
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        first = head.split(b"\r\n", 1)[0].decode(errors="replace")
        raise NodeagentError(f"the agent at {socket_path} answered: {first}")
    return body


def fetch_status(socket_path: str | os.PathLike, timeout: float = 5.0) -> dict[str, Any]:
    """GET /debug/status over the admin unix socket (what `nodeagent status` shows)."""
    return json.loads(fetch(socket_path, "/debug/status", timeout))


def fetch_requests(socket_path: str | os.PathLike, reporter: str, timeout: float = 5.0) -> int:
    """istio_requests_total of one reporter ("waypoint": the client side's waypoint,
    "destination": the server side's), summed over its labels, from the agent's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = fetch(socket_path, "/metrics", timeout).decode()
    return int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "istio_requests_total" and s.labels.get("reporter") == reporter))
