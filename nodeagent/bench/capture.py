"""`nodeagent bench capture`: how fast enrolment takes effect and what capture costs a
request, measured on throwaway pods (nodeagent.bench.sandbox; nothing touches the
machine's own netns, and everything is removed afterwards, also on failure).

1. Enrolment latency: N pods sit unmeshed in one namespace; one label change written
   to the files source meshes them all. For each pod, the time from that write to
   the agent's record of capture being active (netns cookie in the map, listeners and
   steering in place; the agent's `enrolled_at`, same clock). Goal: p99 <= 100 ms.
2. Added latency per request: the same probe (new connection, greeting, one echo
   round trip, close) to the same server, from an unmeshed pod (direct) and from a
   meshed pod (capture + agent relay + passthrough), in the same run, side by side.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import signal
import subprocess
import time

from nodeagent.bench.probe import percentiles
from nodeagent.bench.sandbox import AMBIENT, Sandbox, SandboxPod
from nodeagent.errors import ConfigError

NAME = re.compile(r"^[a-z][a-z0-9-]{0,15}\Z")
GOAL_P99_MS = 100.0
PORT = 9000
WARMUP = 20


def run_capture(pods: int = 50, requests: int = 1000, name: str | None = None) -> dict:
    if name is not None and not NAME.match(name):
        raise ConfigError("--name", f"{name!r} must match {NAME.pattern}", "e.g. bench-1 or test-ab12")
    if not 1 <= pods <= 500 or not 1 <= requests <= 1_000_000:
        raise ConfigError("--pods/--requests", f"{pods}/{requests} out of range", "1-500 pods, 1-1000000 requests")
    sb = Sandbox(name or f"bench-{secrets.token_hex(3)}")
    result: dict = {"pods": pods, "requests": requests, "kernel": platform.release()}
    try:
        sb.setup()
        bench = [sb.add_pod("bench", f"pod{i}") for i in range(pods)]
        plain, server = sb.add_pod("plain", "direct"), sb.add_pod("peer", "server")
        sb.write_pods()
        for ns in ("bench", "plain", "peer"):
            sb.label_namespace(ns, {})
        for pod in bench + [plain]:
            sb.in_pod(pod, ["sleep", "infinity"])
        sb.serve(server, PORT)
        sb.start_agent("--log-level", "warning")
        result["enrolment_ms"] = _enrolment(sb, pods)
        result["latency_us"] = _latency(sb, bench[0], plain, server, requests)
        result["agent_counters"] = {k: v for k, v in sb.status()["counters"].items()
                                    if k in ("outbound_connections_total", "passthrough_connections_total")}
        sb.stop_agent(signal.SIGTERM)
    finally:
        left = sb.close()
        result["left_behind"] = left + sb.leftovers()
    return result


def _enrolment(sb: Sandbox, pods: int) -> dict:
    start = time.time()
    sb.label_namespace("bench", AMBIENT)
    status = sb.wait_for(lambda s: len(s["pods"]) == pods, 60, f"{pods} pods enrolled")
    delays = [(p["enrolled_at"] - start) * 1000.0 for p in status["pods"]]
    out = percentiles(delays, (50, 99))
    out["max"] = max(delays)
    return out


def _series(sb: Sandbox, src: SandboxPod, dst: SandboxPod, count: int) -> dict:
    proc = sb.probe(src, "connect", f"{dst.ip}:{PORT}", "--count", str(count), stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=600)
    data = json.loads(out)
    if data["ok"] != count:
        raise RuntimeError(f"{count - data['ok']} of {count} requests from {src.name} failed: {data['errors']}")
    return data["latency_us"]


def _latency(sb: Sandbox, meshed: SandboxPod, plain: SandboxPod, server: SandboxPod, requests: int) -> dict:
    for src in (plain, meshed):
        _series(sb, src, server, WARMUP)
    direct = _series(sb, plain, server, requests)
    captured = _series(sb, meshed, server, requests)
    return {"direct": direct, "captured": captured,
            "added": {k: captured[k] - direct[k] for k in direct}}


def render(result: dict, output: str) -> str:
    if output == "json":
        return json.dumps(result, indent=2, sort_keys=True) + "\n"
    from nodeagent.agent.status import table

    e, lat = result["enrolment_ms"], result["latency_us"]
    verdict = "met" if e["p99"] <= GOAL_P99_MS else "NOT met"
    lines = [f"nodeagent bench capture: {result['pods']} pods, {result['requests']} requests per series "
             f"(kernel {result['kernel']}, {os.cpu_count()} CPUs)", "",
             "enrolment: namespace label written -> capture active, per pod",
             table(["PODS", "P50 MS", "P99 MS", "MAX MS"],
                   [[result["pods"], f"{e['p50']:.1f}", f"{e['p99']:.1f}", f"{e['max']:.1f}"]]),
             f"goal p99 <= {GOAL_P99_MS:.0f} ms: {verdict}", "",
             "request latency: new connection + greeting + one echo round trip",
             table(["PATH", "P50 US", "P90 US", "P99 US"],
                   [[label, *(f"{lat[key][p]:.0f}" for p in ("p50", "p90", "p99"))]
                    for label, key in (("direct", "direct"), ("capture+passthrough", "captured"),
                                       ("added", "added"))]), ""]
    left = result.get("left_behind") or []
    lines.append("cleanup: nothing left behind" if not left else "cleanup: LEFT BEHIND: " + "; ".join(left))
    return "\n".join(lines) + "\n"
