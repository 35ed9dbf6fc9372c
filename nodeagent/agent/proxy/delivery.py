"""Delivery to a meshed pod, shared by the plaintext inbound relay (inbound.py) and the
HBONE server (tunnel_inbound.py): the connection into the pod netns as the client
(`Delivery`), or to the waypoint's inbound listener for server-side L7 (`open_inbound`);
the destination's report of the connection (`open_flow`), and the relay of a tracked
connection that closes that report (`relay_delivered`: with DENY when a policy change
revoked it).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import select
import socket
import time
from contextlib import ExitStack
from typing import Callable, Sequence

from nodeagent.agent.inpod import sockets as inpod
from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.admission import DENY, Delivered, describe
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.proxy.relay import relay
from nodeagent.agent.proxy.splice import SpliceResult
from nodeagent.agent.proxy.steering import WaypointHandle
from nodeagent.agent.proxy.telemetry import DESTINATION, Flow, Peer
from nodeagent.errors import NodeagentError
from nodeagent.resets import reset
from nodeagent.xds import dataplane

Address = tuple[str, int]
CONNECT_TRIES = 8  # source ports drawn when connect() finds the 4-tuple taken
AHEAD_PER_PAIR = 8  # sockets made ahead for one (pod, client IP) pair of the same-node path...
AHEAD_LOW = 2  # ... made up again once a connection leaves this many or fewer
AHEAD_MAX = 128  # ... for all pairs together (each holds a descriptor and a bound port)
AHEAD_SECONDS = 10.0  # ... closed unused after this long


class Delivery:
    """Connections to the app inside the pod netns, as the client (transparent, on lo)."""

    def __init__(self, mark: int, timeout: float):
        self.mark = mark
        self.timeout = timeout
        # Local addresses of our delivery sockets, from before their connect until the
        # delivered connection ends, counted: two may share one (SO_REUSEADDR) while they
        # connect to different apps.
        self._ours: collections.Counter[Address] = collections.Counter()
        self.ahead = Ahead(self)

    def is_ours(self, addr: Address) -> bool:
        """True for a connection from one of our delivery sockets (a steering loop). Its
        address is known for as long as the delivery lives, so the looped connection is
        recognised whichever the event loop runs first: its accept, or the end of the
        connect that made it."""
        return addr in self._ours

    async def connect(self, ctx: PodContext, src: Address, dst: Address, ends: ExitStack,
                      gone: Sequence[asyncio.Future] = (), ahead: bool = False) -> socket.socket | None:
        """A socket connected to `dst` in `ctx`'s netns from `src`'s IP; its address
        counts as ours until `ends` (the delivered connection's) is closed. None when one
        of `gone` (the client's stream ending) completes first: the connect is abandoned
        and its socket reset, also one that connected at that moment. `ahead`: take a
        socket made ahead for the pair (Ahead) and make the next one after this round."""
        attempt = 0
        while True:
            if any(future.done() for future in gone):
                return None
            attempt += 1
            upstream = self.ahead.take(ctx, src) if ahead else None
            if upstream is None:
                upstream = inpod.transparent_upstream(ctx, self.mark, src[0], avoid_port=src[1])
                local = upstream.getsockname()[:2]
                self._ours[local] += 1  # before connecting: a loop shows up during the connect
            else:
                local = upstream.getsockname()[:2]  # counted as ours since it was made
            try:
                connected = await connect_socket(upstream, dst, self.timeout, gone)
            except BaseException as exc:
                upstream.close()
                self._forget(local)
                # The 4-tuple is taken (a live connection, or one in TIME_WAIT under a
                # second old): another source port.
                if isinstance(exc, OSError) and exc.errno == errno.EADDRNOTAVAIL and attempt < CONNECT_TRIES:
                    continue
                raise
            if not connected:
                reset(upstream)
                self._forget(local)
                return None
            ends.callback(self._forget, local)
            return upstream

    def unconnected(self, ctx: PodContext, src: Address, count: int) -> list[socket.socket]:
        """`count` sockets as `connect` makes one, not connected (for the native engine's
        routes, routes.py), made in one entry into the pod's netns: each address counts as
        ours until `release`d or `adopt`ed."""
        socks = inpod.transparent_upstreams(ctx, self.mark, src[0], src[1], count, verify=True)
        for sock in socks:
            self._ours[sock.getsockname()[:2]] += 1
        return socks

    def adopt(self, local: Address, ends: ExitStack, counted: bool) -> None:
        """A connection the engine made from `local` (a socket of `unconnected`: counted,
        or one released meanwhile) counts as ours until `ends` closes."""
        if not counted:
            self._ours[local] += 1
        ends.callback(self._forget, local)

    def release(self, local: Address) -> None:
        """A socket of `unconnected` the engine closed without connecting it."""
        self._forget(local)

    def _forget(self, local: Address) -> None:
        self._ours[local] -= 1
        if not self._ours[local]:
            del self._ours[local]


class Ahead:
    """Delivery sockets made ahead for the same-node path (issue 11): a new same-node
    connection's delivery socket is taken from here, and the next one is made after the
    connection is joined, in the loop round after it, while its first bytes go through
    the relay engine and the app; so entering the pod's netns, socket(2), the options and
    the bind are off the connection's path, and one entry into the netns makes several.
    Per (pod netns, client IP) pair at most AHEAD_PER_PAIR, made up once a connection
    leaves AHEAD_LOW or fewer, and AHEAD_MAX for all pairs (the
    least recently used pair gives its sockets up); one unused for AHEAD_SECONDS is
    closed (its bound port is the pod's ephemeral port, which an app binding it without
    reserving it would find taken, as by any of its own connections). Each is bound (its
    port drawn as transparent_upstream draws it) and counted as ours from the moment it
    is made; one whose port is the client's own is not used; one made in another netns
    than the pair's (the pod's netns descriptor closed and reused meanwhile) is closed.
    A pod leaving (`forget`), the memory guard tightening and the agent stopping
    (`clear`) close them: a socket would hold its pod's netns."""

    def __init__(self, delivery: Delivery, clock: Callable[[], float] = time.monotonic):
        self.delivery = delivery
        self.clock = clock
        self._pairs: collections.OrderedDict[tuple[int, str], collections.deque[tuple[float, socket.socket]]] = \
            collections.OrderedDict()
        self._held = 0
        self._wanted: dict[tuple[int, str], PodContext] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.taken = self.made = self.failures = 0

    def take(self, ctx: PodContext, src: Address) -> socket.socket | None:
        """A socket made ahead for `ctx`'s pod and `src`'s IP whose port is not `src`'s,
        or None; the pair is made up in the next loop round when it runs low."""
        key = (ctx.cookie, src[0])
        queue = self._pairs.get(key)
        taken = None
        while queue and taken is None:
            _, sock = queue.popleft()
            self._held -= 1
            local = sock.getsockname()[:2]
            if local[1] != src[1]:
                self.taken += 1
                taken = sock
            else:
                self._drop(sock, local)
        if not queue or len(queue) <= AHEAD_LOW:
            self._want(key, ctx)
        return taken

    def _want(self, key: tuple[int, str], ctx: PodContext) -> None:
        if not self._wanted:
            asyncio.get_running_loop().call_soon(self._make)
        self._wanted[key] = ctx

    def _make(self) -> None:
        wanted, self._wanted = self._wanted, {}
        now = self.clock()
        for key, ctx in wanted.items():
            queue = self._pairs.setdefault(key, collections.deque())
            self._pairs.move_to_end(key)
            count = AHEAD_PER_PAIR - len(queue)
            if count <= 0:
                continue
            try:
                socks = self.delivery.unconnected(ctx, (key[1], 0), count)
            except (OSError, NodeagentError):  # the pod's netns went, no port: its connections make their own
                self.failures += 1
                continue
            queue.extend((now, sock) for sock in socks)
            self._held += len(socks)
            self.made += len(socks)
        while self._held > AHEAD_MAX and self._pairs:
            _, queue = self._pairs.popitem(last=False)
            self._close(queue)
        if self._held and self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(AHEAD_SECONDS, self._expire)

    def _expire(self) -> None:
        """Close what was made ahead AHEAD_SECONDS ago and is still unused."""
        self._sweep = None
        oldest = self.clock() - AHEAD_SECONDS
        for key in list(self._pairs):
            queue = self._pairs[key]
            while queue and queue[0][0] <= oldest:
                _, sock = queue.popleft()
                self._held -= 1
                self._drop(sock, sock.getsockname()[:2])
            if not queue:
                del self._pairs[key]
        if self._held:
            self._sweep = asyncio.get_running_loop().call_later(AHEAD_SECONDS, self._expire)

    def forget(self, cookie: int) -> None:
        """The pod of netns `cookie` left: its sockets go."""
        self._forget_where(lambda key: key[0] == cookie)

    def forget_client(self, ip: str) -> None:
        """A pod of this node left: no socket keeps its address."""
        self._forget_where(lambda key: key[1] == ip)

    def clear(self) -> None:
        self._forget_where(lambda key: True)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def held(self) -> int:
        return self._held

    def _forget_where(self, which: Callable[[tuple[int, str]], bool]) -> None:
        for key in [k for k in self._pairs if which(k)]:
            self._close(self._pairs.pop(key))
        self._wanted = {k: c for k, c in self._wanted.items() if not which(k)}

    def _close(self, queue: "collections.deque[tuple[float, socket.socket]]") -> None:
        while queue:
            _, sock = queue.popleft()
            self._held -= 1
            self._drop(sock, sock.getsockname()[:2])

    def _drop(self, sock: socket.socket, local: Address) -> None:
        sock.close()
        self.delivery.release(local)


async def connect_socket(sock: socket.socket, address: Address, timeout: float,
                         gone: Sequence[asyncio.Future] = ()) -> bool:
    """Connect non-blocking `sock` to `address`: True once connected, False when one of
    `gone` completes first; OSError as connect(2) fails, TimeoutError after `timeout`.

    A delivery connects over loopback, where the SYN, the SYN-ACK and the ACK are handled
    before connect(2) returns (EINPROGRESS all the same): a poll with no wait finds the
    socket writable, and the connect completes in the caller's loop round, with no
    writer, timer or task (asyncio's `wait_for(sock_connect)` costs a task, a timer and
    a loop round per delivery). Otherwise it waits for the socket to become writable."""
    err = sock.connect_ex(address)
    if err in (errno.EINPROGRESS, errno.EAGAIN):
        if not _writable_now(sock):
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()

            def settle(outcome) -> None:
                if not waiter.done():
                    waiter.set_result(outcome)

            def left(_) -> None:
                settle(False)
            fd = sock.fileno()
            loop.add_writer(fd, settle, True)
            timer = loop.call_later(timeout, settle, None)
            for future in gone:
                future.add_done_callback(left)
            try:
                outcome = await waiter
            finally:
                loop.remove_writer(fd)
                timer.cancel()
                for future in gone:
                    future.remove_done_callback(left)
            if outcome is None:
                raise TimeoutError(f"connect to {address[0]}:{address[1]} timed out after {timeout:g} s")
            if not outcome:
                return False
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
    return True


def _writable_now(sock: socket.socket) -> bool:
    """Whether `sock` is writable (a connect done, or failed) without waiting; poll, not
    select, which refuses descriptors above 1023."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(0))


def open_flow(inputs: ProxyInputs, ctx: PodContext, src: Address, dst: Address, principal: str | None,
              security: str) -> Flow:
    """Open the destination's report of a connection to `ctx`'s pod. The source
    workload is the pod at the client address when its identity agrees with the
    proven principal (or when no principal was proven)."""
    model, pod, identities = inputs.model(), ctx.pod, inputs.identities
    client = model.pod_by_ip(src[0])
    if client is not None and principal and identities.uri_of(client) != principal:
        client = None
    source = Peer.of(client, principal) if client or not principal else _peer_of_principal(principal)
    own = identities.uri_of(pod) if identities.enabled else None
    return inputs.telemetry.open(Flow(DESTINATION, src, dst, source, Peer.of(pod, own),
                                      model.service_of(pod, dst[1]), security))


def _peer_of_principal(principal: str) -> Peer:
    parts = principal.split("/")  # spiffe: '' td ns <ns> sa <sa>
    namespace = parts[4] if len(parts) == 7 and parts[3] == "ns" else None
    return Peer(namespace=namespace, principal=principal) if namespace else Peer(principal=principal)


async def relay_delivered(inputs: ProxyInputs, flow: Flow, entry: Delivered, client,
                          upstream: socket.socket | None) -> SpliceResult:
    """Relay a connection the agent sent on (to the app, or to the waypoint), tracked
    (`entry`, from `connections.delivering`, entered before the upstream connect so
    no re-check misses it) for re-checks, then close its report: with DENY when a
    policy change revoked it. One revoked while connecting is reset as it starts.
    Returns the relay's result (the same-node fast path reports the source's end too).
    `upstream` None: the native engine delivered `client` itself and relays it (routes.py)."""
    result = await relay(inputs, "inbound", client, upstream, entry.abort)
    close_delivered(inputs, flow, entry, result.a_to_b, result.b_to_a)
    return result


def close_delivered(inputs: ProxyInputs, flow: Flow, entry: Delivered, received: int, sent: int) -> None:
    """Close the report of a connection the agent sent on: with DENY when a policy change
    revoked it (`entry.revoked`), with the reason when a steering change did."""
    revoked, telemetry = entry.revoked, inputs.telemetry
    if revoked is None:
        telemetry.close(flow, received=received, sent=sent)
    elif revoked.route == DENY:
        telemetry.denied(flow, revoked.policy, describe(revoked, entry), received=received, sent=sent)
    else:
        telemetry.close(flow, received=received, sent=sent, reason=describe(revoked, entry))


def inbound_header(src: Address, dst: Address, principal: str | None) -> dataplane.ProxyHeader:
    """What the waypoint's inbound listener is told of a connection from `src` to `dst`."""
    tlvs = ((dataplane.TLV_PRINCIPAL, principal.encode()),) if principal else ()
    return dataplane.ProxyHeader(src, dst, tlvs)


async def open_inbound(waypoint: WaypointHandle, header: dataplane.ProxyHeader):
    """A connection to the waypoint's inbound listener (within `waypoint.expecting`), or
    the reason there is none."""
    try:
        return await waypoint.open("inbound", header)
    except NodeagentError as exc:
        return str(exc)
