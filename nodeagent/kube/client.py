"""A small asyncio client of the Kubernetes API: what the agent's `kube` source needs.

GET (for the agent): discovery, list (paginated with `limit`/`continue`) and watch (a chunked
stream of JSON events, `allowWatchBookmarks=true`, from a `resourceVersion`), over
HTTP/1.1 and TLS from the standard library (asyncio, ssl, json), one connection per
request; POST and PUT of JSON (for the CA: TokenReview, its root Secret and ConfigMap)
and merge-PATCH (the agent's Events, kube/events.py).
Why not a client library: each one costs the agent 10-52 MiB of imports for calls this
file makes in a few hundred lines (figures in docs/design.md, "The kube source").

Credentials, as client-go finds them: in the cluster, the pod's service-account token
(re-read when the file changes and at least every minute, since kubelet rotates
projected tokens), its CA and KUBERNETES_SERVICE_HOST/PORT; or a kubeconfig (its
current context: the server, its CA, and a client certificate or a bearer token).

Every failure is a KubeApiError naming the resource and saying what happened in one
line; `Gone` (410: the resourceVersion is too old, relist) and `NotFound` (404: a
group or kind the server does not serve, e.g. a CRD not installed) are told apart. A
200 whose body is no JSON object (a proxy's HTML page, nothing), or a list answer that
is no list, is a failure too: read as an empty list it would delete every object of
the kind.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import ssl
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

import yaml

from nodeagent import __version__
from nodeagent.errors import ConfigError, NodeagentError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_SECONDS = 60  # client-go re-reads a token file every minute too
MAX_HEADER_BYTES = 64 * 1024
USER_AGENT = f"nodeagent/{__version__}"
# Python's JSON decoder raises RecursionError at ~1000 levels of nesting, where the API
# server accepts 10000 in a preserve-unknown-fields field (an EnvoyFilter's patch, a
# WasmPlugin's pluginConfig): one such object failed every list of its kind, for ever.
# A document that deep is read with what lies past MAX_DEPTH cut, and each object cut so
# is handed on as its identity and TOO_DEEP, which the source refuses alone.
MAX_DEPTH = 100
# Seconds a watch may stay silent before it is taken for dead and watched again (the API
# server's watch cache sends a BOOKMARK to bookmark-enabled watches about every minute; it
# was timeoutSeconds + 10, 310-610 s, in which a new DENY went unapplied while the agent
# took itself for in sync); and TCP keepalive on every connection to the API server, so
# a peer that vanished is noticed by the kernel (idle 30 s, then 3 probes 10 s apart).
WATCH_IDLE = 120
KEEPALIVE = (30, 10, 3)
TOO_DEEP = "nodeagent.too-deep"  # the key of a cut object; its value says how deep it went
_CUT = "\u0000nodeagent: cut here"
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class KubeApiError(NodeagentError):
    """A request about `resource` failed: `status` is the HTTP status (0: no answer)."""

    def __init__(self, resource: str, message: str, status: int = 0, hint: str | None = None):
        self.resource, self.status, self.detail = resource, status, message
        super().__init__(f"{resource}: {message}", hint)


class Gone(KubeApiError):
    """410: the resourceVersion asked for is older than the server keeps; list again."""


class NotFound(KubeApiError):
    """404: the server does not serve this path (a group, version or kind not installed)."""


class Conflict(KubeApiError):
    """409: AlreadyExists on a create, or a stale resourceVersion on an update."""


HINTS = {
    401: "the credentials were refused: check the token or client certificate",
    403: "the agent's ServiceAccount lacks this permission: check its ClusterRole",
}


class TokenFile:
    """A bearer token in a file, re-read when the file changes (a projected token's
    symlink swap changes the inode) and at least every TOKEN_REREAD_SECONDS."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._read_at = 0.0
        self._token = ""

    def get(self) -> str:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp or time.monotonic() - self._read_at > TOKEN_REREAD_SECONDS:
                self._token = self.path.read_text().strip()
                self._stamp, self._read_at = stamp, time.monotonic()
        except OSError as exc:
            if not self._token:
                raise KubeApiError(f"token file {self.path}", f"cannot read: {exc.strerror or exc}") from None
        return self._token  # a rotation caught half-way keeps the previous token one more call


@dataclass(frozen=True)
class ClusterConfig:
    """Where the API server is and how to authenticate to it."""

    host: str
    port: int
    context: ssl.SSLContext
    token: TokenFile | str | None  # a bearer token (a file's, re-read) or none (client certificate)
    origin: str  # "in-cluster" or the kubeconfig's path, for messages

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def bearer(self) -> str | None:
        return self.token.get() if isinstance(self.token, TokenFile) else self.token


def in_cluster(environ: Mapping[str, str] | None = None, directory: Path = SERVICE_ACCOUNT_DIR) -> ClusterConfig:
    """The pod's own view of the API (client-go's rest.InClusterConfig); ConfigError
    naming what is missing when this is not a pod with a service-account token."""
    environ = os.environ if environ is None else environ
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise ConfigError("source kube", "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set, "
                          "so this is not running in a pod", "outside a cluster use --source kube:KUBECONFIG")
    token, ca = directory / "token", directory / "ca.crt"
    for path in (token, ca):
        if not os.access(path, os.R_OK):
            raise ConfigError("source kube", f"cannot read {path}",
                              "the pod needs its service-account token mounted (automountServiceAccountToken)")
    context = ssl.create_default_context(cafile=str(ca))
    return ClusterConfig(host, _port(port, "KUBERNETES_SERVICE_PORT"), context, TokenFile(token), "in-cluster")


def from_kubeconfig(path: Path) -> ClusterConfig:
    """The current context of a kubeconfig file: server, CA, and a client certificate or
    token. ConfigError naming the file and field for anything else (exec plugins,
    auth providers, plain http)."""
    where = f"kubeconfig {path}"
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(where, f"cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(where, f"malformed YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(where, "is not a kubeconfig (expected a map with clusters, users, contexts)")
    name = doc.get("current-context")
    context = _named(doc, "contexts", name, where, "context") if name else None
    if context is None:
        contexts = doc.get("contexts") or []
        if len(contexts) != 1:
            raise ConfigError(where, "no current-context", "set one: kubectl config use-context NAME")
        context = contexts[0].get("context") or {}
    cluster = _named(doc, "clusters", context.get("cluster"), where, "cluster")
    user = _named(doc, "users", context.get("user"), where, "user") if context.get("user") else {}
    base = Path(path).resolve().parent
    url = urllib.parse.urlsplit(str(cluster.get("server") or ""))
    if url.scheme != "https" or not url.hostname:
        raise ConfigError(where, f"cluster server {cluster.get('server')!r} is not an https:// URL")
    tls = ssl.create_default_context()
    ca_data = cluster.get("certificate-authority-data")
    if ca_data:
        tls.load_verify_locations(cadata=_b64(ca_data, where, "certificate-authority-data").decode())
    elif cluster.get("certificate-authority"):
        tls.load_verify_locations(cafile=str(base / cluster["certificate-authority"]))
    if cluster.get("insecure-skip-tls-verify"):
        raise ConfigError(where, "insecure-skip-tls-verify is not supported", "give the cluster's CA")
    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise ConfigError(where, f"user {unsupported} credential plugins are not supported",
                              "use a client certificate or a token (e.g. kubectl create token)")
    _client_certificate(tls, user, base, where)
    token: TokenFile | str | None = user.get("token")
    if not token and user.get("tokenFile"):
        token = TokenFile(base / user["tokenFile"])
    if not token and not (user.get("client-certificate") or user.get("client-certificate-data")):
        raise ConfigError(where, "the user has neither a client certificate nor a token")
    return ClusterConfig(url.hostname, url.port or 443, tls, token, str(path))


def _named(doc: dict, section: str, name: Any, where: str, what: str) -> dict:
    for entry in doc.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(what)
            if isinstance(value, dict):
                return value
    raise ConfigError(where, f"no {what} named {name!r} in {section}")


def _client_certificate(tls: ssl.SSLContext, user: dict, base: Path, where: str) -> None:
    """Load the user's client certificate and key (files, or base64 data written to a
    private temporary file just long enough for OpenSSL to read it)."""
    cert, key = user.get("client-certificate-data"), user.get("client-key-data")
    if cert and key:
        with tempfile.TemporaryDirectory(prefix="nodeagent-kubeconfig-") as tmp:
            pem = Path(tmp) / "client.pem"
            fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(_b64(cert, where, "client-certificate-data") + b"\n"
                         + _b64(key, where, "client-key-data"))
            tls.load_cert_chain(str(pem))
    elif user.get("client-certificate") and user.get("client-key"):
        tls.load_cert_chain(str(base / user["client-certificate"]), str(base / user["client-key"]))


def _b64(value: Any, where: str, field: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError:
        raise ConfigError(where, f"{field} is not base64") from None


def _port(raw: str, what: str) -> int:
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError("source kube", f"{what} {raw!r} is not a port number")
    return int(raw)


@dataclass(frozen=True)
class Resource:
    """The collection path of a kind and how messages name it (`pods`, `virtualservices.networking.istio.io`)."""

    path: str  # "/api/v1/pods", "/apis/networking.istio.io/v1/virtualservices"
    name: str


class KubeClient:
    """GET requests to the API server of `config`; `timeout` bounds connecting and each
    read (a watch's reads are bounded by its own timeoutSeconds plus this)."""

    def __init__(self, config: ClusterConfig, timeout: float = 10.0):
        self.config = config
        self.timeout = timeout

    async def get(self, path: str, resource: str, params: Mapping[str, str] | None = None) -> dict:
        """The decoded JSON object at `path`."""
        return await self.send("GET", path, resource, params)

    async def post(self, path: str, resource: str, body: Mapping[str, Any]) -> dict:
        """Create (`body` to a collection, or a review such as a TokenReview): the server's object."""
        return await self.send("POST", path, resource, body=body)

    async def put(self, path: str, resource: str, body: Mapping[str, Any]) -> dict:
        """Replace the object at `path` (Conflict when body's resourceVersion is stale)."""
        return await self.send("PUT", path, resource, body=body)

    async def patch(self, path: str, resource: str, body: Mapping[str, Any]) -> dict:
        """A JSON merge patch (RFC 7386) of the object at `path`: the server's object after it."""
        return await self.send("PATCH", path, resource, body=body, content_type="application/merge-patch+json")

    async def send(self, method: str, path: str, resource: str, params: Mapping[str, str] | None = None,
                   body: Mapping[str, Any] | None = None, content_type: str = "application/json") -> dict:
        """One request; the decoded JSON answer (200 or 201), else its typed KubeApiError."""
        reader, writer = await self._request(path, resource, params, method, body, content_type)
        try:
            status, headers = await self._head(reader, resource)
            body = b"".join([chunk async for chunk in self._body(reader, headers, resource, self.timeout)])
        finally:
            writer.close()
        return self._decoded(status, body, resource)

    async def list(self, resource: Resource, params: Mapping[str, str] | None = None,
                   limit: int = 500, each: Callable[[Any], Any] | None = None) -> tuple[list[Any], str]:
        """Every item of `resource` and the list's resourceVersion, page by page (each
        item through `each` as its page arrives: what is kept of it); a continue token
        that expired (410) restarts the list from the start, in pages once, then whole."""
        items: list[Any] = []
        query, restarts = {**(params or {}), "limit": str(limit)}, 0
        while True:
            try:
                page = await self.get(resource.path, resource.name, query)
            except Gone:
                if "continue" not in query:
                    raise
                # the snapshot expired mid-way: from the start, in pages (what one answer holds
                # in memory stays bounded), and if it expires again, whole as client-go lists
                # it (paging might never finish within a token's life)
                restarts += 1
                items, query = [], {**(params or {}), **({"limit": str(limit)} if restarts == 1 else {})}
                continue
            found = list_items(page, resource.name)
            items.extend(found if each is None else [each(item) for item in found])
            meta = page.get("metadata") or {}
            del page, found  # the page's whole objects go before the next one comes
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion") or "")
            query = {**query, "continue": meta["continue"]}

    async def watch(self, resource: Resource, resource_version: str, params: Mapping[str, str] | None = None,
                    timeout_seconds: int = 300) -> AsyncIterator[dict]:
        """The events ({"type", "object"}) of `resource` after `resource_version`, bookmarks
        included, until the server ends the watch (after `timeout_seconds`). An ERROR
        event raises its KubeApiError (Gone for 410)."""
        query = {**(params or {}), "watch": "true", "allowWatchBookmarks": "true",
                 "resourceVersion": resource_version, "timeoutSeconds": str(timeout_seconds)}
        reader, writer = await self._request(resource.path, resource.name, query)
        try:
            status, headers = await self._head(reader, resource.name)
            if status != 200:
                body = b"".join([c async for c in self._body(reader, headers, resource.name, self.timeout)])
                self._decoded(status, body, resource.name)
            pending = b""
            # A watch silent past WATCH_IDLE is taken for a dead one (a half-open connection, a
            # proxy holding the stream): the API server sends a bookmark about every minute.
            idle = min(timeout_seconds, WATCH_IDLE) + self.timeout
            async for chunk in self._body(reader, headers, resource.name, idle, idle_ends=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield self._event(line, resource.name)
            if pending.strip():
                yield self._event(pending, resource.name)
        finally:
            writer.close()

    # --- HTTP/1.1 -------------------------------------------------------------------
    async def _request(self, path: str, resource: str, params: Mapping[str, str] | None,
                       method: str = "GET", body: Mapping[str, Any] | None = None,
                       content_type: str = "application/json"):
        target = path + ("?" + urllib.parse.urlencode(params) if params else "")
        cfg = self.config
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(cfg.host, cfg.port, ssl=cfg.context, server_hostname=cfg.host,
                                        limit=MAX_HEADER_BYTES), self.timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            raise KubeApiError(resource, f"cannot connect to {cfg.url}: {_why(exc)}",
                               hint="is the API server reachable from this node?") from None
        _keepalive(writer.get_extra_info("socket"))
        lines = [f"{method} {target} HTTP/1.1", f"Host: {cfg.host}:{cfg.port}", "Accept: application/json",
                 f"User-Agent: {USER_AGENT}", "Connection: close"]
        token = cfg.bearer()
        if token:
            lines.append(f"Authorization: Bearer {token}")
        payload = json.dumps(body).encode() if body is not None else b""
        if body is not None:
            lines += [f"Content-Type: {content_type}", f"Content-Length: {len(payload)}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + payload)
        return reader, writer

    async def _head(self, reader: asyncio.StreamReader, resource: str) -> tuple[int, dict[str, str]]:
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            raise KubeApiError(resource, f"no answer from {self.config.url}: {_why(exc)}") from None
        status_line, *header_lines = raw.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise KubeApiError(resource, f"not an HTTP answer from {self.config.url}: {status_line[:80]!r}")
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def _body(self, reader: asyncio.StreamReader, headers: dict[str, str], resource: str,
                    idle: float, idle_ends: bool = False) -> AsyncIterator[bytes]:
        """The body's bytes as they come: chunked, by Content-Length, or to the end; with
        `idle_ends`, a silence of `idle` seconds ends it as the server's end would (a watch:
        watched again at once, no failure), else it is an error."""
        class Silent(Exception):
            pass

        async def read(coro):
            try:
                return await asyncio.wait_for(coro, idle)
            except asyncio.TimeoutError:
                if idle_ends:
                    raise Silent() from None
                raise KubeApiError(resource, f"answer from {self.config.url} cut short: no data for {idle:g}s") \
                    from None
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as exc:
                raise KubeApiError(resource, f"answer from {self.config.url} cut short: {_why(exc)}") from None
        try:
            async for data in self._body_chunks(reader, headers, read):
                yield data
        except Silent:
            return

    @staticmethod
    async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str],
                           read: Callable[[Any], Any]) -> AsyncIterator[bytes]:
        """The body's bytes, each read through `read`: chunked, by Content-Length, or to the end."""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await read(reader.readuntil(b"\r\n"))
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await read(reader.readuntil(b"\r\n"))  # no trailers from the API server
                    return
                data = await read(reader.readexactly(size + 2))
                yield data[:-2]
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length:
                yield await read(reader.readexactly(length))
        else:
            while data := await read(reader.read(65536)):
                yield data

    def _decoded(self, status: int, body: bytes, resource: str) -> dict:
        """The JSON object of a 200 or 201; else the answer's typed KubeApiError. A 200 that
        is no JSON object (a proxy's page, an empty body) is an error, not an empty answer."""
        try:
            doc = loads(body) if body.strip() else None
        except ValueError:
            doc = None
        if status in (200, 201) and not isinstance(doc, dict):
            what = "is empty" if not body.strip() else f"is not a JSON object: {_snippet(body, 80)!r}"
            raise KubeApiError(resource, f"{status} answer from {self.config.url} {what}", status,
                               "is something other than the API server answering?")
        if status in (200, 201) and doc.get("kind") != "Status":
            return doc
        raise status_error(resource, doc if isinstance(doc, dict) else {"message": _snippet(body, 200)}, status)

    def _event(self, line: bytes, resource: str) -> dict:
        try:
            event = loads(line)
        except ValueError:
            raise KubeApiError(resource, f"malformed watch event: {line[:80]!r}") from None
        if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
            raise KubeApiError(resource, f"malformed watch event: {line[:80]!r}")
        if event.get("type") == "ERROR":
            obj = event["object"]
            raise status_error(resource, obj, int(obj.get("code") or 0))
        return event


def list_items(page: Mapping[str, Any], resource: str) -> list:
    """The items of one list answer (a kind ending in List, an items list); KubeApiError
    for anything else, which taken for an empty list would delete the kind's objects."""
    kind, items = str(page.get("kind") or ""), page.get("items")
    if not kind.endswith("List") or not isinstance(items, list):
        has = "missing" if items is None else type(items).__name__
        raise KubeApiError(resource, f"the answer is not a list: kind {kind!r}, items {has}")
    return items


def of_kind(doc: Mapping[str, Any], kind: str, resource: str) -> Mapping[str, Any]:
    """`doc` when it is a `kind` (a discovery document: APIGroup, APIResourceList);
    KubeApiError otherwise, which read as a group without versions would be a kind not served."""
    if doc.get("kind") != kind:
        raise KubeApiError(resource, f"the answer is not an {kind}: kind {str(doc.get('kind') or '')!r}")
    return doc


def status_error(resource: str, status: Mapping[str, Any], code: int) -> KubeApiError:
    """The typed error of a Kubernetes Status (an HTTP error or a watch ERROR event)."""
    reason, message = status.get("reason") or "", str(status.get("message") or "").strip()
    text = f"{code} {reason}".strip() + (f": {message}" if message else "")
    cls = {410: Gone, 404: NotFound, 409: Conflict}.get(code, KubeApiError)
    return cls(resource, text, code, HINTS.get(code))


def _keepalive(sock: Any) -> None:
    """TCP keepalive (KEEPALIVE) on `sock`, when there is one to set it on."""
    if sock is None:
        return
    idle, interval, count = KEEPALIVE
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except OSError:
        pass  # not TCP (a test's socket pair): nothing to keep alive


def loads(data: bytes) -> Any:
    """json.loads, but a document nested past what the decoder takes is read with every
    value past MAX_DEPTH cut, and each API object in it holding a cut (a list's item, a
    watch event's object) replaced by its identity and TOO_DEEP (kube.admit refuses it)."""
    try:
        return json.loads(data)
    except RecursionError:
        pass
    doc = json.loads(_cut(data))
    if isinstance(doc, dict) and not _objects(doc) and _holds_cut(doc):  # one object's answer
        return _stub(doc)
    if isinstance(doc, dict):
        for holder, key in _objects(doc):
            if _holds_cut(holder[key]):
                holder[key] = _stub(holder[key])
    return doc


def _stub(obj: Any) -> dict:
    """An object that held a cut, as its identity and TOO_DEEP."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    return {"metadata": {k: meta[k] for k in ("namespace", "name", "uid", "resourceVersion")
                         if k in meta and not _holds_cut(meta[k])},
            TOO_DEEP: f"nested deeper than {MAX_DEPTH} levels"}


def _objects(doc: dict) -> list[tuple[Any, Any]]:
    """(container, key) of each API object of a decoded list or watch event: a list's
    items, an event's object; none for an answer that is one object."""
    if isinstance(doc.get("items"), list):
        return [(doc["items"], i) for i in range(len(doc["items"]))]
    if isinstance(doc.get("object"), dict):
        return [(doc, "object")]
    return []


def _cut(data: bytes) -> bytes:
    """`data` with every array or object opened past MAX_DEPTH replaced by a string _CUT
    (strings are skipped whole, so brackets inside them do not count)."""
    out, depth, cut_from, start = [], 0, None, 0
    for token in _TOKEN.finditer(data):
        text = token.group()
        if text[0:1] == b'"':
            continue
        if text in (b"[", b"{"):
            depth += 1
            if depth == MAX_DEPTH + 1 and cut_from is None:
                out.append(data[start:token.start()])
                cut_from = token.start()
        else:
            if depth == MAX_DEPTH + 1 and cut_from is not None:
                out.append(json.dumps(_CUT).encode())
                start, cut_from = token.end(), None
            depth -= 1
    out.append(data[start:])
    return b"".join(out)


def _holds_cut(value: Any) -> bool:
    """Whether `value` holds a _CUT (no recursion: it may be MAX_DEPTH deep)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif item == _CUT:
            return True
    return False


def _snippet(body: bytes, size: int) -> str:
    return body[:size].decode(errors="replace").strip()


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed"
    return str(exc) or type(exc).__name__
