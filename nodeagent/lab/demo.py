"""`lab demo`: bring up the built-in demo lab, show it, and send traffic through it.

A previous demo lab of the same name is removed first. Agents run when `nodeagent run`
works here; otherwise the demo says so and runs without them. Each client (meshed
`mesh/client`, unmeshed `legacy/client`) sends requests to the `backend` service with
the lab's request tool (curl when that tool is missing), and the lab stays up for
exploring.
"""

from __future__ import annotations

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


def _agents_work() -> bool:
    return _nodeagent("run", "--help", capture=True).returncode == 0


def _request_command() -> list[str]:
    if _nodeagent("lab", "request", "--help", capture=True).returncode == 0:
        return ["nodeagent", "lab", "request", URL, "-n", str(REQUESTS), "--new-connection"]
    return ["sh", "-c", f"for i in $(seq {REQUESTS}); do curl -s -m 5 {URL} || echo failed; echo; done"]


def run(name: str, timeout: float, out) -> int:
    layout = Layout(name, cgroup2_root())
    if teardown.down(layout):
        out(f"removed the previous lab {name}")
    agents = _agents_work()
    if not agents:
        out("`nodeagent run --help` failed here: starting the demo without agents (--no-agents)")
    lifecycle.up(name, lifecycle.read_objects(None), agents, out, timeout)
    state = StateDir(layout)
    out(status.render(status.collect(state.load(), state.load_runtime())))
    command = _request_command()
    worst = 0
    for client in CLIENTS:
        out(f"$ nodeagent lab exec --name {name} {client} -- {' '.join(command)}")
        worst = max(worst, _nodeagent("lab", "exec", "--name", name, client, "--", *command).returncode)
    out(f"\nThe lab stays up. Try:\n"
        f"  nodeagent lab status --name {name}\n"
        f"  nodeagent lab exec --name {name} mesh/client -- nodeagent lab request {URL} -n 10\n"
        f"  nodeagent lab exec --name {name} legacy/client -- curl -s {URL}\n"
        f"Logs: {layout.logs_dir}\nRemove it with: nodeagent lab down --name {name}")
    return worst
