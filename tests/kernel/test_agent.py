"""The node agent on a real kernel: `python -m nodeagent run` in a throwaway node netns
(nodeagent.bench.sandbox), pods as netns + kubelet-named cgroups, real capture programs.
Exact counts against a known workload; every test removes all it made, even on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.admin import fetch
from nodeagent.bench.probe import HoldClient
from nodeagent.bench.sandbox import AMBIENT, Sandbox, SandboxPod, scaled, workload_identities
from nodeagent.capture import bpfsys
from nodeagent.capture.cgroup import attached
from nodeagent.lab import topology

pytestmark = pytest.mark.root
PORT = 9000
SINK_PORT = 9001  # probe sink: counts what it reads, answers the count at EOF
REQUEST = 1000  # bytes a client streams to a sink...
RESPONSE = len(f"{REQUEST}\n")  # ...and the sink's answer: 5 bytes back
ISTIO_BYTES = ("istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total")


@pytest.fixture
def sb(tmp_path):
    sandbox = Sandbox(f"test-{secrets.token_hex(3)}", workdir=tmp_path)
    try:
        sandbox.setup()
        yield sandbox
    finally:
        left = sandbox.close()
        assert left == [] and sandbox.leftovers() == []


@pytest.fixture
def pods(sb):
    """client (namespace app, meshed by the test), plain (namespace plain, never meshed),
    server (namespace peer, never meshed); each runs the probe server on PORT."""
    client, plain, server = sb.add_pod("app", "client"), sb.add_pod("plain", "plain"), sb.add_pod("peer", "server")
    sb.write_pods()
    for ns in ("app", "plain", "peer"):
        sb.label_namespace(ns, {})
    for pod in (client, plain, server):
        sb.serve(pod, PORT)
    return client, plain, server


def connect(sb: Sandbox, src: SandboxPod, dst: SandboxPod, count: int) -> dict:
    proc = sb.probe(src, "connect", f"{dst.ip}:{PORT}", "--count", str(count), "--timeout", f"{scaled(3):g}",
                    stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=scaled(120))
    return json.loads(out)


def counters(sb: Sandbox) -> dict:
    return sb.status()["counters"]


def enrolled(sb: Sandbox) -> list[str]:
    return [p["name"] for p in sb.status()["pods"]]


def mesh(sb: Sandbox, namespace: str, on: bool, expect: list[str]) -> None:
    sb.label_namespace(namespace, AMBIENT if on else {})
    sb.wait_for(lambda s: sorted(p["name"] for p in s["pods"]) == expect, 10, f"enrolled pods {expect}")


def start_meshed(sb: Sandbox, *agent_args: str) -> None:
    """Mesh namespace app, start the agent and wait until it has enrolled the client."""
    sb.label_namespace("app", AMBIENT)
    sb.start_agent(*agent_args)
    sb.wait_for(lambda s: len(s["pods"]) == 1, 10, "client enrolled")


def Held(sb: Sandbox, src: SandboxPod, dst: SandboxPod) -> HoldClient:
    """A long-lived connection from a pod (probe hold): send a line, read its echo."""
    return HoldClient(sb.probe(src, "hold", f"{dst.ip}:{PORT}", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, bufsize=1))


def test_outbound_capture_exact_counts(sb, pods):
    client, plain, server = pods
    start_meshed(sb)

    meshed = connect(sb, client, server, 100)
    assert meshed["ok"] == 100 and meshed["errors"] == {}
    assert meshed["peers"] == {client.ip: 100}  # passthrough keeps the pod's own address
    unmeshed = connect(sb, plain, server, 100)
    assert unmeshed["ok"] == 100 and unmeshed["peers"] == {plain.ip: 100}

    status = sb.status()
    c = status["counters"]
    assert c["outbound_connections_total"] == 100
    assert c["passthrough_connections_total"] == 100
    assert not [k for k, v in c.items() if k.startswith("connection_failures_total") and v]
    assert status["capture"]["counters"]["captured"] == 100
    assert [p["name"] for p in status["pods"]] == ["client"]


def test_pod_opt_out_is_not_captured_and_can_opt_back_in(sb, pods):
    client, plain, server = pods
    start_meshed(sb)
    sb.label_pod(client, {"istio.io/dataplane-mode": "none"})  # opt out inside a meshed namespace
    sb.wait_for(lambda s: s["pods"] == [], 10, "client removed")

    result = connect(sb, client, server, 30)
    assert result["ok"] == 30 and result["peers"] == {client.ip: 30}
    status = sb.status()
    assert status["counters"].get("outbound_connections_total", 0) == 0
    assert status["capture"]["counters"]["captured"] == 0

    sb.label_pod(client, {})
    sb.wait_for(lambda s: [p["name"] for p in s["pods"]] == ["client"], 10, "client enrolled again")
    assert connect(sb, client, server, 10)["ok"] == 10
    assert counters(sb)["outbound_connections_total"] == 10


def test_inbound_keeps_client_address(sb, pods):
    client, plain, server = pods
    start_meshed(sb)

    result = connect(sb, server, client, 20)
    assert result["ok"] == 20 and result["peers"] == {server.ip: 20}  # the app saw the real peer
    status = sb.status()
    assert status["counters"]["inbound_connections_total"] == 20
    assert status["capture"]["counters"]["steered"] == 20
    assert connect(sb, server, plain, 5)["peers"] == {server.ip: 5}
    assert counters(sb)["inbound_connections_total"] == 20


def stream(sb: Sandbox, src: SandboxPod, dst: SandboxPod) -> dict:
    """REQUEST bytes from `src` to the sink in `dst`, half-close, read its RESPONSE."""
    proc = sb.probe(src, "stream", f"{dst.ip}:{SINK_PORT}", "--bytes", str(REQUEST), stdout=subprocess.PIPE,
                    text=True)
    out, _ = proc.communicate(timeout=scaled(60))
    return json.loads(out)


def istio_bytes(sb: Sandbox) -> dict:
    """{(metric, reporter, source workload, destination workload, security): value} from /metrics."""
    text = fetch(sb.admin_socket, "/metrics").decode()
    return {(s.name, s.labels["reporter"], s.labels["source_workload"], s.labels["destination_workload"],
             s.labels["connection_security_policy"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name in ISTIO_BYTES}


def test_bytes_are_counted_by_direction_at_source_and_destination(sb, pods):
    """Istio's meaning, for both reporters: received = the request, from the client;
    sent = the response, back to it. Asymmetric payloads, so a swap cannot pass."""
    client, plain, server = pods
    sb.label_namespace("app", AMBIENT)
    sb.label_namespace("peer", AMBIENT)  # client -> server through HBONE, reported by both ends
    sb.start_ca()
    sb.start_agent(*sb.ca_args())
    sb.wait_for(lambda s: len(s["pods"]) == 2 and [i["valid"] for i in workload_identities(s)] == [True, True],
                15, "client and server enrolled and their certificates held")
    for pod in (client, plain, server):
        sink = sb.probe(pod, "sink", "--port", str(SINK_PORT), stderr=subprocess.PIPE, text=True)
        sink.stderr.readline()  # "probe: serving on ..." once listening

    for src, dst in ((client, server), (client, plain), (plain, client)):  # HBONE, passthrough, plaintext in
        assert stream(sb, src, dst)["bytes"] == REQUEST
    c = sb.wait_for(lambda s: s["counters"]["active_connections{direction=outbound}"] == 0
                    and s["counters"]["active_connections{direction=inbound}"] == 0, 10, "every relay ended")["counters"]

    # The agent's own counters: "sent" is towards the upstream, "received" back to the client.
    assert {k: v for k, v in c.items() if k.startswith("relayed_bytes_total")} == {
        "relayed_bytes_total{direction=outbound,flow=sent}": 2 * REQUEST,
        "relayed_bytes_total{direction=outbound,flow=received}": 2 * RESPONSE,
        "relayed_bytes_total{direction=inbound,flow=sent}": 2 * REQUEST,
        "relayed_bytes_total{direction=inbound,flow=received}": 2 * RESPONSE}
    reports = [("source", "client", "server", "mutual_tls"), ("destination", "client", "server", "mutual_tls"),
               ("source", "client", "plain", "none"), ("destination", "plain", "client", "none")]
    received, sent = ISTIO_BYTES
    assert istio_bytes(sb) == {**{(received, *r): REQUEST for r in reports}, **{(sent, *r): RESPONSE for r in reports}}
    sb.wait_for(lambda _: len(sb.flows()) == len(reports), 10, "the flow lines")
    flows = sb.flows()
    assert sorted((f["reporter"], f["src"]["workload"], f["dst"]["workload"], f["security"], f["bytes_received"],
                   f["bytes_sent"], f["verdict"]) for f in flows) == sorted(
        (*r, REQUEST, RESPONSE, "allowed") for r in reports)


def test_label_change_keeps_long_lived_connections(sb, pods):
    client, plain, server = pods
    sb.start_agent()
    before = Held(sb, client, server)  # opened before enrolment: never captured
    assert before.greeting.startswith(client.ip + ":")

    mesh(sb, "app", True, ["client"])
    proxied = Held(sb, client, server)  # captured: relayed by the agent
    inbound = Held(sb, server, client)  # steered: delivered by the agent
    assert proxied.greeting.startswith(client.ip + ":") and inbound.greeting.startswith(server.ip + ":")
    assert counters(sb)["outbound_connections_total"] == 1
    assert counters(sb)["inbound_connections_total"] == 1
    assert before.echo("a1") == "a1" and proxied.echo("b1") == "b1" and inbound.echo("c1") == "c1"

    mesh(sb, "app", False, [])
    assert before.echo("a2") == "a2" and proxied.echo("b2") == "b2" and inbound.echo("c2") == "c2"
    after = connect(sb, client, server, 5)
    assert after["ok"] == 5
    assert counters(sb)["outbound_connections_total"] == 1  # no longer captured

    mesh(sb, "app", True, ["client"])
    assert before.echo("a3") == "a3" and proxied.echo("b3") == "b3" and inbound.echo("c3") == "c3"
    for held in (before, proxied, inbound):
        held.close()
    assert connect(sb, client, server, 3)["ok"] == 3
    assert counters(sb)["outbound_connections_total"] == 4


def test_sigkill_fails_closed_and_restart_adopts(sb, pods):
    client, plain, server = pods
    start_meshed(sb)
    assert connect(sb, client, server, 5)["ok"] == 5

    assert sb.stop_agent(signal.SIGKILL) == -signal.SIGKILL
    assert os.path.isdir(os.path.join(sb.bpffs, "maps"))
    down = connect(sb, client, server, 10)
    assert down["ok"] == 0 and down["errors"] == {"refused": 10}  # fail closed
    inbound_down = connect(sb, server, client, 3)
    assert inbound_down["ok"] == 0 and inbound_down["errors"] == {"refused": 3}
    assert connect(sb, plain, server, 3)["ok"] == 3  # unmeshed pods never notice

    sb.start_agent()
    status = sb.wait_for(lambda s: len(s["pods"]) == 1, 10, "client re-enrolled")
    assert status["counters"]["outbound_connections_total"] == 0
    up = connect(sb, client, server, 10)
    assert up["ok"] == 10 and up["peers"] == {client.ip: 10}
    assert connect(sb, server, client, 4)["peers"] == {server.ip: 4}
    c = counters(sb)
    assert c["outbound_connections_total"] == 10 and c["inbound_connections_total"] == 4


def test_restart_drops_enrolments_that_left_the_mesh_meanwhile(sb, pods):
    client, plain, server = pods
    start_meshed(sb)
    cookie = sb.status()["pods"][0]["netns_cookie"]
    sb.stop_agent(signal.SIGKILL)
    sb.label_namespace("app", {})  # leaves the mesh while no agent runs
    assert os.path.exists(os.path.join(sb.bpffs, "links", str(cookie)))

    sb.start_agent()
    assert sb.status()["pods"] == []
    assert not os.path.exists(os.path.join(sb.bpffs, "links", str(cookie)))
    out = connect(sb, client, server, 5)
    inbound = connect(sb, server, client, 5)
    assert out["ok"] == 5 and inbound["ok"] == 5 and inbound["peers"] == {server.ip: 5}
    assert counters(sb)["outbound_connections_total"] == 0 and counters(sb)["inbound_connections_total"] == 0
    assert sb.status()["capture"]["counters"]["captured"] == 0


def _programs_on(cgroup: str) -> list[str]:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [name for t in (bpfsys.ATTACH_CGROUP_INET4_CONNECT, bpfsys.ATTACH_CGROUP_INET6_CONNECT,
                               bpfsys.ATTACH_CGROUP_SOCK_OPS) for _, name in attached(fd, t)]
    finally:
        os.close(fd)


def _rules(pod: SandboxPod) -> str:
    return subprocess.run(["ip", "-n", pod.netns, "rule"], capture_output=True, text=True, check=True).stdout


def test_sigterm_keeps_capture_so_meshed_pods_fail_closed_until_uninstall(sb, pods):
    """Issue 9.3: a clean stop (every rolling restart) used to detach capture, and meshed
    pods talked plaintext until the next agent was ready. Now only `nodeagent uninstall`
    removes it."""
    client, plain, server = pods
    start_meshed(sb)
    assert sorted(_programs_on(sb.kubepods)) == ["na_connect4", "na_connect6", "na_sockops"]

    assert sb.stop_agent(signal.SIGTERM) == 0
    assert sorted(_programs_on(sb.kubepods)) == ["na_connect4", "na_connect6", "na_sockops"]
    assert os.path.isdir(os.path.join(sb.bpffs, "maps")) and not sb.admin_socket.exists()
    assert connect(sb, client, server, 5)["errors"] == {"refused": 5}  # never around the mesh
    assert connect(sb, plain, server, 5)["ok"] == 5  # unmeshed pods never noticed

    out = subprocess.run([os.sys.executable, "-m", "nodeagent", "uninstall", "--cgroup", sb.kubepods,
                          "--bpffs", sb.bpffs], capture_output=True, text=True, check=True).stdout
    assert sorted(line.split(" (id")[0] for line in out.splitlines() if line.startswith("detached")) == \
        ["detached na_connect4", "detached na_connect6", "detached na_sockops"], out
    assert out.splitlines()[-1] == f"unpinned {sb.bpffs}"
    assert _programs_on(sb.kubepods) == [] and not os.path.exists(sb.bpffs)
    result = connect(sb, client, server, 5)
    assert (result["ok"], result["peers"]) == (5, {client.ip: 5})  # out of the mesh: direct
    again = subprocess.run([os.sys.executable, "-m", "nodeagent", "uninstall", "--cgroup", sb.kubepods,
                            "--bpffs", sb.bpffs], capture_output=True, text=True, check=True).stdout
    assert again.startswith("nothing to remove")


def test_sigterm_with_no_keep_on_exit_leaves_nothing_attached_or_pinned(sb, pods):
    client, plain, server = pods
    start_meshed(sb, "--no-keep-on-exit")
    assert sorted(_programs_on(sb.kubepods)) == ["na_connect4", "na_connect6", "na_sockops"]
    assert "lookup 539" in _rules(client)

    assert sb.stop_agent(signal.SIGTERM) == 0
    assert _programs_on(sb.kubepods) == []
    assert not os.path.exists(sb.bpffs)
    assert "lookup 539" not in _rules(client)
    assert not sb.admin_socket.exists()
    direct = connect(sb, client, server, 5)
    assert direct["ok"] == 5 and direct["peers"] == {client.ip: 5}
    assert connect(sb, server, client, 5)["ok"] == 5


def test_keep_on_exit_leaves_capture_for_the_next_agent(sb, pods):
    client, plain, server = pods
    start_meshed(sb, "--keep-on-exit")

    assert sb.stop_agent(signal.SIGTERM) == 0
    assert sorted(_programs_on(sb.kubepods)) == ["na_connect4", "na_connect6", "na_sockops"]
    assert os.path.isdir(os.path.join(sb.bpffs, "maps"))
    assert connect(sb, client, server, 3)["errors"] == {"refused": 3}

    sb.start_agent("--no-keep-on-exit")
    sb.wait_for(lambda s: len(s["pods"]) == 1, 10, "client re-enrolled")
    assert connect(sb, client, server, 3)["ok"] == 3
    assert sb.stop_agent(signal.SIGTERM) == 0
    assert _programs_on(sb.kubepods) == [] and not os.path.exists(sb.bpffs)


def test_status_command_renders_live_agent(sb, pods):
    client, plain, server = pods
    start_meshed(sb)
    assert connect(sb, client, server, 7)["ok"] == 7
    run = [os.sys.executable, "-m", "nodeagent", "status", "--socket", str(sb.admin_socket)]
    text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert f"app        client  {client.ip}" in text
    assert any(line.split() == ["outbound_connections_total", "7"] for line in text.splitlines())
    for name in ("na_connect4", "na_sockops", "na_pods", "na_origdst"):
        assert name in text
    data = json.loads(subprocess.run(run + ["--output", "json"], capture_output=True, text=True,
                                     check=True).stdout)
    assert data["pods"][0]["netns_cookie"] > 0 and data["counters"]["outbound_connections_total"] == 7


def test_a_failed_enrolment_leaves_nothing_of_the_pod_but_refuses_its_inbound_and_is_retried(sb, pods):
    """The app holds the mesh's inbound port 15006: enrolment fails after the pod's
    delivery routing is in place. Everything is undone (no routing rule, no capture
    entry, no listener), the failure is reported and retried with backoff, and once the
    port is free the pod is enrolled. Meanwhile connections to the pod are refused in
    its netns (it is meshed: nothing reaches its app around the mesh); before, its app
    took them, plaintext and unchecked."""
    client, plain, server = pods
    squatter = sb.serve(client, 15006)
    try:
        sb.label_namespace("app", AMBIENT)
        sb.start_agent()
        status = sb.wait_for(lambda s: [w for w in s["waiting"] if w["name"] == "client" and w["attempts"] >= 2],
                             20, "two failed enrolments of client")
        failed = next(w for w in status["waiting"] if w["name"] == "client")
        assert "Address already in use" in failed["reason"] and "15006" in failed["reason"], failed
        assert status["pods"] == [] and "lookup 539" not in _rules(client)
        maps = {m["name"]: m["entries"] for m in status["capture"]["maps"]}
        assert maps["na_pods"] == 0, maps
        result = connect(sb, client, server, 3)
        assert (result["ok"], result["peers"]) == (3, {client.ip: 3})  # not captured: nothing half-done
        assert failed["inbound"] == "refused" and maps["na_enrolled_ips"] == 1 and maps["na_inbound"] == 0, maps
        dropped = sb.status()["capture"]["counters"]["dropped_failclosed"]
        assert connect(sb, plain, client, 3)["errors"] == {"refused": 3}  # fail closed, not to the app
        assert sb.status()["capture"]["counters"]["dropped_failclosed"] == dropped + 3
    finally:
        squatter.kill()
        squatter.wait()
    sb.wait_for(lambda s: [p["name"] for p in s["pods"]] == ["client"], 30, "client enrolled once 15006 is free")
    assert "lookup 539" in _rules(client)
    assert connect(sb, client, server, 3)["ok"] == 3
    assert counters(sb)["outbound_connections_total"] == 3


V6_NODE, V6_POD, V6_PORT = "fd00:77::1", "fd00:77::2", 9100
V6_EXCHANGE = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        s.sendall(b"ping\\n")
        print("ok" if s.recv(5) == b"ping\\n" else "mismatch")
except ConnectionRefusedError:
    print("refused")
except OSError as exc:
    print(type(exc).__name__)
"""


def _from_the_node_v6(sb: Sandbox) -> str:
    """One exchange from the node's netns with the client pod's IPv6 address (the echo
    app's TCP port): ok, refused, or the error's name."""
    return subprocess.run(["nsenter", f"--net=/run/netns/{sb.node_netns}", "--", sys.executable, "-c", V6_EXCHANGE,
                           V6_POD, str(V6_PORT), f"{scaled(3):g}"],
                          capture_output=True, text=True, check=True, timeout=scaled(30)).stdout.strip()


def test_a_dual_stack_pods_other_family_is_refused_in_its_netns_not_left_open(sb, pods):
    """A meshed pod with two addresses (status.podIPs: IPv4, then IPv6) has only its
    status.podIP carried by the mesh. Its IPv6 address took any client's connection
    straight to the app, plaintext, with every policy and STRICT unenforced (the model
    read status.podIP alone). Now the agent refuses that address in the pod's netns
    (fail closed, as for a pod it cannot serve), says so in status, and gives it back
    when the pod leaves the mesh; its IPv4 address is meshed as before."""
    client, plain, _ = pods
    veth = topology.host_veth(client.namespace, client.name)
    for netns_name, device, address in ((sb.node_netns, veth, V6_NODE), (client.netns, "eth0", V6_POD)):
        subprocess.run(["ip", "-n", netns_name, "-6", "addr", "add", f"{address}/64", "dev", device, "nodad"],
                       check=True)
    client.other_ips = [V6_POD]
    sb.write_pods()
    sb.in_pod(client, [sys.executable, "-m", "nodeagent.lab.echo", "--port", "0", "--tcp-port", str(V6_PORT),
                       "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + scaled(20)
    while (answer := _from_the_node_v6(sb)) != "ok":  # the app starting: before the mesh, open to anybody
        assert time.monotonic() < deadline, f"the app never answered on its IPv6 address ({answer})"
        time.sleep(0.1)
    start_meshed(sb)
    [pod] = sb.status()["pods"]
    assert (pod["ip"], pod["refused_ips"]) == (client.ip, [V6_POD])
    dropped = sb.status()["capture"]["counters"]["dropped_failclosed"]
    assert _from_the_node_v6(sb) == "refused"
    assert sb.status()["capture"]["counters"]["dropped_failclosed"] == dropped + 1
    result = connect(sb, plain, client, 2)  # its IPv4 address: through the mesh, as the client
    assert (result["ok"], result["peers"]) == (2, {plain.ip: 2})
    text = subprocess.run([sys.executable, "-m", "nodeagent", "status", "--socket", str(sb.admin_socket)],
                          capture_output=True, text=True, check=True).stdout
    assert f"app        client  {client.ip} (refused: {V6_POD}, dual-stack)" in text
    mesh(sb, "app", False, [])
    assert _from_the_node_v6(sb) == "ok"  # out of the mesh: nothing of it left refused
    maps = {m["name"]: m["entries"] for m in sb.status()["capture"]["maps"]}
    assert maps["na_enrolled_ips"] == 0, maps


NODE_IP = "172.31.255.1"  # the sandbox node's own address (it has none of its own)


def _from_the_node(sb: Sandbox, pod: SandboxPod, port: int, count: int) -> dict:
    """`count` probe connections from the node's netns (where kubelet runs) to the pod."""
    proc = sb.spawn(sb.node_netns, sb.layout.system_cgroup(sb.node),
                    [sys.executable, "-m", "nodeagent.bench.probe", "connect", f"{pod.ip}:{port}", "--count",
                     str(count), "--timeout", f"{scaled(3):g}"], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=scaled(120))
    return json.loads(out)


def test_kubelets_probes_reach_a_strict_pod_from_the_node_on_its_probe_ports_only(sb, pods):
    """STRICT refused kubelet's probes (plaintext from the node's address), so under a
    mesh-wide STRICT PeerAuthentication no meshed pod with a tcpSocket or httpGet probe
    ever became Ready. As Istio's ambient mode lets them past ztunnel, the node's own
    connections to a port the pod's probes name are delivered around PeerAuthentication
    and AuthorizationPolicy, as the client; another port from the node, and the probe
    port from anybody else, are refused as before."""
    client, plain, _ = pods
    subprocess.run(["ip", "-n", sb.node_netns, "addr", "add", f"{NODE_IP}/32", "dev", "lo"], check=True)  # a node's
    client.probe_ports = [PORT]
    sb.write_pods()
    sb.serve(client, SINK_PORT)  # a port no probe names
    sb.write_policy("strict", {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                               "metadata": {"name": "default", "namespace": "app"},
                               "spec": {"mtls": {"mode": "STRICT"}}})
    start_meshed(sb)
    sb.wait_for(lambda s: "PeerAuthentication app/default" in s["policy"]["resources"], 10, "STRICT in force")
    assert (sb.status()["pods"][0]["node_source"]) == NODE_IP
    probed = _from_the_node(sb, client, PORT, 3)
    assert (probed["ok"], probed["errors"], probed["peers"]) == (3, {}, {NODE_IP: 3}), probed  # as the client
    assert _from_the_node(sb, client, SINK_PORT, 2)["errors"] == {"reset": 2}  # by the agent: STRICT
    assert connect(sb, plain, client, 2)["errors"] == {"reset": 2}  # the probe port, not from the node
    # A NodePort client from outside the node, masqueraded to the node's address by
    # kube-proxy's rules, has kubelet's source address and port but no socket of the node.
    outside = f"{sb.layout.netns_prefix}outside"
    topology.create_netns(outside)
    for argv in (["ip", "-n", sb.node_netns, "link", "add", "vout", "type", "veth", "peer", "name", "eth0",
                  "netns", outside],
                 ["ip", "-n", sb.node_netns, "addr", "add", "192.0.2.1/24", "dev", "vout"],
                 ["ip", "-n", sb.node_netns, "link", "set", "vout", "up"],
                 ["ip", "-n", outside, "addr", "add", "192.0.2.2/24", "dev", "eth0"],
                 ["ip", "-n", outside, "link", "set", "eth0", "up"]):
        subprocess.run(argv, check=True, capture_output=True)
    nodeport = (f"table ip nodeport {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n"
                f"  ip daddr 192.0.2.1 tcp dport 30080 dnat to {client.ip}:{PORT}\n }}\n"
                f" chain post {{\n  type nat hook postrouting priority srcnat;\n"
                f"  ip saddr 192.0.2.2 snat to {NODE_IP}\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", sb.node_netns, "nft", "-f", "-"], input=nodeport, text=True, check=True)
    proc = sb.spawn(outside, sb.layout.system_cgroup(sb.node),
                    [sys.executable, "-m", "nodeagent.bench.probe", "connect", "192.0.2.1:30080", "--count", "2",
                     "--timeout", f"{scaled(3):g}"], stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.communicate(timeout=scaled(120))[0])["errors"] == {"reset": 2}  # STRICT, not a probe
    assert counters(sb)["probe_connections_total"] == 3
    assert counters(sb)["inbound_connections_total"] == 9
