"""The workload identities of this node's meshed pods, as the tunnel needs them.

A pod's identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccountName>`.
`sync(pods)` keeps the IdentityManager fetching certificates for the identities of the
enrolled pods (ahead of any connection) and forgets identities no pod uses any more
(their key files are deleted); key files an earlier agent left are served at once when
still valid, and the ones no pod claimed by the end of the first reconcile are deleted
(`discard_unclaimed`). `ready(identity)` waits for a first certificate when there is
none yet; `missing(pods)` says, without waiting, which of the pods' identities have no
valid certificate and why (the agent is not ready while any has none). The tunnel asks
for TLS contexts synchronously during a handshake, so `context(identity, server_side)`
serves one built from the credentials in use now, cached until they rotate. Without a
CA (`--ca-address off`) there are no identities: `enabled` is False and `ready`
refuses, saying how to turn mTLS on.
"""

from __future__ import annotations

import functools
import logging
import ssl
from typing import Iterable

from nodeagent.errors import ConfigError
from nodeagent.identity.workload.credentials import Credentials
from nodeagent.identity.errors import IdentityUnavailable
from nodeagent.identity.workload.manager import IdentityManager
from nodeagent.identity.spiffe import NODE_NAMESPACE, Identity, node_identity
from nodeagent.model import Pod


def no_ca() -> IdentityUnavailable:
    return IdentityUnavailable("this agent has no mesh CA, so no workload certificates",
                               "start it with --ca-address, --ca-root-cert and --ca-token-file")


class WorkloadIdentities:
    def __init__(self, trust_domain: str, manager: IdentityManager | None, log: logging.Logger,
                 node: str | None = None):
        self.trust_domain = trust_domain
        self.manager = manager
        self.log = log
        # The agent's own identity (spiffe.NODE_NAMESPACE), fetched beside its pods': what it
        # presents when it vouches for a pod's request its waypoint enforced. Nothing waits
        # for it: without it (a CA refusing it) such requests meet their destination's waypoint.
        self.node = node_identity(trust_domain, node) if node else None
        self._contexts: dict[tuple[Identity, bool], tuple[Credentials, ssl.SSLContext]] = {}
        self._invalid: set[tuple[str, str]] = set()  # pods already warned about

    @property
    def enabled(self) -> bool:
        return self.manager is not None

    def of(self, pod: Pod) -> Identity:
        """The pod's SPIFFE identity; IdentityUnavailable if its names cannot form one, or
        form a node's (a pod in namespace spiffe.NODE_NAMESPACE: it gets none)."""
        if pod.namespace == NODE_NAMESPACE:
            raise IdentityUnavailable(f"pod {pod.namespace}/{pod.name} has no identity: namespace {NODE_NAMESPACE} "
                                      "holds the node agents' own identities", "run it in another namespace")
        try:
            return _identity(self.trust_domain, pod.namespace, pod.service_account)
        except ConfigError as exc:
            raise IdentityUnavailable(f"pod {pod.namespace}/{pod.name} has no valid identity: {exc}",
                                      "fix its spec.serviceAccountName") from None

    def uri_of(self, pod: Pod | None) -> str | None:
        """The pod's SPIFFE URI, or None (no pod, or no valid identity)."""
        identity = self._identity_or_none(pod) if pod is not None else None
        return identity.uri if identity is not None else None

    def _identity_or_none(self, pod: Pod) -> Identity | None:
        try:
            return self.of(pod)
        except IdentityUnavailable:
            return None

    def sync(self, pods: Iterable[Pod]) -> None:
        """Fetch ahead for these pods' identities; forget the ones no longer used."""
        if self.manager is None:
            return
        wanted, invalid = set(), set()
        for pod in pods:
            try:
                wanted.add(self.of(pod))
            except IdentityUnavailable as exc:
                if pod.key not in self._invalid:
                    self.log.warning("%s", exc)  # once, not on every model change
                invalid.add(pod.key)
        self._invalid = invalid
        if self.node is not None:
            wanted.add(self.node)
        self.manager.prefetch(sorted(wanted - set(self.manager.identities)))
        for identity in set(self.manager.identities) - wanted:
            self.manager.forget(identity)
            self._contexts = {k: v for k, v in self._contexts.items() if k[0] != identity}

    def discard_unclaimed(self) -> None:
        """Delete the key files an earlier agent left for identities no enrolled pod has."""
        if self.manager is not None:
            self.manager.discard_unclaimed()

    def missing(self, pods: Iterable[Pod]) -> list[str]:
        """For each identity of `pods` without a valid certificate now, why (sorted; empty
        when all have one, or without a CA). A pod whose names form no identity can never
        have one: it is refused and reported by `sync`, never waited for."""
        if self.manager is None:
            return []
        wanted = {identity for pod in pods if (identity := self._identity_or_none(pod)) is not None}
        return [problem for identity in sorted(wanted) if (problem := self.manager.problem(identity))]

    async def ready(self, identity: Identity) -> Credentials:
        """Valid credentials for `identity`, waiting for the first fetch if need be."""
        if self.manager is None:
            raise no_ca()
        return await self.manager.get(identity)

    def node_ready(self) -> Identity | None:
        """The node's identity when it has a valid certificate now, else None."""
        if self.node is None or self.manager is None or self.manager.current(self.node) is None:
            return None
        return self.node

    def context(self, identity: Identity, server_side: bool) -> ssl.SSLContext:
        """An mTLS context presenting `identity`'s certificate in use now (call after
        `ready`); IdentityUnavailable when there is no valid certificate."""
        creds = self.manager.current(identity) if self.manager is not None else None
        if creds is None:
            raise IdentityUnavailable(f"no valid certificate for {identity}")
        cached = self._contexts.get((identity, server_side))
        if cached is not None and cached[0] is creds:
            return cached[1]
        ctx = creds.ssl_context(server_side)  # reads the key file: once per certificate
        self._contexts[(identity, server_side)] = (creds, ctx)
        return ctx

    def describe(self) -> dict:
        if self.manager is None:
            return {"enabled": False, "identities": []}
        return {"enabled": True, "trust_domain": self.trust_domain, "identities": self.manager.describe(),
                "roots": self.manager.describe_roots(),
                # one waypoint per request: whether the agent can vouch for its pods' requests now
                "node": {"identity": self.node.uri, "ready": self.node_ready() is not None} if self.node else None}

    async def close(self) -> None:
        self._contexts.clear()
        if self.manager is not None:
            await self.manager.close()
            await self.manager.client.close()


@functools.lru_cache(maxsize=4096)
def _identity(trust_domain: str, namespace: str, service_account: str) -> Identity:
    """Identity(...), validated once per name rather than each time a connection asks
    (several times per connection; an Identity is immutable). A name that is invalid is
    not cached: it raises ConfigError each time."""
    return Identity(trust_domain, namespace, service_account)
