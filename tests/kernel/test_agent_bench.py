"""`nodeagent bench capture` with small numbers: the output's structure and that it
cleans up after itself (its speed is the benchmark's business, not this test's)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from nodeagent.bench.sandbox import scaled
from nodeagent.lab import cgroups, topology

pytestmark = pytest.mark.root


def bench(name: str, output: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nodeagent", "bench", "capture", "--pods", "3", "--requests", "20",
                           "--name", name, "--output", output], capture_output=True, text=True, timeout=scaled(180))


def leftovers(name: str) -> list[str]:
    found = topology.list_netns(f"{name}-")
    found += [p for p in (os.path.join(cgroups.cgroup2_root(), f"nodeagent-{name}"),
                          f"/sys/fs/bpf/nodeagent-{name}") if os.path.exists(p)]
    return found


def test_bench_json_structure_and_cleanup():
    name = f"test-{secrets.token_hex(3)}"
    try:
        proc = bench(name, "json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["pods"] == 3 and result["requests"] == 20
        assert set(result["enrolment_ms"]) == {"p50", "p99", "max"}
        assert 0 < result["enrolment_ms"]["p50"] <= result["enrolment_ms"]["p99"] <= result["enrolment_ms"]["max"]
        assert set(result["latency_us"]) == {"direct", "captured", "added"}
        for series in ("direct", "captured"):
            assert set(result["latency_us"][series]) == {"p50", "p90", "p99"}
            assert all(v > 0 for v in result["latency_us"][series].values())
        # 20 warm-up requests and 20 measured ones went through the agent, exactly.
        assert result["agent_counters"] == {"outbound_connections_total": 40.0,
                                            "passthrough_connections_total": 40.0}
        assert result["left_behind"] == []
    finally:
        assert leftovers(name) == []


def test_bench_text_table_and_cleanup():
    name = f"test-{secrets.token_hex(3)}"
    try:
        proc = bench(name, "text")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("nodeagent bench capture: 3 pods, 20 requests per series")
        assert "PODS  P50 MS  P99 MS  MAX MS" in lines
        assert any(line.startswith("goal p99 <= 100 ms: ") for line in lines)
        header = next(i for i, line in enumerate(lines) if line.startswith("PATH"))
        assert lines[header].split() == ["PATH", "P50", "US", "P90", "US", "P99", "US"]
        assert [lines[header + i].split()[0] for i in (1, 2, 3)] == ["direct", "capture+passthrough", "added"]
        assert lines[-1] == "cleanup: nothing left behind"
    finally:
        assert leftovers(name) == []


def test_bench_rejects_bad_name():
    proc = bench("Bad_Name", "text")
    assert proc.returncode == 1 and "--name" in proc.stderr
