"""The lab's echo app: an HTTP server that answers every request with who answered and
what it saw, and a TCP port that echoes bytes back.

Run as a lab container command, `nodeagent lab echo [--port 8080] [--tcp-port 9000]
[--status CODE]`, or stand-alone, `python -m nodeagent.lab.echo`. Every HTTP request
(any method, HTTP/1.1 keep-alive and pipelining, bodies by Content-Length or chunked,
read and discarded) gets a JSON object: pod, namespace, node, labels, service_account
(from the env vars POD_NAME, POD_NAMESPACE, NODE_NAME, POD_LABELS as JSON,
SERVICE_ACCOUNT), and method, path (with query), headers (names lower-cased, repeats
joined with ", ", so the result is the same whether or not Envoy forwarded the request)
and remote_addr (the client's IP:port as this socket sees it, which is how tests check
that the mesh keeps client addresses). Query parameters shape the answer, checked first
and applied in this order: `delay=SECONDS` waits, `fail=FRACTION` answers 503 with that
probability (one draw from random.Random(ECHO_SEED) per request carrying `fail`, so a
seeded run is reproducible; with `draws=NAME` from a stream of its own,
random.Random(f"{ECHO_SEED}/{NAME}"), so one client's draws do not depend on what
others sent), `status=CODE` answers with that code. Without `status=`
(and unless `fail` drew a 503) the answer has the code of `--status` (default 200):
`--status 503` makes an always-failing endpoint, e.g. for outlier detection. Bad
parameters get a 400 naming them (whatever --status says). One access-log line per
request goes to stderr unless --quiet. SIGTERM and SIGINT stop it cleanly (exit 0). The
start-up line on stderr names the bound addresses, so a caller that asked for port 0
learns the port.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import math
import os
import random
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Awaitable, Callable, Mapping, TextIO
from urllib.parse import parse_qs, urlsplit

from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.lab.http1 import BadRequest, Request, drain_body, read_request

DEFAULT_HTTP_PORT = 8080
DEFAULT_TCP_PORT = 9000
MAX_DELAY = 300.0  # seconds; longer than any test or client timeout
DRAWS_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_DRAW_STREAMS = 100  # named `fail` streams kept at once
MIN_STATUS, MAX_STATUS = 200, 599  # status= and --status: codes with a final, non-1xx answer
READ_SIZE = 65536


@dataclass(frozen=True)
class Identity:
    """Who this echo is, as the lab (or the Downward API) tells it through env vars."""

    pod: str
    namespace: str = "default"
    node: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = "default"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "Identity":
        raw = env.get("POD_LABELS") or "{}"
        try:
            labels = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ConfigError("POD_LABELS", f"is not JSON ({exc.msg}): {raw!r}") from None
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise ConfigError("POD_LABELS", f"must be a JSON object of strings, not {raw!r}")
        return cls(pod=env.get("POD_NAME") or socket.gethostname(),
                   namespace=env.get("POD_NAMESPACE") or "default", node=env.get("NODE_NAME") or "",
                   labels=labels, service_account=env.get("SERVICE_ACCOUNT") or "default")


@dataclass(frozen=True)
class Shape:
    """What the query asks of the answer."""

    status: int = 200
    delay: float = 0.0
    fail: float | None = None  # None: no `fail` parameter, so no random draw
    draws: str = ""  # the named stream `fail` draws from ("": the pod's default one)

    @classmethod
    def from_target(cls, target: str, default_status: int = 200) -> "Shape":
        """The shape `target`'s query asks for; `default_status` when it has no status=."""
        query = parse_qs(urlsplit(target).query, keep_blank_values=True)

        def number(name: str, low: float, high: float, kind=float):
            raw = query.get(name, [None])[-1]
            if raw is None:
                return None
            try:
                value = kind(raw)
            except ValueError:
                value = math.nan
            if not low <= value <= high:  # NaN fails this too
                raise BadRequest(f"query parameter {name} must be a number from {low:g} to {high:g}, "
                                 f"not {raw!r}")
            return value

        status = number("status", MIN_STATUS, MAX_STATUS, int)
        draws = query.get("draws", [""])[-1]
        if draws and not DRAWS_NAME.fullmatch(draws):
            raise BadRequest(f"query parameter draws must be 1-64 of [A-Za-z0-9_-], not {draws!r}")
        return cls(default_status if status is None else status, number("delay", 0.0, MAX_DELAY) or 0.0,
                   number("fail", 0.0, 1.0), draws)


def format_addr(sockname) -> str:
    """"ip:port", with brackets for IPv6 ("[::1]:8080")."""
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Echo:
    """The HTTP and TCP handlers, with the state they share (identity, RNG, log, and the
    sleep `delay=` waits with, which tests replace)."""

    def __init__(self, identity: Identity, rng: random.Random, log: TextIO | None, status: int = 200,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, seed: str | None = None):
        self.identity = identity
        self.rng = rng
        self.seed = seed  # of the named draw streams
        self._streams: dict[str, random.Random] = {}
        self.log = log
        self.status = status  # the code of answers whose query has no status=
        self.sleep = sleep
        self.connections: set[asyncio.Task] = set()

    def connection(self, handler):
        """Wrap a per-connection handler so that shutdown can cancel it and the client
        going away ends it quietly."""
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            self.connections.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the client went away mid-request; nothing to answer
            except asyncio.CancelledError:
                pass  # shutdown; returning normally keeps 3.11's stream callback from logging it
            finally:
                self.connections.discard(task)
                writer.close()
        return run

    async def serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = format_addr(writer.get_extra_info("peername"))
        while True:
            try:
                request = await read_request(reader)
                if request is None:
                    return
                await drain_body(reader, writer, request)
                keep_alive = await self._answer(writer, request, peer)
            except BadRequest as exc:
                self._log(peer, f'"? ? ?" {exc.status} {exc.message}')
                await self._send(writer, exc.status, {"error": exc.message, "pod": self.identity.pod},
                                 keep_alive=False)
                return
            if not keep_alive:
                return

    async def _answer(self, writer: asyncio.StreamWriter, request: Request, peer: str) -> bool:
        started = time.monotonic()
        body = {"pod": self.identity.pod, "namespace": self.identity.namespace, "node": self.identity.node,
                "labels": dict(self.identity.labels), "method": request.method, "path": request.target,
                "headers": request.header_map(), "remote_addr": peer,
                "service_account": self.identity.service_account}
        try:
            shape = Shape.from_target(request.target, self.status)
        except BadRequest as exc:
            status, body = exc.status, {"error": exc.message, "pod": self.identity.pod}
        else:
            if shape.delay:
                await self.sleep(shape.delay)
            failed = shape.fail is not None and self._draws(shape.draws).random() < shape.fail
            status = 503 if failed else shape.status
        # Logged before the answer goes out, so a client holding the answer finds the line.
        elapsed = (time.monotonic() - started) * 1000
        self._log(peer, f'"{request.method} {request.target} {request.version}" {status} {elapsed:.1f}ms')
        await self._send(writer, status, body, request.keep_alive, head=request.method == "HEAD")
        return request.keep_alive

    def _draws(self, name: str) -> random.Random:
        if not name:
            return self.rng
        stream = self._streams.get(name)
        if stream is None:
            if len(self._streams) >= MAX_DRAW_STREAMS:
                self._streams.clear()  # a lab tool: bounded, and a reused name starts over
            stream = self._streams[name] = random.Random(f"{self.seed}/{name}")
        return stream

    async def _send(self, writer: asyncio.StreamWriter, status: int, body: dict, keep_alive: bool,
                    head: bool = False) -> None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}", "server: nodeagent-echo"]
        payload = b""
        if status not in (204, 304):  # these must not carry a body or its length
            payload = json.dumps(body).encode() + b"\n"
            lines += ["content-type: application/json", f"content-length: {len(payload)}"]
        if not keep_alive:
            lines.append("connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else payload))
        await writer.drain()

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
        writer.write_eof()  # the peer half-closed: finish our side once all is echoed

    def _log(self, peer: str, what: str) -> None:
        if self.log is not None:
            print(f"echo: {peer} {what}", file=self.log, flush=True)


def listen(binds: list[str] | None, port: int) -> list[socket.socket]:
    """Listening sockets on every address in `binds`, all on the same port (port 0 picks
    one for the first). None means 0.0.0.0 and, when this netns has IPv6, [::]."""
    addresses = binds or ["0.0.0.0", "::"]
    socks: list[socket.socket] = []
    try:
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                if binds is None and exc.errno == errno.EAFNOSUPPORT:
                    continue  # no IPv6 in this netns; IPv4 alone is fine
                raise
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Separate v4 and v6 sockets, so IPv4 clients show as a.b.c.d, not ::ffff:a.b.c.d.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address, port))
            except OSError as exc:
                if binds is None and family == socket.AF_INET6 and exc.errno == errno.EADDRNOTAVAIL:
                    socks.pop().close()  # IPv6 disabled on this netns
                    continue
                raise ConfigError(f"bind {address} port {port}", exc.strerror or str(exc),
                                  "is another process using the port?") from None
            sock.listen(1024)
            port = port or sock.getsockname()[1]
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


async def serve(args: argparse.Namespace, env: Mapping[str, str], stop: asyncio.Event,
                log: TextIO = sys.stderr) -> None:
    """Serve until `stop` is set, then close listeners and every open connection."""
    identity = Identity.from_env(env)
    seed = env.get("ECHO_SEED")
    echo = Echo(identity, random.Random(seed), None if args.quiet else log, args.status, seed=seed)
    http_socks = listen(args.bind, args.port)
    try:
        tcp_socks = listen(args.bind, args.tcp_port)
    except BaseException:
        for sock in http_socks:
            sock.close()
        raise
    servers = [await asyncio.start_server(echo.connection(echo.serve_http), sock=s) for s in http_socks]
    servers += [await asyncio.start_server(echo.connection(echo.serve_tcp), sock=s) for s in tcp_socks]
    print(f"echo: listening http={','.join(format_addr(s.getsockname()) for s in http_socks)} "
          f"tcp={','.join(format_addr(s.getsockname()) for s in tcp_socks)} pod={identity.pod}",
          file=log, flush=True)
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        for task in list(echo.connections):
            task.cancel()
        await asyncio.gather(*echo.connections, return_exceptions=True)
        for server in servers:
            await server.wait_closed()


async def _main(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(args, os.environ, stop)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT, help="HTTP port (0: any free port)")
    parser.add_argument("--tcp-port", type=int, default=DEFAULT_TCP_PORT,
                        help="TCP echo port (0: any free port)")
    parser.add_argument("--bind", action="append", metavar="ADDR",
                        help="address to listen on, repeatable (default: 0.0.0.0 and :: when IPv6 is up)")
    parser.add_argument("--status", type=status_code, default=200, metavar="CODE",
                        help="code of every answer whose query has no status= (default 200; "
                             "e.g. 503 for an always-failing endpoint)")
    parser.add_argument("--quiet", action="store_true", help="no access-log line per request")


def status_code(raw: str) -> int:
    """argparse type of --status: the range status= accepts."""
    try:
        code = int(raw)
    except ValueError:
        code = 0
    if not MIN_STATUS <= code <= MAX_STATUS:
        raise argparse.ArgumentTypeError(f"must be a number from {MIN_STATUS} to {MAX_STATUS}, not {raw!r}")
    return code


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_main(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.lab.echo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except NodeagentError as exc:
        print(f"echo: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
