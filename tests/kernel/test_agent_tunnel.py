"""The agent's HBONE on one real node: `python -m nodeagent run` with a mesh CA in a
throwaway sandbox (nodeagent.bench.sandbox), two meshed pods and an unmeshed one.

Meshed to meshed on the same node goes through the tunnel with the client's address
and principal, exactly counted; bad clients on a pod's real port 15008 (not TLS, no
client certificate, another CA's, an expired one, another trust domain's, a valid one
sending truncated HTTP/2) are refused and counted, and a connection held open through
the tunnel meanwhile, like new ones after, never notices. A client with a valid
certificate cannot aim a stream at another pod or at the agent's own ports: each is
answered 400 and counted, and its connection goes on serving good streams. Every
connection the agent relays has Nagle off (issue 11), read from the live agent's own
sockets.
"""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from agent_sockets import connected_tcp_sockets
from hbone_attacks import aim, attack, labelled, refusals
from nodeagent.agent.config import SETTINGS
from nodeagent.bench.probe import HoldClient
from meshed_sandbox import PORT, inbound_counted, meshed_sandbox
from nodeagent.bench.sandbox import Sandbox, SandboxPod, scaled

pytestmark = pytest.mark.root
PRINCIPAL = "spiffe://cluster.local/ns/app/sa/default"


def default(name: str):
    """A setting's default as the sandbox's agent runs with it."""
    setting = next(s for s in SETTINGS if s.name == name)
    return setting.parse(setting.default)


# The agent's own ports: tunnel, outbound, inbound, admin (15008, 15001, 15006, 15020).
AGENT_PORTS = (default("tunnel_port"), default("outbound_port"), default("inbound_port"),
               default("admin_address")[1])


@pytest.fixture(params=["auto", "python"])
def mesh(tmp_path, request):
    """client and server (namespace app, meshed), legacy (namespace plain); the probe
    server runs in server; the CA and the agent run, the server holds a certificate.
    Client to server is HBONE here: the same-node fast path (on by default; its own
    tests are test_same_node.py) is off. Each test runs on both HBONE engines: the
    default (auto: the native engine where it is built) and the Python fallback."""
    with meshed_sandbox(tmp_path, "legacy", "--no-same-node-fast-path", "--hbone-engine", request.param) as (
            sb, client, server, legacy, app):
        yield sb, client, server, legacy


def connect(sb: Sandbox, src: SandboxPod, dst: SandboxPod, count: int) -> dict:
    proc = sb.probe(src, "connect", f"{dst.ip}:{PORT}", "--count", str(count), "--timeout", f"{scaled(5):g}",
                    stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=scaled(120))
    return json.loads(out)


def test_same_node_meshed_traffic_goes_through_the_tunnel(mesh):
    sb, client, server, legacy = mesh
    result = connect(sb, client, server, 20)
    assert result["ok"] == 20 and result["peers"] == {client.ip: 20}  # the app saw the client's own address
    c = inbound_counted(sb, 20)
    assert c["hbone_streams_opened_total{direction=inbound}"] == 20
    assert c["hbone_streams_opened_total{direction=outbound}"] == 20
    assert c.get("passthrough_connections_total", 0) == 0
    assert c["inbound_connections_total"] == 20 and c["outbound_connections_total"] == 20
    sb.wait_for(lambda _: len(sb.flows()) >= 40, 10, "both ends' flow lines")
    flows = sb.flows()
    inbound = [f for f in flows if f["reporter"] == "destination"]
    assert len(inbound) == 20 and len(flows) == 40  # each connection reported by both ends
    assert {(f["src"]["principal"], f["security"], f["bytes_received"], f["verdict"]) for f in inbound} == {
        (PRINCIPAL, "mutual_tls", len(b"ping\n"), "allowed")}
    plain = connect(sb, legacy, server, 5)  # unmeshed: plaintext inbound, PERMISSIVE
    assert plain["ok"] == 5 and plain["peers"] == {legacy.ip: 5}


def test_bad_clients_on_the_real_tunnel_port_are_refused_and_harm_no_one(mesh):
    sb, client, server, legacy = mesh
    held = HoldClient(sb.probe(client, "hold", f"{server.ip}:{PORT}", stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, bufsize=1))
    try:
        assert held.greeting.startswith(client.ip + ":") and held.echo("before") == "before"
        results = attack(sb, legacy, server.ip)
        assert results == {"garbage": "closed", "no_client_cert": "closed", "foreign_ca": "closed",
                           "expired": "closed", "foreign_trust_domain": "closed", "truncated_h2": "sent"}
        expected = {("handshake", "not_tls"): 1, ("handshake", "no_client_cert"): 1, ("handshake", "unknown_ca"): 1,
                    ("handshake", "cert_expired"): 1, ("handshake", "identity"): 1, ("error", "truncated"): 1}
        sb.wait_for(lambda s: refusals(s["counters"]) == expected, 10, f"refusals counted as {expected}")
        assert held.echo("after") == "after"
    finally:
        held.close()
    assert connect(sb, client, server, 5)["ok"] == 5
    assert inbound_counted(sb, 6)["hbone_streams_opened_total{direction=inbound}"] == 6


def test_a_valid_client_cannot_aim_a_stream_at_another_pod_or_at_the_agent(mesh):
    """The :authority must be the dialled pod's IP and not one of the agent's ports: a
    compromised workload's valid certificate buys no reach beyond that pod's own apps."""
    sb, client, server, legacy = mesh
    aimed = [f"{client.ip}:{PORT}", *(f"{server.ip}:{port}" for port in AGENT_PORTS)]
    result = aim(sb, legacy, server.ip, PORT, aimed)
    assert result["refused"] == {authority: 400 for authority in aimed} and result["goaway"] is None
    then = result["then"]
    assert (then["status"], then["echo"]) == (200, "ping")  # the same connection still serves
    assert then["greeting"].startswith(legacy.ip + ":")  # delivered as the client
    principal = "spiffe://cluster.local/ns/plain/sa/default"

    def attacker_flows() -> list[dict]:
        return [f for f in sb.flows() if f["reporter"] == "destination" and f["src"]["principal"] == principal]
    c = sb.wait_for(lambda _: len(attacker_flows()) == len(aimed) + 1, 10, "the attacker's flows closed")["counters"]
    assert labelled(c, "connection_failures_total") == {"hbone_bad_destination": len(aimed)}
    assert labelled(c, "hbone_streams_refused_total") == {"bad_destination": len(aimed)}
    assert c["hbone_streams_opened_total{direction=inbound}"] == 1  # only the good stream reached the app
    assert c["inbound_connections_total"] == len(aimed) + 1
    *refused, good = attacker_flows()
    assert [(f["dst"]["addr"], f["verdict"], f["response_flags"], f["reason"]) for f in refused] == [
        (f"{client.ip}:{PORT}", "failed", "CONNECT",
         f":authority {client.ip}:{PORT} is not this pod ({server.ip}); the source's model is stale?"),
        *((f"{server.ip}:{port}", "failed", "CONNECT", f":authority port {port} is one of the agent's own ports")
          for port in AGENT_PORTS)]
    assert (good["dst"]["addr"], good["verdict"], good["bytes_received"]) == (
        f"{server.ip}:{PORT}", "allowed", len(b"ping\n"))


def nagle_off(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_every_connection_the_agent_relays_has_nagle_off(mesh):
    """Issue 11: asyncio turns Nagle off only on sockets made with proto IPPROTO_TCP, and
    the agent makes its own with 0 — in-pod accepts, its HBONE connection, deliveries —
    so a small write behind unacknowledged bytes waited for the peer's delayed ACK (a new
    connection per HTTP request through HBONE: ~45 ms, twice). Read from the live agent
    while one meshed and one plaintext connection are held open through it."""
    sb, client, server, legacy = mesh
    meshed = HoldClient(sb.probe(client, "hold", f"{server.ip}:{PORT}", stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, bufsize=1))
    plain = HoldClient(sb.probe(legacy, "hold", f"{server.ip}:{PORT}", stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, bufsize=1))
    try:
        assert meshed.echo("meshed") == "meshed" and plain.echo("plain") == "plain"
        pods = {client.ip, server.ip, legacy.ip}
        relayed = sorted((local[1] if local[1] in (15001, 15008, PORT) else peer[1], off)
                         for local, peer, off in connected_tcp_sockets(sb.agent.pid, nagle_off)
                         if local[0] in pods or peer[0] in pods or local[1] == 15001)
        assert relayed == sorted([
            (15001, True),  # the meshed client's connection, accepted in its pod
            (15008, True), (15008, True),  # the HBONE connection, the pool's end and the server's
            (PORT, True), (PORT, True),  # deliveries to the app, meshed and plaintext
            (PORT, True),  # the plaintext client's connection, steered to 15006 and accepted there
        ])
    finally:
        meshed.close()
        plain.close()
