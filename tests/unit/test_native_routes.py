"""The destination's delivery by the native HBONE engine (agent/proxy/routes.py, the
Routes of native/hbone.h), through the real relays of a loopback node (relay_world.py):
once the agent delivered a CONNECT itself, the engine delivers the next ones of that
kind on that connection without asking, transparent and byte-identical, each reported
and tracked as any other; a recheck (a policy change) stops that before the next
CONNECT; and what the engine delivered under a change it had not been told of is reset
by the agent's own admission, reported denied.
"""

from __future__ import annotations

import pytest

from engines import NATIVE_HBONE, engine_fixture
from identity_fixtures import run, until
from nodeagent.agent.proxy.native_inbound import NativeRequest
from nodeagent.agent.proxy.routes import LOW_WATER, ROUTE_SOCKETS
from nodeagent.native import hbone
from policy_world import document
from relay_world import CLIENT, SERVER, SERVICE, World, ended

engine = engine_fixture((NATIVE_HBONE,))

DENY_SLEEP = document("AuthorizationPolicy", "mesh", "deny-sleep", """
action: DENY
rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/sleep]}}]}]
""")


@pytest.fixture
def node(tmp_path, monkeypatch, engine):
    def on_node(body):
        async def main():
            async with World(tmp_path, monkeypatch, engine=engine) as world:
                await body(world)
        run(main(), timeout=120)
    return on_node


def stats(w: World) -> dict:
    return w.hbone_engines.describe()["native"]


async def echo_once(w: World, payload: bytes) -> bytes:
    """One connection of the client pod to the service: the app's greeting (the client's
    address as the app saw it), then `payload` echoed, then EOF both ways."""
    reader, writer = await w.dial_out(SERVICE)
    greeting = await reader.readline()
    writer.write(payload)
    await writer.drain()
    assert await reader.readexactly(len(payload)) == payload
    await until(lambda: w.delivery.is_ours(w.app.peers[-1]))  # its delivery is known as ours while it lives
    writer.write_eof()
    assert await ended(reader) == "eof"
    writer.close()
    return greeting


async def echo_rounds(w: World, rounds: int, payload: bytes) -> None:
    """`rounds` connections one after the other (echo_once), each settled (its two flows)."""
    done = len(w.flows())
    for i in range(rounds):
        await echo_once(w, payload)
        await w.settled(flows=done + 2 * (i + 1))


def destination_flows(w: World) -> list[dict]:
    return [f for f in w.flows() if f["reporter"] == "destination"]


def test_the_engine_delivers_the_next_connects_of_a_delivered_kind(node):
    """The agent delivers the first CONNECT and gives its route ROUTE_SOCKETS sockets; the
    engine delivers the next ones, and once it holds LOW_WATER the route gets as many
    again in one batch."""
    rounds = 1 + ROUTE_SOCKETS - LOW_WATER

    async def body(w: World):
        await w.app.start()
        asked = len(w.sockets.asked)
        at_once = spy(w.tunnel, "delivered_at_once")
        sent = []
        for i in range(rounds):
            payload = f"round {i}\n".encode() * (100 + i)
            greeting = await echo_once(w, payload)
            assert greeting.startswith(f"{CLIENT}:".encode())  # as the client, whoever connected
            sent.append((len(payload), len(greeting) + len(payload)))
            await w.settled(flows=2 * (i + 1))
        s = stats(w)
        # the first the agent delivered; the engine the ones after it, the route topped up at the last
        assert (s["streams_delivered"], s["route_failures"], s["route_sockets"]) == (rounds - 1, 0, ROUTE_SOCKETS)
        transparent = [a for a in w.sockets.asked[asked:] if a[0] == "transparent"]
        # the agent's own delivery, the route's sockets, then the top-up
        assert len(transparent) == 1 + ROUTE_SOCKETS + (ROUTE_SOCKETS - LOW_WATER)
        assert [(f["verdict"], f["bytes_received"], f["bytes_sent"], f["security"]) for f in destination_flows(w)] == [
            ("allowed", received, app_sent, "mutual_tls") for received, app_sent in sent]
        assert w.value("nodeagent_hbone_streams_opened_total", direction="inbound") == rounds
        assert w.value("nodeagent_hbone_streams", direction="inbound") == 0
        assert len(w.connections) == 0 and len(w.app.peers) == rounds
        assert not any(w.delivery.is_ours(peer) for peer in w.app.peers)  # each released at its end
        assert at_once == [True] * (rounds - 1)  # nothing changed: each decided as its route was, no task
    node(body)


def spy(obj, name: str) -> list:
    """What each call of obj.name returned, in order."""
    returned, real = [], getattr(obj, name)

    def wrapper(*args):
        returned.append(real(*args))
        return returned[-1]
    setattr(obj, name, wrapper)
    return returned


def test_a_policy_change_resets_what_the_engine_delivered_at_once(node):
    """A connection delivered by the engine and booked at once is tracked as any other: the
    re-check after a DENY resets it and reports it denied, with its bytes."""
    async def body(w: World):
        await w.app.start()
        await echo_once(w, b"first\n")
        await w.settled(flows=2)
        at_once = spy(w.tunnel, "delivered_at_once")
        reader, writer = await w.dial_out(SERVICE)
        greeting = await reader.readline()
        writer.write(b"ping\n")
        assert await reader.readexactly(5) == b"ping\n"
        assert at_once == [True] and len(w.connections) == 1
        w.apply(DENY_SLEEP)
        assert w.connections.recheck() == 1
        assert await ended(reader) == "reset"
        writer.close()
        await w.settled(flows=4)
        flow = destination_flows(w)[-1]
        assert (flow["verdict"], flow["response_flags"], flow["bytes_received"], flow["bytes_sent"]) == (
            "denied", "DENY", 5, len(greeting) + 5)
        assert w.value("nodeagent_inbound_connections_revoked_total", reason="deny") == 1
        assert len(w.connections) == 0 and w.memory.holdings.of(SERVER) == 0
    node(body)


def test_a_policy_change_stops_the_routes_before_the_next_connect(node):
    async def body(w: World):
        await w.app.start()
        await echo_rounds(w, 2, b"allowed\n")
        assert stats(w)["streams_delivered"] == 1
        w.apply(DENY_SLEEP)
        assert w.connections.recheck() == 0  # nothing open to reset; the routes are stale now
        reader, writer = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"  # refused (403) by the agent: the app never saw it
        writer.close()
        await w.settled(flows=6)
        assert len(w.app.peers) == 2
        s = stats(w)
        assert (s["streams_delivered"], s["route_sockets"]) == (1, 0)  # the stale route dropped, its sockets closed
        assert destination_flows(w)[-1]["verdict"] == "denied"
        assert w.value("nodeagent_policy_denials_total", policy="mesh/deny-sleep") == 1
    node(body)


def test_a_change_between_a_delivery_and_its_route_leaves_no_route(node):
    """The agent delivers a CONNECT itself and gives the engine its route a loop round
    later (`offer`); a DENY applied and re-checked in between (the connection reset) leaves
    no route: the next CONNECT is the agent's to decide, and refused. A route given then was
    of the new generation, carrying the old admission past the change: the engine delivered
    the denied peer's next CONNECTs itself (before the agent's own check reset them)."""
    async def body(w: World):
        await w.app.start()
        routes = w.tunnel.routes
        offer = routes.offer

        def offer_after_a_change(*args):
            routes.offer = offer
            w.apply(DENY_SLEEP)
            assert w.connections.recheck() == 1
            offer(*args)

        routes.offer = offer_after_a_change
        reader, writer = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"  # delivered, then revoked by the re-check
        writer.close()
        assert routes.offer is offer  # the route was offered (after the change)
        reader, writer = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"  # refused by the agent: the app never saw it
        writer.close()
        await w.settled(flows=4)
        s = stats(w)
        assert (s["streams_delivered"], s["route_sockets"], len(w.app.peers)) == (0, 0, 1)
        assert destination_flows(w)[-1]["verdict"] == "denied"
    node(body)


def test_what_the_engine_delivered_under_a_change_it_was_not_told_of_is_reset(node):
    async def body(w: World):
        await w.app.start()
        await echo_once(w, b"allowed\n")
        await w.settled(flows=2)
        w.apply(DENY_SLEEP)  # no recheck: the engine's generation is the route's still
        reader, writer = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"  # delivered by the engine, reset by the agent's admission
        writer.close()
        await w.settled(flows=4)
        assert stats(w)["streams_delivered"] == 1 and len(w.app.peers) == 2
        flow = destination_flows(w)[-1]
        assert (flow["verdict"], flow["response_flags"]) == ("denied", "DENY")
        assert w.value("nodeagent_hbone_streams_refused_total", direction="inbound", reason="policy_denied") == 1
        assert len(w.connections) == 0
        # and that moved the generation: the next one is the agent's to decide, and refused
        reader, writer = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"
        writer.close()
        await w.settled(flows=6)
        assert stats(w)["streams_delivered"] == 1 and len(w.app.peers) == 2
    node(body)


def test_a_delivered_stream_that_ended_before_the_agent_heard_of_it_counts_as_opened(node):
    """The engine answers 200 and relays before the agent's loop hears of the CONNECT, so
    its end can come in the same batch of events, ahead of the agent's answer: it was
    opened all the same (without this, the kernel tier read 5-16 of 20 right after its
    client was done, some of them never to come)."""
    async def body(w: World):
        engine = w.hbone_engines.engine
        request = hbone.Request(engine, 987654, None, ((":authority", f"{SERVER}:80"),), delivered=40000)
        request.ended.set_result(hbone.End("closed", to_peer=5, from_peer=5))  # settled first by its STREAM_END
        NativeRequest(request, w.tunnel.native.metrics).respond(200)
        assert w.value("nodeagent_hbone_streams_opened_total", direction="inbound") == 1
        unanswered = hbone.Request(engine, 987655, None, ((":authority", f"{SERVER}:80"),))
        unanswered.cancelled.set_result(8)  # one the agent answers after the client reset it: not opened
        NativeRequest(unanswered, w.tunnel.native.metrics).respond(200)
        assert w.value("nodeagent_hbone_streams_opened_total", direction="inbound") == 1
    node(body)
