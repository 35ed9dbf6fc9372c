"""`nodeagent status` rendering, socket selection and the admin routes (no agent needed)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from agent_world import free_port
from identity_fixtures import run, until
from nodeagent import admin
from nodeagent.agent import status
from nodeagent.admin import AdminServer
from nodeagent.agent.metrics import AgentMetrics
from nodeagent.errors import ConfigError
from nodeagent.lab.layout import agent_socket

NOW = 1_700_000_100.0
STATUS = {
    "node": "node-1", "version": "0.1.0", "pid": 4242, "started_at": NOW - 60, "ready": True,
    "source": {"location": "files:/run/x", "errors": {"/run/x/bad.yaml": "bad.yaml:3: malformed YAML"},
               "model_changed_at": NOW - 2.5, "pods_on_node": 3},
    "pods": [
        {"namespace": "app", "name": "client", "ip": "10.244.1.2", "netns_cookie": 4097, "uid": "u1",
         "enrolled_at": NOW - 10, "active": {"outbound": 2, "inbound": 0}},
        {"namespace": "app", "name": "server-long-name", "ip": "10.244.1.10", "netns_cookie": 12,
         "uid": "u2", "enrolled_at": NOW - 1, "active": {"outbound": 0, "inbound": 1}},
    ],
    "waiting": [{"namespace": "app", "name": "pending", "uid": "u3", "reason": "no status.podIP yet"},
                {"namespace": "app", "name": "squatted", "uid": "u4", "inbound": "refused",
                 "reason": "OSError: cannot listen in pod app/squatted: Address already in use"}],
    "capture": {"programs": [{"name": "na_connect4", "id": 17, "attach_point": "cgroup /sys/fs/cgroup/x connect4"}],
                "maps": [{"name": "na_pods", "max_entries": 1024, "entries": 2},
                         {"name": "na_origdst", "max_entries": 65536, "entries": 0}],
                "counters": {"captured": 100.0}},
    "counters": {"outbound_connections_total": 100.0, "passthrough_connections_total": 100.0,
                 "connection_failures_total{direction=outbound,reason=connect_refused}": 3.0},
}


def test_text_has_every_section():
    text = status.render_text(STATUS, now=NOW)
    assert "agent on node node-1: pid 4242, version 0.1.0, ready, started 60.0s ago" in text
    assert "files:/run/x: 3 pods on this node, model changed 2.5s ago" in text
    for title in ("ENROLLED PODS", "WAITING PODS", "PROGRAMS", "MAPS", "AGENT COUNTERS", "SOURCE ERRORS",
                  "CAPTURE COUNTERS (kernel)", "WORKLOAD CERTIFICATES", "POLICIES IN FORCE", "POLICY ERRORS"):
        assert title in text
    assert "bad.yaml:3: malformed YAML" in text
    assert "no status.podIP yet" in text
    waiting = text.split("WAITING PODS\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[:4] for line in waiting] == [["NAMESPACE", "NAME", "UID", "INBOUND"],
                                                      ["app", "pending", "u3", "-"], ["app", "squatted", "u4", "refused"]]
    assert "0.2%" in text  # na_pods fill 2/1024
    assert "cgroup /sys/fs/cgroup/x connect4" in text


def test_a_dual_stack_pods_refused_other_address_is_shown_beside_the_one_carried():
    dual = {**STATUS["pods"][0], "refused_ips": ["fd00::2"]}
    text = status.render_text({**STATUS, "pods": [dual, STATUS["pods"][1]]}, now=NOW)
    rows = text.split("ENROLLED PODS\n")[1].split("\n\n")[0].splitlines()
    assert rows[1].split()[:6] == ["app", "client", "10.244.1.2", "(refused:", "fd00::2,", "dual-stack)"]
    assert rows[2].split()[:4] == ["app", "server-long-name", "10.244.1.10", "12"]


def test_pod_table_is_aligned():
    text = status.render_text(STATUS, now=NOW)
    lines = text.split("ENROLLED PODS\n")[1].split("\n\n")[0].splitlines()
    header, first, second = lines
    assert header.split() == ["NAMESPACE", "NAME", "IP", "NETNS", "COOKIE", "ACTIVE", "OUT", "ACTIVE", "IN",
                              "ENROLLED"]
    # Every column starts at the same offset in every row.
    assert header.index("IP") == first.index("10.244.1.2") == second.index("10.244.1.10")
    # Numbers are right-aligned: their last digit lines up with the header's end.
    end = header.index("NETNS COOKIE") + len("NETNS COOKIE")
    assert first[:end].endswith("4097") and second[:end].endswith("12")


MESH = {
    "identity": {"enabled": True, "trust_domain": "cluster.local", "identities": [
        {"identity": "spiffe://cluster.local/ns/app/sa/client", "valid": True, "not_after": NOW + 86400,
         "refresh_at": NOW + 43200, "failures": 0, "error": None},
        {"identity": "spiffe://cluster.local/ns/app/sa/ghost", "valid": False, "not_after": None,
         "refresh_at": None, "failures": 3, "error": "CA refused (PERMISSION_DENIED): no pod"}]},
    "policy": {"root_namespace": "istio-system", "built_at": NOW - 1,
               "resources": {"AuthorizationPolicy app/allow": "0dbd433e532b"},
               "errors": ["policies.yaml#2 (AuthorizationPolicy app/x) spec.action: bad"]},
    "tunnel": {"pooled_connections": 2, "inbound_connections": 1},
}


def test_certificates_policies_and_tunnel_are_shown():
    text = status.render_text({**STATUS, **MESH}, now=NOW)
    rows = text.split("WORKLOAD CERTIFICATES\n")[1].split("\n\n")[0].splitlines()
    assert rows[1].split()[:5] == ["spiffe://cluster.local/ns/app/sa/client", "yes", "in", "24.0h", "in"]
    assert rows[2].split()[:6] == ["spiffe://cluster.local/ns/app/sa/ghost", "NO", "-", "-", "3", "CA"]
    assert "AuthorizationPolicy app/allow  0dbd433e532b" in text
    assert "POLICY ERRORS\n  policies.yaml#2 (AuthorizationPolicy app/x) spec.action: bad" in text
    assert "HBONE: 2 pooled outbound connections, 1 inbound" in text
    off = status.render_text({**STATUS, "identity": {"enabled": False, "identities": []}}, now=NOW)
    assert "WORKLOAD CERTIFICATES\n  mTLS off: no --ca-address" in off


def test_counter_values_are_integers():
    text = status.render_text(STATUS, now=NOW)
    row = next(line for line in text.splitlines() if line.startswith("outbound_connections_total"))
    assert row.split() == ["outbound_connections_total", "100"]


def test_empty_status_renders():
    text = status.render_text({"node": "n", "capture": {}, "source": {}}, now=NOW)
    assert text.count("(none)") >= 4 and "NOT ready" in text


def test_capture_error_is_shown():
    text = status.render_text({**STATUS, "capture": {"error": "map gone"}}, now=NOW)
    assert "cannot read capture state: map gone" in text


def test_json_output_round_trips():
    assert json.loads(status.render(STATUS, "json")) == STATUS


def test_table_alignment():
    out = status.table(["A", "NUM"], [["x", 1], ["longer", 100]])
    assert out.splitlines() == ["A       NUM", "x         1", "longer  100"]


def test_socket_path():
    assert status.socket_path("/tmp/s.sock", None, None, agent_socket) == "/tmp/s.sock"
    assert status.socket_path(None, None, None, agent_socket) == "/run/nodeagent/agent.sock"
    assert status.socket_path(None, "node-1", "lab2", agent_socket) == "/run/nodeagent/lab2/agents/node-1.sock"
    with pytest.raises(ConfigError):
        status.socket_path(None, "node-1", "Bad Name", agent_socket)


def test_admin_routes():
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry)
    metrics.outbound.inc(3)
    metrics.failure("outbound", "connect_refused")
    ready = [False]
    admin = AdminServer(registry=registry, status=lambda: {"node": "n"}, ready=lambda: ready[0], log=None)
    body = run(admin.metrics_page())
    assert b"nodeagent_outbound_connections_total 3.0" in body
    assert b'nodeagent_connection_failures_total{direction="outbound",reason="connect_refused"} 1.0' in body
    assert admin.respond("GET", "/debug/status")[2] == b'{\n "node": "n"\n}\n'
    assert admin.respond("GET", "/healthz/ready")[0] == 503
    ready[0] = True
    assert admin.respond("GET", "/healthz/ready")[0] == 200
    assert admin.respond("GET", "/nope")[0] == 404
    assert admin.respond("POST", "/metrics")[0] == 405


def test_metrics_snapshot_matches_registry():
    metrics = AgentMetrics(CollectorRegistry())
    metrics.outbound.inc(100)
    metrics.enrolled.set(2)
    metrics.failure("inbound", "agent_port")
    snap = metrics.snapshot()
    assert snap["outbound_connections_total"] == 100
    assert snap["enrolled_pods"] == 2
    assert snap["connection_failures_total{direction=inbound,reason=agent_port}"] == 1
    assert not any(k.endswith("_created") for k in snap)


def test_not_ready_says_why():
    reasons = ["no valid certificate for spiffe://cluster.local/ns/shop/sa/web: CA unreachable (timed out)"]
    text = status.render_text({"node": "n", "capture": {}, "source": {}, "ready": False, "not_ready": reasons},
                              now=NOW)
    lines = text.splitlines()
    assert "NOT ready" in lines[0] and lines[2] == f"not ready: {reasons[0]}"


def test_without_a_waypoint_the_kind_verdicts_are_shown():
    kinds = {"errors": ["x.yaml#1 (Gateway app/gw) kind: not supported in ambient mode: …"],
             "warnings": ["x.yaml#2 (Sidecar app/default) kind: not applicable to ambient (sidecar-only): …"]}
    text = status.render_text({**STATUS, **MESH, "policy": {**MESH["policy"], "kinds": kinds}, "waypoint": None},
                              now=NOW)
    assert ("WAYPOINT: off (--no-waypoint): L4 only\n\nISTIO KINDS NOT READ\n"
            f"  error: {kinds['errors'][0]}\n  warning: {kinds['warnings'][0]}\n") in text
    none = status.render_text({**STATUS, **MESH, "waypoint": None}, now=NOW)
    assert "ISTIO KINDS NOT READ\n  (none)\n" in none


WAYPOINT = {"envoy": {"running": True, "pid": 77, "restarts": 0, "last_exit": None, "user": "10337:10337",
                       "admin": "/run/na/admin.sock", "log": "/run/na/envoy.log"},
            "xds": {"version": "3", "accepted": "3", "in_sync": True, "connected": True, "nacks": 0},
            "dataplane": {"outbound": ["10.96.0.10:80"], "inbound": []}, "connections": {"outbound": 4, "inbound": 0},
            "access_log": {"path": "/run/na/access-log.fifo", "lines": 1200, "unreadable": 2}}


def test_the_waypoint_says_how_many_request_lines_it_read_and_how_many_it_could_not():
    text = status.render_text({**STATUS, **MESH, "waypoint": WAYPOINT}, now=NOW)
    assert ("  envoy      running, pid 77, 0 restarts, user 10337:10337, admin /run/na/admin.sock, "
            "log /run/na/envoy.log\n") in text
    assert ("  sent       4 outbound, 0 inbound\n"
            "  requests   1200 logged by Envoy (2 unreadable), read from /run/na/access-log.fifo\n") in text
    refusing = status.render_text({**STATUS, **MESH, "waypoint": {**WAYPOINT, "unsolicited": {"upstream": 3,
                                                                                             "deliver": 0}}}, now=NOW)
    assert ("  sent       4 outbound, 0 inbound\n"
            "  REFUSED    3 upstream, 0 deliver connections Envoy handed back for none the agent sent it (see the "
            "agent's log)\n  requests") in refusing


def test_the_waypoint_says_which_routes_enforce_their_pods_policy():
    """One waypoint per request: the routes that enforce their endpoints' HTTP policy, so
    the reader knows why those pods' own node's waypoint sees none of their requests."""
    enforcing = {**WAYPOINT, "dataplane": {**WAYPOINT["dataplane"], "enforced": {"10.96.0.10:80": ["10.244.2.6:8080"]}}}
    text = status.render_text({**STATUS, **MESH, "waypoint": enforcing}, now=NOW)
    assert ("  sent       4 outbound, 0 inbound\n"
            "  enforces   the HTTP policy of the pods behind 10.96.0.10:80 (their node's waypoint skipped: one "
            "waypoint per request)\n") in text
    assert "enforces" not in status.render_text({**STATUS, **MESH, "waypoint": WAYPOINT}, now=NOW)


def test_the_exit_decision_is_shown_when_the_owner_is_watched():
    """--on-exit=owner: who owns the agent's pod and what its exit would do, under the source line."""
    owner = {"owner": "DaemonSet nodeagent (uid d1)",
             "at_exit": "keeping capture for the next agent: DaemonSet nodeagent is in place (a rolling update, or "
                        "the pod deleted by hand)"}
    watched = {**STATUS, "source": {**STATUS["source"], "owner": owner}}
    lines = status.render_text(watched, now=NOW).splitlines()
    assert lines[2] == ("at exit (owner DaemonSet nodeagent (uid d1)): keeping capture for the next agent: DaemonSet "
                        "nodeagent is in place (a rolling update, or the pod deleted by hand)")
    unread = {**STATUS, "source": {**STATUS["source"], "owner": {"owner": None, "at_exit": "keeping capture …"}}}
    assert status.render_text(unread, now=NOW).splitlines()[2] == "at exit (owner not read yet): keeping capture …"
    assert not any(line.startswith("at exit") for line in status.render_text(STATUS, now=NOW).splitlines())


def test_memory_against_the_limit_is_shown():
    memory = {"limit_bytes": 512 << 20, "usage_bytes": 140 << 20, "peak_bytes": 150 << 20, "overloaded": False,
              "overload_episodes": 0, "overload_at": 0.9, "recover_at": 0.85, "full_at": 0.95,
              "socket_bytes": 3 << 20, "socket_source": "/sys/fs/cgroup/memory.stat (sock)"}
    text = status.render_text({**STATUS, **MESH, "memory": memory}, now=NOW)
    assert "HBONE: 2 pooled outbound connections, 1 inbound\nMEMORY: 140 MiB of the 512 MiB limit (27 %, 3 MiB of " \
           "it socket buffers, peak 150); new connections are refused from 90 % for pods over their share, from 95 % for all (0 times so " \
           "far)\n" in text
    over = {**memory, "usage_bytes": 470 << 20, "peak_bytes": 480 << 20, "overloaded": True, "overload_episodes": 1,
            "socket_bytes": None, "socket_source": None}
    assert "MEMORY: OVERLOADED, 470 MiB of the 512 MiB limit (92 %, socket buffers not read: no memory cgroup, " \
           "peak 480): new connections of pods over " \
           "their share (from 95 %: of every pod) are refused until under 85 %\n" in status.render_text({**STATUS, "memory": over}, now=NOW)
    off = {**memory, "limit_bytes": None}
    assert "MEMORY: agent and waypoint 140 MiB resident and in socket buffers (3 MiB of it socket buffers, peak " \
           "150); no limit (memory_limit_mib=off)\n" in \
        status.render_text({**STATUS, "memory": off}, now=NOW)
    held = {**memory, "connections_held": 1452, "most_held": [{"pod": "mesh/client", "connections": 1450},
                                                               {"pod": "mesh/other", "connections": 2}],
            "per_pod_cap": 16384}
    assert "(0 times so far)\n  1452 connections relayed; the most for mesh/client (1450), mesh/other (2); at " \
           "most 16384 a pod (max_connections_per_pod)\n" in status.render_text({**STATUS, "memory": held}, now=NOW)
    assert "mesh/other (2); no cap per pod\n" in \
        status.render_text({**STATUS, "memory": {**held, "per_pod_cap": None}}, now=NOW)
    shedding = {**memory, "shedding": "on", "shed_sockets": 3, "shed_bytes": 12 << 20}
    assert "for all (0 times so far)\n  from 95 % the connections holding the most socket memory are reset; 3 " \
           "reset so far (12 MiB)\n" in status.render_text({**STATUS, "memory": shedding}, now=NOW)


async def _get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` from the admin address on 127.0.0.1:`port`: (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_the_admin_address_serves_no_status_and_at_most_32_connections_at_once(tmp_path, monkeypatch):
    """The admin address is the node's (every pod reaches it): status is refused there and
    served over the socket; 32 connections that send nothing hold every slot, so the next
    is closed at accept and counted while the socket still serves status and metrics; a
    slot comes back when one of them closes, and all of them when their head timeout
    passes."""
    monkeypatch.setattr(admin, "HEAD_TIMEOUT", 2.0)

    async def main():
        registry = CollectorRegistry()
        server = AdminServer(registry=registry, status=lambda: {"node": "n"}, ready=lambda: True,
                             log=logging.getLogger("test.admin"))
        port, path = free_port(), tmp_path / "agent.sock"
        await server.start(("127.0.0.1", port), path)
        try:
            assert await _get(port, "/debug/status") == (
                404, b"/debug/status is served on the agent's admin socket only: nodeagent status\n")
            assert (await _get(port, "/metrics"))[0] == 200 and (await _get(port, "/healthz/ready"))[0] == 200
            assert await asyncio.to_thread(admin.fetch_status, path) == {"node": "n"}
            silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(admin.MAX_TCP_CONNECTIONS)]
            await until(lambda: server.tcp_open == admin.MAX_TCP_CONNECTIONS, what="every slot taken")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                assert await reader.read() == b""  # closed at accept, nothing answered
            except ConnectionResetError:
                pass
            writer.close()
            assert registry.get_sample_value("nodeagent_admin_connections_refused_total") == 1
            assert await asyncio.to_thread(admin.fetch_status, path) == {"node": "n"}
            assert b"nodeagent_admin_connections_refused_total 1.0" in await asyncio.to_thread(
                admin.fetch, path, "/metrics")
            silent[0][1].close()
            await until(lambda: server.tcp_open == admin.MAX_TCP_CONNECTIONS - 1, what="the closed one's slot")
            assert (await _get(port, "/metrics"))[0] == 200
            await until(lambda: server.tcp_open == 0, timeout=10, what="the silent ones' head timeout")
            for reader, writer in silent[1:]:
                assert await reader.read() == b""
                writer.close()
            assert (await _get(port, "/healthz/ready"))[0] == 200
            assert registry.get_sample_value("nodeagent_admin_connections_refused_total") == 1
        finally:
            await server.close()
    run(main(), timeout=60)


class _Page:
    """A collector whose page takes a while to build (thousands of label sets) and counts
    its builds, and the threads they ran on."""

    def __init__(self, size: int = 0):
        self.builds, self.threads, self.size = 0, [], size
        self.loop_ran = threading.Event()  # set by a callback of the agent's loop

    def describe(self):
        return []

    def collect(self):
        self.builds += 1
        self.threads.append(threading.get_ident())
        self.loop_ran.wait(5)  # built on the loop, this would wait for the loop: 5 s, and not set
        family = GaugeMetricFamily("big_page", "padding", labels=["pad"])
        if self.size:
            family.add_metric(["x" * self.size], 1.0)
        yield family


def test_metrics_are_built_off_the_loop_once_for_requests_together(tmp_path):
    """One /metrics from any pod held every new connection of the node for as long as the
    page took to build (seconds for thousands of label sets): it is built in a thread, one
    build at a time, and one page answers the requests made while it was built."""
    async def main():
        registry, page = CollectorRegistry(), _Page()
        registry.register(page)
        server = AdminServer(registry=registry, status=dict, ready=lambda: True, log=logging.getLogger("t"))
        port = free_port()
        await server.start(("127.0.0.1", port), None)
        try:
            requests = [asyncio.ensure_future(_get(port, "/metrics")) for _ in range(5)]
            await until(lambda: page.builds == 1, what="the page's build")
            asyncio.get_running_loop().call_soon(page.loop_ran.set)  # runs only if the loop is free
            answers = await asyncio.gather(*requests)
            assert [code for code, _ in answers] == [200] * 5 and page.builds == 1
            assert all(b"big_page" in body for _, body in answers)
            assert page.threads[0] != threading.get_ident()  # not the loop's thread
        finally:
            await server.close()
    run(main(), timeout=30)


def test_a_client_that_never_reads_its_response_is_aborted(tmp_path, monkeypatch):
    """It held its slot, and the page, for ever: 32 of them shut every scraper out."""
    monkeypatch.setattr(admin, "RESPONSE_TIMEOUT", 0.5)

    async def main():
        page = _Page(size=16 << 20)  # more than the socket buffers hold
        page.loop_ran.set()
        registry = CollectorRegistry()
        registry.register(page)
        server = AdminServer(registry=registry, status=dict, ready=lambda: True, log=logging.getLogger("t"))
        port = free_port()
        await server.start(("127.0.0.1", port), None)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            await until(lambda: server.tcp_open == 1, what="the request served")
            await until(lambda: server.tcp_open == 0, timeout=10, what="the stalled response aborted")
            writer.close()
            assert (await _get(port, "/healthz/ready"))[0] == 200
        finally:
            await server.close()
    run(main(), timeout=30)


def test_open_files_against_the_limit_are_shown():
    text = status.render_text({**STATUS, **MESH, "open_files": {"open": 130, "limit": 1048576}}, now=NOW)
    assert "HBONE: 2 pooled outbound connections, 1 inbound\nOPEN FILES: 130 of 1048576 (0 %)\n" in text
