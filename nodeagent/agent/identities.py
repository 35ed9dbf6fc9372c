"""The workload identities of this node's meshed pods, as the tunnel needs them.

A pod's identity is `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccountName>`.
`sync(pods)` keeps the IdentityManager fetching certificates for the identities of the
enrolled pods (ahead of any connection) and forgets identities no pod uses any more
(their key files are deleted). `ready(identity)` waits for a first certificate when
there is none yet. The tunnel asks for TLS contexts synchronously during a handshake,
so `context(identity, server_side)` serves one built from the credentials in use now,
cached until they rotate. Without a CA (`--ca-address off`) there are no identities:
`enabled` is False and `ready` refuses, saying how to turn mTLS on.
"""

from __future__ import annotations

import logging
import ssl
from typing import Iterable

from nodeagent.errors import ConfigError
from nodeagent.identity.credentials import Credentials
from nodeagent.identity.errors import IdentityUnavailable
from nodeagent.identity.manager import IdentityManager
from nodeagent.identity.spiffe import Identity
from nodeagent.model import Pod



def no_ca() -> IdentityUnavailable:
    return IdentityUnavailable("this agent has no mesh CA, so no workload certificates",
                               "start it with --ca-address, --ca-root-cert and --ca-token-file")


class WorkloadIdentities:
    def __init__(self, trust_domain: str, manager: IdentityManager | None, log: logging.Logger):
        self.trust_domain = trust_domain
        self.manager = manager
        self.log = log
        self._contexts: dict[tuple[Identity, bool], tuple[Credentials, ssl.SSLContext]] = {}
        self._invalid: set[tuple[str, str]] = set()  # pods already warned about

    @property
    def enabled(self) -> bool:
        return self.manager is not None

    def of(self, pod: Pod) -> Identity:
        """The pod's SPIFFE identity; IdentityUnavailable if its names cannot form one."""
        try:
            return Identity(self.trust_domain, pod.namespace, pod.service_account)
        except ConfigError as exc:
            raise IdentityUnavailable(f"pod {pod.namespace}/{pod.name} has no valid identity: {exc}",
                                      "fix its spec.serviceAccountName") from None

    def uri_of(self, pod: Pod | None) -> str | None:
        """The pod's SPIFFE URI, or None (no pod, or no valid identity)."""
        try:
            return self.of(pod).uri if pod is not None else None
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
        self.manager.prefetch(sorted(wanted - set(self.manager.identities)))
        for identity in set(self.manager.identities) - wanted:
            self.manager.forget(identity)
            self._contexts = {k: v for k, v in self._contexts.items() if k[0] != identity}

    async def ready(self, identity: Identity) -> Credentials:
        """Valid credentials for `identity`, waiting for the first fetch if need be."""
        if self.manager is None:
            raise no_ca()
        return await self.manager.get(identity)

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
        return {"enabled": True, "trust_domain": self.trust_domain, "identities": self.manager.describe()}

    async def close(self) -> None:
        self._contexts.clear()
        if self.manager is not None:
            await self.manager.close()
            await self.manager.client.close()
