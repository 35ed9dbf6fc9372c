"""One waypoint per request, the agents' side (design.md "One waypoint per request"):
the source's agent, handed back a request whose route enforced the destination's HTTP
policy (TLV_ENFORCED, and its steering agrees), opens the stream with its node's own
identity and says so (ENFORCED_HEADER, SOURCE_HEADER); the destination's agent delivers
such a stream straight to the pod when the node holds that pod at that address with that
principal and the digest is what the pod's waypoint chain enforces now, tracks it under
that digest (a change resets it), and otherwise sends it through the chain or refuses it.
A workload's certificate says nothing of enforcement whatever its headers say. On the
loopback node of relay_world.py, for each engine of the data path."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from types import MappingProxyType

import pytest

from engines import NATIVE_HBONE, engine_fixture
from identity_fixtures import run, until
from nodeagent.identity.spiffe import node_identity
from nodeagent.tunnel import ConnectRefused, StreamReset
from nodeagent.xds.dataplane import (ENFORCED_HEADER, SOURCE_HEADER, TLV_ENDPOINT, TLV_ENFORCED, TLV_PRINCIPAL,
                                     ProxyHeader)
from policy_world import document
from relay_world import CLIENT, LEGACY, NODE, SERVER, SERVICE, TD, World, header_of, principal

SLEEP, HTTPBIN = principal("mesh", "sleep"), principal("mesh", "httpbin")
PING = b"ping\n"
DIGEST = "d1" * 16

engine = engine_fixture(("python", "native", NATIVE_HBONE))


@pytest.fixture
def node(tmp_path, monkeypatch, engine):
    def on_node(body):
        async def main():
            async with World(tmp_path, monkeypatch, engine=engine) as world:
                await body(world)
        run(main())
    return on_node


async def line(stream) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.read(64)
        assert chunk, f"the stream ended after {data!r}"
        data += chunk
    return data.decode()


def behind_the_waypoint(w: World, enforceable: str | None = DIGEST):
    """httpbin's app port has server-side HTTP policy (chain c1) a routing waypoint may
    enforce as `enforceable`."""
    port = w.app.address[1]
    return w.envoy_acks(inbound={(SERVER, port): "c1"},
                        enforceable={(SERVER, port): enforceable} if enforceable else {})


async def vouched(w: World, headers, node: str = NODE, source: str = CLIENT):
    """A stream to httpbin's app from `source`'s address with `node`'s agent identity."""
    pool = await w.hbone_client(identity=node_identity(TD, node), source=source)
    return await w.open_stream(pool, (SERVER, w.app.address[1]), headers)


def test_a_stream_its_node_vouches_for_is_delivered_past_the_waypoint_while_the_digest_holds(node):
    async def body(w: World):
        await w.app.start()
        envoy = behind_the_waypoint(w)
        stream = await vouched(w, ((ENFORCED_HEADER, DIGEST), (SOURCE_HEADER, SLEEP)))
        assert (await line(stream)).startswith(CLIENT + ":")  # the app, as the client pod
        assert envoy.accepted == [] and len(w.connections) == 1
        (entry,) = w.connections._delivered
        assert (entry.conn.source_principal, entry.enforced, entry.admission.chain) == (
            SLEEP, DIGEST, f"enforced:{DIGEST}")
        w.connections.recheck()  # nothing changed: it lives on
        assert len(w.connections) == 1
        envoy.enforceable = {(SERVER, w.app.address[1]): "d2" * 16}  # the pod's policy changed
        assert w.connections.recheck() == 1
        with pytest.raises(StreamReset):
            while await stream.read(65536):
                pass
        await w.settled(flows=1)
        (flow,) = w.flows()
        assert (flow["src"]["principal"], flow["src"]["workload"], flow["dst"]["principal"]) == (
            SLEEP, "sleep", HTTPBIN)
        assert w.value("nodeagent_inbound_connections_revoked_total", reason="waypoint") == 1
    node(body)


def test_a_stream_whose_digest_is_not_the_one_in_force_goes_through_the_waypoint_as_its_source(node):
    async def body(w: World):
        await w.app.start()
        envoy = behind_the_waypoint(w, enforceable="d0" * 16)
        await vouched(w, ((ENFORCED_HEADER, DIGEST), (SOURCE_HEADER, SLEEP)))
        await until(lambda: envoy.accepted, 5, "the stream through Envoy")
        kind, sock = envoy.accepted[0]
        header = header_of(sock)
        assert (kind, header.source[0], dict(header.tlvs)) == ("inbound", CLIENT, {TLV_PRINCIPAL: SLEEP.encode()})
    node(body)


# not-its-pod: from the address of another pod of the node (legacy), vouching for sleep
@pytest.mark.parametrize("case", ["no-headers", "another-principal", "another-node", "not-its-pod"])
def test_a_node_identity_vouching_for_what_it_does_not_hold_is_refused(node, case):
    async def body(w: World):
        await w.app.start()
        envoy = behind_the_waypoint(w)
        headers = {"no-headers": (), "another-principal": ((ENFORCED_HEADER, DIGEST), (SOURCE_HEADER, HTTPBIN)),
                   "another-node": ((ENFORCED_HEADER, DIGEST), (SOURCE_HEADER, SLEEP)),
                   "not-its-pod": ((ENFORCED_HEADER, DIGEST), (SOURCE_HEADER, SLEEP))}[case]
        with pytest.raises(ConnectRefused) as refused:
            await vouched(w, headers, node="node2" if case == "another-node" else NODE,
                          source=LEGACY if case == "not-its-pod" else CLIENT)
        assert refused.value.status == 403
        assert envoy.accepted == [] and w.app.peers == [] and len(w.connections) == 0
        assert w.failures() == {("inbound", "not_vouched"): 1}
    node(body)


def test_a_vouched_stream_is_still_held_to_its_policys_sources(node):
    """A node vouching for one of its pods cannot send it where the pod's policy's sources
    keep it out: the router's decision is taken for what only HTTP can say, the source
    (principal, namespace, address) and the port are checked here too."""
    async def body(w: World):
        await w.app.start()
        w.apply(document("AuthorizationPolicy", "mesh", "only-other", """
selector: {matchLabels: {app: httpbin}}
rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/other]}}], to: [{operation: {methods: [GET]}}]}]
"""))
        behind_the_waypoint(w)
        with pytest.raises(ConnectRefused) as refused:
            await vouched(w, ((ENFORCED_HEADER, DIGEST), (SOURCE_HEADER, SLEEP)))
        assert refused.value.status == 403 and w.app.peers == []
        await w.settled(flows=1)
        (flow,) = w.flows()
        assert (flow["verdict"], flow["src"]["principal"]) == ("denied", SLEEP)
        assert w.value("nodeagent_policy_denials_total", policy="no-allow-match") == 1
    node(body)


def test_a_vouch_the_destination_refuses_is_made_again_as_the_pod(node):
    """The destination's model may not have the source pod yet (or have it elsewhere):
    the source agent's stream goes again with the pod's own certificate, which the
    destination's waypoint then decides."""
    async def body(w: World):
        await w.app.start()
        port = w.app.address[1]
        envoy = w.envoy_acks(inbound={(SERVER, port): "c1"}, enforceable={(SERVER, port): DIGEST},
                             enforced={SERVICE: {(SERVER, port): DIGEST}})
        await w.identities.ready(w.identities.node)
        pods = dict(w.model.pods)
        pods[("mesh", "sleep")] = replace(pods[("mesh", "sleep")], node="node2")  # as the destination sees it
        w.model = replace(w.model, pods=MappingProxyType(pods))
        ours, theirs = socket.socketpair()
        tlvs = ((TLV_PRINCIPAL, SLEEP.encode()), (TLV_ENDPOINT, f"{SERVER}:{port}".encode()),
                (TLV_ENFORCED, DIGEST.encode()))
        w.handle(w.enrolled[CLIENT], "outbound", w.outbound.handle_upstream(ours, ProxyHeader((CLIENT, 0), SERVICE,
                                                                                           tlvs)))
        await until(lambda: envoy.accepted, 5, "the stream through the destination's waypoint")
        kind, sock = envoy.accepted[0]
        assert (kind, dict(header_of(sock).tlvs)) == ("inbound", {TLV_PRINCIPAL: SLEEP.encode()})
        assert w.failures() == {("inbound", "not_vouched"): 1}
        theirs.close()
    node(body)


def test_a_workload_certificate_says_nothing_of_enforcement(node):
    """What one stolen certificate can do: name any digest, and meet the waypoint all the same."""
    async def body(w: World):
        await w.app.start()
        envoy = behind_the_waypoint(w)
        pool = await w.hbone_client()
        await w.open_stream(pool, (SERVER, w.app.address[1]), ((ENFORCED_HEADER, DIGEST), (SOURCE_HEADER, SLEEP)))
        await until(lambda: envoy.accepted, 5, "the stream through Envoy")
        assert w.app.peers == []
    node(body)


def test_the_source_agent_vouches_for_a_request_its_route_enforced_and_its_steering_agrees(node):
    """Envoy hands back a request whose cluster says DIGEST (TLV_ENFORCED): the stream
    presents the node's identity and the destination delivers it past its waypoint; one
    whose steering says otherwise (or none) goes as before, through the destination's
    waypoint."""
    async def body(w: World):
        await w.app.start()
        port = w.app.address[1]
        envoy = w.envoy_acks(inbound={(SERVER, port): "c1"}, enforceable={(SERVER, port): DIGEST},
                             enforced={SERVICE: {(SERVER, port): DIGEST}})
        endpoint = f"{SERVER}:{port}".encode()
        await w.identities.ready(w.identities.node)  # the agent prefetches it with its pods' (sync)
        for said in (DIGEST, "d9" * 16, None):
            ours, theirs = socket.socketpair()
            tlvs = ((TLV_PRINCIPAL, SLEEP.encode()), (TLV_ENDPOINT, endpoint)) + (
                ((TLV_ENFORCED, said.encode()),) if said else ())
            w.handle(w.enrolled[CLIENT], "outbound", w.outbound.handle_upstream(ours, ProxyHeader((CLIENT, 0), SERVICE,
                                                                                               tlvs)))
            if said == DIGEST:
                reader, writer = await asyncio.open_connection(sock=theirs)
                assert (await reader.readline()).decode().startswith(CLIENT + ":")
                assert envoy.accepted == []
                writer.close()
            else:
                await until(lambda: len(envoy.accepted) == (1 if said else 2), 5, "the stream through Envoy")
                theirs.close()
        assert w.failures() == {}
    node(body)
