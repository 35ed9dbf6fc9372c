"""The same-node fast path (issue 11): an outbound connection whose endpoint is a meshed
pod enrolled on this very node skips HBONE, its TLS and HTTP/2 and its second hop.

HBONE between two pods of one node would have this agent encrypt to itself: both ends'
certificates are its own, so the mutual TLS proves nothing it does not know already.
The fast path therefore decides what the HBONE server would have decided for that
connection — `admission.admit` with the source pod's SPIFFE identity, namespace and IP
and the endpoint's port, not plaintext, so PeerAuthentication STRICT holds — reports it
as both ends would (the source's report and the destination's, `mutual_tls`, the same
DENY, counters and flow lines, marked `same_node` in the flow log), delivers into the
server pod's netns as the client's address (delivery.Delivery, as the HBONE server
does), tracks the connection for revocation (admission.InboundConnections) and joins
the client socket with the delivery socket: in the kernel (`KernelJoin`: a sockmap
verdict program, bpf/samenode.c, no byte through the agent) when it loaded and takes
the pair, else in one relay of the inputs' Splicer (native: splice(2) on the engine's
thread; Python otherwise).

A connection it does not take goes over HBONE exactly as before: the setting
`same_node_fast_path` off (the outbound relay then has no SameNodeRoute), an endpoint
that is not an enrolled pod of this node, a pod without a valid certificate now (HBONE
waits for it and reports the failure), a port of the agent's own, or a pod port behind
the waypoint (server-side L7: Envoy decides, reached through the HBONE server). A
denied connection is refused as the HBONE client sees a 403: the client is reset and
the source counts `hbone_status_403`, so dashboards do not tell the two paths apart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import select
import socket

from prometheus_client import CollectorRegistry, Counter

from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.admission import DENY, WAYPOINT, Admission, admit
from nodeagent.agent.proxy.delivery import Delivery, open_flow, relay_delivered
from nodeagent.agent.proxy.destinations import Target
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.proxy.relay import Relay, connect_failure_reason
from nodeagent.agent.proxy.splice import Abort, SpliceResult
from nodeagent.agent.proxy.telemetry import FLAG_CONNECT, MTLS, SOURCE, Flow, Peer
from nodeagent.capture.sockmap import taken
from nodeagent.errors import NodeagentError
from nodeagent.policy import Connection
from nodeagent.resets import linger_reset

Address = tuple[str, int]
DENIED_REASON = "hbone_status_403"  # the source's failure label of a denial, as over HBONE
UNREACHABLE_REASON = "hbone_status_503"  # ... of an app that refused the delivery
OUTCOMES = ("relayed", "denied", "failed", "waypoint")


class SameNodeRoute(Relay):
    """Outbound connections to a meshed pod of this node, admitted and joined here."""

    direction = "outbound"  # its failures are the outbound relay's, as over HBONE

    def __init__(self, inputs: ProxyInputs, delivery: Delivery, registry: CollectorRegistry, log: logging.Logger,
                 kernel: "KernelJoin | None" = None):
        super().__init__(inputs, log)
        self.delivery = delivery  # the HBONE server's: its sockets are known to the steering loop check
        self.kernel = kernel  # the in-kernel join, when set up (KernelJoin.start); else the inputs' Splicer
        self._kernel_inputs = dataclasses.replace(inputs, splicer=kernel) if kernel is not None else inputs
        counter = Counter("nodeagent_same_node_connections",
                          "Outbound connections to a meshed pod of this node decided by the same-node fast "
                          "path (no HBONE), by outcome: relayed, denied, failed (the app refused), or waypoint "
                          "(the port is behind the waypoint: left to HBONE)", ["outcome"], registry=registry)
        self._counters = {outcome: counter.labels(outcome=outcome) for outcome in OUTCOMES}
        self.counts = dict.fromkeys(OUTCOMES, 0)  # the same, for status

    def _count(self, outcome: str) -> None:
        self._counters[outcome].inc()
        self.counts[outcome] += 1

    def local(self, target: Target) -> PodContext | None:
        """The enrolled pod of this node `target` is, when it is one and meshed."""
        if not target.meshed or target.pod is None:
            return None
        ctx = self.inputs.pod_at(target.address[0])
        return ctx if ctx is not None and ctx.pod.key == target.pod.key else None

    async def relay(self, ctx: PodContext, client: socket.socket, src: Address, dst: Address,
                    target: Target, enforced: str | None = None) -> bool:
        """Take the connection from `ctx`'s pod to `target` if it is this node's: True
        once it is decided and done (relayed, refused or failed), False when it must go
        over HBONE (nothing was reported or counted then)."""
        server = self.local(target)
        if server is None or target.address[1] in self.inputs.agent_ports:
            return False
        identities = self.inputs.identities
        source, destination = identities.uri_of(ctx.pod), identities.uri_of(target.pod)
        if not identities.enabled or source is None or destination is None or \
                identities.missing([ctx.pod, target.pod]):
            return False
        conn = Connection(src[0], source, ctx.pod.namespace, server.pod, *target.address)
        # `enforced`: the waypoint that routed it enforced the server's HTTP policy of that
        # digest (one waypoint per request): delivered here when it is the one in force
        admission = admit(self.inputs.policies.current, self.inputs.waypoint, conn, plaintext=False,
                          enforced=enforced)
        if admission.route == WAYPOINT:
            self._count("waypoint")
            return False
        telemetry = self.inputs.telemetry
        outbound = telemetry.open(Flow(SOURCE, src, dst, Peer.of(ctx.pod, source), Peer.of(target.pod, destination),
                                       target.service, MTLS, upstream=target.address, same_node=True))
        self.metrics.inbound.inc()
        inbound = open_flow(self.inputs, server, src, target.address, source, MTLS)
        inbound.upstream, inbound.same_node = target.address, True
        if admission.route == DENY:
            self._count("denied")
            telemetry.denied(inbound, admission.policy, admission.reason)
            self._fail(ctx, client, DENIED_REASON, f"to {_where(server, target)} denied by policy on this node "
                       f"(same-node fast path): {admission.reason}")
            telemetry.close(outbound, flags=FLAG_CONNECT, verdict="failed", reason=admission.reason)
            return True
        await self._join(ctx, server, client, conn, src, target, outbound, inbound, admission, enforced)
        return True

    async def _join(self, ctx: PodContext, server: PodContext, client: socket.socket, conn: Connection,
                    src: Address, target: Target, outbound: Flow, inbound: Flow, admission: Admission,
                    enforced: str | None) -> None:
        """Deliver into the server pod as the client and relay, tracked for re-checks."""
        metrics, telemetry = self.metrics, self.inputs.telemetry
        with self.inputs.connections.delivering(conn, src, plaintext=False, admission=admission,
                                                enforced=enforced) as entry:
            try:
                upstream = await self.delivery.connect(server, src, target.address, entry.ends, ahead=True)
            except (OSError, asyncio.TimeoutError) as exc:
                reason = connect_failure_reason(exc)
                self._count("failed")
                metrics.failure("inbound", reason)  # as the HBONE server counts it
                telemetry.close(inbound, flags=FLAG_CONNECT, verdict="failed", reason=reason)
                self._fail(ctx, client, UNREACHABLE_REASON, f"to {_where(server, target)}: delivery failed: "
                           f"{reason} ({exc})")
                telemetry.close(outbound, flags=FLAG_CONNECT, verdict="failed", reason=reason)
                return
            self._count("relayed")
            self.log.debug("outbound %s -> %s: same-node fast path", ctx, _where(server, target))
            active = metrics.active_by["outbound"]  # the inbound side's gauge and bytes: relay_delivered
            active.inc()
            inputs = self._kernel_inputs if self.kernel is not None and self.kernel.ready else self.inputs
            try:
                result = await relay_delivered(inputs, inbound, entry, client, upstream)
            finally:
                active.dec()
        metrics.bytes_by[("outbound", "sent")].inc(result.a_to_b)
        metrics.bytes_by[("outbound", "received")].inc(result.b_to_a)
        telemetry.close(outbound, received=result.a_to_b, sent=result.b_to_a)

    def describe(self) -> dict:
        """For status: on, how the bytes move (and why not in the kernel), the outcomes so far."""
        if self.kernel is not None and self.kernel.ready:
            join = "sockmap"
        else:
            join = "splice" if self.inputs.splicer.engine is not None else "python"
        kernel, ahead = self.kernel, self.delivery.ahead
        return {"enabled": True, "join": join, "sockmap": kernel.why if kernel is not None else "off",
                "connections": dict(self.counts),
                "sockets_ahead": {"held": ahead.held(), "taken": ahead.taken, "made": ahead.made,
                                  "failed": ahead.failures},
                "sockmap_pairs": {"joined": kernel.joined, "refused": kernel.fallbacks} if kernel is not None
                else None}


def _where(server: PodContext, target: Target) -> str:
    return f"{target.address[0]}:{target.address[1]} ({server.pod.namespace}/{server.pod.name})"


class KernelJoin:
    """The pair of sockets joined in the kernel (bpf/samenode.c through
    capture.sockmap.SockmapJoin): `splice(a, b, abort)` as splice.Splicer's, same
    result and semantics, with no byte passing through the agent. The kernel moves the
    segments and counts them; the agent watches both sockets for their FIN or error
    only (an epoll set with EPOLLRDHUP, no EPOLLIN, so data never wakes it), passes a
    FIN on once the other socket has taken every byte counted for that direction,
    passes a reset on as a reset, and reads the counts when the pair ends. `start`
    loads it beside capture; until then, or when it cannot (`why`), the relays use the
    Splicer. The kernel takes only established TCP sockets: a pair one of whose ends
    has already half-closed (a short request sent with its FIN before the join) is
    refused at the insert and goes to the Splicer (`fallbacks`), and so does one with
    Envoy's unix socket on one side (a connection the waypoint handed back)."""

    def __init__(self, setting: bool, splicer, log: logging.Logger):
        self.log = log
        self.splicer = splicer  # splice.Splicer: the fallback for pairs the kernel refuses
        self.maps = None  # capture.sockmap.SockmapJoin once started
        self.why = "starting" if setting else "same_node_sockmap=false"
        self._setting = setting
        self.engine = None  # as Splicer: not the native engine
        self.joined = self.fallbacks = 0

    @property
    def ready(self) -> bool:
        return self.maps is not None

    async def start(self, capture) -> None:
        """Load the program and maps beside `capture` (its compile child, in a thread:
        it takes a second or two); on failure say why and leave the Splicer in use."""
        if not self._setting:
            return
        load = getattr(capture, "sockmap_join", None)
        if load is None:
            self.why = "this capture layer has no sockmap join"
            return
        try:
            maps = await asyncio.to_thread(load)
            self.maps = maps
            self.why = "loaded: bpf/samenode.c's verdict program on na_sn_peers"
        except (NodeagentError, OSError) as exc:
            self.why = f"not loaded: {exc}"
            self.log.warning("same-node fast path: the in-kernel join (sockmap) is not available, splice "
                             "instead: %s", exc)

    def close(self) -> None:
        self.maps = None  # the capture loader closes it

    async def splice(self, a: socket.socket, b: socket.socket, abort: Abort | None = None) -> SpliceResult:
        if not (_tcp(a) and _tcp(b)) or (abort is not None and abort.requested):
            # Envoy's unix socket (a connection it handed back): not the kernel's. Revoked already (a
            # re-check while its delivery connected): the splicer resets both as it starts, where a
            # join would first flush the client's queued bytes to the app
            return await self.splicer.splice(a, b, abort)
        try:
            keys = self.maps.insert(a, b)
        except (NodeagentError, OSError) as exc:
            self.fallbacks += 1
            self.log.debug("same-node fast path: the kernel refused the pair (%s); splice instead", exc)
            return await self.splicer.splice(a, b, abort)
        self.joined += 1
        pair = _JoinedPair(self.maps, keys, a, b, asyncio.get_running_loop())
        if abort is not None:
            abort.bind(pair)
        try:
            return await asyncio.shield(pair.done)
        except asyncio.CancelledError:  # the agent is stopping: both peers see a reset
            pair.abort()
            raise


_WATCH = select.EPOLLRDHUP | select.EPOLLET  # ERR and HUP are always reported


def _tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM


class _JoinedPair:
    """One pair in the kernel's hands, watched until both directions end."""

    def __init__(self, maps, keys: tuple[int, int], a: socket.socket, b: socket.socket,
                 loop: asyncio.AbstractEventLoop):
        self.maps, self.keys, self.loop = maps, keys, loop
        self.socks = (a, b)
        self.done = loop.create_future()
        self.eof = [False, False]  # read a FIN on a (a_to_b done once passed on), on b
        self.passed = [False, False]
        self._drains: set[asyncio.Task] = set()
        self.epoll = select.epoll()
        try:
            for sock in self.socks:
                self.epoll.register(sock.fileno(), _WATCH)
            loop.add_reader(self.epoll.fileno(), self._events)
        except (NodeagentError, OSError) as exc:
            self._end(exc, reset=True)
            return
        self._events()  # a FIN or reset that came before the watch

    def abort(self) -> None:
        if not self.done.done():
            self._end(None, reset=True)

    def _events(self) -> None:
        if self.done.done():
            return
        fds = {sock.fileno(): i for i, sock in enumerate(self.socks)}
        for i, sock in enumerate(self.socks):  # edge-triggered: look at both, not only at what fired
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._end(OSError(err, os.strerror(err)), reset=True)
                return
        try:
            fired = self.epoll.poll(0)
        except OSError:
            fired = []
        for fd, events in fired:
            i = fds.get(fd)
            if i is not None and events & select.EPOLLRDHUP and not self.eof[i]:
                self.eof[i] = True
                task = self.loop.create_task(self._pass_fin(i))
                self._drains.add(task)
                task.add_done_callback(self._drains.discard)

    async def _pass_fin(self, i: int) -> None:
        """A FIN read on socket i: pass it on once the other socket took all i sent."""
        other, delay = self.socks[1 - i], 0.0005
        try:
            while self.maps.redirected(self.keys[i]) > taken(other):
                if self.done.done():
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
            other.shutdown(socket.SHUT_WR)
        except (NodeagentError, OSError) as exc:
            if not self.done.done():
                self._end(exc, reset=True)
            return
        self.passed[i] = True
        if all(self.passed) and not self.done.done():
            self._end(None, reset=False)

    def _end(self, error: BaseException | None, reset: bool) -> None:
        try:
            self.loop.remove_reader(self.epoll.fileno())
        except (ValueError, OSError):
            pass
        self.epoll.close()
        result = SpliceResult(error=error)
        try:
            result.a_to_b, result.b_to_a = (self.maps.redirected(k) if k else 0 for k in self.keys)
            self.maps.forget(*(k for k in self.keys if k))
        except (NodeagentError, OSError) as exc:
            result.error = result.error or exc
        for sock in self.socks:
            if reset:
                linger_reset(sock)
            sock.close()
        for task in self._drains:
            task.cancel()
        if not self.done.done():
            self.done.set_result(result)


