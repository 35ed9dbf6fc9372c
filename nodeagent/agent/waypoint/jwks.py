"""Fetches the JWKS of every RequestAuthentication `jwksUri` into local files, for the waypoint.

Envoy never fetches keys (design: "JWT keys are local"); the agent does, as istiod does.
`want(uris)` names the URIs in force (`jwks_uris(config)` reads them from an IstioConfig):
each new one gets a task that fetches it at once and again every `refresh`; a URI no
longer wanted is forgotten and its file deleted. A fetch is a GET in a thread (http or
https, verified against the system CAs, size and time bounded); an answer that
`read_jwks` accepts is written atomically to `<directory>/<sha256(uri)[:16]>.json`. A
failure keeps the last good file, is logged once per distinct error and retried with
backoff. `files()` is the mapping WaypointOptions.jwks_files takes; `on_change` is
called (soon, from the event loop, never inside `want`) when it or a file's content
changes, so the agent rebuilds the waypoint snapshot. Files survive `close()`: a
restarted agent uses them until its first fetch answers.

A jwksUri naming an in-cluster Service (`http://jwks.auth.svc.cluster.local/keys`, also
`….svc` or `<service>.<namespace>`) is resolved through the mesh's model, not the node's
resolver (which knows no cluster names): the agent connects to the Service's ClusterIP
(and the node forwards it as it forwards any connection to a ClusterIP), or, for a
headless Service, to its first ready endpoint; Host, TLS server name and certificate
check keep the URI's name. Any other name goes to the node's resolver (and proxies from
the environment), as istiod's client does.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping
from urllib.parse import urlsplit

from nodeagent.addresses import unmapped
from nodeagent.backoff import Backoff
from nodeagent.clock import Clock, SystemClock
from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.xds.translate.options import read_jwks

if TYPE_CHECKING:
    from nodeagent.model import Model
    from nodeagent.xds.istio.config import IstioConfig

# istiod's defaults: PILOT_JWT_PUB_KEY_REFRESH_INTERVAL and the jwtRule timeout.
DEFAULT_REFRESH = timedelta(minutes=20)
DEFAULT_TIMEOUT = timedelta(seconds=5)
# The longest a jwtRule's timeout makes a fetch: a server that accepts and stays silent
# holds a thread of the fetcher's own pool (FETCH_THREADS) for it, and anybody who may
# create a RequestAuthentication names the URI and the timeout.
MAX_TIMEOUT = timedelta(seconds=30)
FETCH_THREADS = 4
FIRST_RETRY = 5.0  # seconds; doubles up to the refresh interval
MAX_BYTES = 1 << 20  # a JWKS is a few KiB; anything this large is not one
FILE_NAME = re.compile(r"^[0-9a-f]{16}\.json(\.tmp)?\Z")  # what this fetcher writes, and may sweep

Fetch = Callable[[str, float, int], bytes]  # (uri, timeout seconds, max bytes) -> body; blocking
Resolve = Callable[[str], "str | None"]  # host name -> the address to connect to; None: the node's resolver
CLUSTER_DOMAIN = "svc.cluster.local"


class JwksUnavailable(NodeagentError):
    """A jwksUri did not answer with a body: unreachable, an HTTP error, too large or too slow."""


def file_name(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16] + ".json"


def jwks_uris(config: IstioConfig) -> dict[str, timedelta]:
    """The jwksUri of every jwtRule in force without inline `jwks` (which wins, as in
    translate/jwt.py), each with its fetch timeout: the rule's `timeout` (the longest, when
    several rules name the URI; at most MAX_TIMEOUT), else istiod's default."""
    out: dict[str, timedelta] = {}
    for authn in config.authentications:
        for rule in authn.rules:
            if rule.jwks_uri and not rule.jwks:
                timeout = rule.timeout if rule.timeout and rule.timeout > timedelta(0) else DEFAULT_TIMEOUT
                timeout = min(timeout, MAX_TIMEOUT)  # a fetch holds one of the fetcher's threads meanwhile
                out[rule.jwks_uri] = max(timeout, out.get(rule.jwks_uri, timeout))
    return out


def mesh_addresses(model: Callable[[], "Model"]) -> Resolve:
    """A Resolve answering for the Services of the current model: their ClusterIP, or the
    first ready endpoint of a headless one; None for a name that is no Service."""
    def resolve(host: str) -> str | None:
        current = model()
        service = current.services.get(_service_key(host, current))
        if service is None:
            return None
        if service.cluster_ip not in ("", "None"):
            return service.cluster_ip
        ready = current.endpoints(service)
        if not ready:
            raise JwksUnavailable(f"{host} is the headless Service {service.namespace}/{service.name}, which has no "
                                  "ready endpoint")
        return ready[0].ip
    return resolve


def _service_key(host: str, model: "Model") -> tuple[str, str] | None:
    """(namespace, name) a cluster DNS name gives: <name>.<ns>.svc.cluster.local, <name>.<ns>.svc,
    or <name>.<ns> when the model has that Service (a pod's DNS search path finds it so)."""
    labels = host.lower().rstrip(".").split(".")
    if len(labels) == 2 and (labels[1], labels[0]) in model.services:
        return labels[1], labels[0]
    for suffix in (CLUSTER_DOMAIN.split("."), ["svc"]):
        if len(labels) == 2 + len(suffix) and labels[2:] == suffix:
            return labels[1], labels[0]
    return None


def http_get(uri: str, timeout: float, max_bytes: int, resolve: Resolve = lambda host: None) -> bytes:
    """The body of a GET of `uri` (http or https verified against the system CAs; proxies
    from the environment, as istiod's client), at most `max_bytes`, in about `timeout`
    seconds; JwksUnavailable otherwise. A host `resolve` answers for is connected to at
    that address (no proxy). Blocking: run it in a thread."""
    if urlsplit(uri).scheme not in ("http", "https"):
        raise JwksUnavailable(f"{uri} is not an http(s) URL")
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(uri, headers={"Accept": "application/json", "User-Agent": "nodeagent"})
    try:
        with _opener(resolve).open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(uri, max_bytes)
            body = bytearray()
            # read1: one recv at a time, so a server trickling bytes meets the deadline.
            while chunk := response.read1(65536):
                body += chunk
                if len(body) > max_bytes:
                    raise _too_large(uri, max_bytes)
                if time.monotonic() > deadline:
                    raise _too_slow(uri, timeout)
            return bytes(body)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise JwksUnavailable(f"{uri} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _too_slow(uri, timeout) from None
        raise JwksUnavailable(f"cannot reach {uri}: {exc.reason}") from None
    except TimeoutError:
        raise _too_slow(uri, timeout) from None
    except (OSError, http.client.HTTPException) as exc:  # a timeout or reset after the headers
        raise JwksUnavailable(f"cannot read the answer of {uri}: {exc!r}") from None


def _opener(resolve: Resolve) -> urllib.request.OpenerDirector:
    # Only http(s): build_opener would also follow a redirect to ftp:// or read file://.
    opener = urllib.request.OpenerDirector()
    for handler in (_MeshProxyHandler(resolve), urllib.request.UnknownHandler(), _MeshHTTPHandler(resolve),
                    _MeshHTTPSHandler(resolve, context=ssl.create_default_context()),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def refused_address(ip: str) -> str | None:
    """Why the agent does not fetch a JWKS from `ip`, or None. It fetches from the node's
    network as root, where anybody allowed a RequestAuthentication names the URI: not from
    the node itself (loopback), link-local addresses (the cloud's metadata service,
    169.254.169.254), unspecified or multicast ones (istiod fetches from its pod's network)."""
    address = unmapped(ipaddress.ip_address(ip.split("%", 1)[0]))
    for refused, what in ((address.is_loopback, "loopback"), (address.is_link_local, "link-local"),
                          (address.is_unspecified, "unspecified"), (address.is_multicast, "multicast")):
        if refused:
            return f"is a {what} address"
    return None


def _pinned(request: urllib.request.Request, resolve: Resolve) -> str | None:
    """The address to connect to for the request's host (a proxied request: None, the
    proxy's): the one `resolve` gives a mesh Service, else the first the name resolves to
    that is not refused; connected to as checked, so a name that resolves again otherwise
    meanwhile changes nothing. URLError when every address is refused."""
    if request.has_proxy():
        return None
    parts = urlsplit(request.full_url)
    host = parts.hostname or ""
    address = resolve(host)
    try:
        candidates = [address] if address is not None else list(dict.fromkeys(
            info[4][0] for info in socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                                      type=socket.SOCK_STREAM)))
    except OSError as exc:
        raise urllib.error.URLError(exc) from None
    reasons = []
    for candidate in candidates:
        why = refused_address(candidate)
        if why is None:
            return candidate
        reasons.append(f"{candidate} {why}")
    raise urllib.error.URLError(f"{host}: {'; '.join(reasons)}: not fetched from the node's network")


class _MeshProxyHandler(urllib.request.ProxyHandler):
    """The environment's proxies, except for the mesh's own Services."""

    def __init__(self, resolve: Resolve):
        super().__init__()
        self._resolve = resolve

    def proxy_open(self, req, proxy, type):  # noqa: A002 - urllib's signature
        if self._resolve(urlsplit(req.full_url).hostname or "") is not None:
            return None
        return super().proxy_open(req, proxy, type)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to `address` (the port of the URI), while Host stays the URI's name."""

    def __init__(self, host: str, *, address: str, **kwargs):
        super().__init__(host, **kwargs)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout, self.source_address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As _PinnedHTTPConnection; TLS names and verifies the URI's name, not the address."""

    def __init__(self, host: str, *, address: str, **kwargs):
        super().__init__(host, **kwargs)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout, self.source_address)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _MeshHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, resolve: Resolve):
        super().__init__()
        self._resolve = resolve

    def http_open(self, req):
        address = _pinned(req, self._resolve)
        if address is None:
            return super().http_open(req)
        return self.do_open(partial(_PinnedHTTPConnection, address=address), req)


class _MeshHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, resolve: Resolve, context: ssl.SSLContext):
        super().__init__(context=context)
        self._resolve, self._ssl = resolve, context

    def https_open(self, req):
        address = _pinned(req, self._resolve)
        if address is None:
            return super().https_open(req)
        return self.do_open(partial(_PinnedHTTPSConnection, address=address), req, context=self._ssl)


def _too_slow(uri: str, timeout: float) -> JwksUnavailable:
    return JwksUnavailable(f"{uri} did not answer within {timeout:g}s")


def _too_large(uri: str, max_bytes: int) -> JwksUnavailable:
    return JwksUnavailable(f"the answer of {uri} is larger than {max_bytes} bytes", "a JWKS is a few KiB")


@dataclass
class _Source:
    uri: str
    path: Path
    digest: str | None = None  # sha256 of the good file in use; None: there is none
    fetched_at: float | None = None  # wall time of the last good answer
    error: Exception | None = None  # of the last attempt, None after a success
    logged: str | None = None  # the error last logged: each distinct one once
    failures: int = 0  # consecutive
    task: asyncio.Task | None = None
    timeout: float | None = None  # seconds, for this URI's fetches (None: the fetcher's)


class JwksFetcher:
    def __init__(self, directory: Path, log: logging.Logger, *, on_change: Callable[[], None] = lambda: None,
                 refresh: timedelta = DEFAULT_REFRESH, retry: Backoff | None = None,
                 timeout: timedelta = DEFAULT_TIMEOUT, max_bytes: int = MAX_BYTES, fetch: Fetch | None = None,
                 resolve: Resolve | None = None, clock: Clock | None = None, rng: random.Random | None = None):
        """`resolve` (mesh_addresses of the agent's model) sends in-cluster names to their
        Service; `fetch` replaces the HTTP client altogether (tests)."""
        for name, value in (("refresh", refresh), ("timeout", timeout)):
            if value <= timedelta(0):
                raise ConfigError(f"jwks {name}", f"{value} must be positive")
        if max_bytes <= 0:
            raise ConfigError("jwks max_bytes", f"{max_bytes} must be positive")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log, self.on_change = log, on_change
        self.fetch = fetch or partial(http_get, resolve=resolve or (lambda host: None))
        self.refresh = refresh.total_seconds()
        self.retry = retry or Backoff(FIRST_RETRY, max(FIRST_RETRY, self.refresh))
        self.timeout, self.max_bytes = timeout.total_seconds(), max_bytes
        self.clock, self.rng = clock or SystemClock(), rng or random.Random()
        self._sources: dict[str, _Source] = {}
        # its own threads: a slow issuer never takes those of the agent's loop (asyncio's
        # default pool, which /metrics, memory shedding and the waypoint's stop use)
        self._threads = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="jwks")
        self._swept = False
        self._notify: asyncio.Handle | None = None

    # --- what callers use ---------------------------------------------------------------
    def want(self, uris: Iterable[str] | Mapping[str, timedelta]) -> None:
        """Keep exactly these URIs fetched: new ones at once, others forgotten (call from the
        loop); a mapping gives each its fetch timeout (jwks_uris), else the fetcher's."""
        timeouts = dict(uris) if isinstance(uris, Mapping) else {}
        wanted = set(uris)
        if not self._swept:
            self._sweep({file_name(uri) for uri in wanted})
        changed = False
        for uri in sorted(wanted - self._sources.keys()):
            source = self._sources[uri] = _Source(uri, self.directory / file_name(uri))
            changed |= self._adopt(source)
            source.task = asyncio.get_running_loop().create_task(self._keep(source), name=f"jwks {uri}")
        for uri in wanted:
            timeout = timeouts.get(uri)
            self._sources[uri].timeout = timeout.total_seconds() if timeout is not None else None
        for uri in sorted(self._sources.keys() - wanted):
            changed |= self._forget(uri)
        if changed:
            self._changed()

    def files(self) -> dict[str, str]:
        """jwksUri → its good local file (WaypointOptions.jwks_files); URIs without one are absent."""
        return {uri: str(s.path) for uri, s in sorted(self._sources.items()) if s.digest is not None}

    def describe(self) -> dict:
        return {"directory": str(self.directory), "refresh_seconds": self.refresh,
                "uris": {uri: {"path": str(s.path) if s.digest is not None else None, "fetched_at": s.fetched_at,
                               "failures": s.failures, "error": str(s.error) if s.error else None,
                               "timeout_seconds": s.timeout if s.timeout is not None else self.timeout}
                         for uri, s in sorted(self._sources.items())}}

    async def close(self) -> None:
        """Stop fetching and wait for the tasks to end; the files stay for the next start."""
        tasks = [s.task for s in self._sources.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        if self._notify is not None:
            self._notify.cancel()
            self._notify = None
        self._sources.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._threads.shutdown(wait=False, cancel_futures=True)  # a fetch under way ends by its timeout

    # --- the per-URI task ---------------------------------------------------------------
    async def _keep(self, source: _Source) -> None:
        while True:
            try:
                timeout = source.timeout if source.timeout is not None else self.timeout
                body = await asyncio.get_running_loop().run_in_executor(
                    self._threads, self.fetch, source.uri, timeout, self.max_bytes)
                self._fetched(source, body)
                delay = self.refresh
            except Exception as exc:  # noqa: BLE001 - anything: keep the last good file and retry
                delay = self._failed(source, exc)
            await self.clock.sleep(delay)

    def _fetched(self, source: _Source, body: bytes) -> None:
        """Validate and install an answer (raises, leaving the file in use, when it is no JWKS)."""
        digest = hashlib.sha256(body).hexdigest()
        tmp = source.path.with_name(source.path.name + ".tmp")
        try:
            tmp.write_bytes(body)
            text = read_jwks(str(tmp), f"jwksUri {source.uri}")  # exactly what the translation accepts
            changed = digest != source.digest or not source.path.exists()
            if changed:
                os.replace(tmp, source.path)  # atomic: a reader sees the old keys or the new
        finally:
            tmp.unlink(missing_ok=True)
        recovered = source.error is not None
        previous, source.digest = source.digest, digest
        source.fetched_at, source.error, source.logged, source.failures = self.clock.now(), None, None, 0
        if changed:
            self.log.info("JWKS of %s %s: %d keys in %s", source.uri, "updated" if previous else "fetched",
                          len(json.loads(text)["keys"]), source.path)
            self._changed()
        elif recovered:
            self.log.info("JWKS of %s fetched again, unchanged", source.uri)

    def _failed(self, source: _Source, exc: Exception) -> float:
        """Record a failed attempt; the delay before the next one."""
        source.error, source.failures = exc, source.failures + 1
        delay = self.retry.jittered(source.failures, self.rng)
        if str(exc) != source.logged:  # once per distinct error, not on every retry
            source.logged = str(exc)
            keeping = (f"keeping the keys fetched at {_iso(source.fetched_at)}" if source.digest is not None
                       else "its issuer's tokens are refused (401) until it answers")
            expected = isinstance(exc, (NodeagentError, OSError))
            log = self.log.warning if expected else self.log.error
            log("cannot fetch the JWKS of %s (%s; retrying with backoff): %s", source.uri, keeping, exc,
                exc_info=not expected)
        return delay

    # --- files --------------------------------------------------------------------------
    def _adopt(self, source: _Source) -> bool:
        """Use a good file a previous run left for this URI until the first fetch answers."""
        try:
            body = source.path.read_bytes()
            read_jwks(str(source.path), f"jwksUri {source.uri}")
            fetched_at = source.path.stat().st_mtime
        except (OSError, ConfigError):
            return False
        source.digest, source.fetched_at = hashlib.sha256(body).hexdigest(), fetched_at
        self.log.info("using the JWKS of %s fetched at %s until it is fetched again", source.uri, _iso(fetched_at))
        return True

    def _forget(self, uri: str) -> bool:
        source = self._sources.pop(uri)
        if source.task is not None:
            source.task.cancel()
        source.path.unlink(missing_ok=True)
        self.log.info("forgot the JWKS of %s", uri)
        return source.digest is not None

    def _sweep(self, keep: set[str]) -> None:
        """Once, at the first `want`: delete what a previous run wrote for URIs gone since."""
        self._swept = True
        for entry in self.directory.iterdir():
            if FILE_NAME.match(entry.name) and entry.name not in keep:
                entry.unlink(missing_ok=True)

    def _changed(self) -> None:
        # Deferred and coalesced: `want` runs inside the caller's rebuild, which must not re-enter.
        if self._notify is None:
            self._notify = asyncio.get_running_loop().call_soon(self._call_on_change)

    def _call_on_change(self) -> None:
        self._notify = None
        try:
            self.on_change()
        except Exception:  # noqa: BLE001 - a bug in the caller must not stop the fetches
            self.log.exception("the JWKS on_change callback failed")


def _iso(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")
