"""`nodeagent bench tunnel` with small numbers: the output's structure, that the meshed
path really went through HBONE, and that the lab it made is gone afterwards (its speed
is the benchmark's business, not this test's)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.e2e.conftest import NODEAGENT, leftovers, unique_name

pytestmark = pytest.mark.timeout(300)


def bench(name: str, output: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NODEAGENT, "bench", "tunnel", "--requests", "30", "--size", "32", "--megabytes", "2",
                           "--name", name, "--output", output], capture_output=True, text=True, timeout=240)


def test_bench_json_structure_and_cleanup():
    name = unique_name()
    try:
        proc = bench(name, "json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert (result["lab"], result["requests"], result["size"], result["megabytes"]) == (name, 30, 32, 2)
        assert set(result["latency_us"]) == {"direct", "hbone", "added"}
        for path in ("direct", "hbone"):
            series = result["latency_us"][path]
            assert set(series) == {"p50", "p90", "p99"} and 0 < series["p50"] <= series["p90"] <= series["p99"]
            assert result["throughput_mib_s"][path] > 0
        assert result["latency_us"]["added"] == {p: result["latency_us"]["hbone"][p] - result["latency_us"]["direct"][p]
                                                 for p in ("p50", "p90", "p99")}
        assert result["hbone_streams"] == 3  # warm-up, round trips, stream: each one HBONE stream, exactly
        assert result["left_behind"] == []
    finally:
        assert leftovers(name) == []


def test_bench_text_table_and_cleanup():
    name = unique_name()
    try:
        proc = bench(name, "text")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith(f"nodeagent bench tunnel: lab {name}, client on node1, server on node2")
        header = lines.index("PATH        P50 US    P90 US    P99 US     MIB/S")
        assert [lines[header + i].split()[0] for i in (1, 2, 3)] == ["direct", "hbone", "added"]
        assert lines[-2] == "HBONE streams accepted by the server's agent: 3 (the meshed path made 3 connections)"
        assert lines[-1] == "cleanup: nothing left behind"
    finally:
        assert leftovers(name) == []


def test_bench_rejects_a_bad_name():
    proc = subprocess.run([*NODEAGENT, "bench", "tunnel", "--name", "Bad_Name"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "lab name 'Bad_Name'" in proc.stderr
