"""An HBONE connection that has ended leaves nothing behind on the server, also when a
stream's handler outlives it (what rapid reset does: the client resets its streams and
closes while the agent still connects them to the app). Each such connection used to
stay alive for `idle_timeout` (600 s): the handler's return re-armed the connection's
idle timer after connection_lost had stopped it, and the timer kept the Session, its TLS
transport and asyncio's 256 KiB read buffer (~350 KB a connection; the soak's node2 grew
15 MiB a minute under 60 such connections a minute).
"""

from __future__ import annotations

import asyncio
import gc
import weakref

from hbone_certs import Loopback, pki, run  # noqa: F401 (pki is a fixture)
from identity_fixtures import until
from nodeagent.tunnel.liveness import Liveness
from nodeagent.tunnel.settings import TunnelSettings
from test_hbone_resets import RawClient

CONNECTIONS = 20


def test_connections_whose_handlers_outlive_them_are_freed_at_once(pki):
    """20 connections, each with one stream whose handler returns only after the client
    has closed the connection: once the handlers are done, none of the 20 server
    Sessions (nor their TLS transports) is alive — no timer of theirs is left on the loop."""
    async def main():
        gone = asyncio.Event()
        handled = []

        async def on_stream(info, reader, stream):
            stream.respond(200)
            await gone.wait()  # the app connect still under way when the client leaves
            handled.append(info)

        sessions, transports = [], []
        async with Loopback(pki, on_stream) as lb:
            for _ in range(CONNECTIONS):
                client = await RawClient.connect(lb)
                client.open()
                assert await client.ping()  # the server has taken the stream in
                (session,) = lb.server.sessions
                sessions.append(weakref.ref(session))
                transports.append(weakref.ref(session.transport))
                del session
                client.close()  # the client goes; the handler has not returned
                await until(lambda: not lb.server.sessions, 5, "the server to see the connection end")
            gone.set()
            await until(lambda: len(handled) == CONNECTIONS and not lb.server._tasks, 5, "every handler to return")
            gc.collect()
            assert sum(ref() is not None for ref in sessions) == 0
            assert sum(ref() is not None for ref in transports) == 0
            assert lb.value("nodeagent_hbone_connections", direction="inbound") == 0
    run(main())


def test_a_stopped_liveness_arms_no_timer():
    """stop() is final: a stream ending after the connection is lost (busy(False)) and a
    late start() arm nothing (each timer would hold the session until it fired)."""
    async def main():
        liveness = Liveness(asyncio.get_running_loop(), TunnelSettings(), 600.0, ping=lambda: None,
                            dead=lambda: None, idle=lambda: None)
        liveness.start()
        liveness.busy(False)
        armed = [liveness._tick_handle, liveness._idle_handle]
        liveness.stop()
        liveness.busy(True)
        liveness.busy(False)
        liveness.start()
        assert [handle.cancelled() for handle in armed] == [True, True]
        assert (liveness._tick_handle, liveness._idle_handle) == (None, None)
    run(main())
