"""The agent's admin endpoints: a small HTTP/1.1 server on the admin address (default
127.0.0.1:15020 in the agent's netns) and on the admin unix socket, serving the same
routes on both: `/metrics` (Prometheus text), `/debug/status` (JSON, what `nodeagent
status` renders) and `/healthz/ready` (200 when the agent can serve; 503 naming everything
missing, from a `Readiness`). `fetch` and `fetch_status` are the client side over the unix
socket. One request per connection; nothing here can block the agent's event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from nodeagent.errors import ConfigError, NodeagentError

MAX_REQUEST = 16 * 1024
REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
           503: "Service Unavailable"}


@dataclass(frozen=True)
class Readiness:
    """Whether the agent can serve: true when nothing is missing; else each thing missing,
    in words (what `/healthz/ready` answers and `nodeagent status` shows)."""

    missing: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return not self.missing


class AdminServer:
    def __init__(self, *, registry: CollectorRegistry, status: Callable[[], dict[str, Any]],
                 ready: Callable[[], Readiness | bool], log: logging.Logger):
        self.registry = registry
        self.status = status
        self.ready = ready
        self.log = log
        self._servers: list[asyncio.AbstractServer] = []
        self._socket_path: Path | None = None

    async def start(self, address: tuple[str, int] | None, socket_path: Path | None) -> None:
        if address is not None:
            try:
                self._servers.append(await asyncio.start_server(self._serve, address[0], address[1],
                                                                reuse_address=True))
            except OSError as exc:
                raise ConfigError("setting admin_address", f"cannot listen on {address[0]}:{address[1]}: "
                                  f"{exc.strerror}", "is another agent running in this netns? "
                                  "pick another --admin-address") from None
        if socket_path is not None:
            _clear_stale_socket(socket_path)
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            self._servers.append(await asyncio.start_unix_server(self._serve, str(socket_path)))
            self._socket_path = socket_path

    async def close(self) -> None:
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

    def respond(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        if method != "GET":
            return 405, "text/plain", b"only GET\n"
        path = path.split("?", 1)[0]
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/debug/status":
            return 200, "application/json", json.dumps(self.status(), indent=1, sort_keys=True).encode() + b"\n"
        if path == "/healthz/ready":
            return self._readiness()
        return 404, "text/plain", b"try /metrics, /debug/status or /healthz/ready\n"

    def _readiness(self) -> tuple[int, str, bytes]:
        verdict = self.ready()
        if verdict:
            return 200, "text/plain", b"ready\n"
        lines = [f"not ready: {m}" for m in getattr(verdict, "missing", ())] or ["not ready"]
        return 503, "text/plain", "\n".join(lines).encode() + b"\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            code, ctype, body = self.respond(parts[0], parts[1]) if len(parts) == 3 else (400, "text/plain", b"")
            writer.write(f"HTTP/1.1 {code} {REASONS[code]}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
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
