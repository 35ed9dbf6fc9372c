"""The agent with `--hbone-engine native` on one real node (a throwaway sandbox, as
test_agent_tunnel.py and test_rapid_reset.py run it): meshed traffic crosses the native
HBONE engine with the client's address and principal, exactly counted by both reports,
over one pooled connection, and status says which engine carries HBONE; the bad clients
of test_agent_tunnel.py are refused with the same labels; rapid resets against the real
tunnel port leave nothing behind (each counted `client_reset`), a flood gets GOAWAY
ENHANCE_YOUR_CALM, streams reset once relayed end their app connections; the handshake
flood of test_handshake_flood.py stays within its bounds — each counted as the Python
path counts it.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from h2.errors import ErrorCodes

from meshed_sandbox import PORT, meshed_sandbox
from nodeagent.bench.probe import HoldClient
from hbone_attacks import attack, refusals
from test_agent_tunnel import PRINCIPAL, connect
from test_handshake_flood import (FLOOD, HITS, PENDING, PER_SOURCE, RSS_BOUND_MB, TIMEOUTS, client_hello,  # noqa: F401
                                  descriptors, flood, moved, rss_mb)  # (descriptors is a fixture)
from test_rapid_reset import BURST, LIMIT, RapidResetClient, agent_descriptors, app_established, settle, steady

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
    status = sb.status()
    c = status["counters"]
    assert c["hbone_streams_opened_total{direction=inbound}"] == 20
    assert c["hbone_streams_opened_total{direction=outbound}"] == 20
    assert "HBONE: native engine [hbone_engine=native]" in status["data_path"]["summary"]
    native = status["data_path"]["hbone"]["native"]
    assert (native["conns_total"], native["streams_total"]) == (2, 40)  # one pooled connection, each side
    with open(sb.layout.flow_log(sb.node)) as f:
        flows = [json.loads(line) for line in f]
    inbound = [f for f in flows if f["reporter"] == "destination"]
    assert len(inbound) == 20 and len(flows) == 40
    assert {(f["src"]["principal"], f["security"], f["bytes_received"], f["verdict"]) for f in inbound} == {
        (PRINCIPAL, "mutual_tls", len(b"ping\n"), "allowed")}


def test_rapid_resets_leave_nothing_and_a_flood_gets_goaway(mesh):
    sb, client, server, attacker, app = mesh
    held = HoldClient(sb.probe(client, "hold", f"{server.ip}:{PORT}", stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, bufsize=1))
    rapid = None
    try:
        assert held.echo("before") == "before"
        before = sb.status()["counters"]
        fds_idle = steady(lambda: agent_descriptors(sb))
        apps = app_established(app)
        rapid = RapidResetClient(sb, attacker, server.ip)
        assert rapid.ping()
        fds = steady(lambda: agent_descriptors(sb))
        while rapid.sent < LIMIT:
            rapid.reset_streams(min(BURST, LIMIT - rapid.sent))
            assert rapid.ping(), f"GOAWAY after {rapid.sent} resets, at most {LIMIT} in its window are allowed"
        settle(lambda: (agent_descriptors(sb), app_established(app)), (fds, apps),
               f"(agent descriptors, app connections) after {LIMIT} rapid resets")
        while rapid.goaway is None and rapid.sent < 20 * LIMIT:
            rapid.reset_streams(BURST)
            rapid.ping()
        assert rapid.goaway is not None and rapid.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        handled = (rapid.goaway.last_stream_id + 1) // 2  # client streams are 1, 3, 5...; none after it
        rapid.close()
        rapid = None
        settle(lambda: (agent_descriptors(sb), app_established(app)), (fds_idle, apps),
               "(agent descriptors, app connections) once the flooding connection is gone")
        after = sb.status()["counters"]
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("hbone_")}
        assert moved["hbone_limit_hits_total{direction=inbound,limit=stream_resets}"] == 1
        assert moved["hbone_connection_errors_total{direction=inbound,reason=too_many_resets}"] == 1
        assert moved.get("hbone_streams_opened_total{direction=inbound}", 0) == 0
        reset = "connection_failures_total{direction=inbound,reason=client_reset}"
        assert after.get(reset, 0) - before.get(reset, 0) == handled  # each cancelled its connect to the app
        assert held.echo("after") == "after"
    finally:
        if rapid is not None:
            rapid.close()
        held.close()


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


@pytest.mark.parametrize("first", ["silent", "client_hello"])
def test_a_handshake_flood_is_capped_reset_and_counted(mesh, descriptors, first):
    """test_handshake_flood.py's flood against the native engine: the same per-source
    budget (Python's, told of each connection up or ended), the same counts, and the
    agent's growth under the same bound."""
    sb, client, server, attacker, app = mesh
    before, rss_before = sb.status()["counters"], rss_mb(sb)
    fates = flood(attacker, server.ip, client_hello() if first == "client_hello" else b"")
    try:
        settle(lambda: (lambda m: m.get(HITS, 0) + m.get(PENDING, 0) + m.get(TIMEOUTS, 0))(moved(sb, before)),
               FLOOD, f"the agent's decision on all {FLOOD} connections (reset + pending + timed out)")
        during = moved(sb, before)
        result = connect(sb, client, server, 20)
        resets = during.get(HITS, 0)
        if first == "client_hello":
            settle(fates.tally, (resets, FLOOD - resets), "(reset, answered) flood connections")
        assert fates.tally()[0] == resets
        rss_during = rss_mb(sb)
        print(f"native, {first}: agent RSS {rss_before:.0f} MB -> {rss_during:.0f} MB with {FLOOD} connections "
              f"({during.get(PENDING, 0):.0f} pending, {resets:.0f} reset)")
        assert result["ok"] == 20 and result["peers"] == {client.ip: 20}
        assert during.get(PENDING, 0) <= PER_SOURCE and resets >= FLOOD - 2 * PER_SOURCE
        assert rss_during - rss_before < RSS_BOUND_MB
    finally:
        fates.close()
    settle(lambda: sb.status()["counters"].get(PENDING), 0, "pending handshakes once the flood is gone")
    after = moved(sb, before)
    assert after[HITS] == resets and after["hbone_connections{direction=inbound}"] == 1


def test_streams_reset_once_relayed_end_their_app_connections(mesh):
    """test_rapid_reset.py's: 20 streams answered 200 and relayed, then reset by the client:
    each app connection is reset too, and the agent holds no descriptor more than before."""
    sb, client, server, attacker, app = mesh
    count = 20
    fds_idle, apps = steady(lambda: agent_descriptors(sb)), app_established(app)
    before = sb.status()["counters"]
    late = RapidResetClient(sb, attacker, server.ip)
    try:
        assert late.ping()
        fds = steady(lambda: agent_descriptors(sb))
        ids = late.open_answered(count)
        settle(lambda: app_established(app), apps + count, "app connections of the answered streams")
        for stream_id in ids:
            late.reset(stream_id)
        assert late.ping()
        settle(lambda: (agent_descriptors(sb), app_established(app)), (fds, apps),
               f"(agent descriptors, app connections) after resetting {count} relayed streams")
    finally:
        late.close()
    settle(lambda: agent_descriptors(sb), fds_idle, "agent descriptors once the connection is gone")
    opened = "hbone_streams_opened_total{direction=inbound}"
    assert sb.status()["counters"][opened] - before.get(opened, 0) == count
