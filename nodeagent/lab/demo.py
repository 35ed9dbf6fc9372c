"""`lab demo`: bring up the built-in demo lab, show it, and send traffic through it.

A previous demo lab of the same name is removed first. One agent runs per node. Each
client (meshed `mesh/client`, unmeshed `legacy/client`) sends requests to the `backend`
service with the lab's request tool; then each agent's counters show what it captured
(the meshed client's connections outbound, both clients' connections to the meshed
backends inbound). The lab stays up for exploring.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from nodeagent.lab import lifecycle, processes, status, teardown
from nodeagent.lab.cgroups import cgroup2_root
from nodeagent.lab.layout import Layout
from nodeagent.lab.state import StateDir

CLIENTS = ("mesh/client", "legacy/client")
URL = "http://backend.mesh:8080/"
REQUESTS = 20


def _nodeagent(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nodeagent", *args], text=True,
                          capture_output=capture, env={**processes.base_env()})


def _command_name() -> str:
    """How the user can call nodeagent from their shell (the venv is usually not on PATH)."""
    own = os.path.join(os.path.dirname(sys.executable), "nodeagent")
    if shutil.which("nodeagent") == own or not os.path.exists(own):
        return "nodeagent"
    rel = os.path.relpath(own)
    return rel if not rel.startswith("..") else own


def _agent_summary(name: str, nodes: list[str], out) -> None:
    out("\nWhat the agents saw (nodeagent status --node NODE):")
    for node in nodes:
        proc = _nodeagent("status", "--lab", name, "--node", node, "--output", "json", capture=True)
        if proc.returncode != 0:
            out(f"  {node}: status unavailable: {proc.stderr.strip()}")
            continue
        st = json.loads(proc.stdout)
        enrolled = ", ".join(f"{p['namespace']}/{p['name']}" for p in st["pods"]) or "none"
        counters = st["counters"]
        out(f"  {node}: enrolled {enrolled}; outbound captured "
            f"{counters.get('outbound_connections_total', 0):.0f}, inbound "
            f"{counters.get('inbound_connections_total', 0):.0f}")


def run(name: str, timeout: float, out) -> int:
    layout = Layout(name, cgroup2_root())
    if teardown.down(layout):
        out(f"removed the previous lab {name}")
    lifecycle.up(name, lifecycle.read_objects(None), True, out, timeout)
    state = StateDir(layout)
    collected = status.collect(state.load(), state.load_runtime())
    out(status.render(collected))
    command = ["nodeagent", "lab", "request", URL, "-n", str(REQUESTS), "--new-connection"]
    worst = 0
    for client in CLIENTS:
        out(f"$ nodeagent lab exec --name {name} {client} -- {' '.join(command)}")
        worst = max(worst, _nodeagent("lab", "exec", "--name", name, client, "--", *command).returncode)
    _agent_summary(name, [n["name"] for n in collected["nodes"]], out)
    na = _command_name()
    out(f"\nThe lab stays up. Try:\n"
        f"  {na} lab status --name {name}\n"
        f"  {na} status --lab {name} --node node1\n"
        f"  {na} lab exec --name {name} mesh/client -- nodeagent lab request {URL} -n 10\n"
        f"  {na} lab exec --name {name} legacy/client -- curl -s {URL}\n"
        f"Logs: {layout.logs_dir} (flows-<node>.log: one JSON line per connection, with the "
        f"client's SPIFFE principal at the destination)\nRemove it with: {na} lab down --name {name}")
    return worst
