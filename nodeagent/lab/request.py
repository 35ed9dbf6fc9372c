"""The lab's request tool: send N HTTP requests and summarise who answered and how.

`nodeagent lab request URL [-n 100] [--concurrency 1] [--new-connection] [-H 'Name: v']
[-X METHOD] [-d BODY] [--timeout S] [--output text|json]`, run inside a lab pod (names
resolve through the pod's hosts file, like any program there). Requests reuse one
keep-alive connection per worker unless --new-connection; a connection that fails is
replaced for the next request and the failure counted, never retried, so what the mesh
did is what the summary shows. The summary counts responses by status code, by the
answering `pod` and by its `labels.version` (when the body is the echo app's JSON),
errors by kind (refused, reset, closed, timeout, resolve, unreachable, protocol, other)
and latency percentiles over the requests that got a response. `--output json` prints
one object with the keys sent, codes, pods, versions, errors, latency_ms. Exit code 0
when every request got a response (any status), else 1. Standard library only.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import itertools
import json
import math
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from nodeagent.errors import ConfigError

KINDS = ("refused", "reset", "closed", "timeout", "resolve", "unreachable", "protocol", "other")
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str  # with query

    @classmethod
    def parse(cls, url: str) -> "Target":
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise ConfigError(f"URL {url!r}", f"scheme {parts.scheme!r} is not supported, only http://",
                              "the mesh adds mTLS itself; send plaintext")
        try:
            port = parts.port or 80
        except ValueError:
            raise ConfigError(f"URL {url!r}", "the port is not a number from 0 to 65535") from None
        if not parts.hostname:
            raise ConfigError(f"URL {url!r}", "no host")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, path)


@dataclass
class Summary:
    sent: int = 0
    codes: Counter = field(default_factory=Counter)
    pods: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # of requests that got a response

    @property
    def ok(self) -> bool:
        return not self.errors

    def latency(self) -> dict[str, float | None]:
        """Nearest-rank percentiles (p50, p90, p99) and max, in ms; None with no responses."""
        ordered = sorted(self.latencies_ms)
        out: dict[str, float | None] = {}
        for p in PERCENTILES:
            out[f"p{p}"] = round(ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)], 3) if ordered else None
        out["max"] = round(ordered[-1], 3) if ordered else None
        return out

    def to_json(self) -> dict:
        return {"sent": self.sent, "codes": {str(k): v for k, v in sorted(self.codes.items())},
                "pods": dict(sorted(self.pods.items())), "versions": dict(sorted(self.versions.items())),
                "errors": dict(sorted(self.errors.items())), "latency_ms": self.latency()}

    def to_text(self) -> str:
        def counts(c: Counter) -> str:
            return " ".join(f"{k}={v}" for k, v in sorted(c.items(), key=lambda kv: str(kv[0]))) or "-"
        lat = self.latency()
        latency = " ".join(f"{k}={v:.1f}ms" for k, v in lat.items()) if lat["max"] is not None else "-"
        return "\n".join([f"sent      {self.sent}", f"codes     {counts(self.codes)}",
                          f"pods      {counts(self.pods)}", f"versions  {counts(self.versions)}",
                          f"errors    {counts(self.errors) if self.errors else 'none'}",
                          f"latency   {latency}"])


def error_kind(exc: BaseException) -> str:
    """The summary's name for what went wrong with one request."""
    if isinstance(exc, http.client.RemoteDisconnected):  # before ConnectionResetError: a subclass
        return "closed"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)):
        return "reset"
    if isinstance(exc, OSError) and exc.errno == errno.ENOTCONN:  # shutdown() after the peer's RST
        return "reset"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(exc, socket.gaierror):
        return "resolve"
    if isinstance(exc, http.client.HTTPException):
        return "protocol"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return "other"


def _identify(body: bytes) -> tuple[str | None, str | None]:
    """(pod, version) from an echo app answer; (None, None) for any other body."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    if not isinstance(doc, dict) or not isinstance(doc.get("pod"), str):
        return None, None
    labels = doc.get("labels")
    version = labels.get("version") if isinstance(labels, dict) else None
    return doc["pod"], version if isinstance(version, str) else None


class _Run:
    """Shared state of one run: the request counter and the summary, behind one lock."""

    def __init__(self, target: Target, count: int, method: str, headers: dict[str, str],
                 body: bytes | None, timeout: float, new_connection: bool):
        self.target, self.method, self.headers, self.body = target, method, headers, body
        self.timeout, self.new_connection = timeout, new_connection
        self.summary = Summary()
        self._tickets = iter(range(count))
        self._lock = threading.Lock()

    def _take(self) -> bool:
        with self._lock:
            return next(self._tickets, None) is not None

    def worker(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while self._take():
            if conn is None:
                conn = http.client.HTTPConnection(self.target.host, self.target.port, timeout=self.timeout)
            started = time.perf_counter()
            try:
                conn.request(self.method, self.target.path, body=self.body, headers=self.headers)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = None
                self._record(error=error_kind(exc))
                continue
            self._record(status=response.status, body=data, ms=(time.perf_counter() - started) * 1000)
            if self.new_connection:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _record(self, status: int | None = None, body: bytes = b"", ms: float = 0.0,
                error: str | None = None) -> None:
        pod, version = _identify(body) if status is not None else (None, None)
        with self._lock:
            s = self.summary
            s.sent += 1
            if error is not None:
                s.errors[error] += 1
                return
            s.codes[status] += 1
            s.latencies_ms.append(ms)
            if pod is not None:
                s.pods[pod] += 1
            if version is not None:
                s.versions[version] += 1


def parse_headers(raw: list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise ConfigError(f"-H {item!r}", "a header must be 'Name: value'")
        headers[name] = value.strip()
    return headers


def send(url: str, count: int = 100, concurrency: int = 1, new_connection: bool = False,
         headers: dict[str, str] | None = None, method: str = "GET", body: bytes | None = None,
         timeout: float = 5.0) -> Summary:
    """Send `count` requests to `url` from `concurrency` threads and summarise them."""
    if count < 1:
        raise ConfigError("-n", f"must be at least 1, not {count}")
    if concurrency < 1:
        raise ConfigError("--concurrency", f"must be at least 1, not {concurrency}")
    if not timeout > 0:
        raise ConfigError("--timeout", f"must be a positive number of seconds, not {timeout}")
    run = _Run(Target.parse(url), count, method.upper(), dict(headers or {}), body, timeout, new_connection)
    threads = [threading.Thread(target=run.worker, name=f"request-{i}", daemon=True)
               for i in range(min(concurrency, count))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return run.summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="http://host[:port]/path?query (host may be a lab service or pod name)")
    parser.add_argument("-n", "--count", type=int, default=100, help="requests to send (default 100)")
    parser.add_argument("--concurrency", type=int, default=1, help="parallel connections (default 1)")
    parser.add_argument("--new-connection", action="store_true",
                        help="a new TCP connection per request (default: keep-alive)")
    parser.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="request header, repeatable")
    parser.add_argument("-X", "--method", default="GET")
    parser.add_argument("-d", "--data", help="request body")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per connect or read (default 5)")
    parser.add_argument("--output", choices=("text", "json"), default="text")


def run(args: argparse.Namespace) -> int:
    summary = send(args.url, args.count, args.concurrency, args.new_connection,
                   parse_headers(args.header), args.method,
                   None if args.data is None else args.data.encode(), args.timeout)
    print(json.dumps(summary.to_json()) if args.output == "json" else summary.to_text(), flush=True)
    return 0 if summary.ok else 1
