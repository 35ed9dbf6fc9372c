"""The kernel tier's meshed sandbox: one node agent with its CA, a meshed client and a
meshed server (namespace app; the probe server on PORT in the server), and an unmeshed
pod (namespace plain) to connect or attack from. Shared by the HBONE, rapid-reset and
handshake-flood tests; everything it made is removed, and the test fails when not."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
from pathlib import Path
from typing import Iterator

from nodeagent.bench.sandbox import AMBIENT, Sandbox, SandboxPod, workload_identities

PORT = 9000


@contextlib.contextmanager
def meshed_sandbox(tmp_path: Path, outsider: str, *agent_args: str, cgroup: str | None = None) -> Iterator[
        tuple[Sandbox, SandboxPod, SandboxPod, SandboxPod, subprocess.Popen]]:
    """(sandbox, client, server, the unmeshed pod named `outsider`, the server's app)
    once the agent (with `agent_args`, in `cgroup` too: `Sandbox.start_agent`) has
    enrolled both meshed pods and holds their certificate (`enrolled`)."""
    sb = Sandbox(f"test-{secrets.token_hex(3)}", workdir=tmp_path)
    try:
        sb.setup()
        client, server, other = sb.add_pod("app", "client"), sb.add_pod("app", "server"), sb.add_pod("plain", outsider)
        sb.write_pods()
        sb.label_namespace("app", AMBIENT)
        sb.label_namespace("plain", {})
        app = sb.serve(server, PORT)
        sb.in_pod(client, ["sleep", "infinity"])  # a pod is found by its processes
        sb.start_ca()
        sb.start_agent(*sb.ca_args(), *agent_args, cgroup=cgroup)
        enrolled(sb)
        yield sb, client, server, other, app
    finally:
        left = sb.close()
        assert left == [] and sb.leftovers() == []


def enrolled(sb: Sandbox) -> None:
    """Wait until the agent has enrolled both meshed pods and holds their certificate."""
    sb.wait_for(lambda s: len(s["pods"]) == 2 and [i["valid"] for i in workload_identities(s)] == [True],
                15, "both pods enrolled and their certificate held")


def inbound_counted(sb: Sandbox, count: int) -> dict:
    """The agent's counters once its destination side counted `count` streams and
    connections: one its engine delivered on a route (agent/proxy/routes.py) is counted
    when the agent's loop hears of it, which can be after the client is done."""
    def counted(status: dict) -> bool:
        c = status["counters"]
        return (c.get("hbone_streams_opened_total{direction=inbound}", 0) >= count
                and c.get("inbound_connections_total", 0) >= count)
    return sb.wait_for(counted, 10, f"the destination side counting {count} streams")["counters"]
