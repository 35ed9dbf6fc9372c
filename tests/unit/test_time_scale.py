"""NODEAGENT_TEST_TIME_SCALE (nodeagent/bench/sandbox.py): the factor by which the kernel
lab's VMs stretch every wait of the kernel tier for a promised condition, and the agent's
compile limit and HBONE handshake timeout with them; a bad value is refused, naming the variable."""

from __future__ import annotations

import pytest

from nodeagent.bench import sandbox, timescale
from nodeagent.capture.compiler import COMPILE_TIMEOUT
from nodeagent.errors import ConfigError


@pytest.mark.parametrize("raw, factor", [(None, 1.0), ("", 1.0), ("  ", 1.0), ("1", 1.0), ("30", 30.0),
                                         (" 2.5 ", 2.5)])
def test_the_factor_read_from_the_environment(raw, factor) -> None:
    environ = {} if raw is None else {"NODEAGENT_TEST_TIME_SCALE": raw}
    assert timescale.time_scale(environ) == factor


@pytest.mark.parametrize("raw", ["0.5", "0", "-3", "nan", "inf", "x30", "30s"])
def test_a_factor_below_one_or_not_a_number_is_refused(raw) -> None:
    with pytest.raises(ConfigError) as caught:
        timescale.time_scale({"NODEAGENT_TEST_TIME_SCALE": raw})
    text = str(caught.value)
    assert "NODEAGENT_TEST_TIME_SCALE" in text and repr(raw) in text and "is not a number >= 1" in text


def test_waits_and_the_agents_limits_scale_together(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("NODEAGENT_TEST_TIME_SCALE", "30")
    assert sandbox.scaled(2.0) == 60.0
    node = sandbox.Sandbox("scale", workdir=tmp_path)  # builds nothing until entered
    argv = node.agent_argv("--no-waypoint")
    assert argv[argv.index("--compile-timeout") + 1] == "3600"  # 30 x 120 s, at most the setting's 3600
    assert argv[argv.index("--hbone-handshake-timeout") + 1] == "150"  # 30 x 5 s
    assert argv[-1] == "--no-waypoint"
    monkeypatch.setenv("NODEAGENT_TEST_TIME_SCALE", "2")
    argv = node.agent_argv()
    assert argv[argv.index("--compile-timeout") + 1] == f"{2 * COMPILE_TIMEOUT:g}"
    monkeypatch.delenv("NODEAGENT_TEST_TIME_SCALE")
    assert sandbox.scaled(2.0) == 2.0
    argv = node.agent_argv()
    assert argv[argv.index("--compile-timeout") + 1] == "120"
    assert argv[argv.index("--hbone-handshake-timeout") + 1] == "5"
    monkeypatch.setenv("NODEAGENT_TEST_TIME_SCALE", "100")
    argv = node.agent_argv()
    assert argv[argv.index("--hbone-handshake-timeout") + 1] == "300"  # at most the setting's 300
