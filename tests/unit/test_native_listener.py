"""The native HBONE engine's listeners and out-routes (native/hbone.h "Listeners and
out-routes"): the engine accepts on a pod's outbound listener, reads and deletes the
original destination from a real BPF map of the capture's layout (origdst_map.py: root),
and opens the CONNECT itself on the out-route's connection, or hands the socket over with
what it found. Byte-identical relaying, the events in order, a route of another generation
or without room not used, and a routed stream that ends before its 200 (refused, no answer
in time) handing the client's socket back with its first bytes still in it.
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from hbone_certs import LOG, pki, run  # noqa: F401 (pki is a fixture)
from identity_fixtures import until
from origdst_map import KernelOriginalDestinations
from test_native_hbone import AUTH, NativeServer, built, drained, engine, exchange, native_client  # noqa: F401
from nodeagent.native import hbone
from nodeagent.tunnel import TunnelSettings

pytestmark = pytest.mark.root  # a BPF map
COOKIE = 4242
DST = ("10.96.0.10", 80)  # a service address: only the map and the route know it


class Owner:
    """The listener owner: every event, in order."""

    def __init__(self):
        self.events: list[tuple] = []

    def accepted(self, listener, sock, dst, client_port, tag, endpoint):
        self.events.append(("accepted", listener, sock, dst, client_port, tag, endpoint))

    def opened(self, listener, stream, conn, dst, client_port, tag, endpoint, authority):
        self.events.append(("opened", listener, stream, conn, dst, client_port, tag, endpoint, authority))

    def ended(self, listener, stream, end, sock, conn, dst, client_port, tag, endpoint):
        self.events.append(("ended", listener, stream, end, sock, conn, dst, client_port, tag, endpoint))

    def accept_failed(self, listener, error, pause):
        self.events.append(("accept_failed", listener, error, pause))

    def of(self, kind: str) -> list[tuple]:
        return [e for e in self.events if e[0] == kind]


class Pod:
    """A pod's outbound listener on loopback, its original destinations in a BPF map."""

    def __init__(self):
        self.origdst = KernelOriginalDestinations()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)

    async def dial(self, dst=DST) -> socket.socket:
        """The app connecting to `dst`, captured to the listener (recorded as connect4 would)."""
        client = socket.socket()
        client.bind(("127.0.0.1", 0))
        if dst is not None:
            self.origdst.record(COOKIE, socket.AF_INET, client.getsockname()[1], dst)
        client.setblocking(False)
        await asyncio.get_running_loop().sock_connect(client, self.sock.getsockname())
        return client

    def close(self):
        self.sock.close()
        self.origdst.close()


async def listening(eng, pod: Pod) -> tuple[hbone.Listener, Owner]:
    owner = Owner()
    eng.listener_owner = owner
    return eng.listen(pod.sock, pod.origdst.origdst_map_fd(), COOKIE), owner


async def routed(eng, pod: Pod, conn, tag: int, generation: int) -> tuple[hbone.Listener, Owner]:
    """The pod's listener in `eng`, without a limit of room, with an out-route for DST to
    `conn`, under `generation` (the engine's too)."""
    listener, owner = await listening(eng, pod)
    eng.set_out_generation(generation)
    listener.room(None, 0)
    listener.route(DST, [conn.id], [AUTH], tag=tag, generation=generation)
    return listener, owner


def test_without_a_route_the_connection_goes_to_the_owner_with_its_destination(pki):
    async def main():
        pod = Pod()
        async with engine() as eng:
            listener, owner = await listening(eng, pod)
            client = await pod.dial()
            bare = await pod.dial(dst=None)  # nothing recorded: a direct connection to the port
            await until(lambda: len(owner.of("accepted")) == 2, what="both handed over")
            (_, lid, sock, dst, port, tag, endpoint), (_, _, bare_sock, bare_dst, bare_port, _, _) = owner.events
            assert (lid, dst, port, endpoint) == (listener.id, DST, client.getsockname()[1], hbone.NO_ENDPOINT)
            assert (bare_dst, bare_port) == (None, bare.getsockname()[1])
            assert sock.getpeername() == client.getsockname()  # the client's own socket
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert pod.origdst.left() == 0  # read and deleted
            stats = eng.stats()
            assert (stats["listeners"], stats["accepted"], stats["streams_routed"]) == (1, 2, 0)
            listener.close()
            await until(lambda: eng.stats()["listeners"] == 0, what="the listener closed")
            for s in (sock, bare_sock, client, bare):
                s.close()
        pod.close()
    run(main())


@pytest.mark.parametrize("size", [64, 4 * 1024 * 1024])
def test_an_out_route_opens_the_stream_and_relays_byte_identical(pki, size):
    payload = os.urandom(size)

    async def main():
        pod = Pod()
        async with engine() as eng, NativeServer(eng, pki) as srv:
            conn = await native_client(eng, pki, srv.address)
            listener, owner = await routed(eng, pod, conn, tag=7, generation=3)
            client = await pod.dial()
            assert await exchange(client, payload) == payload  # echoed by the server's app
            await until(lambda: len(owner.of("ended")) == 1, what="the routed stream's end")
            (opened,), (ended,) = owner.of("opened"), owner.of("ended")
            _, lid, stream, conn_id, dst, port, tag, endpoint, authority = opened
            assert (lid, conn_id, dst, port, tag, endpoint, authority) == (
                listener.id, conn.id, DST, client.getsockname()[1], 7, 0, AUTH)
            _, _, end_stream, end, sock, _, _, _, _, _ = ended
            assert (end_stream, end.how, end.to_peer, end.from_peer, sock) == (stream, "closed", size, size, None)
            assert [r.authority for r in srv.requests] == [AUTH]
            assert owner.of("accepted") == []  # Python never saw it
            stats = eng.stats()
            assert (stats["accepted"], stats["streams_routed"], stats["handed_back"]) == (1, 1, 0)
            client.close()
            listener.close()
        pod.close()
    run(main())


def test_a_route_of_another_generation_or_without_room_is_not_used(pki):
    async def main():
        pod = Pod()
        async with engine() as eng, NativeServer(eng, pki) as srv:
            conn = await native_client(eng, pki, srv.address)
            listener, owner = await routed(eng, pod, conn, tag=1, generation=1)
            eng.set_out_generation(2)  # what decided it changed
            clients = [await pod.dial()]
            await until(lambda: len(owner.events) == 1, what="the first connection")
            assert owner.events[0][0] == "accepted" and owner.events[0][6] == hbone.NO_ENDPOINT  # dropped, unused
            listener.route(DST, [conn.id], [AUTH], tag=2, generation=2)
            listener.room(1, 0)
            for _ in range(2):
                clients.append(await pod.dial())
            await until(lambda: len(owner.events) == 3, what="two more")
            # the first by the route (heard of at its 200); the second met it without room:
            # handed over at once, with the route and endpoint it missed on
            (_, _, _, _, _, tag, endpoint), = owner.of("accepted")[1:]
            assert (tag, endpoint) == (2, 0)
            (_, _, _, _, _, _, tag, endpoint, _), = owner.of("opened")
            assert (tag, endpoint) == (2, 0)
            listener.room(1, 1)  # one seen: room for one more
            clients.append(await pod.dial())
            await until(lambda: len(owner.of("opened")) == 2, what="routed again")
            assert eng.stats()["streams_routed"] == 2
            assert listener.route(DST, [], [], tag=3, generation=2) is None  # removed
            clients.append(await pod.dial())
            await until(lambda: len(owner.of("accepted")) == 3, what="no route any more")
            assert owner.of("accepted")[-1][6] == hbone.NO_ENDPOINT
            for e in owner.of("accepted"):
                e[2].close()
            for c in clients:
                c.close()
            listener.close()
        pod.close()
    run(main())


def test_a_routed_stream_refused_or_unanswered_hands_the_socket_back_untouched(pki):
    async def main():
        pod = Pod()
        async with engine(TunnelSettings(open_timeout=0.5)) as eng, NativeServer(eng, pki, app="hold") as srv:
            conn = await native_client(eng, pki, srv.address)
            listener, owner = await routed(eng, pod, conn, tag=9, generation=0)
            refused = await pod.dial()
            refused.send(b"GET / HTTP/1.1\r\n\r\n")
            await until(lambda: len(srv.requests) == 1, what="the CONNECT")
            srv.requests[0].refuse(403)
            await until(lambda: len(owner.of("ended")) == 1, what="the refusal")
            _, _, _, end, sock, conn_id, dst, port, tag, endpoint = owner.of("ended")[0]
            assert (end.how, end.status, conn_id, dst, port, tag, endpoint) == (
                "refused", 403, conn.id, DST, refused.getsockname()[1], 9, 0)
            assert sock.getpeername() == refused.getsockname()
            assert sock.recv(100) == b"GET / HTTP/1.1\r\n\r\n"  # peeked only: the bytes are the caller's
            unanswered = await pod.dial()
            unanswered.send(b"hello")
            await until(lambda: len(srv.requests) == 2, what="the second CONNECT")
            await until(lambda: len(owner.of("ended")) == 2, what="the open timeout", timeout=10)
            _, _, _, end, late, _, _, _, _, _ = owner.of("ended")[1]
            assert (end.how, end.status) == ("timeout", 0)
            assert late.recv(100) == b"hello"
            await until(lambda: srv.requests[1].cancelled.done(), what="the server sees it reset")
            assert owner.of("opened") == [] and owner.of("accepted") == []
            assert eng.stats()["handed_back"] == 2
            for s in (sock, late, refused, unanswered):
                s.close()
            srv.requests[1].refuse(0)
            listener.close()
        pod.close()
    run(main())


def test_a_closed_listener_leaves_no_descriptor_behind(pki):
    """The engine's copies of the listening socket and of the map are closed with it."""
    async def main():
        pod = Pod()
        async with engine() as eng:
            before = len(os.listdir("/proc/self/fd"))
            listener, owner = await listening(eng, pod)
            assert len(os.listdir("/proc/self/fd")) == before + 2
            listener.close()
            await until(lambda: eng.stats()["listeners"] == 0, what="closed")
            await until(lambda: len(os.listdir("/proc/self/fd")) == before, what="its copies closed")
            assert owner.events == []
        pod.close()
    run(main())
