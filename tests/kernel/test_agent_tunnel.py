"""The agent's HBONE on one real node: `python -m nodeagent run` with a mesh CA in a
throwaway sandbox (nodeagent.agent.sandbox), two meshed pods and an unmeshed one.

Meshed to meshed on the same node goes through the tunnel with the client's address
and principal, exactly counted; bad clients on a pod's real port 15008 (not TLS, no
client certificate, another CA's, an expired one, another trust domain's, a valid one
sending truncated HTTP/2) are refused and counted, and a connection held open through
the tunnel meanwhile, like new ones after, never notices.
"""

from __future__ import annotations

import json
import secrets
import subprocess

import pytest

from hbone_attacks import attack, refusals
from nodeagent.agent.probe import HoldClient
from nodeagent.agent.sandbox import AMBIENT, Sandbox, SandboxPod

pytestmark = pytest.mark.root
PORT = 9000
PRINCIPAL = "spiffe://cluster.local/ns/app/sa/default"


@pytest.fixture
def mesh(tmp_path):
    """client and server (namespace app, meshed), legacy (namespace plain); the probe
    server runs in server; the CA and the agent run, the server holds a certificate."""
    sb = Sandbox(f"test-{secrets.token_hex(3)}", workdir=tmp_path)
    try:
        sb.setup()
        client, server, legacy = sb.add_pod("app", "client"), sb.add_pod("app", "server"), sb.add_pod("plain", "legacy")
        sb.write_pods()
        sb.label_namespace("app", AMBIENT)
        sb.label_namespace("plain", {})
        sb.serve(server, PORT)
        sb.in_pod(client, ["sleep", "infinity"])  # a pod is found by its processes
        sb.start_ca()
        sb.start_agent(*sb.ca_args())
        sb.wait_for(lambda s: len(s["pods"]) == 2 and [i["valid"] for i in s["identity"]["identities"]] == [True],
                    15, "both pods enrolled and their certificate held")
        yield sb, client, server, legacy
    finally:
        left = sb.close()
        assert left == [] and sb.leftovers() == []


def connect(sb: Sandbox, src: SandboxPod, dst: SandboxPod, count: int) -> dict:
    proc = sb.probe(src, "connect", f"{dst.ip}:{PORT}", "--count", str(count), "--timeout", "5",
                    stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=120)
    return json.loads(out)


def test_same_node_meshed_traffic_goes_through_the_tunnel(mesh):
    sb, client, server, legacy = mesh
    result = connect(sb, client, server, 20)
    assert result["ok"] == 20 and result["peers"] == {client.ip: 20}  # the app saw the client's own address
    c = sb.status()["counters"]
    assert c["hbone_streams_opened_total{direction=inbound}"] == 20
    assert c["hbone_streams_opened_total{direction=outbound}"] == 20
    assert c.get("passthrough_connections_total", 0) == 0
    assert c["inbound_connections_total"] == 20 and c["outbound_connections_total"] == 20
    with open(sb.layout.flow_log(sb.node)) as f:
        flows = [json.loads(line) for line in f]
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
    assert sb.status()["counters"]["hbone_streams_opened_total{direction=inbound}"] == 6
