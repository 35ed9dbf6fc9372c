"""The outbound HBONE route: a captured connection to a meshed endpoint, carried as an
HTTP/2 CONNECT stream over mutual TLS to the endpoint pod's port 15008.

One HbonePool per source pod, because its TCP connections are made inside that pod's
netns (marked, so capture leaves them alone) and the destination reads the source pod's
IP from them; within it, connections are pooled per (source identity, destination
identity, destination pod address). The source presents its own workload certificate
and requires the destination pod's SPIFFE identity (its service account); `:authority`
is the endpoint's IP and target port. A removed pod's pool is closed once its relayed
connections have ended.
"""

from __future__ import annotations

import asyncio
import logging

from nodeagent.agent.inpod import sockets as inpod
from nodeagent.agent.proxy.destinations import Target
from nodeagent.agent.proxy.identities import WorkloadIdentities
from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.identity.spiffe import Identity
from nodeagent.tunnel import HbonePool, HboneStream, TunnelMetrics, TunnelSettings, tls


class HboneRoute:
    name = "hbone"

    def __init__(self, identities: WorkloadIdentities, metrics: TunnelMetrics, log: logging.Logger, *,
                 mark: int, port: int, settings: TunnelSettings = TunnelSettings()):
        self.identities = identities
        self.metrics = metrics
        self.log = log
        self.mark = mark
        self.port = port
        self.settings = settings
        self.verify = tls.verifier(identities.trust_domain)
        self.pools: dict[PodContext, HbonePool] = {}

    async def connect(self, ctx: PodContext, target: Target) -> HboneStream:
        source = self.identities.of(ctx.pod)
        await self.identities.ready(source)  # the handshake reads its context synchronously
        destination = self.identities.of(target.pod)
        stream, _ = await self._pool(ctx).open_stream(source.uri, destination.uri, (target.pod.ip, self.port),
                                                      target.address)
        return stream

    def _pool(self, ctx: PodContext) -> HbonePool:
        pool = self.pools.get(ctx)
        if pool is None:
            pool = self.pools[ctx] = HbonePool(
                lambda ip, _port: inpod.upstream(ctx.netns_fd, inpod.family_of(ip), self.mark),
                lambda uri: self.identities.context(Identity.parse(uri), server_side=False),
                self.verify, metrics=self.metrics, log=self.log, settings=self.settings)
        return pool

    async def release(self, ctx: PodContext) -> None:
        """Close a removed pod's pool once its outbound relays have ended."""
        relays = set(ctx.tasks.get("outbound", ()))
        if relays:
            await asyncio.wait(relays)
        pool = self.pools.pop(ctx, None)
        if pool is not None:
            await pool.close()

    def connections(self) -> int:
        return sum(p.connections() for p in self.pools.values())

    async def close(self) -> None:
        pools, self.pools = list(self.pools.values()), {}
        await asyncio.gather(*(p.close() for p in pools), return_exceptions=True)
