"""The same-node fast path (issue 11) on one real node: `python -m nodeagent run` with
its mesh CA in a throwaway sandbox (nodeagent.bench.sandbox), two meshed pods (client
and server, namespace app, service accounts client and server), real capture programs and netns.

(a) An allowed connection takes the fast path (status and its counter say so, no HBONE
stream opens): a known payload crosses byte-identically both ways with a half-close
each way (the server greets, then answers only after the client's FIN; the client
sends after the greeting, so the join happens while both ways are open, and reads to
the server's FIN), the server sees the client pod's own address, and both reporters'
istio_tcp_* metrics and flow lines carry the exact byte counts.
(b) An AuthorizationPolicy DENY for the client's principal resets the connection it
already joined (revocation: both ends reset, reported DENY) and refuses the next one:
the client is reset with no data, the server never sees it; the policy's denial counter
moves by exactly one for each.
(c) With --no-same-node-fast-path the same exchange goes over HBONE, counted the same.
(a) and (b) run with each join: asyncio (the Python engine), splice(2) (the native
engine) and the kernel's (a sockmap verdict program, bpf/samenode.c, opt-in).
(d) With the default join, a server that never reads holds its client back within a few
MiB (the sockmap join let the kernel queue without bound).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent_sockets import connected_tcp_sockets
from nodeagent.admin import fetch
from nodeagent.bench.sandbox import AMBIENT, Sandbox, scaled, workload_identities
from nodeagent.capture.sockmap import SNDBUF
from nodeagent.digests import spec_digest
from samenode_peer import GREETING, pattern

pytestmark = pytest.mark.root
PORT = 9000
UP, DOWN = (1 << 20) + 7, 300 * 1024 + 3  # client -> server, server -> client (after its greeting)
BACK = len(GREETING) + DOWN  # all the server sends
CLIENT_ID, SERVER_ID = "spiffe://cluster.local/ns/app/sa/client", "spiffe://cluster.local/ns/app/sa/server"
EMPTY = hashlib.sha256(b"").hexdigest()
PEER = str(Path(__file__).with_name("samenode_peer.py"))
DENY_SPEC = {"selector": {"matchLabels": {"app": "server"}}, "action": "DENY",
             "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/app/sa/client"]}}]}]}


class Node:
    """The sandbox and what the tests read from it."""

    def __init__(self, sb: Sandbox, client, server, app: subprocess.Popen):
        self.sb, self.client, self.server, self.app = sb, client, server, app

    def send(self, size: int) -> dict:
        proc = self.sb.in_pod(self.client, [sys.executable, PEER, "send", f"{self.server.ip}:{PORT}", str(size)],
                              stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=scaled(60))
        return json.loads(out)

    def served(self) -> dict:
        """The server's line for the next connection it finished."""
        return json.loads(self.app.stdout.readline())

    def metric(self, name: str, **labels) -> float:
        text = fetch(self.sb.admin_socket, "/metrics").decode()
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def flows(self) -> list[dict]:
        return self.sb.flows()

    def apply(self, name: str, spec: dict) -> None:
        """An AuthorizationPolicy in namespace app, waited for until the agent enforces it."""
        doc = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": "app"}, "spec": spec}
        tmp = self.sb.source_dir / f".{name}.yaml.tmp"
        tmp.write_text(yaml.safe_dump(doc))
        tmp.replace(self.sb.source_dir / f"{name}.yaml")
        key = f"AuthorizationPolicy app/{name}"
        self.sb.wait_for(lambda s: s["policy"]["resources"].get(key) == spec_digest(spec), 15, f"{key} in force")


def sandbox(tmp_path: Path, *agent_args: str):
    """A node with the meshed client and server (its app: samenode_peer serve) and the
    agent started with `agent_args`; removed after, and the test fails if anything is left."""
    sb = Sandbox(f"test-{secrets.token_hex(3)}", workdir=tmp_path)
    try:
        sb.setup()
        client, server = sb.add_pod("app", "client"), sb.add_pod("app", "server")
        server.labels = {"app": "server"}
        write_pods(sb)
        sb.label_namespace("app", AMBIENT)
        app = sb.in_pod(server, [sys.executable, PEER, "serve", str(PORT), str(DOWN)], stdout=subprocess.PIPE,
                        text=True)
        assert app.stdout.readline().strip() == "listening"
        sb.in_pod(client, ["sleep", "infinity"])  # a pod is found by its processes
        sb.start_ca()
        sb.start_agent(*sb.ca_args(), "--no-waypoint", *agent_args, timeout=60)  # bounds for a loaded machine
        sb.wait_for(lambda s: len(s["pods"]) == 2 and [i["valid"] for i in workload_identities(s)] == [True] * 2
                    and s["data_path"]["same_node"].get("sockmap") != "starting", 60,
                    "both pods enrolled, their certificates held, the in-kernel join loaded (or not)")
        yield Node(sb, client, server, app)
    finally:
        left = sb.close()
        assert left == [] and sb.leftovers() == []


def write_pods(sb: Sandbox) -> None:
    """The sandbox's pods, each with a service account of its name (Sandbox.write_pods
    gives none, so both would share one identity)."""
    docs = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": p.labels},
             "spec": {"nodeName": sb.node, "serviceAccountName": p.name},
             "status": {"phase": "Running", "podIP": p.ip}} for p in sb.pods.values()]
    tmp = sb.source_dir / ".pods.yaml.tmp"
    tmp.write_text(yaml.safe_dump_all(docs))
    tmp.replace(sb.source_dir / "pods.yaml")


JOINS = {"python": ("--data-path-engine", "python", "--no-same-node-sockmap"),  # joined by asyncio
         "native": ("--data-path-engine", "native", "--no-same-node-sockmap"),  # by the engine's splice(2)
         "sockmap": ("--data-path-engine", "native", "--same-node-sockmap")}  # in the kernel: bpf/samenode.c


@pytest.fixture(params=list(JOINS))
def fast(request, tmp_path):
    yield from sandbox(tmp_path, *JOINS[request.param])


@pytest.fixture
def default_join(tmp_path):
    yield from sandbox(tmp_path, "--data-path-engine", "native")


@pytest.fixture
def hbone(tmp_path):
    yield from sandbox(tmp_path, "--no-same-node-fast-path")


LABELS = {"source_workload": "client", "source_workload_namespace": "app", "source_principal": CLIENT_ID,
          "destination_workload": "server", "destination_workload_namespace": "app",
          "destination_principal": SERVER_ID, "connection_security_policy": "mutual_tls"}


def exchanged(node: Node) -> None:
    """One known exchange, checked byte for byte at both ends and in both reporters'
    metrics and flow lines."""
    result = node.send(UP)
    assert result == {"received": DOWN, "sha256": hashlib.sha256(pattern(DOWN)).hexdigest(), "error": None}
    served = node.served()
    assert (served["received"], served["sha256"]) == (UP, hashlib.sha256(pattern(UP)).hexdigest())
    assert served["peer"].startswith(node.client.ip + ":")  # the client pod's own address
    node.sb.wait_for(lambda _: len(node.flows()) == 2, 10, "both ends' flow lines")
    for reporter in ("source", "destination"):
        labels = {**LABELS, "reporter": reporter}
        assert (node.metric("istio_tcp_connections_opened_total", **labels),
                node.metric("istio_tcp_connections_closed_total", **labels, response_flags="-"),
                node.metric("istio_tcp_received_bytes_total", **labels),
                node.metric("istio_tcp_sent_bytes_total", **labels)) == (1, 1, UP, BACK), reporter
    assert sorted((f["reporter"], f["bytes_received"], f["bytes_sent"], f["verdict"], f["security"])
                  for f in node.flows()) == [("destination", UP, BACK, "allowed", "mutual_tls"),
                                             ("source", UP, BACK, "allowed", "mutual_tls")]


def send_buffer(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def test_the_fast_path_joins_an_allowed_connection_and_refuses_a_denied_one(fast, request):
    node, join = fast, request.node.callspec.params["fast"]
    status = node.sb.status()
    same_node = status["data_path"]["same_node"]
    assert (same_node["enabled"], same_node["join"], same_node["connections"]) == (
        True, "splice" if join == "native" else join, {"relayed": 0, "denied": 0, "failed": 0, "waypoint": 0})
    assert same_node["sockmap"].startswith("loaded") if join == "sockmap" else \
        same_node["sockmap"] == "same_node_sockmap=false"
    assert f"same-node fast path on, joined by {same_node['join']}" in status["data_path"]["summary"]

    exchanged(node)  # (a)
    status = node.sb.status()
    counters = status["counters"]
    assert counters["same_node_connections_total{outcome=relayed}"] == 1
    assert counters["active_connections{direction=outbound}"] == counters["active_connections{direction=inbound}"] == 0
    assert status["data_path"]["same_node"]["sockmap_pairs"] == (
        {"joined": 1, "refused": 0} if join == "sockmap" else {"joined": 0, "refused": 0})
    assert counters.get("hbone_streams_opened_total{direction=outbound}", 0) == 0
    assert counters.get("hbone_streams_opened_total{direction=inbound}", 0) == 0
    assert all(f["same_node"] is True for f in node.flows())
    resetting = node.sb.in_pod(node.client, [sys.executable, PEER, "hold", f"{node.server.ip}:{PORT}", "--reset"],
                               stdout=subprocess.PIPE, text=True)  # a reset passes on as a reset
    assert resetting.communicate(timeout=scaled(30))[0].splitlines() == ["joined", '{"received": 0, "error": null}']
    served = node.served()
    assert (served["received"], served["error"]) == (0, "reset")
    node.sb.wait_for(lambda _: len(node.flows()) == 4, 10, "the reset connection's flow lines")

    held = node.sb.in_pod(node.client, [sys.executable, PEER, "hold", f"{node.server.ip}:{PORT}"],
                          stdout=subprocess.PIPE, text=True)  # joined, then revoked by the DENY
    assert held.stdout.readline().strip() == "joined"
    if join == "sockmap":  # both joined sockets: a send buffer past autotuning's (the kernel doubles it)
        joined = sorted(sndbuf for local, peer, sndbuf in connected_tcp_sockets(node.sb.agent.pid, send_buffer)
                        if local[1] == 15001 or peer == (node.server.ip, PORT))
        assert joined == [2 * SNDBUF, 2 * SNDBUF]
    denials = node.metric("nodeagent_policy_denials_total", policy="app/deny-client")
    node.apply("deny-client", DENY_SPEC)  # (b)
    assert json.loads(held.stdout.readline()) == {"received": 0, "error": "reset"}
    served = node.served()
    assert (served["received"], served["error"]) == (0, "reset")  # the server's end was reset too
    assert node.send(1000) == {"received": 0, "sha256": EMPTY, "error": "reset"}
    node.sb.wait_for(lambda _: len(node.flows()) == 8, 10, "the revoked and the denied connections' flow lines")
    assert node.metric("nodeagent_policy_denials_total", policy="app/deny-client") - denials == 2  # one each
    status = node.sb.status()
    counters = status["counters"]
    assert counters["same_node_connections_total{outcome=denied}"] == 1
    assert counters["inbound_connections_revoked_total{reason=deny}"] == 1
    assert counters["connection_failures_total{direction=outbound,reason=hbone_status_403}"] == 1
    assert node.metric("istio_tcp_connections_closed_total", **LABELS, reporter="destination",
                       response_flags="DENY") == 2
    revoked, refused = (f for f in node.flows()[4:] if f["reporter"] == "destination")
    assert (revoked["verdict"], revoked["response_flags"], revoked["bytes_received"], revoked["bytes_sent"],
            revoked["reason"].startswith("no longer allowed")) == ("denied", "DENY", 0, len(GREETING), True)
    assert (refused["verdict"], refused["response_flags"], refused["bytes_received"]) == ("denied", "DENY", 0)
    if join == "sockmap":
        assert status["data_path"]["same_node"]["sockmap_pairs"] == {"joined": 3, "refused": 0}
    node.apply("deny-client", {**DENY_SPEC, "rules": [{"from": [{"source": {"principals": ["nobody"]}}]}]})
    exchanged_again = node.send(UP)  # the server saw nothing of the denied one: its next line is this one
    assert exchanged_again["error"] is None and node.served()["received"] == UP
    counters = node.sb.status()["counters"]
    assert counters["active_connections{direction=outbound}"] == counters["active_connections{direction=inbound}"] == 0


def test_with_the_fast_path_off_the_same_exchange_goes_over_hbone(hbone):
    node = hbone
    status = node.sb.status()
    assert status["data_path"]["same_node"] == {"enabled": False}
    assert "same-node fast path off" in status["data_path"]["summary"]
    exchanged(node)  # (c)
    counters = node.sb.status()["counters"]
    assert counters["hbone_streams_opened_total{direction=outbound}"] == 1
    assert counters["hbone_streams_opened_total{direction=inbound}"] == 1
    assert not any(k.startswith("same_node_connections_total") for k in counters)
    assert all("same_node" not in f for f in node.flows())


FLOOD_MOST = 1 << 30


def test_by_default_a_receiver_that_stops_reading_holds_its_sender_back(default_join):
    """The default join is the engine's splice(2): a server that never reads stops its
    client once the sockets' buffers and the pipe are full, a few MiB. (The opt-in sockmap
    join does not: the kernel queues what the client sends for the stalled socket without
    bound, 6 GiB in 17 s for one connection, uncharged to any cgroup.)"""
    node = default_join
    assert node.sb.status()["data_path"]["same_node"]["join"] == "splice"
    stalled = node.sb.in_pod(node.server, [sys.executable, PEER, "stall", str(PORT + 1)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert stalled.stdout.readline().strip() == "listening"
        proc = node.sb.in_pod(node.client, [sys.executable, PEER, "flood", f"{node.server.ip}:{PORT + 1}",
                                            str(scaled(3)), str(FLOOD_MOST)], stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate(timeout=scaled(120))
        result = json.loads(out)
        assert result["error"] is None and 1 << 20 <= result["sent"] < 64 << 20, result
        status = node.sb.status()
        assert status["data_path"]["same_node"]["connections"]["relayed"] == 1
        # the pipe toward the stalled server is full, and the memory guard counts it (its
        # pages show in no RSS and in no socket's charge)
        held = status["data_path"]["native"]["bytes_held"]
        assert held >= 64 << 10 and status["memory"]["pipe_bytes"] == held, (held, status["memory"])
    finally:
        stalled.kill()
        stalled.wait()
