"""CPU per 1000 requests through the waypoint, on a lab of its own (root).

Usage: python -m nodeagent.bench.waypointcpu [--seconds 20] [--connections 8] [--name X] [-o json]

Brings up a two-node lab: a client pod (sleep) on node1 and the lab's echo app on node2
in a meshed namespace, Service `backend` (port `http` 8080) with a VirtualService (the
client side's L7) and an AuthorizationPolicy with an HTTP rule on the backend, which the
client side's waypoint enforces (one waypoint per request), so every request takes
client → agent node1 → waypoint Envoy node1 → agent node1 → HBONE (node1's own identity,
vouching) → agent node2 → server, and node1's waypoint writes an access-log line for it,
which its agent reads (node2's counts none: its waypoint is not on the path). wrk in the client pod sends
keep-alive GETs for --seconds. Before and after, the bench reads utime+stime of each
agent and each Envoy from /proc/PID/stat, and istio_requests_total of node1
(reporter="waypoint") and node2 (reporter="destination") once they have stopped moving
(Envoy flushes its access log every 200 ms). Prints ms of CPU per 1000 requests for each
process and for the agents together, and takes the lab down in `finally`.

Caveats: wrk, the echo app and the four processes share the machine's cores, so the
request rate (printed) depends on the machine; CPU per request is what to compare
between runs on one machine. The requests counted may exceed wrk's by up to the
connection count (requests wrk cut at the end are logged by Envoy too).
The run fails if wrk saw an error or a non-2xx answer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time

from nodeagent.admin import fetch_requests, fetch_status
from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.kube.objects import parse_documents
from nodeagent.lab import cgroups, lifecycle, teardown
from nodeagent.lab.layout import Layout, check_name
from nodeagent.lab.state import StateDir

NODES = ("node1", "node2")
LAB_YAML = """\
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
metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: node1, containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: backend, namespace: bench, labels: {app: backend, version: v1}}
spec: {nodeName: node2, containers: [{name: c, command: [nodeagent, lab, echo, --port, "8080", --quiet]}]}
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: bench}
spec: {selector: {app: backend}, ports: [{name: http, port: 8080, targetPort: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: backend, namespace: bench}
spec:
  hosts: [backend]
  http: [{route: [{destination: {host: backend}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: bench}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/bench/sa/default]}}], to: [{operation: {methods: [GET]}}]}]
"""
REPORTERS = {"node1": "waypoint", "node2": "destination"}  # whose request count proves the path
URL = "http://backend.bench:8080/"


def run(seconds: int, connections: int, name: str | None,
        progress=lambda line: print(line, file=sys.stderr, flush=True)) -> dict:
    name = check_name(name) if name is not None else f"wc{secrets.token_hex(3)}"
    if not 1 <= seconds <= 3600 or not 1 <= connections <= 1000:
        raise ConfigError("--seconds/--connections", f"{seconds}/{connections} out of range",
                          "1-3600 seconds, 1-1000 connections")
    layout = Layout(name, cgroups.cgroup2_root())
    result: dict = {"lab": name, "seconds": seconds, "connections": connections, "cpus": os.cpu_count()}
    try:
        lifecycle.up(name, parse_documents(LAB_YAML, "waypointcpu.yaml"), True, progress, 120)
        pids = _pids(layout)
        _wrk(name, 2, connections)  # warm-up: connections, pools, the label cache
        counted = _settled(layout)
        before = {role: _cpu_ms(pid) for role, pid in pids.items()}
        sent = _wrk(name, seconds, connections)
        counted = [after - before for before, after in zip(counted, _settled(layout))]
        after = {role: _cpu_ms(pid) for role, pid in pids.items()}
        result.update(requests=sent, counted=dict(zip(NODES, counted)), rate=sent / seconds,
                      cpu_ms={role: after[role] - before[role] for role in pids})
    finally:
        teardown.down(layout)
        result["left_behind"] = os.path.exists(layout.state_dir)
    return result


def _pids(layout: Layout) -> dict[str, int]:
    runtime = StateDir(layout).load_runtime()
    pids = {f"agent {node}": runtime.agents[node]["pid"] for node in NODES}
    for node in NODES:
        envoy = fetch_status(layout.agent_socket(node))["waypoint"]["envoy"]
        if not envoy["running"]:
            raise NodeagentError(f"the waypoint Envoy of {node} is not running", "see its agent's log")
        pids[f"envoy {node}"] = envoy["pid"]
    return pids


def _cpu_ms(pid: int) -> float:
    """utime + stime of a process (its threads included), in ms."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def _wrk(name: str, seconds: int, connections: int) -> int:
    proc = subprocess.run([sys.executable, "-m", "nodeagent", "lab", "exec", "--name", name, "bench/client", "--",
                           "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", URL],
                          capture_output=True, text=True, timeout=seconds + 60)
    found = re.search(r"(\d+) requests in", proc.stdout)
    if proc.returncode != 0 or found is None or "Non-2xx" in proc.stdout or "Socket errors" in proc.stdout:
        raise NodeagentError(f"wrk failed or saw errors: {proc.stdout.strip()} {proc.stderr.strip()}")
    return int(found.group(1))


def _settled(layout: Layout, timeout: float = 10.0) -> tuple[int, ...]:
    """Each node's request count (REPORTERS) once two reads 0.5 s apart agree."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        counts = tuple(_requests(layout, node) for node in NODES)
        if counts == last:
            return counts
        last = counts
        time.sleep(0.5)
    raise NodeagentError(f"istio_requests_total kept moving for {timeout} s")


def _requests(layout: Layout, node: str) -> int:
    return fetch_requests(layout.agent_socket(node), REPORTERS[node])


def render(result: dict, output: str) -> str:
    if output == "json":
        return json.dumps(result, indent=2, sort_keys=True) + "\n"
    per_k = {role: ms * 1000 / result["requests"] for role, ms in result["cpu_ms"].items()}
    agents = sum(v for role, v in per_k.items() if role.startswith("agent"))
    lines = [f"waypoint CPU: lab {result['lab']}, {result['cpus']} CPUs, wrk {result['connections']} connections "
             f"for {result['seconds']} s: {result['requests']} requests ({result['rate']:.0f}/s), "
             "counted in istio_requests_total: " + ", ".join(
                 f"{node} {REPORTERS[node]} {n}" for node, n in result["counted"].items()),
             f"{'PROCESS':<14}{'CPU MS':>10}{'MS/1000 REQ':>14}"]
    lines += [f"{role:<14}{result['cpu_ms'][role]:>10.0f}{per_k[role]:>14.1f}" for role in sorted(per_k)]
    lines.append(f"{'agents':<14}{'':>10}{agents:>14.1f}")
    lines.append("cleanup: nothing left behind" if not result["left_behind"] else "cleanup: STATE DIR LEFT BEHIND")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.bench.waypointcpu", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=20, help="how long wrk sends requests")
    parser.add_argument("--connections", type=int, default=8, help="wrk's keep-alive connections")
    parser.add_argument("--name", help="name of the lab the bench brings up and down (default wc<random>)")
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    sys.stdout.write(render(run(args.seconds, args.connections, args.name), args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
