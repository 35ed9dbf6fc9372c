"""The agent with `--hbone-engine native` on one real node (a throwaway sandbox, as
test_agent_tunnel.py runs it): meshed traffic crosses the native HBONE engine with the
client's address and principal, exactly counted by both reports, over one pooled
connection, and status says which engine carries HBONE; the bad clients of
test_agent_tunnel.py are refused with the same labels. The attacks on the tunnel port
(rapid reset, streams reset once relayed, the handshake flood) run against both engines
in test_rapid_reset.py and test_handshake_flood.py.
"""
from __future__ import annotations

import subprocess

import pytest

from meshed_sandbox import PORT, inbound_counted, meshed_sandbox
from nodeagent.bench.probe import HoldClient
from nodeagent.native import openssl
from hbone_attacks import attack, refusals
from test_agent_tunnel import PRINCIPAL, connect

pytestmark = pytest.mark.root


@pytest.fixture
def mesh(tmp_path):
    with meshed_sandbox(tmp_path, "attacker", "--no-same-node-fast-path", "--hbone-engine", "native") as (
            sb, client, server, attacker, app):
        yield sb, client, server, attacker, app


def test_meshed_traffic_crosses_the_native_engine(mesh):
    sb, client, server, attacker, app = mesh
    result = connect(sb, client, server, 20)
    assert result["ok"] == 20 and result["peers"] == {client.ip: 20}
    c = inbound_counted(sb, 20)
    status = sb.status()
    assert c["hbone_streams_opened_total{direction=inbound}"] == 20
    assert c["hbone_streams_opened_total{direction=outbound}"] == 20
    assert f"HBONE: native engine (OpenSSL {openssl.VERSION}) [hbone_engine=native]" in status["data_path"]["summary"]
    assert status["data_path"]["hbone"]["tls_library"].startswith(f"OpenSSL {openssl.VERSION} ")
    native = status["data_path"]["hbone"]["native"]
    assert (native["conns_total"], native["streams_total"]) == (2, 40)  # one pooled connection, each side
    sb.wait_for(lambda _: len(sb.flows()) >= 40, 10, "both ends' flow lines")
    flows = sb.flows()
    inbound = [f for f in flows if f["reporter"] == "destination"]
    assert len(inbound) == 20 and len(flows) == 40
    assert {(f["src"]["principal"], f["security"], f["bytes_received"], f["verdict"]) for f in inbound} == {
        (PRINCIPAL, "mutual_tls", len(b"ping\n"), "allowed")}


def test_bad_clients_on_the_real_tunnel_port_are_refused_and_harm_no_one(mesh):
    sb, client, server, attacker, app = mesh
    held = HoldClient(sb.probe(client, "hold", f"{server.ip}:{PORT}", stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, bufsize=1))
    try:
        assert held.greeting.startswith(client.ip + ":") and held.echo("before") == "before"
        results = attack(sb, attacker, server.ip)
        assert results == {"garbage": "closed", "no_client_cert": "closed", "foreign_ca": "closed",
                           "expired": "closed", "foreign_trust_domain": "closed", "truncated_h2": "sent"}
        expected = {("handshake", "not_tls"): 1, ("handshake", "no_client_cert"): 1, ("handshake", "unknown_ca"): 1,
                    ("handshake", "cert_expired"): 1, ("handshake", "identity"): 1, ("error", "truncated"): 1}
        sb.wait_for(lambda s: refusals(s["counters"]) == expected, 10, f"refusals counted as {expected}")
        assert held.echo("after") == "after"
    finally:
        held.close()
    assert connect(sb, client, server, 5)["ok"] == 5
