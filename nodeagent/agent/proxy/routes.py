"""The destination's delivery by the native HBONE engine, without a round through this
loop (docs/design.md "Delivery by the engine", issue 11).

Once this agent delivered a CONNECT itself (tunnel_inbound.py), it gives the engine a
route for more of its kind on that HBONE connection (one peer identity, one source IP):
sockets made in the pod's netns as `Delivery.connect` makes them (transparent, marked,
bound to the client's IP), not connected, and the generation of what decided it, given
again in a batch when the engine is down to a few. While
the engine's generation is still the route's, it delivers the next CONNECTs to that
:authority itself (connect, 200, relay) and this agent hears of each afterwards (a
request with `delivered`), admits it again as any other, and resets one it would not have
delivered. Every change of what decides delivery moves the generation first
(`invalidate`): a recheck (policies, steering, the model: InboundConnections.changing), a
pod leaving, the memory guard refusing, so no CONNECT the engine reads after such a
change goes by a route made before it. A pod's connection cap bounds the sockets given
(`Holdings.room`), so the engine never delivers past it. What the agent's admission of a
route's first CONNECT decided is kept with it (`Known`): a CONNECT the engine delivered under
the generation still in force would be decided the same way again (same peer, same source
IP, same :authority, nothing changed), so TunnelInbound does its bookkeeping at once, in the
engine's batch of events, without a task (`known`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from contextlib import ExitStack
from dataclasses import dataclass

from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.proxy.delivery import Delivery
from nodeagent.agent.proxy.hbone_native import HboneEngines
from nodeagent.agent.proxy.native_inbound import NativeRequest
from nodeagent.agent.proxy.telemetry import Peer
from nodeagent.memory import MemoryGuard
from nodeagent.model import Service
from nodeagent.native import hbone
from nodeagent.policy import Connection

Address = tuple[str, int]
ROUTE_SOCKETS = 8  # sockets a route is given when this agent delivered (the most the engine keeps for one)...
LOW_WATER = 2  # ...and given again, in one command, once the engine used all but this many


@dataclass(frozen=True)
class Known:
    """What the agent's admission of a route's first CONNECT decided (delivered), and under
    what: the same for every CONNECT of the route while the generation, the policies and
    the waypoint's steering are these (TunnelInbound.delivered_at_once checks the last two
    too, so a change that forgot to move the generation is still re-admitted)."""

    ctx: PodContext
    conn: Connection  # as admitted: the peer's IP and identity, the pod and its port
    source: Peer  # the destination's report of them (open_flow)
    destination: Peer
    service: Service | None
    generation: int
    policies: object  # the PolicySet in force (replaced, never changed, by an update)
    dataplane: object  # the waypoint's ACKed steering


class _Given:
    """The sockets one route was given that the engine may still hold: the client's IP
    they are bound to, and how many on each port; what decided the route."""

    def __init__(self, ip: str):
        self.ip = ip
        self.ports: collections.Counter[int] = collections.Counter()
        self.known: Known | None = None

    def __len__(self) -> int:
        return sum(self.ports.values())


class Routes:
    def __init__(self, delivery: Delivery, engines: HboneEngines | None, memory: MemoryGuard, log: logging.Logger):
        self.delivery, self.engines, self.memory, self.log = delivery, engines, memory, log
        self.generation = 1
        self._given: dict[tuple[int, str], _Given] = {}  # (engine connection id, :authority) -> its sockets
        self._watched: set[int] = set()  # connections whose end releases what they were given
        self._told = None  # the engine last told the generation (a new one starts at 0)

    def _engine(self):
        return self.engines.engine if self.engines is not None and self.engines.native else None

    def invalidate(self) -> None:
        """What decides delivery changed: the engine uses no route given before."""
        self.generation += 1
        self._tell(self._engine())
        for key in list(self._given):
            self._release(key)

    def delivered(self, request: hbone.Request, client_ip: str, ends: ExitStack) -> bool:
        """`request` came delivered by the engine: the address of the socket it used (bound
        to `client_ip`) counts as ours (a connection steered back from it is a loop) until
        `ends` closes. True when its route is down to LOW_WATER (`offer` is due)."""
        given = self._given.get((request.conn.id, request.authority))
        port = request.delivered
        counted = given is not None and given.ports[port] > 0
        if counted:
            given.ports[port] -= 1
            if not given.ports[port]:
                del given.ports[port]
        self.delivery.adopt((client_ip, port), ends, counted)
        return given is None or len(given) <= LOW_WATER

    def known(self, request: hbone.Request) -> Known | None:
        """What decided the route `request` was delivered on, when that route's generation,
        the engine's as it read the CONNECT and the agent's now are one: nothing that decides
        delivery changed in between."""
        given = self._given.get((request.conn.id, request.authority))
        known = given.known if given is not None else None
        if known is None or not known.generation == request.generation == self.generation:
            return None
        return known

    def offer(self, ctx: PodContext, request: hbone.Request, src: Address, dst: Address, known: Known) -> None:
        """After `stream` was delivered (by this agent, or by the engine on a route), give
        the engine sockets for more CONNECTs of its kind, up to ROUTE_SOCKETS: when it asked
        (it holds none for it any more), and when its route is down to LOW_WATER, in one
        command made in one entry into the pod's netns (one per delivery was a command, a
        wake-up of the engine's thread and two setns calls for each connection); none past
        the pod's connection cap or while the memory guard refuses new work for the pod.
        None when `known`, the admission that decided it, was made under a generation a
        change has replaced since (this runs a loop round or a delivery's connect after
        it): a route given now would be of the new generation and carry the old decision
        past the change (a peer denied in between had its next CONNECTs delivered)."""
        engine = self._engine()
        conn = request.conn
        if engine is None or conn.closed.done() or self.memory.refuses(ctx.pod.ip) \
                or known.generation != self.generation:
            return
        if engine is not self._told:
            self._tell(engine)
        key = (conn.id, request.authority)
        if request.delivered is None:
            self._release(key)  # the engine dropped what it held of this route, or used it all
        given = self._given.setdefault(key, _Given(src[0]))
        given.known = known
        if conn.id not in self._watched:
            self._watched.add(conn.id)
            conn.closed.add_done_callback(lambda _: self._ended(conn.id))
        if request.delivered is not None and len(given) > LOW_WATER:
            return
        want = ROUTE_SOCKETS - len(given)
        room = self.memory.holdings.room(ctx.pod.ip)
        count = want if room is None else min(want, room - len(given))
        if count <= 0:
            return
        try:
            socks = self.delivery.unconnected(ctx, src, count)
        except OSError as exc:  # Delivery.connect will say it when it meets it
            self.log.debug("no route socket for %s to %s: %s", src[0], ctx, exc)
            return
        ports = [sock.getsockname()[1] for sock in socks]
        try:
            conn.route(request.authority, dst, socks, self.generation)
        except OSError as exc:  # the engine stopped: it closed the sockets
            for port in ports:
                self.delivery.release((src[0], port))
            self.log.debug("route for %s to %s not taken: %s", src[0], ctx, exc)
            return
        given.ports.update(ports)

    def later(self, ctx: PodContext, stream, src: Address, dst: Address, known: Known) -> None:
        """`offer` once the current step of the loop is done (after the answer went out),
        for a stream of the native engine; nothing for the Python engine's."""
        if isinstance(stream, NativeRequest) and self._engine() is not None:
            asyncio.get_running_loop().call_soon(self.offer, ctx, stream.request, src, dst, known)

    def _tell(self, engine) -> None:
        if engine is not None:
            engine.set_generation(self.generation)
        self._told = engine

    def _release(self, key: tuple[int, str]) -> None:
        given = self._given.pop(key, None)
        if given is not None:
            for port, count in given.ports.items():
                for _ in range(count):
                    self.delivery.release((given.ip, port))

    def _ended(self, conn_id: int) -> None:
        self._watched.discard(conn_id)
        for key in [k for k in self._given if k[0] == conn_id]:
            self._release(key)
