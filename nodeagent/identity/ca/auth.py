"""Who may ask the CA for what: caller authentication and node authorization.

A node agent authenticates with a bearer token (`authorization: Bearer <token>` gRPC
metadata). `Authenticator` is the interface; `TokenFileAuthenticator` is the lab/files
implementation: a YAML or JSON map of node name to token, re-read when it changes (a
broken edit keeps the last good tokens). The Kubernetes implementation (TokenReview of
the agent's service account token, node from its pod binding) comes with the kube
source. `NodeAuthorizer` then lets a node have ns/X/sa/Y only while a pod with
serviceAccountName Y in namespace X is on that node in the cluster model, as Istio's CA
checks ztunnel's impersonation requests, and its own identity (spiffe.NODE_NAMESPACE,
its name), which no pod's can be.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol

import yaml

from nodeagent.errors import ConfigError
from nodeagent.identity.errors import PermissionDenied, Unauthenticated
from nodeagent.identity.spiffe import NODE_NAMESPACE, Identity
from nodeagent.kube.objects import DNS_SUBDOMAIN
from nodeagent.model import TERMINATED, Model
from nodeagent.sources.files import RACY_SECONDS

MIN_TOKEN_LENGTH = 16  # shorter tokens are guessable; `openssl rand -hex 32` makes a good one


@dataclass(frozen=True)
class Caller:
    """An authenticated node agent."""

    node: str

    def __str__(self) -> str:
        return f"node {self.node}"


class Authenticator(Protocol):
    def authenticate(self, token: str) -> Caller:
        """The caller owning `token`; Unauthenticated if there is none."""


def bearer_token(metadata: Mapping[str, str] | list[tuple[str, str]]) -> str:
    """The token of `authorization: Bearer <token>`; Unauthenticated if absent or malformed."""
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    values = [v for k, v in items if k.lower() == "authorization"]
    if not values:
        raise Unauthenticated("no authorization metadata", "send 'authorization: Bearer <node token>'")
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization metadata is not 'Bearer <token>'")
    return token.strip()


def _digest(token: str) -> bytes:
    # Looked up by digest, so lookup time says nothing about how much of a token matched.
    return hashlib.sha256(token.encode()).digest()


class TokenFileAuthenticator:
    """Node tokens from a file: `{node-name: token, ...}` in YAML or JSON."""

    def __init__(self, path: Path, log: logging.Logger | None = None):
        self.path = path
        self.log = log or logging.getLogger("nodeagent.identity.ca.auth")
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._content: bytes | None = None
        self._nodes: dict[bytes, str] = {}
        data = self._read()
        self._nodes = parse_tokens(data, str(path))  # a bad file at start is fatal
        self._content = data

    def authenticate(self, token: str) -> Caller:
        with self._lock:
            self._refresh()
            node = self._nodes.get(_digest(token))
        if node is None:
            # The caller learns nothing of the CA's files; the operator finds the path in the log.
            self.log.warning("refused an unknown bearer token; node tokens are read from %s", self.path)
            raise Unauthenticated("unknown bearer token", "the node's token must be listed in the CA's token file")
        return Caller(node)

    @property
    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._nodes.values())

    def _read(self) -> bytes:
        try:
            st = self.path.stat()
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(str(self.path), f"cannot read the token file: {exc.strerror}") from None
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        return data

    def _refresh(self) -> None:
        """Re-read the file if it changed; a broken version keeps the last good tokens."""
        try:
            st = self.path.stat()
        except OSError as exc:
            self._refuse(f"cannot stat: {exc.strerror}")
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        # mtime is coarse: a same-size rewrite within a tick looks unchanged, so files
        # changed recently are compared by content too (as the files source does).
        racy = st.st_mtime_ns > time.time_ns() - RACY_SECONDS * 1_000_000_000
        if stamp == self._stamp and not racy:
            return
        try:
            data = self._read()
            if data == self._content:
                return
            self._content = data
            nodes = parse_tokens(data, str(self.path))
        except ConfigError as exc:
            self._refuse(str(exc))
            return
        self._nodes = nodes
        self.log.info("token file %s reloaded: %d nodes", self.path, len(nodes))

    def _refuse(self, why: str) -> None:
        self.log.error("keeping the last good node tokens, token file refused: %s", why)


def parse_tokens(data: bytes, where: str) -> dict[bytes, str]:
    """token digest -> node, from `{node: token}`; ConfigError naming the node at fault."""
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(where, f"not YAML/JSON: {exc}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(where, "must be a non-empty map of node name to token", "e.g. node1: <random hex>")
    nodes: dict[bytes, str] = {}
    for node, token in raw.items():
        if not isinstance(node, str) or not DNS_SUBDOMAIN.match(node):
            raise ConfigError(where, f"{node!r} is not a Kubernetes node name")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
            raise ConfigError(where, f"node {node}: the token must be a string of at least "
                                     f"{MIN_TOKEN_LENGTH} characters without spaces", "openssl rand -hex 32")
        digest = _digest(token)
        if digest in nodes:
            raise ConfigError(where, f"node {node} has the same token as node {nodes[digest]}",
                              "a token must name exactly one node")
        nodes[digest] = node
    return nodes


class ModelView:
    """The latest cluster model of a source (`poll() -> Model | None`), polled on every
    read so a pod the agent has just seen is seen by the CA too. Thread-safe."""

    def __init__(self, source):
        self.source = source
        self._lock = threading.Lock()
        self._model = Model.empty()

    def __call__(self) -> Model:
        with self._lock:
            model = self.source.poll()
            if model is not None:
                self._model = model
            return self._model


class NodeAuthorizer:
    """A node may have an identity while a pod with that service account runs on it.
    `lookup(node, identity)`, when given, is asked on a miss: the model is a watch's
    view and may not have a pod created moments ago (the kube source's; kubeauth.PodLookup
    asks the API directly). It answers True or False, or raises (CaUnavailable)."""

    def __init__(self, models: Callable[[], Model], lookup: Callable[[str, Identity], bool] | None = None):
        self.models = models
        self.lookup = lookup

    def authorize(self, caller: Caller, identity: Identity) -> None:
        if identity.namespace == NODE_NAMESPACE:  # a node's own identity, never a pod's
            if identity.node == caller.node:
                return
            raise PermissionDenied(f"{identity.short} is node {identity.node}'s own identity, not {caller.node}'s",
                                   f"namespace {NODE_NAMESPACE} is reserved for the node agents' identities")
        for pod in self.models().pods_on_node(caller.node):
            if (pod.namespace, pod.service_account) == (identity.namespace, identity.service_account) \
                    and pod.phase not in TERMINATED:  # a finished pod needs no certificate
                return
        if self.lookup is not None and self.lookup(caller.node, identity):
            return
        raise PermissionDenied(f"no pod with service account {identity.short} on node {caller.node}",
                               "the CA issues an identity only to the agent of a node running a pod "
                               "with that service account")
