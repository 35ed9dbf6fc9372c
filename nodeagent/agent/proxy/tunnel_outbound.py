"""The outbound HBONE route: a captured connection to a meshed endpoint, carried as an
HTTP/2 CONNECT stream over mutual TLS to the endpoint pod's port 15008.

One HbonePool per source pod, because its TCP connections are made inside that pod's
netns (marked, so capture leaves them alone) and the destination reads the source pod's
IP from them; within it, connections are pooled per (source identity, destination
identity, destination pod address). The source presents its own workload certificate
and requires the destination pod's SPIFFE identity (its service account); `:authority`
is the endpoint's IP and target port. A removed pod's pool is closed once its relayed
connections have ended. With the native HBONE engine (setting hbone_engine) the pool is
a native_outbound.NativePool and the stream returned is a native one: the relay's splice
hands the client socket to it (`carry`) and the engine moves the bytes.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from nodeagent.agent.inpod import sockets as inpod
from nodeagent.agent.proxy.destinations import Target
from nodeagent.agent.proxy.hbone_native import HboneEngines
from nodeagent.agent.proxy.native_outbound import NativePool
from nodeagent.agent.proxy.identities import WorkloadIdentities
from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.identity.errors import IdentityUnavailable
from nodeagent.identity.spiffe import Identity
from nodeagent.native.hbone import NativeStream
from nodeagent.tunnel import (ConnectRefused, HandshakeFailed, HbonePool, HboneStream, StreamBudget, TunnelMetrics,
                              TunnelSettings, tls)
from nodeagent.xds import dataplane


class HboneRoute:
    name = "hbone"

    def __init__(self, identities: WorkloadIdentities, metrics: TunnelMetrics, log: logging.Logger, *,
                 mark: int, port: int, settings: TunnelSettings = TunnelSettings(),
                 engines: HboneEngines | None = None, budget: StreamBudget | None = None):
        self.identities = identities
        self.engines = engines  # None or python: tunnel/'s HbonePool
        self.metrics = metrics
        self.log = log
        self.mark = mark
        self.port = port
        self.settings = settings
        self.budget = budget or StreamBudget(settings)  # shared by every pod's pool (and the agent's server)
        self.verify = tls.verifier(identities.trust_domain)
        self.pools: dict[PodContext, HbonePool | NativePool] = {}
        # streams open on a native pool's connection that the engine opened itself (source_routes.py)
        self.engine_streams: Callable[[int], int] = lambda _conn: 0

    async def connect(self, ctx: PodContext, target: Target, client: socket.socket | None = None,
                      enforced: str | None = None) -> HboneStream | NativeStream:
        """A stream to `target`; the native one relays `client` (when given) from its 200 on.
        `enforced`: the waypoint enforced the destination's HTTP policy of that digest (one
        waypoint per request): with a certificate for the node's own identity, the stream
        presents it and vouches for the source pod and the digest (dataplane.ENFORCED_HEADER),
        on connections of their own; without one, the pod's as any other (the destination's
        waypoint then enforces the policy again)."""
        source = self.identities.of(ctx.pod)
        node = self.identities.node_ready() if enforced is not None else None
        if node is not None:
            headers = ((dataplane.ENFORCED_HEADER, enforced), (dataplane.SOURCE_HEADER, source.uri))
            try:
                return await self._open(ctx, target, client, node, headers)
            except (ConnectRefused, HandshakeFailed) as exc:
                if isinstance(exc, ConnectRefused) and exc.status != 403:
                    raise
                # Refused as no vouch it takes (its model does not have the pod here yet,
                # or another node's), or the node's identity refused (an agent of a version
                # before it): the pod's own certificate, the destination's waypoint deciding.
                self.log.debug("HBONE to %s: the vouch for %s refused (%s), again as the pod", target.address, source,
                               exc)
        return await self._open(ctx, target, client, source, ())

    async def _open(self, ctx: PodContext, target: Target, client: socket.socket | None, presented: Identity,
                    headers: tuple[tuple[str, str], ...]) -> HboneStream | NativeStream:
        await self.identities.ready(presented)  # the handshake reads its context synchronously
        destination = self.identities.of(target.pod)
        pool = self._pool(ctx)
        if isinstance(pool, NativePool):
            return await pool.open_stream(presented.uri, destination.uri, (target.pod.ip, self.port), target.address,
                                          headers, sock=client)
        opened = await pool.open_stream(presented.uri, destination.uri, (target.pod.ip, self.port), target.address,
                                        headers)
        return opened[0]

    def _pool(self, ctx: PodContext) -> HbonePool | NativePool:
        pool = self.pools.get(ctx)
        if pool is None and self.engines is not None and self.engines.native:
            pool = self.pools[ctx] = NativePool(
                self.engines, lambda ip, _port: inpod.upstream(ctx.netns_fd, inpod.family_of(ip), self.mark),
                self._native_tls, metrics=self.metrics, log=self.log, settings=self.settings,
                max_streams_per_connection=min(100, self.settings.max_concurrent_streams),
                elsewhere=lambda conn: self.engine_streams(conn))
        elif pool is None:
            pool = self.pools[ctx] = HbonePool(
                lambda ip, _port: inpod.upstream(ctx.netns_fd, inpod.family_of(ip), self.mark),
                lambda uri: self.identities.context(Identity.parse(uri), server_side=False),
                self.verify, metrics=self.metrics, log=self.log, settings=self.settings, budget=self.budget)
        return pool

    def _native_tls(self, uri: str):
        creds = self.identities.manager.current(Identity.parse(uri)) if self.identities.manager else None
        if creds is None:
            raise IdentityUnavailable(f"no valid certificate for {uri}")
        return self.engines.tls(creds)

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
