"""Nagle off on every TCP socket the agent relays on (issue 11): the agent makes its
sockets as `socket.socket(family, SOCK_STREAM)`, whose Python `proto` is 0, so asyncio
never sets TCP_NODELAY on them, and a small write behind unacknowledged bytes waited for
the peer's delayed ACK (a new connection per HTTP request paid ~45 ms twice through
HBONE). Checked on the sockets themselves (getsockopt), not by timing: the in-pod
listener's accepted sockets, and both ends of an HBONE connection whose caller hands the
pool a socket with Nagle on, over which sequential streams (a new client connection
each) share one TLS connection. The live agent's sockets: tests/kernel/test_agent_tunnel.py."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field

from hbone_certs import Loopback, pki, round_trip, run  # noqa: F401 (pki is a fixture)
from nodeagent.agent.inpod.sockets import InPodListener
from nodeagent.nodelay import set_nodelay

STREAMS = 20


def nodelay(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@dataclass
class RecordingLoopback(Loopback):
    """Loopback whose pool's connect hands out sockets as the agent makes them (proto 0,
    Nagle on), kept to look at."""
    made: list = field(default_factory=list)

    def _connect(self, ip: str, port: int) -> socket.socket:
        sock = super()._connect(ip, port)
        self.made.append(sock)
        return sock


class Pod:
    """The PodContext an InPodListener reports its connections to."""

    def track(self, direction: str, task: asyncio.Task) -> None:
        pass


def test_set_nodelay_turns_nagle_off_on_tcp_and_leaves_other_sockets_be():
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(family, socket.SOCK_STREAM) as tcp:
            assert tcp.proto == 0 and not nodelay(tcp)  # as the agent makes them: asyncio leaves Nagle on
            set_nodelay(tcp)
            assert nodelay(tcp)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        set_nodelay(unix)  # the waypoint's sockets: no Nagle to turn off, no error
    closed = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    closed.close()
    set_nodelay(closed)  # its own use reports the problem


def test_the_in_pod_listener_hands_over_sockets_with_nagle_off():
    async def main():
        accepted: list[socket.socket] = []
        done = asyncio.Event()

        async def handler(ctx, conn: socket.socket) -> None:
            accepted.append(conn)
            if len(accepted) == 3:
                done.set()

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        assert not nodelay(listener)
        inpod = InPodListener(listener, Pod(), "outbound", handler, logging.getLogger("test.nodelay"))
        inpod.start()
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            await asyncio.wait_for(done.wait(), 5)
            assert [nodelay(conn) for conn in accepted] == [True] * 3
        finally:
            inpod.close()
            for sock in clients + accepted:
                sock.close()
    run(main())


def test_sequential_streams_share_one_tls_connection_with_nagle_off_at_both_ends(pki):
    async def main():
        async with RecordingLoopback(pki) as lb:
            for i in range(STREAMS):  # one CONNECT per client connection, as an app opening one per request
                stream = await lb.open()
                await round_trip(stream, b"GET /%d HTTP/1.1\r\n\r\n" % i)
                await asyncio.wait_for(stream.wait_closed(), 5)
            assert lb.connects == 1 and lb.pool.connections() == 1
            assert lb.value("nodeagent_hbone_streams_opened_total", direction="inbound") == STREAMS
            (made,) = lb.made
            (server_side,) = lb.server.sessions
            assert nodelay(made) and nodelay(server_side.transport.get_extra_info("socket"))
    run(main())

