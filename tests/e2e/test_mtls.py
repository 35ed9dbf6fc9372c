"""Identity, HBONE and L4 policy end to end on a two-node lab with real agents and CA.

Clients on node1 (meshed `mesh/client`, `mesh/other`, `mesh2/client`, unmeshed
`legacy/client`) talk to the meshed `mesh/backend` Deployment on node2 (the lab echo
app: TCP echo on 9000, HTTP on 8080) through its Service. Every connection sends an
exact number of bytes and is counted: the destination agent's flow log and metrics
must agree with what was sent, a packet capture on the fabric must see TLS only,
PeerAuthentication STRICT/PERMISSIVE and AuthorizationPolicies must allow and deny
exactly the connections they should, and policy changes apply without restarting
anything. (Bad clients on a pod's real port 15008: tests/kernel/test_agent_tunnel.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.admin import fetch, fetch_status
from nodeagent.bench.probe import HoldClient
from nodeagent.digests import spec_digest
from nodeagent.lab.layout import Layout
from tests.e2e.conftest import FabricCapture

pytestmark = pytest.mark.timeout(240)

TD = "cluster.local"
CLIENT, OTHER, CLIENT2 = (f"spiffe://{TD}/ns/mesh/sa/client", f"spiffe://{TD}/ns/mesh/sa/other",
                          f"spiffe://{TD}/ns/mesh2/sa/client")
BACKEND = f"spiffe://{TD}/ns/mesh/sa/backend"
SERVICE = "backend.mesh.svc.cluster.local"
SIZE = 1000  # bytes each way per connection


def _pod(ns: str, name: str, sa: str) -> str:
    return f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec:
  nodeName: node1
  serviceAccountName: {sa}
  containers: [{{name: main, command: [sleep, infinity]}}]
"""


LAB_YAML = """
apiVersion: v1
kind: Node
metadata: {name: node1}
---
apiVersion: v1
kind: Node
metadata: {name: node2}
---
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: mesh2, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: mesh}
spec:
  selector: {app: backend}
  ports: [{name: http, port: 8080, targetPort: http}, {name: tcp, port: 9000, targetPort: tcp-echo}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: backend, namespace: mesh}
spec:
  replicas: 1
  selector: {matchLabels: {app: backend}}
  template:
    metadata: {labels: {app: backend}}
    spec:
      nodeName: node2
      serviceAccountName: backend
      containers:
      - name: echo
        command: [nodeagent, lab, echo, --port, "8080", --tcp-port, "9000", --quiet]
        ports: [{name: http, containerPort: 8080}, {name: tcp-echo, containerPort: 9000}]
""" + _pod("mesh", "client", "client") + _pod("mesh", "other", "other") + _pod("mesh2", "client", "client") \
    + _pod("legacy", "client", "default")


class Mesh:
    def __init__(self, lab):
        self.lab = lab
        self.layout = Layout(lab.name, cgroup_root="")
        self.pods = {f"{p['namespace']}/{p['name']}": p for p in lab.status()["pods"]}

    def send(self, pod: str, port: int = 9000, count: int = 5, marker: str = "", host: str = "backend.mesh") -> dict:
        out = self.lab.exec(pod, "python3", "-m", "nodeagent.bench.probe", "send", f"{host}:{port}",
                            "--count", str(count), "--bytes", str(SIZE), "--marker", marker, "--timeout", "5",
                            timeout=120).stdout
        return json.loads(out)

    def samples(self, node: str) -> list:
        text = fetch(self.layout.agent_socket(node), "/metrics").decode()
        return [s for family in text_string_to_metric_families(text) for s in family.samples]

    def total(self, node: str, name: str, **labels) -> float:
        return sum(s.value for s in self.samples(node)
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def flows(self, node: str) -> list[dict]:
        with open(self.layout.flow_log(node)) as f:
            return [json.loads(line) for line in f]

    def status(self, node: str) -> dict:
        return fetch_status(self.layout.agent_socket(node))

    def apply(self, kind: str, name: str, spec: dict) -> None:
        """Apply one security.istio.io resource in namespace mesh and wait until both
        agents enforce this very spec (its digest in their status)."""
        doc = {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": "mesh"},
               "spec": spec}
        self.lab.apply(json.dumps(doc))
        key, digest = f"{kind} mesh/{name}", spec_digest(spec)
        eventually(lambda: [self.status(n)["policy"]["resources"].get(key) for n in ("node1", "node2")],
                   [digest, digest], f"{key} in force on both agents")

    def processes(self) -> dict:
        status = self.lab.status()
        return {"ca": (status["ca"]["pid"], status["ca"]["restarts"]),
                **{n["name"]: (n["agent"]["pid"], n["agent"]["restarts"]) for n in status["nodes"]}}


def eventually(read, expected, what: str, timeout: float = 10.0):
    """Poll `read()` until it equals `expected`; fail showing the last value."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        value = read()
        if value == expected:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: expected {expected!r}, last saw {value!r}")


@pytest.fixture(scope="module")
def mesh(lab_factory_module):
    lab = lab_factory_module(LAB_YAML, agents=True, timeout=90)
    m = Mesh(lab)
    m.started = m.processes()
    return m


def test_meshed_traffic_across_nodes_carries_the_principal_and_only_tls(mesh, tmp_path):
    marker, control = f"SECRET-{uuid.uuid4().hex}", f"PLAIN-{uuid.uuid4().hex}"
    count, flows_before = 20, len(mesh.flows("node2"))
    dst_labels = {"reporter": "destination", "source_principal": CLIENT, "source_workload": "client",
                  "source_workload_namespace": "mesh", "destination_workload": "backend",
                  "destination_principal": BACKEND, "destination_service": SERVICE,
                  "connection_security_policy": "mutual_tls",
                  # Istio's names Kiali draws L4 edges by: canonical service and revision (a bare
                  # pod's: its name, "latest"), the service's name and namespace, the protocol
                  "source_app": "unknown", "source_canonical_service": "client", "source_canonical_revision": "latest",
                  "destination_app": "backend", "destination_version": "unknown",
                  "destination_canonical_service": "backend", "destination_canonical_revision": "latest",
                  "destination_service_name": "backend", "destination_service_namespace": "mesh",
                  "request_protocol": "tcp"}
    src_labels = {**dst_labels, "reporter": "source"}
    before = {name: mesh.total("node2", name, **dst_labels) for name in (
        "istio_tcp_connections_opened_total", "istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total")}
    source_before = mesh.total("node1", "istio_tcp_connections_opened_total", **src_labels)
    capture = FabricCapture(mesh.layout.fabric_netns, str(tmp_path / "fabric.pcap"))
    try:
        meshed = mesh.send("mesh/client", count=count, marker=marker)
        plain = mesh.send("legacy/client", count=3, marker=control)  # the control: plaintext is visible
        # Sent last, the control is in the file once tcpdump has written all the meshed packets.
        eventually(lambda: control.encode() in capture.read(), True, "the plaintext control in the capture")
    finally:
        pcap = capture.stop()
    assert meshed == {"sent": count, "ok": count, "errors": {}, "bytes_sent": count * SIZE,
                      "bytes_received": count * SIZE}
    assert plain["ok"] == 3
    assert control.encode() in pcap, f"the capture missed the plaintext control ({len(pcap)} bytes)"
    assert marker.encode() not in pcap, "the meshed payload crossed the fabric in plaintext"
    assert capture.packets("tcp port 15008") > 0 and capture.packets("tcp port 9000 and src net 10.244.1.0/24") > 0

    eventually(lambda: len([f for f in mesh.flows("node2")[flows_before:] if f["security"] == "mutual_tls"]),
               count, "flow lines of the meshed connections at the destination")
    new = mesh.flows("node2")[flows_before:]
    tunnelled = [f for f in new if f["security"] == "mutual_tls"]
    assert len(tunnelled) == count and len(new) == count + 3
    for f in tunnelled:
        assert (f["src"]["principal"], f["src"]["workload"], f["src"]["addr"].split(":")[0]) == (
            CLIENT, "client", mesh.pods["mesh/client"]["ip"])
        assert (f["dst"]["workload"], f["dst"]["principal"], f["dst"]["service"]) == ("backend", BACKEND, SERVICE)
        assert (f["bytes_received"], f["bytes_sent"], f["verdict"], f["response_flags"]) == (SIZE, SIZE, "allowed", "-")
    assert [f["src"]["principal"] for f in new if f["security"] == "none"] == ["unknown"] * 3
    after = {name: mesh.total("node2", name, **dst_labels) - before[name] for name in before}
    assert after == {"istio_tcp_connections_opened_total": count, "istio_tcp_received_bytes_total": count * SIZE,
                     "istio_tcp_sent_bytes_total": count * SIZE}
    assert mesh.total("node1", "istio_tcp_connections_opened_total", **src_labels) - source_before == count


def test_strict_refuses_plaintext_and_permissive_accepts_it(mesh):
    denied = {"reporter": "destination", "connection_security_policy": "none", "response_flags": "DENY"}
    strict_before = mesh.total("node2", "nodeagent_policy_denials_total", policy="peer-authentication-strict")
    closed_before = mesh.total("node2", "istio_tcp_connections_closed_total", **denied)
    mesh.apply("PeerAuthentication", "default", {"mtls": {"mode": "STRICT"}})
    refused = mesh.send("legacy/client", count=10)
    assert refused["ok"] == 0 and refused["errors"] == {"reset": 10}
    assert mesh.send("mesh/client", count=10)["ok"] == 10  # HBONE is mTLS: STRICT lets it in
    eventually(lambda: mesh.total("node2", "nodeagent_policy_denials_total", policy="peer-authentication-strict")
               - strict_before, 10, "STRICT denials")
    assert mesh.total("node2", "istio_tcp_connections_closed_total", **denied) - closed_before == 10

    mesh.apply("PeerAuthentication", "default", {"mtls": {"mode": "PERMISSIVE"}})
    assert mesh.send("legacy/client", count=10) == {"sent": 10, "ok": 10, "errors": {}, "bytes_sent": 10 * SIZE,
                                                   "bytes_received": 10 * SIZE}
    assert mesh.total("node2", "nodeagent_policy_denials_total", policy="peer-authentication-strict") \
        - strict_before == 10


CLIENTS = ("mesh/client", "mesh/other", "mesh2/client", "legacy/client")


def outcome(mesh: Mesh, port: int = 9000) -> dict[str, tuple[int, dict]]:
    """(successes, errors) of 5 connections from every client."""
    results = {pod: mesh.send(pod, port=port) for pod in CLIENTS}
    return {pod: (r["ok"], r["errors"]) for pod, r in results.items()}


def denials(mesh: Mesh) -> dict[str, float]:
    return {s.labels["policy"]: s.value for s in mesh.samples("node2") if s.name == "nodeagent_policy_denials_total"}


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


OK, RESET = (5, {}), (0, {"reset": 5})


def test_authorization_policies_by_principal_namespace_ip_block_and_port(mesh):
    processes = mesh.processes()
    policy = {"selector": {"matchLabels": {"app": "backend"}}}
    mesh.apply("AuthorizationPolicy", "backend", {**policy, "action": "ALLOW", "rules": [
        {"from": [{"source": {"principals": [f"{TD}/ns/mesh/sa/client"]}}]}]})
    before = denials(mesh)
    assert outcome(mesh) == {"mesh/client": OK, "mesh/other": RESET, "mesh2/client": RESET, "legacy/client": RESET}
    eventually(lambda: delta(denials(mesh), before), {"no-allow-match": 15}, "ALLOW by principal denials")

    legacy_ip = mesh.pods["legacy/client"]["ip"]
    mesh.apply("AuthorizationPolicy", "backend", {**policy, "action": "DENY", "rules": [
        {"from": [{"source": {"namespaces": ["mesh2"]}}]},
        {"from": [{"source": {"ipBlocks": [f"{legacy_ip}/32"]}}]}]})
    before = denials(mesh)
    assert outcome(mesh) == {"mesh/client": OK, "mesh/other": OK, "mesh2/client": RESET, "legacy/client": RESET}
    eventually(lambda: delta(denials(mesh), before), {"mesh/backend": 10}, "DENY by namespace and ipBlock")

    mesh.apply("AuthorizationPolicy", "backend", {**policy, "action": "ALLOW", "rules": [
        {"to": [{"operation": {"ports": ["9000"]}}]}]})
    before = denials(mesh)
    assert outcome(mesh) == {pod: OK for pod in CLIENTS}
    assert outcome(mesh, port=8080) == {pod: RESET for pod in CLIENTS}  # the HTTP port is not allowed
    eventually(lambda: delta(denials(mesh), before), {"no-allow-match": 20}, "ALLOW by port denials")
    assert mesh.processes() == processes  # three policy changes, nothing restarted


def test_a_policy_change_resets_the_established_connections_it_refuses(mesh):
    """As ztunnel: the destination agent re-checks the connections it delivered when a
    policy changes; those the new policy refuses are reset, the others live on."""
    backend = {"selector": {"matchLabels": {"app": "backend"}}}
    mesh.apply("PeerAuthentication", "default", {"mtls": {"mode": "PERMISSIVE"}})
    mesh.apply("AuthorizationPolicy", "backend", {**backend, "action": "ALLOW", "rules": [
        {"to": [{"operation": {"ports": ["9000"]}}]}]})
    pods = ("mesh/client", "mesh/other", "legacy/client")
    holds = {}
    try:
        for pod in pods:
            holds[pod] = HoldClient(mesh.lab.spawn(pod, "python3", "-m", "nodeagent.bench.probe", "hold",
                                                   "backend.mesh:9000", "--no-greeting", stdin=subprocess.PIPE))
        assert {pod: h.echo(f"hello {pod}") for pod, h in holds.items()} == {pod: f"hello {pod}" for pod in pods}
        revoked = mesh.total("node2", "nodeagent_inbound_connections_revoked_total", reason="deny")
        flows = len(mesh.flows("node2"))

        mesh.apply("AuthorizationPolicy", "backend", {**backend, "action": "DENY", "rules": [
            {"from": [{"source": {"principals": [f"{TD}/ns/mesh/sa/other"]}}]}]})
        assert holds["mesh/other"].echo("again") == "error reset"
        assert (holds["mesh/client"].echo("still"), holds["legacy/client"].echo("still")) == ("still", "still")

        mesh.apply("PeerAuthentication", "default", {"mtls": {"mode": "STRICT"}})
        assert holds["legacy/client"].echo("again") == "error reset"  # plaintext, now refused
        assert holds["mesh/client"].echo("still") == "still"
        assert mesh.total("node2", "nodeagent_inbound_connections_revoked_total", reason="deny") - revoked == 2
        # One line each at the destination, once reset: DENY, with the bytes echoed before.
        other, legacy = len("hello mesh/other\n"), len("hello legacy/client\nstill\n")
        eventually(lambda: sorted((f["src"]["principal"], f["verdict"], f["response_flags"], f["bytes_received"],
                                   f["bytes_sent"]) for f in mesh.flows("node2")[flows:]),
                   sorted([(OTHER, "denied", "DENY", other, other), ("unknown", "denied", "DENY", legacy, legacy)]),
                   "flow lines of the two reset connections")
        assert all(f["reason"].startswith("no longer allowed: ") for f in mesh.flows("node2")[flows:])
    finally:
        for hold in holds.values():
            hold.close()
        mesh.apply("PeerAuthentication", "default", {"mtls": {"mode": "PERMISSIVE"}})


def test_nothing_restarted_along_the_way(mesh):
    assert mesh.processes() == mesh.started
    assert all(v[1] == 0 for v in mesh.started.values())
    assert os.path.exists(mesh.layout.root_cert)
