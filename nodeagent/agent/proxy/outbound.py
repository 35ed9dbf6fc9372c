"""Outbound relay: connections a meshed pod's app opened, captured to the agent's
in-pod listener (127.0.0.1:15001 / [::1]:15001).

For each accepted connection: recover the original destination from the capture maps
(keyed by the pod's netns cookie and the client port), decide where it goes
(destinations.resolve: a Service is load-balanced here, at the source), then reach it
over HBONE when the endpoint is a meshed pod (tunnel_outbound.py) — or, when it is a
meshed pod of this node and the fast path is on, joined here with no HBONE
(samenode.py) — else as plain TCP from the pod's own netns (`Passthrough`), and splice. Every connection is reported with
`reporter="source"`; a failure resets the client and is counted with its reason.

With the native HBONE engine the pods' outbound listeners are the engine's
(source_routes.py, setting outbound_in_engine): it opens the streams itself on the routes
this relay taught it, and hands this relay the rest with their original destination
(`accepted`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Protocol

from nodeagent.agent.inpod import sockets as inpod
from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.destinations import NoEndpoint, RoundRobin, Target, resolve
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.proxy.relay import Relay, connect_failure_reason, relay
from nodeagent.agent.proxy.samenode import SameNodeRoute
from nodeagent.agent.proxy.source_routes import Handed, Offload, SourceRoutes
from nodeagent.agent.proxy.telemetry import FLAG_CONNECT, MTLS, PLAINTEXT, SOURCE, Flow, Peer
from nodeagent.errors import NodeagentError
from nodeagent.identity.errors import IdentityUnavailable
from nodeagent.tunnel import TunnelError
from nodeagent.xds import dataplane

Address = tuple[str, int]


class Route(Protocol):
    name: str

    async def connect(self, ctx: PodContext, target: Target, client: socket.socket | None = None):
        """A connected socket, or an HBONE stream, to `target`, for `client`'s connection."""


class Passthrough:
    """Plain TCP from the pod's own netns to the target."""

    name = "passthrough"

    def __init__(self, mark: int, timeout: float):
        self.mark = mark
        self.timeout = timeout

    async def connect(self, ctx: PodContext, target: Target, client: socket.socket | None = None) -> socket.socket:
        sock = inpod.upstream(ctx.netns_fd, inpod.family_of(target.address[0]), self.mark)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, target.address), self.timeout)
            return sock
        except BaseException:
            sock.close()
            raise


class OutboundRelay(Relay):
    direction = "outbound"

    def __init__(self, inputs: ProxyInputs, capture, log: logging.Logger, *, passthrough: Route, hbone: Route,
                 same_node: SameNodeRoute | None = None, in_engine: bool = True):
        super().__init__(inputs, log)
        self.capture = capture
        self.identities = inputs.identities
        self.telemetry = inputs.telemetry
        self.passthrough = passthrough
        self.hbone = hbone
        self.same_node = same_node  # None: the same-node fast path is off (setting same_node_fast_path)
        self.balancer = RoundRobin()
        # the pods' outbound listeners in the native HBONE engine (setting outbound_in_engine)
        self.routes = SourceRoutes(self, hbone, inputs, capture, log, enabled=in_engine)
        self.offload = self.routes.offload  # InPodListener's: the engine may take the accepting

    async def handle(self, ctx: PodContext, client: socket.socket, handed: Handed | None = None) -> None:
        """A connection accepted on `ctx`'s outbound listener; `handed`: by the native engine,
        which read its original destination already (source_routes.py)."""
        self.metrics.outbound.inc()
        if self._overloaded(ctx, client):
            return
        with self.inputs.memory.holdings.held(ctx.pod.ip):
            await self._handle(ctx, client, handed)

    async def _handle(self, ctx: PodContext, client: socket.socket, handed: Handed | None) -> None:
        if handed is not None:
            client_port, dst = handed.client_port, handed.dst
        else:
            try:
                client_port = client.getpeername()[1]
            except OSError:
                self._fail(ctx, client, "client_gone", "the client closed before it was accepted")
                return
            dst = self.capture.pop_original_dst(ctx.cookie, client.family, client_port)
        if dst is None:
            self._fail(ctx, client, "no_original_dst",
                       f"no original destination recorded for client port {client_port} "
                       "(a direct connection to the outbound port?); closing it")
            return
        await self._to(ctx, client, (ctx.pod.ip, client_port), dst, handed)

    async def _to(self, ctx: PodContext, client: socket.socket, src: Address, dst: Address,
                  handed: Handed | None) -> None:
        if dst in self.inputs.waypoint.dataplane().outbound:
            await self._through_waypoint(ctx, client, src, dst)
            return
        if handed is not None and handed.hint is not None:
            target = handed.hint  # the endpoint an out-route's balancer chose, under the model in force
        else:
            try:
                target = resolve(self.inputs.model(), dst, self.balancer)
            except NoEndpoint as exc:
                flow = self.telemetry.open(Flow(SOURCE, src, dst, Peer.of(ctx.pod), Peer(), service=exc.service))
                self._fail(ctx, client, "no_endpoints", f"to {dst[0]}:{dst[1]}: {exc}")
                self.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason="no_endpoints")
                return
        if target.meshed and target.pod is not None and target.address[0] in target.pod.other_ips:
            flow = self.telemetry.open(Flow(SOURCE, src, dst, Peer.of(ctx.pod), Peer.of(target.pod)))
            self._fail(ctx, client, "other_family",
                       f"to {dataplane.endpoint(*dst)}: the other-family address of dual-stack pod {target.pod.namespace}/"
                       f"{target.pod.name}, which the mesh does not carry (only its status.podIP {target.pod.ip})")
            self.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason="other_family")
            return
        await self._relay(ctx, client, src, dst, target, handed.via if handed is not None else None)

    async def _through_waypoint(self, ctx: PodContext, client: socket.socket, src: Address, dst: Address) -> None:
        """Client-side L7: the connection goes to Envoy, which routes it and hands it back
        on upstream.sock (handle_upstream) with the endpoint it picked."""
        pod = ctx.pod
        tlvs = [(dataplane.TLV_SOURCE_LABELS, dataplane.encode_labels(pod.labels)),
                (dataplane.TLV_SOURCE_WORKLOAD, f"{pod.namespace}/{pod.name}".encode())]
        principal = self.identities.uri_of(pod) if self.identities.enabled else None
        if principal:
            tlvs.insert(0, (dataplane.TLV_PRINCIPAL, principal.encode()))
        # Source port 0: Envoy keys its upstream connection pools by the PROXY header it
        # passes on, so one pool per source pod (a sidecar's scope for connectionPool
        # limits) rather than one per client connection, which no limit would bound.
        header = dataplane.ProxyHeader((src[0], 0), dst, tuple(tlvs))
        with self.inputs.waypoint.expecting("outbound", header):
            try:
                upstream = await self.inputs.waypoint.open("outbound", header)
            except NodeagentError as exc:
                self._fail(ctx, client, "waypoint_unavailable", f"to {dst[0]}:{dst[1]} through the waypoint: {exc}")
                return
            await relay(self.inputs, "outbound", client, upstream)

    async def handle_upstream(self, sock: socket.socket, header: dataplane.ProxyHeader) -> None:
        """A connection Envoy hands back after client-side L7: PROXY source = the client
        pod, destination = what it asked for, ENDPOINT = the pod Envoy picked (absent:
        the destination itself). Reached from the source pod as any outbound connection."""
        src, dst = header.source, header.destination
        ctx = self._enrolled(sock, src[0], "upstream from")
        if ctx is None:
            return
        with self.inputs.memory.holdings.held(ctx.pod.ip):  # the next leg of a connection taken: never refused
            await self._upstream(ctx, sock, src, dst, header)

    async def _upstream(self, ctx: PodContext, sock: socket.socket, src: Address, dst: Address,
                        header: dataplane.ProxyHeader) -> None:
        endpoint = header.tlv(dataplane.TLV_ENDPOINT)
        try:
            address = dataplane.parse_endpoint(endpoint.decode()) if endpoint else dst
        except (ValueError, UnicodeDecodeError) as exc:
            self._fail(ctx, sock, "waypoint_bad_endpoint", f"waypoint upstream: {exc}")
            return
        model = self.inputs.model()
        pod = model.pod_by_ip(address[0])
        target = Target(address, pod=pod, service=model.service_by_ip(dst[0]),
                        meshed=pod is not None and model.is_meshed(pod))
        await self._relay(ctx, sock, src, dst, target, enforced=self._enforced(header, dst, address))

    def _enforced(self, header: dataplane.ProxyHeader, dst: Address, endpoint: Address) -> str | None:
        """The digest of the destination's HTTP policy the route enforced (one waypoint per
        request): what the connection's cluster says (TLV_ENFORCED), when the steering in
        force has the chain of `dst` enforce that one for `endpoint`; else None (a request
        of a chain or route that enforces nothing, or another policy: the steering changed
        since Envoy routed it), and the destination's waypoint enforces the policy."""
        said = header.tlv(dataplane.TLV_ENFORCED)
        if not said:
            return None
        enforced = self.inputs.waypoint.dataplane().enforced_for(dst, endpoint)
        return enforced if enforced is not None and said == enforced.encode() else None

    async def _relay(self, ctx: PodContext, client: socket.socket, src: Address, dst: Address,
                     target: Target, via: Offload | None = None, enforced: str | None = None) -> None:
        if self.same_node is not None and await self.same_node.relay(ctx, client, src, dst, target, enforced):
            return
        route, flow = self._route(ctx, src, dst, target)
        try:
            if route is self.hbone:
                self.identities.of(target.pod)  # a destination without a valid identity: refused
                upstream = await route.connect(ctx, target, client, enforced)
            else:
                upstream = await route.connect(ctx, target, client)
        except (OSError, asyncio.TimeoutError, TunnelError, IdentityUnavailable) as exc:
            self._connect_failed(ctx, client, route, target, flow, exc)
            return
        if via is not None and route is self.hbone:
            self.routes.learn(via, dst)  # the next connections to dst: the engine's
        if route is self.passthrough:
            self.metrics.passthrough.inc()
        self.log.debug("outbound %s -> %s via %s", ctx, _where(target), route.name)
        result = await relay(self.inputs, "outbound", client, upstream)
        self.telemetry.close(flow, received=result.a_to_b, sent=result.b_to_a)

    def refused(self, ctx: PodContext, client: socket.socket, src: Address, dst: Address, target: Target,
                error: TunnelError) -> None:
        """A stream the engine opened on an out-route ended before its 200 (source_routes.py):
        reported as this relay reports a failed connect over HBONE."""
        self.metrics.outbound.inc()
        route, flow = self._route(ctx, src, dst, target)
        self._connect_failed(ctx, client, route, target, flow, error)

    def _connect_failed(self, ctx: PodContext, client: socket.socket, route: Route, target: Target, flow: Flow,
                        exc: BaseException) -> None:
        reason = connect_failure_reason(exc)
        self._fail(ctx, client, reason, f"{route.name} to {_where(target)} failed: {reason} ({exc})")
        self.telemetry.close(flow, flags=FLAG_CONNECT, verdict="failed", reason=str(exc))

    def _route(self, ctx: PodContext, src: Address, dst: Address, target: Target) -> tuple[Route, Flow]:
        """HBONE for a meshed endpoint, passthrough otherwise; the flow reporting it."""
        if target.meshed:
            own, peer = self.identities.uri_of(ctx.pod), self.identities.uri_of(target.pod)
            flow = Flow(SOURCE, src, dst, Peer.of(ctx.pod, own), Peer.of(target.pod, peer), target.service,
                        MTLS, upstream=(target.pod.ip, self.hbone.port))
            return self.hbone, self.telemetry.open(flow)
        flow = Flow(SOURCE, src, dst, Peer.of(ctx.pod), Peer.of(target.pod), target.service, PLAINTEXT,
                    upstream=target.address)
        return self.passthrough, self.telemetry.open(flow)


def _where(target: Target) -> str:
    name = f" ({target.pod.namespace}/{target.pod.name})" if target.pod else ""
    return f"{target.address[0]}:{target.address[1]}{name}"

