"""The relay micro-benchmark (nodeagent/bench/relay.py) runs, briefly, and reports every
figure for the floor and for each engine it was asked for, through the engine it names."""

from __future__ import annotations

import json
import shutil

import pytest

from engines import ci_enabled, require_native
from nodeagent.bench import relay


def test_a_short_run_reports_every_figure_for_each_column(capsys):
    require_native()
    if shutil.which("iperf3") is None:
        if ci_enabled():
            pytest.fail("CI: iperf3 is needed (scripts/setup installs it)", pytrace=False)
        pytest.skip("no iperf3")
    assert relay.main(["--rounds", "1", "--seconds", "1", "--round-trips", "20", "--connections", "10",
                       "--engines", "python,native,native-copy", "-o", "json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert list(results) == ["direct", "python", "native", "native-copy"]
    figures = [key for _, key, _ in relay.ROWS]
    for column, values in results.items():
        assert all(values[key] > 0 for key in figures), (column, values)
    for column in ("python", "native", "native-copy"):
        assert all(results[column][key] > 0 for _, key, _ in relay.RELAY_ROWS), column
    assert results["python"]["engine"] == "python: data_path_engine=python"
    assert results["native"]["engine"] == results["native-copy"]["engine"] == \
        "native (socket pairs); python for HBONE streams"
