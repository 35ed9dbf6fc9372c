"""Capture end to end on the lab: the built-in demo with one real agent per node.

The meshed client (namespace `mesh`) reaches the backend service through its node's
agent (outbound capture; the backends are meshed, so HBONE to the other node's, and the
same-node fast path to the one beside it) and the backends' agents (HBONE streams,
delivery with the client's address); the unmeshed client
(namespace `legacy`) is not captured at its source and reaches the backends' agents as
plaintext (inbound steering). Counts are exact: every request opens one new connection.
"""

from __future__ import annotations

import json
import subprocess
from importlib import resources

import pytest

from tests.e2e.conftest import NODEAGENT
from tests.e2e.kubelab import poll

DEMO_YAML = resources.files("nodeagent.lab").joinpath("demo.yaml").read_text()


@pytest.fixture(scope="module")
def demo(lab_factory_module):
    lab = lab_factory_module(DEMO_YAML, agents=True, timeout=90)
    return lab, {(p["namespace"], p["name"]): p for p in lab.status()["pods"]}


def agent_status(lab, node: str) -> dict:
    proc = subprocess.run([*NODEAGENT, "status", "--lab", lab.name, "--node", node, "--output", "json"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def counter(status: dict, name: str) -> float:
    return status["counters"].get(name, 0.0)


def request(lab, pod: str, url: str, count: int) -> dict:
    out = lab.exec(pod, "nodeagent", "lab", "request", "-n", str(count), "--new-connection",
                   "--output", "json", url, timeout=120).stdout
    return json.loads(out)


def totals(lab, name: str) -> dict[str, float]:
    return {node: counter(agent_status(lab, node), name) for node in ("node1", "node2")}


def counted(lab, name: str, before: dict[str, float], added: int, timeout: float = 10.0) -> dict[str, float]:
    """`totals` once the agents together counted `added` more than `before`: a
    destination counts a CONNECT its engine delivered on a route when its loop hears of
    it, which can be after the client is done (agent/proxy/routes.py)."""
    def grown() -> dict[str, float] | None:
        now = totals(lab, name)
        return now if sum(now.values()) - sum(before.values()) >= added else None
    return poll(grown, f"the agents counting {added} more {name}", timeout, 0.05)


def test_agents_enrol_exactly_the_meshed_pods(demo):
    lab, pods = demo
    enrolled = {}
    for node in ("node1", "node2"):
        status = agent_status(lab, node)
        assert status["ready"] is True
        assert status["waiting"] == []
        enrolled[node] = sorted((p["namespace"], p["name"], p["ip"]) for p in status["pods"])
    meshed = {k: p for k, p in pods.items() if k[0] == "mesh"}
    expected = {node: sorted((ns, name, p["ip"]) for (ns, name), p in meshed.items() if p["node"] == node)
                for node in ("node1", "node2")}
    assert enrolled == expected
    assert all(p["meshed"] is (k[0] == "mesh") for k, p in pods.items())
    assert {p["name"] for p in lab.status()["pods"] if p["meshed"]} == {"client", "backend-v1-0", "backend-v2-0"}


def test_meshed_client_goes_through_the_agents(demo):
    lab, pods = demo
    client = pods[("mesh", "client")]
    out_before = totals(lab, "outbound_connections_total")
    in_before = totals(lab, "inbound_connections_total")
    hbone_before = totals(lab, "hbone_streams_opened_total{direction=inbound}")
    same_node_before = totals(lab, "same_node_connections_total{outcome=relayed}")
    passthrough_before = totals(lab, "passthrough_connections_total")

    result = request(lab, "mesh/client", "http://backend:8080/", 60)

    assert result["sent"] == 60
    assert result["codes"] == {"200": 60}
    assert result["errors"] == {}
    assert sum(result["pods"].values()) == 60
    assert set(result["pods"]) == {"backend-v1-0", "backend-v2-0"}
    out_after = totals(lab, "outbound_connections_total")
    in_after = counted(lab, "inbound_connections_total", in_before, 60)
    # Every connection was captured on the client's node and steered on the backends' nodes.
    assert out_after[client["node"]] - out_before[client["node"]] == 60
    other = "node2" if client["node"] == "node1" else "node1"
    assert out_after[other] == out_before[other]
    assert sum(in_after.values()) - sum(in_before.values()) == 60
    by_node = {pods[("mesh", name)]["node"]: n for name, n in result["pods"].items()}
    remote = sum(n for node, n in by_node.items() if node != client["node"])
    hbone_after = counted(lab, "hbone_streams_opened_total{direction=inbound}", hbone_before, remote)
    same_node_after = totals(lab, "same_node_connections_total{outcome=relayed}")
    for node, n in by_node.items():
        assert in_after[node] - in_before[node] == n
        # Across nodes every one goes through the tunnel; on the client's own node the
        # agent joins the two pods' connections itself (the same-node fast path, issue 11).
        tunnelled, joined = (0, n) if node == client["node"] else (n, 0)
        assert hbone_after[node] - hbone_before[node] == tunnelled, (node, hbone_before, hbone_after)
        assert same_node_after[node] - same_node_before[node] == joined, (node, same_node_before, same_node_after)
    assert result["pods"] == {"backend-v1-0": 30, "backend-v2-0": 30}  # the source agent's round-robin
    assert totals(lab, "passthrough_connections_total") == passthrough_before


def test_backend_sees_the_client_address(demo):
    lab, pods = demo
    body = json.loads(lab.exec("mesh/client", "curl", "-s", "--max-time", "10", "http://backend:8080/").stdout)
    assert body["remote_addr"].split(":")[0] == pods[("mesh", "client")]["ip"]
    assert body["namespace"] == "mesh"


def test_unmeshed_client_is_not_captured(demo):
    lab, pods = demo
    out_before = totals(lab, "outbound_connections_total")
    in_before = totals(lab, "inbound_connections_total")
    hbone_before = totals(lab, "hbone_streams_opened_total{direction=inbound}")

    result = request(lab, "legacy/client", "http://backend.mesh:8080/", 40)

    assert result["codes"] == {"200": 40}
    assert totals(lab, "outbound_connections_total") == out_before
    # The backends are meshed, so their agents still receive these connections inbound
    # (plaintext; PERMISSIVE until PeerAuthentication says otherwise).
    assert sum(totals(lab, "inbound_connections_total").values()) - sum(in_before.values()) == 40
    assert totals(lab, "hbone_streams_opened_total{direction=inbound}") == hbone_before  # plaintext, not HBONE
    body = json.loads(lab.exec("legacy/client", "curl", "-s", "--max-time", "10",
                               "http://backend.mesh:8080/").stdout)
    assert body["remote_addr"].split(":")[0] == pods[("legacy", "client")]["ip"]


def test_tcp_port_through_capture(demo):
    lab, _ = demo
    script = ("import socket; s = socket.create_connection(('backend', 9000), timeout=10); "
              "s.sendall(b'x' * 100000); s.shutdown(socket.SHUT_WR); n = 0\n"
              "while True:\n d = s.recv(65536)\n if not d: break\n n += len(d)\n"
              "print(n)")
    out = lab.exec("mesh/client", "python3", "-c", script).stdout
    assert out.strip() == "100000"
