"""The CA's callers in a cluster: node agents proven by their service-account token.

An agent sends its projected token (kubelet writes and rotates it; audience
`nodeagent-ca`, so a token made for the API server or anything else is useless here).
`KubeAuthenticator` asks the API server about it with a TokenReview whose
`spec.audiences` is the CA's own audience, accepts only the agent's ServiceAccount, and
takes the caller's node from the pod the token is bound to: the
`authentication.kubernetes.io/node-name` extra (Kubernetes >= 1.32 puts it there for
pod-bound tokens), else the bound pod read by name and checked by UID. A token bound to
no pod names no node and is refused. As Istio's CA does for ztunnel, the node is then
all that is trusted: NodeAuthorizer decides which identities it may have.

Accepted tokens are remembered by digest (bounded, least recently used out first) until
the token expires or CACHE_SECONDS pass, whichever is first, so a rotating fleet of
agents costs the API one review per agent per minute at most; refusals are not
remembered. An API server that cannot answer never authenticates anyone: the request
fails with Unavailable (the agent retries), never with a guess.

`PodLookup` closes the watch's window for NodeAuthorizer: a pod created moments ago may
not be in the CA's pod watch yet when its node's agent asks for its identity, so on a
miss the CA lists that namespace's pods on that node with that service account (field
selectors `spec.nodeName` and `spec.serviceAccountName`: one small consistent read)
before refusing. Only authenticated agents get this far.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from nodeagent.identity.ca.auth import Caller, ModelView
from nodeagent.identity.errors import CaUnavailable, Unauthenticated
from nodeagent.identity.spiffe import Identity
from nodeagent.kube.client import KubeApiError, KubeClient, NotFound, Resource
from nodeagent.model import TERMINATED, Model

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
NODE_NAME = "authentication.kubernetes.io/node-name"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"
DEFAULT_AUDIENCE = "nodeagent-ca"
CACHE_SECONDS = 60.0
REFUSAL_SECONDS = 30.0  # a token the API server refused is refused again without a review this long
CACHE_SIZE = 4096  # accepted tokens remembered: a few per node of a large cluster
REVIEWS_AT_ONCE = 4  # TokenReviews under way at once (of the CA's 8 workers: the rest sign for known callers)
REVIEW_WAIT = 2.0  # seconds a request waits for one of them before it is UNAVAILABLE (the agent retries)
STALE_AFTER = 30.0  # seconds a failing pod watch is tolerated before the CA refuses (UNAVAILABLE)
REBUILD_EVERY = 1.0  # seconds between rebuilds of the CA's model of the pods, at most one


@dataclass(frozen=True)
class Binding:
    """What a TokenReview says of an accepted agent token: its pod and, if given, its node."""

    namespace: str
    pod: str
    uid: str
    node: str | None


def review_request(token: str, audience: str) -> dict[str, Any]:
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": [audience]}}


def binding_of(review: Mapping[str, Any], audience: str, account: tuple[str, str]) -> Binding:
    """The pod binding of an authenticated agent token, from the API server's TokenReview
    answer; Unauthenticated saying why for anything else."""
    status = review.get("status") if isinstance(review.get("status"), dict) else {}
    if not status.get("authenticated"):
        why = str(status.get("error") or "not authenticated")
        raise Unauthenticated(f"the API server refused the token: {why}",
                              f"send the agent's projected service-account token of audience {audience}")
    if audience not in (status.get("audiences") or []):
        raise Unauthenticated(f"the token is not for audience {audience} (it is for "
                              f"{', '.join(status.get('audiences') or []) or 'no audience'})")
    user = status.get("user") if isinstance(status.get("user"), dict) else {}
    namespace, name = account
    if user.get("username") != f"system:serviceaccount:{namespace}:{name}":
        raise Unauthenticated(f"the token is {user.get('username') or 'nobody'}'s; only ServiceAccount "
                              f"{namespace}/{name} (the node agents') may ask the CA")
    extra = user.get("extra") if isinstance(user.get("extra"), dict) else {}

    def one(key: str) -> str | None:
        values = extra.get(key) or []
        return str(values[0]) if isinstance(values, list) and len(values) == 1 and values[0] else None

    pod, uid = one(POD_NAME), one(POD_UID)
    if not pod or not uid:
        raise Unauthenticated("the token is bound to no pod, so it names no node",
                              "use the projected token kubelet writes for the agent's pod")
    return Binding(namespace, pod, uid, one(NODE_NAME))


def node_of_pod(pod: Mapping[str, Any], binding: Binding) -> str:
    """The node of the token's bound pod as the API has it (the UID tells a pod from a
    newer one of the same name)."""
    meta = pod.get("metadata") if isinstance(pod.get("metadata"), dict) else {}
    node = (pod.get("spec") or {}).get("nodeName") if isinstance(pod.get("spec"), dict) else None
    if meta.get("uid") != binding.uid:
        raise Unauthenticated(f"the token's pod {binding.namespace}/{binding.pod} no longer exists")
    if not node:
        raise Unauthenticated(f"the token's pod {binding.namespace}/{binding.pod} is on no node")
    return str(node)


def token_claims(token: str) -> dict | None:
    """A JWT's payload, unverified, or None when `token` is no JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def token_expiry(token: str) -> float | None:
    """The `exp` of a JWT's payload (read only after the API server vouched for the
    token), or None if it has none."""
    exp = (token_claims(token) or {}).get("exp")
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def implausible(token: str, audience: str, now: float) -> str | None:
    """Why the API server would refuse `token` for `audience` without looking it up (no JWT,
    expired, not for the audience), or None. Read unverified: it only spares the API
    server a TokenReview of what it would refuse; it never accepts anything."""
    claims = token_claims(token)
    if claims is None:
        return "the bearer token is not a JWT"
    exp, aud = claims.get("exp"), claims.get("aud")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool) or exp <= now:
        return "the token has expired, or says not when it does"
    if aud != audience and not (isinstance(aud, list) and audience in aud):
        return f"the token is not for audience {audience}"
    return None


class CallerCache:
    """Accepted tokens by digest -> (caller, until), at most `size`, least recently used out first."""

    def __init__(self, size: int = CACHE_SIZE, seconds: float = CACHE_SECONDS):
        self.size, self.seconds = size, seconds
        self._entries: OrderedDict[bytes, tuple[Caller, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: bytes, now: float) -> Caller | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            if entry[1] <= now:
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return entry[0]

    def put(self, digest: bytes, caller: Caller, now: float, expiry: float | None) -> None:
        until = min(now + self.seconds, expiry if expiry is not None else now + self.seconds)
        if until <= now:
            return
        with self._lock:
            self._entries[digest] = (caller, until)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class KubeAuthenticator:
    """Authenticator of agents' projected tokens by TokenReview (auth.Authenticator)."""

    def __init__(self, client: KubeClient, audience: str, account: tuple[str, str],
                 log: logging.Logger | None = None, cache: CallerCache | None = None,
                 clock: Callable[[], float] = time.time, reviews_at_once: int = REVIEWS_AT_ONCE,
                 review_wait: float = REVIEW_WAIT):
        self.client, self.audience, self.account = client, audience, account
        self.log = log or logging.getLogger("nodeagent.identity.ca.kubeauth")
        self.cache = cache if cache is not None else CallerCache()
        self.clock = clock
        self.reviews_at_once, self.review_wait = reviews_at_once, review_wait
        self.reviews = threading.BoundedSemaphore(reviews_at_once)
        self._refusals: OrderedDict[bytes, float] = OrderedDict()  # token digest -> refused until
        self._lock = threading.Lock()

    def known(self, token: str) -> bool:
        """Whether `token` is decided without a TokenReview: vouched for a moment ago, or
        refused by the API server a moment ago, or one it would refuse unseen."""
        digest, now = hashlib.sha256(token.encode()).digest(), self.clock()
        return self.cache.get(digest, now) is not None or self._refused(digest, now) or \
            implausible(token, self.audience, now) is not None

    def _refused(self, digest: bytes, now: float) -> bool:
        with self._lock:
            until = self._refusals.get(digest)
            if until is not None and until <= now:
                del self._refusals[digest]
                return False
            return until is not None

    def authenticate(self, token: str) -> Caller:
        digest = hashlib.sha256(token.encode()).digest()
        caller = self.cache.get(digest, self.clock())
        if caller is not None:
            return caller
        if self._refused(digest, self.clock()):
            raise Unauthenticated("the API server refused this token moments ago")
        # Who sends a token is not known before its review: whatever anybody sends must not
        # become a TokenReview each (the API server's load), nor hold the CA's workers.
        problem = implausible(token, self.audience, self.clock())
        if problem:
            raise Unauthenticated(problem)
        if not self.reviews.acquire(timeout=self.review_wait):
            raise CaUnavailable(f"the CA is reviewing {self.reviews_at_once} tokens at once already", "retry")
        try:
            # grpc's worker threads have no loop of their own: one short-lived loop per review.
            caller = asyncio.run(self._review(token))
        except KubeApiError as exc:
            self.log.error("cannot check an agent's token: %s", exc)
            raise CaUnavailable(f"the CA cannot check tokens now: the API server did not answer "
                                f"its TokenReview ({exc.detail})", "retry; check the CA's log") from None
        except Unauthenticated:
            with self._lock:  # the same token again is refused without another review
                self._refusals[digest] = self.clock() + REFUSAL_SECONDS
                while len(self._refusals) > CACHE_SIZE:
                    self._refusals.popitem(last=False)
            raise
        finally:
            self.reviews.release()
        self.cache.put(digest, caller, self.clock(), token_expiry(token))
        return caller

    async def _review(self, token: str) -> Caller:
        review = await self.client.post(TOKEN_REVIEWS, "tokenreviews", review_request(token, self.audience))
        binding = binding_of(review, self.audience, self.account)
        if binding.node:
            return Caller(binding.node)
        try:
            pod = await self.client.get(f"/api/v1/namespaces/{binding.namespace}/pods/{binding.pod}",
                                        f"pod {binding.namespace}/{binding.pod}")
        except NotFound:
            raise Unauthenticated(f"the token's pod {binding.namespace}/{binding.pod} no longer exists") from None
        return Caller(node_of_pod(pod, binding))


class SyncedModelView(ModelView):
    """ModelView of the kube source that refuses to answer (Unavailable) until the
    source has listed the cluster's pods once (an empty model is not an empty cluster),
    and once its pod watch has been failing for `stale_after` seconds (the pods it
    remembers may have left their nodes: their identities are not given on that word).
    The model is rebuilt at most every `rebuild_every` seconds: a rebuild reads every pod,
    and anybody who can touch a pod (an annotation in a loop) changes it at will; a pod
    newer than the model is found by the authorizer's direct lookup."""

    def __init__(self, source, clock: Callable[[], float] = time.monotonic, stale_after: float = STALE_AFTER,
                 rebuild_every: float = REBUILD_EVERY):
        super().__init__(source)
        self.clock, self.stale_after, self.rebuild_every = clock, stale_after, rebuild_every
        self._read = False
        self._polled = self._failing_since = None

    def __call__(self) -> Model:
        with self._lock:
            now = self.clock()
            if not self._read or self._polled is None or now - self._polled >= self.rebuild_every:
                self._polled = now
                model = self.source.poll()
                if model is not None:
                    self._model, self._read = model, True
            error = self.source.scan_error
            if not self._read:
                raise CaUnavailable(f"the CA has not read the cluster's pods yet: {error}",
                                    "retry; check that the CA can list pods")
            if error is None:
                self._failing_since = None
            elif self._failing_since is None:
                self._failing_since = now
            elif now - self._failing_since >= self.stale_after:
                raise CaUnavailable(f"the CA's pod watch has failed for {now - self._failing_since:.0f}s "
                                    f"({error}): which pods run where is not known now",
                                    "retry; check the CA's access to the API server")
            return self._model


def pods_query(node: str, identity: Identity) -> tuple[Resource, dict[str, str]]:
    """The list that finds the pods of `identity` on `node`."""
    namespace = identity.namespace
    return (Resource(f"/api/v1/namespaces/{namespace}/pods", f"pods in {namespace}"),
            {"fieldSelector": f"spec.nodeName={node},spec.serviceAccountName={identity.service_account}"})


def runs_identity(pods: list[dict[str, Any]], node: str, identity: Identity) -> bool:
    """A listed pod of `identity` runs (is not finished) on `node` (the selectors'
    answer checked again, as the model's pods are)."""
    for pod in pods:
        meta, spec, status = (pod.get(k) if isinstance(pod.get(k), dict) else {}
                              for k in ("metadata", "spec", "status"))
        account = spec.get("serviceAccountName") or spec.get("serviceAccount")
        if (meta.get("namespace"), spec.get("nodeName"), account) == (identity.namespace, node,
                                                                       identity.service_account) \
                and status.get("phase") not in TERMINATED:
            return True
    return False


class PodLookup:
    """NodeAuthorizer's `lookup` in a cluster: the API asked directly on a watch miss."""

    def __init__(self, client: KubeClient, log: logging.Logger | None = None):
        self.client = client
        self.log = log or logging.getLogger("nodeagent.identity.ca.kubeauth")

    def __call__(self, node: str, identity: Identity) -> bool:
        resource, params = pods_query(node, identity)
        try:
            items, _ = asyncio.run(self.client.list(resource, params))  # a grpc worker thread: no loop
        except KubeApiError as exc:
            self.log.error("cannot look up the pods of %s on node %s: %s", identity.short, node, exc)
            raise CaUnavailable(f"the CA cannot check the pods of node {node} now: {exc.detail}",
                                "retry; check the CA's log") from None
        found = runs_identity(items, node, identity)
        if found:
            self.log.info("%s on node %s: found by a direct list (not in the pod watch yet)", identity.short, node)
        return found
