"""The source's connections in the native HBONE engine (agent/proxy/source_routes.py),
through the real relays of a loopback node (relay_world.py) whose original destinations
are a real BPF map (root): the agent carries the first connection to a service and teaches
the engine its route; the engine opens the next ones itself, byte-identical, each reported
as the agent reports its own (flow, Istio's TCP metrics, the tunnel's stream counts, the
pod's connection count); a policy change stops the routes before the next connection; a
stream the destination refuses before its 200 comes back to the agent and is reported and
reset as the agent's own; a pod at its connection cap is refused by the agent.
"""

from __future__ import annotations

import asyncio

import pytest

from engines import NATIVE_HBONE, engine_fixture
from identity_fixtures import run, until
from nodeagent.memory import MemoryGuard
from nodeagent.tunnel import TunnelSettings
from relay_world import CLIENT, LOG, SERVER, SERVICE, World, ended
from test_native_routes import DENY_SLEEP, echo_once, echo_rounds

pytestmark = pytest.mark.root  # the BPF map of original destinations
engine = engine_fixture((NATIVE_HBONE,))


@pytest.fixture
def node(tmp_path, monkeypatch, engine):
    def on_node(body, **kw):
        async def main():
            async with World(tmp_path, monkeypatch, engine=engine, origdst_map=True, **kw) as world:
                await body(world)
        run(main(), timeout=120)
    return on_node


def stats(w: World) -> dict:
    return w.hbone_engines.describe()["native"]


def source_flows(w: World) -> list[dict]:
    return [f for f in w.flows() if f["reporter"] == "source"]


async def learned(w: World) -> None:
    """The app up and one connection carried by the agent: the engine has the route."""
    await w.app.start()
    await echo_once(w, b"learn\n")
    await w.settled(flows=2)


async def relayed(w: World):
    """A connection to the service, its greeting (the app's: relayed, not queued) read."""
    reader, writer = await w.dial_out(SERVICE)
    greeting = await asyncio.wait_for(reader.readline(), 10)
    assert greeting.startswith(f"{CLIENT}:".encode())
    return reader, writer


def test_the_engine_opens_the_next_connections_to_a_service_itself(node):
    rounds = 5

    async def body(w: World):
        await w.app.start()
        sent = []
        for i in range(rounds):
            payload = f"round {i}\n".encode() * (50 + i)
            greeting = await echo_once(w, payload)
            sent.append((len(payload), len(greeting) + len(payload)))
            await w.settled(flows=2 * (i + 1))
        s = stats(w)
        # the first the agent carried (and learned the route from); the engine the rest
        assert (s["accepted"], s["streams_routed"], s["handed_back"]) == (rounds, rounds - 1, 0)
        flows = source_flows(w)
        assert [(f["verdict"], f["bytes_received"], f["bytes_sent"], f["security"]) for f in flows] == [
            ("allowed", received, app_sent, "mutual_tls") for received, app_sent in sent]
        # the engine's reported exactly as the agent's own (the first): who, to what, through where
        same = [{k: v for k, v in f.items() if k not in ("time", "bytes_received", "bytes_sent", "duration_ms")}
                for f in flows]
        for f in same:
            f["src"] = {**f["src"], "addr": f["src"]["addr"].rsplit(":", 1)[0]}
        assert same == [same[0]] * rounds
        assert (flows[0]["src"]["workload"], flows[0]["dst"]["service"], flows[0]["upstream"]) == (
            "sleep", "httpbin.mesh.svc.cluster.local", f"{SERVER}:{w.tunnel_port}")
        src = {"reporter": "source", "source_workload": "sleep", "destination_workload": "httpbin",
               "destination_service": "httpbin.mesh.svc.cluster.local"}
        assert w.value("nodeagent_hbone_streams_opened_total", direction="outbound") == rounds
        assert w.value("nodeagent_hbone_streams", direction="outbound") == 0
        assert w.value("nodeagent_outbound_connections_total") == rounds
        assert w.value("nodeagent_active_connections", direction="outbound") == 0
        assert w.value("nodeagent_relayed_bytes_total", direction="outbound", flow="sent") == sum(r for r, _ in sent)
        assert sum(s.value for f in w.registry.collect() for s in f.samples
                   if s.name == "istio_tcp_connections_closed_total"
                   and all(s.labels.get(k) == v for k, v in src.items())) == rounds
        assert w.memory.holdings.of(CLIENT) == 0
        assert w.capture.left() == 0
    node(body)


def test_a_policy_change_stops_the_out_routes_before_the_next_connection(node):
    async def body(w: World):
        await w.app.start()
        await echo_rounds(w, 2, b"allowed\n")
        assert stats(w)["streams_routed"] == 1
        w.apply(DENY_SLEEP)
        assert w.connections.recheck() == 0
        reader, writer = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"
        writer.close()
        await w.settled(flows=6)
        assert stats(w)["streams_routed"] == 1  # the agent's: the route is of another generation
        assert source_flows(w)[-1]["verdict"] == "failed"
        assert w.stream_refusals()[("outbound", "status_403")] == 1
    node(body)


def test_a_service_steered_through_the_waypoint_while_its_first_connection_connected_gets_no_route(node):
    """The agent learns a destination's out-route after its first connection's HBONE
    connect; Envoy ACKing a VirtualService for the service meanwhile (steering: a re-check,
    the out-generation moved) leaves it without one, so its next connections go through
    the waypoint. The route was given under the new generation, and the engine carried the
    service's connections around the client-side waypoint's routing."""
    async def body(w: World):
        await w.app.start()
        learn = w.outbound.routes.learn

        def learn_after_steering(via, dst):
            w.envoy_acks(outbound={SERVICE})
            w.connections.recheck()
            learn(via, dst)

        w.outbound.routes.learn = learn_after_steering
        await echo_once(w, b"first\n")
        await w.settled(flows=2)
        assert w.outbound.routes.describe()["routes"] == 0
    node(body)


def test_a_routed_stream_the_destination_refuses_is_reported_and_reset_by_the_agent(node):
    """The destination's policy denies what the source's routes still send (across nodes,
    each agent learns of a change in its own time): the engine's stream is refused before
    its 200 and handed back; the agent reports and resets it as its own refused connect."""
    async def body(w: World):
        await w.app.start()
        await echo_rounds(w, 2, b"allowed\n")
        w.apply(DENY_SLEEP)
        w.tunnel.routes.invalidate()  # the destination's side only: the source's routes stay
        reader, writer = await w.dial_out(SERVICE)
        writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await ended(reader) == "reset"
        writer.close()
        await w.settled(flows=6)
        s = stats(w)
        assert (s["streams_routed"], s["handed_back"]) == (2, 1)
        flow = source_flows(w)[-1]
        assert (flow["verdict"], flow["bytes_received"], flow["bytes_sent"]) == ("failed", 0, 0)
        assert w.failures()[("outbound", "hbone_status_403")] == 1
        assert w.stream_refusals()[("outbound", "status_403")] == 1
        assert len(w.app.peers) == 2  # the app never saw it
        assert w.value("nodeagent_hbone_streams", direction="outbound") == 0
        assert w.memory.holdings.of(CLIENT) == 0
    node(body)


def test_a_pod_at_its_connection_cap_is_refused_by_the_agent(node):
    """The engine opens no more than the pod's room (max_connections_per_pod): the
    connection past it comes to the agent, which refuses it."""
    async def body(w: World):
        await learned(w)
        held = []
        for i in range(2):
            held.append(await relayed(w))
            await until(lambda: w.outbound.routes.describe()["open"] == i + 1, what="the agent told of it")
        assert w.memory.holdings.of(CLIENT) == 2
        reader, writer = await w.dial_out(SERVICE)
        assert await ended(reader) == "reset"
        writer.close()
        assert w.failures()[("outbound", "pod_connection_limit")] == 1
        assert stats(w)["streams_routed"] == 2
        for reader, writer in held:
            writer.close()
        await w.settled(flows=6)
        assert w.memory.holdings.of(CLIENT) == 0
    node(body, memory=MemoryGuard(None, LOG, per_pod=2))


def test_outbound_in_engine_false_leaves_every_connection_to_the_agent(node):
    async def body(w: World):
        await w.app.start()
        await echo_rounds(w, 3, b"mine\n")
        s = stats(w)
        assert (s["listeners"], s["accepted"], s["streams_routed"]) == (0, 0, 0)
        assert w.outbound.routes.describe()["why"] == "outbound_in_engine=false"
        assert w.capture.left() == 0
    node(body, in_engine=False)


def test_a_connection_without_an_original_destination_is_refused(node):
    async def body(w: World):
        loop = asyncio.get_running_loop()
        sock = __import__("socket").socket()
        sock.bind((CLIENT, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, w.outbound_listener.getsockname())  # nothing recorded
        reader, writer = await asyncio.open_connection(sock=sock)
        assert await ended(reader) == "reset"
        writer.close()
        assert w.failures()[("outbound", "no_original_dst")] == 1
        assert stats(w)["accepted"] == 1
    node(body)


def test_a_pods_connections_in_the_engine_are_waited_for(node):
    """A removed pod's pool closes, and a rolling update's drain ends, only once the streams
    the engine opened for it have ended (SourceRoutes.drained)."""
    async def body(w: World):
        await learned(w)
        reader, writer = await relayed(w)
        await until(lambda: w.outbound.routes.describe()["open"] == 1, what="the agent told of it")
        routes, ctx = w.outbound.routes, w.enrolled[CLIENT]
        assert (await routes.drained(ctx, 0.05), await routes.drained(None, 0.05)) == (1, 1)
        waiting = asyncio.ensure_future(routes.drained(ctx))
        everything = asyncio.ensure_future(routes.drained(None))
        writer.write_eof()
        assert await ended(reader) == "eof"
        writer.close()
        assert await asyncio.wait_for(asyncio.gather(waiting, everything), 10) == [0, 0]
        assert await routes.drained(ctx, 0) == 0
    node(body)


def test_connections_past_a_pooled_connections_streams_go_on_another(node):
    """The server takes 2 streams a connection: the pool counts the engine's streams with
    its own, so a connection past them goes on a second pooled connection (the route then
    names it), none waits in a full one."""
    async def body(w: World):
        await learned(w)
        held = [await relayed(w) for _ in range(5)]
        assert w.hbone.connections() == 3  # 2 + 2 + 1
        assert stats(w)["streams_routed"] >= 3  # the ones that met a route with room; the rest the agent's
        for reader, writer in held:
            writer.close()
        await w.settled(flows=12)
        assert w.value("nodeagent_hbone_streams", direction="outbound") == 0
    node(body, tunnel=TunnelSettings(max_concurrent_streams=2))
