"""Issue 11: the running agent carries no bcc or LLVM, nor grpcio. `python -m nodeagent run` in a
throwaway sandbox node compiles and loads its programs in a short-lived child process;
the agent itself must have none of libbcc, libLLVM or libclang mapped (an exact check
of /proc/<pid>/maps, not a size), while capture works, after a start and after a
restart that adopts what the first agent left pinned. Its gRPC (the waypoint's ADS and
access logs, the CA client) is grpclib's, so grpcio's core library is not mapped either. Memory figures are printed
(pytest -s), never asserted.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time

import pytest

from footprint import children, grpcio, llvm_or_bcc, report
from nodeagent.bench.sandbox import AMBIENT, Sandbox, SandboxPod, scaled

pytestmark = pytest.mark.root
PORT = 9000
PROGRAMS = ["na_connect4", "na_connect6", "na_sk_lookup", "na_sockops"]


@pytest.fixture
def sb(tmp_path):
    sandbox = Sandbox(f"test-{secrets.token_hex(3)}", workdir=tmp_path)
    try:
        sandbox.setup()
        yield sandbox
    finally:
        left = sandbox.close()
        assert left == [] and sandbox.leftovers() == []


def connect(sb: Sandbox, src: SandboxPod, dst: SandboxPod, count: int) -> dict:
    proc = sb.probe(src, "connect", f"{dst.ip}:{PORT}", "--count", str(count), "--timeout", f"{scaled(3):g}",
                    stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=scaled(120))
    return json.loads(out)


def compile_processes(pid: int) -> list[str]:
    """Command lines of the agent's children that are compile processes (none wanted)."""
    found = []
    for child in children(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except FileNotFoundError:
            continue  # exited meanwhile
        if "nodeagent.capture.compiler" in argv:
            found.append(" ".join(argv))
    return found


def check_agent(sb: Sandbox, client: SandboxPod, server: SandboxPod, captured_before: int) -> int:
    """No bcc/LLVM mapped in the agent, no compile process left, capture in force."""
    pid = sb.agent.pid
    # The same-node join's program compiles in a child of its own after start-up
    # (readiness does not wait for it): once it has loaded, or said why not, none is left.
    deadline = time.monotonic() + scaled(120)
    while sb.status()["data_path"]["same_node"]["sockmap"] == "starting":
        assert time.monotonic() < deadline, f"the same-node join is still starting after {scaled(120):g} s"
        time.sleep(0.2)
    assert llvm_or_bcc(pid) == []
    assert grpcio(pid) == []
    assert compile_processes(pid) == []
    status = sb.status()
    assert sorted(p["name"] for p in status["capture"]["programs"]) == PROGRAMS
    assert connect(sb, client, server, 10)["ok"] == 10
    captured = sb.status()["capture"]["counters"]["captured"]
    assert captured == captured_before + 10
    print("\n" + report(pid, "agent"))
    return captured


def test_agent_maps_no_bcc_or_llvm_before_and_after_a_restart(sb):
    client, server = sb.add_pod("app", "client"), sb.add_pod("peer", "server")
    sb.write_pods()
    sb.label_namespace("app", AMBIENT)
    sb.label_namespace("peer", {})
    for pod in (client, server):
        sb.serve(pod, PORT)
    sb.start_agent()
    sb.wait_for(lambda s: len(s["pods"]) == 1, 10, "client enrolled")
    first_ids = {p["name"]: p["id"] for p in sb.status()["capture"]["programs"]}
    captured = check_agent(sb, client, server, 0)

    assert sb.stop_agent(signal.SIGTERM) == 0  # keep-on-exit: programs and pins stay
    sb.start_agent()
    sb.wait_for(lambda s: len(s["pods"]) == 1, 10, "client re-enrolled")
    now = {p["name"]: p["id"] for p in sb.status()["capture"]["programs"]}
    assert sorted(now) == PROGRAMS and all(now[n] != first_ids[n] for n in now)  # new programs adopted the pins
    check_agent(sb, client, server, captured)  # the pinned counters carried over
