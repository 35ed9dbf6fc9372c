"""`nodeagent bench tunnel`: what the HBONE tunnel costs a connection, on a real lab.

Brings up a two-node lab (agents, CA) of its own, measures, and takes it down again,
also on failure. A client on node1 talks to a server on node2 twice over the same
nodes and fabric: from an unmeshed namespace (direct: plain TCP, no agent) and from a
meshed one (capture, HBONE over mutual TLS between the agents, delivery). For each:
1. added latency per request: one connection, N request/response round trips of S
   bytes to an echo server; p50/p90/p99 of a round trip;
2. single-stream throughput: M MiB sent one way on one connection to a sink that
   answers the count at EOF.
The destination agent's HBONE stream counter proves the meshed path was tunnelled.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import sys

from nodeagent.admin import fetch
from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.kube.objects import parse_documents
from nodeagent.lab import cgroups, lifecycle, teardown, topology
from nodeagent.lab.layout import Layout, check_name

ECHO_PORT, SINK_PORT = 9000, 9001
WARMUP = 20
CONNECTIONS = 3  # per path: warm-up, round trips, stream
PATHS = ("direct", "hbone")
NAMESPACES = {"direct": "plain", "hbone": "bench"}


def lab_yaml() -> str:
    pods = []
    for ns in NAMESPACES.values():
        pods.append(_pod(ns, "client", "node1", ["sleep", "infinity"]))
        pods.append(_pod(ns, "server", "node2", ["nodeagent", "lab", "echo", "--port", "8080", "--tcp-port",
                                                 str(ECHO_PORT), "--quiet"],
                         ["python3", "-m", "nodeagent.bench.probe", "sink", "--port", str(SINK_PORT)]))
    return "\n---\n".join([
        "apiVersion: v1\nkind: Node\nmetadata: {name: node1}", "apiVersion: v1\nkind: Node\nmetadata: {name: node2}",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: plain}", *pods]) + "\n"


def _pod(ns: str, name: str, node: str, *commands: list[str]) -> str:
    containers = ", ".join(f"{{name: c{i}, command: {json.dumps(c)}}}" for i, c in enumerate(commands))
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec: {{nodeName: {node}, containers: [{containers}]}}")


def run_tunnel(requests: int = 1000, size: int = 64, megabytes: int = 128, name: str | None = None,
               progress=lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    name = check_name(name) if name is not None else f"bt{secrets.token_hex(3)}"
    if not 1 <= requests <= 1_000_000 or not 1 <= size <= 65536 or not 1 <= megabytes <= 4096:
        raise ConfigError("--requests/--size/--megabytes", f"{requests}/{size}/{megabytes} out of range",
                          "1-1000000 round trips of 1-65536 bytes, 1-4096 MiB")
    layout = Layout(name, cgroups.cgroup2_root())
    result: dict = {"lab": name, "requests": requests, "size": size, "megabytes": megabytes,
                    "kernel": platform.release()}
    try:
        lifecycle.up(name, parse_documents(lab_yaml(), "bench-tunnel.yaml"), True, progress, 120)
        ips = {path: _pod_ip(name, ns) for path, ns in NAMESPACES.items()}
        before = _hbone_streams(layout)
        result.update(_measure(name, ips, requests, size, megabytes))
        result["hbone_streams"] = _hbone_streams(layout) - before
    finally:
        teardown.down(layout)
        result["left_behind"] = left_behind(layout)
    return result


def _measure(name: str, ips: dict[str, str], requests: int, size: int, megabytes: int) -> dict:
    latency, throughput = {}, {}
    for path in PATHS:
        client = f"{NAMESPACES[path]}/client"
        _probe(name, client, "rr", f"{ips[path]}:{ECHO_PORT}", "--count", str(WARMUP), "--size", str(size))
        latency[path] = _probe(name, client, "rr", f"{ips[path]}:{ECHO_PORT}", "--count", str(requests),
                               "--size", str(size))["latency_us"]
        throughput[path] = _probe(name, client, "stream", f"{ips[path]}:{SINK_PORT}",
                                  "--bytes", str(megabytes << 20), "--timeout", "60")["mib_per_s"]
    latency["added"] = {p: latency["hbone"][p] - latency["direct"][p] for p in latency["direct"]}
    return {"latency_us": latency, "throughput_mib_s": throughput}


def _probe(name: str, pod: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "nodeagent", "lab", "exec", "--name", name, pod, "--", "python3",
                           "-m", "nodeagent.bench.probe", *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise NodeagentError(f"probe {args[0]} from {pod} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return json.loads(proc.stdout)


def _pod_ip(name: str, namespace: str) -> str:
    out = subprocess.run([sys.executable, "-m", "nodeagent", "lab", "status", "--name", name, "--output", "json"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return next(p["ip"] for p in json.loads(out)["pods"] if p["namespace"] == namespace and p["name"] == "server")


def _hbone_streams(layout: Layout) -> int:
    """HBONE streams the server's agent (node2) accepted so far."""
    from prometheus_client.parser import text_string_to_metric_families

    text = fetch(layout.agent_socket("node2"), "/metrics").decode()
    return int(sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "nodeagent_hbone_streams_opened_total" and s.labels.get("direction") == "inbound"))


def left_behind(layout: Layout) -> list[str]:
    found = [f"netns {n}" for n in topology.list_netns(layout.netns_prefix)]
    return found + [p for p in (layout.state_dir, layout.lab_cgroup, layout.bpffs_dir) if os.path.exists(p)]


def render(result: dict, output: str) -> str:
    if output == "json":
        return json.dumps(result, indent=2, sort_keys=True) + "\n"
    lat, tput = result["latency_us"], result["throughput_mib_s"]
    rows = [("direct", lat["direct"], f"{tput['direct']:.1f}"), ("hbone", lat["hbone"], f"{tput['hbone']:.1f}"),
            ("added", lat["added"], f"x{tput['hbone'] / tput['direct']:.2f}")]
    lines = [f"nodeagent bench tunnel: lab {result['lab']}, client on node1, server on node2, "
             f"kernel {result['kernel']}",
             f"latency: {result['requests']} round trips of {result['size']} B on one connection; "
             f"throughput: {result['megabytes']} MiB one way on one connection",
             f"{'PATH':<8}{'P50 US':>10}{'P90 US':>10}{'P99 US':>10}{'MIB/S':>10}"]
    lines += [f"{name:<8}{v['p50']:>10.0f}{v['p90']:>10.0f}{v['p99']:>10.0f}{t:>10}" for name, v, t in rows]
    lines.append(f"HBONE streams accepted by the server's agent: {result['hbone_streams']} "
                 f"(the meshed path made {CONNECTIONS} connections)")
    left = result["left_behind"]
    lines.append("cleanup: nothing left behind" if not left else f"cleanup: LEFT BEHIND {', '.join(left)}")
    return "\n".join(lines) + "\n"
