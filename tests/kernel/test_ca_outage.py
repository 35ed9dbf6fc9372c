"""An agent restart while the mesh CA is down, on one real node (nodeagent.bench.sandbox):
two meshed pods talking over HBONE, the CA stopped, the agent restarted.

The certificate the previous agent left (0600 in its --identity-dir) is checked and
served at once: the new agent is ready and 20 of 20 connections pass, as ztunnel keeps
serving while its CA is unreachable. When that file cannot be trusted (here: readable
by others) it is deleted saying why, the agent is not ready and says which certificate
is missing and why (503), and once the CA is back the certificate arrives without a
restart and traffic flows again.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess

import pytest

from nodeagent.bench import sandbox as sandbox_module
from nodeagent.bench.sandbox import AMBIENT, Sandbox, SandboxPod, scaled, workload_identities
from meshed_sandbox import inbound_counted
from nodeagent.errors import NodeagentError

pytestmark = pytest.mark.root
PORT = 9000
COUNT = 20
IDENTITY = "spiffe://cluster.local/ns/app/sa/default"
INBOUND_STREAMS = "hbone_streams_opened_total{direction=inbound}"
HBONE = "--no-same-node-fast-path"  # the pods of this one node talk over HBONE (test_same_node.py: the fast path)


@pytest.fixture
def mesh(tmp_path):
    """client and server (namespace app, meshed, one service account); the probe server
    runs in server; the CA and the agent run and the certificate is held."""
    sb = Sandbox(f"test-{secrets.token_hex(3)}", workdir=tmp_path)
    try:
        sb.setup()
        client, server = sb.add_pod("app", "client"), sb.add_pod("app", "server")
        sb.write_pods()
        sb.label_namespace("app", AMBIENT)
        sb.serve(server, PORT)
        sb.in_pod(client, ["sleep", "infinity"])  # a pod is found by its processes
        ca = sb.start_ca()
        sb.start_agent(*sb.ca_args(), HBONE)
        sb.wait_for(lambda s: len(s["pods"]) == 2 and holds_certificate(s), 15, "both pods and the certificate")
        yield sb, ca, client, server
    finally:
        left = sb.close()
        assert left == [] and sb.leftovers() == []


def holds_certificate(status: dict) -> bool:
    return [(i["identity"], i["valid"]) for i in workload_identities(status)] == [(IDENTITY, True)]


def connect(sb: Sandbox, src: SandboxPod, dst: SandboxPod, count: int = COUNT) -> dict:
    proc = sb.probe(src, "connect", f"{dst.ip}:{PORT}", "--count", str(count), "--timeout", f"{scaled(5):g}",
                    stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=scaled(120))
    return json.loads(out)


def stop_ca(ca: subprocess.Popen) -> None:
    ca.terminate()
    ca.wait(scaled(10))


def readiness(sb: Sandbox) -> tuple[int, str]:
    """GET /healthz/ready on the admin socket: (status code, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(scaled(5))
        sock.connect(str(sb.admin_socket))
        sock.sendall(b"GET /healthz/ready HTTP/1.1\r\nHost: agent\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def key_file(sb: Sandbox) -> str:
    return os.path.join(sb.layout.identity_dir(sb.node), "app_default_cluster.local.pem")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_restart_while_the_ca_is_down_keeps_serving_with_the_certificate_left(mesh, stop):
    sb, ca, client, server = mesh
    before = connect(sb, client, server)
    assert before["ok"] == COUNT
    left = open(key_file(sb), "rb").read()
    stop_ca(ca)
    sb.stop_agent(stop)
    sb.start_agent(*sb.ca_args(), HBONE)  # returns once ready: with the CA down, only the file can make it so
    after = connect(sb, client, server)
    assert after["ok"] == COUNT and after["peers"] == {client.ip: COUNT}
    assert inbound_counted(sb, COUNT)[INBOUND_STREAMS] == COUNT  # through the new agent's tunnel
    status = sb.status()
    assert status["ready"] is True and status["not_ready"] == [] and holds_certificate(status)
    assert readiness(sb) == (200, "ready\n")
    assert open(key_file(sb), "rb").read() == left  # served as it was, no CA involved
    assert "adopted" in (sb.workdir / "agent.log").read_text()


def test_without_a_trustworthy_certificate_the_agent_is_not_ready_until_the_ca_is_back(mesh, monkeypatch):
    sb, ca, client, server = mesh
    assert connect(sb, client, server)["ok"] == COUNT
    stop_ca(ca)
    sb.stop_agent()
    os.chmod(key_file(sb), 0o644)  # readable by others: not to be trusted any more
    with pytest.raises(NodeagentError, match="the agent to become ready"):
        sb.start_agent(*sb.ca_args(), HBONE, timeout=5)
    status = sb.wait_for(lambda s: any("CA unreachable" in m for m in s["not_ready"]), 15, "the reason")
    assert status["ready"] is False and status["not_ready"] == [
        m for m in status["not_ready"] if m.startswith(f"no valid certificate for {IDENTITY}: CA unreachable (")]
    code, body = readiness(sb)
    assert code == 503 and body.startswith(f"not ready: no valid certificate for {IDENTITY}: CA unreachable (")
    log = (sb.workdir / "agent.log").read_text()
    assert f"{key_file(sb)}: has mode 0644, not 0600" in log
    assert connect(sb, client, server, 5)["ok"] == 0  # no certificate: refused, never plaintext
    # The CA back, as it was (its keys and the tokens the agent holds are kept):
    monkeypatch.setattr(sandbox_module.meshca, "provision", lambda *args: None)
    os.replace(sb.layout.ca_log, sb.layout.ca_log + ".1")
    sb.start_ca()
    sb.wait_for(lambda s: s["ready"] and holds_certificate(s), 60, "the certificate from the CA")
    assert readiness(sb) == (200, "ready\n")
    assert connect(sb, client, server)["ok"] == COUNT
