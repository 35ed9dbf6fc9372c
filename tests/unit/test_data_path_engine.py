"""Which engine moves the relays' bytes (setting data_path_engine, splice.Splicer) and
what status says about it: auto takes the native engine when it is built and current,
else Python with the reason; native without it fails at start-up naming the setting;
the native module refuses to load when built from other sources than the tree's."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from engines import require_native
from nodeagent import native
from nodeagent.agent import config, status
from nodeagent.agent.proxy.splice import Splicer
from nodeagent.errors import ConfigError
from nodeagent.native import build

LOG = logging.getLogger("test.engine")
NATIVE_SUMMARY = "native (socket pairs); python for HBONE streams"


def _started(setting: str) -> dict:
    async def main():
        s = Splicer(setting, LOG)
        await s.start()
        try:
            return s.describe()
        finally:
            s.close()
    return asyncio.run(main())


@pytest.mark.parametrize("setting", ["auto", "native"])
def test_auto_and_native_take_the_built_module(setting):
    require_native()
    described = _started(setting)
    assert (described["engine"], described["setting"], described["summary"]) == ("native", setting, NATIVE_SUMMARY)
    assert described["native"]["max_relays"] == native.DEFAULT_MAX_RELAYS
    assert described["native"]["pipe_size"] == native.DEFAULT_PIPE_SIZE


def test_python_is_python_even_when_the_module_is_built():
    described = _started("python")
    assert (described["engine"], described["summary"], described["native"]) == (
        "python", "python: data_path_engine=python", None)


def _unbuilt(monkeypatch) -> None:
    def unavailable():
        raise native.NativeUnavailable("native module not built (No module named '_relay'); run scripts/setup")
    monkeypatch.setattr(native, "load", unavailable)


def test_auto_without_the_module_says_why_it_is_python(monkeypatch):
    _unbuilt(monkeypatch)
    described = _started("auto")
    assert (described["engine"], described["summary"]) == (
        "python", "python: native module not built (No module named '_relay'); run scripts/setup")


def test_native_without_the_module_fails_at_start_naming_the_setting(monkeypatch):
    _unbuilt(monkeypatch)
    with pytest.raises(ConfigError) as caught:
        Splicer("native", LOG)
    assert "setting data_path_engine" in str(caught.value) and "scripts/setup" in str(caught.value)


def test_a_module_built_from_other_sources_is_refused(monkeypatch):
    require_native()
    monkeypatch.setattr(build, "source_digest", lambda native_dir: "0" * 64)
    with pytest.raises(native.NativeUnavailable, match="built from other sources.*rebuild it: scripts/setup"):
        native.load()


def test_the_build_digest_covers_both_sources(tmp_path: Path):
    for name in build.SOURCES:
        (tmp_path / name).write_text("one")
    first = build.source_digest(tmp_path)
    (tmp_path / "relay.c").write_text("two")
    assert build.source_digest(tmp_path) != first
    assert "struct na_end" in build.cdef() and "#include" not in build.cdef()


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cg").mkdir()
    return {"node": "node-1", "source": f"files:{tmp_path / 'cluster'}", "cgroup": str(tmp_path / "cg")}


def test_the_setting_defaults_to_auto_and_reads_flag_and_environment(base):
    assert config.load(base, {}).data_path_engine == "auto"
    assert config.load(base, {"NODEAGENT_DATA_PATH_ENGINE": "python"}).data_path_engine == "python"
    assert config.load({**base, "data_path_engine": "native"}, {"NODEAGENT_DATA_PATH_ENGINE": "python"}
                       ).data_path_engine == "native"
    with pytest.raises(ConfigError, match="setting data_path_engine .*'splice'"):
        config.load({**base, "data_path_engine": "splice"}, {})


def test_status_says_which_engine_and_why():
    engine = {"relays_open": 3, "max_relays": 65536, "relays_total": 120, "relays_failed": 2, "relays_aborted": 1,
              "bytes_held": 4096, "pipe_size": 65536}
    text = status.render_text({"data_path": {"engine": "native", "setting": "auto", "summary": NATIVE_SUMMARY,
                                             "native": engine}}, now=0)
    assert f"DATA PATH: {NATIVE_SUMMARY} [data_path_engine=auto]\n  native engine: 3 relays open (max 65536), " \
           "120 total, 2 failed, 1 aborted; 4096 bytes held (at most 65536 per direction)\n" in text
    receive = {"received_held": 1000, "received_held_peak": 9000, "receive_budget": 4096, "streams_overloaded": 1,
               "send_held": 20, "send_held_peak": 30, "send_budget": 8192, "streams_send_waiting": 2}
    text = status.render_text({"data_path": {"engine": "native", "setting": "auto", "summary": NATIVE_SUMMARY,
                                             "native": engine, "hbone": {"receive": receive}}}, now=0)
    assert "\n  HBONE receive budget: 1000 received bytes held (peak 9000, budget 4096); 1 streams reset for it; " \
           "send budget: 20 bytes from the apps held (peak 30, budget 8192); 2 streams waiting for it\n" in text
    hbone = {"streams_total": 40, "streams_delivered": 15, "route_sockets": 4, "route_failures": 1}
    text = status.render_text({"data_path": {"engine": "native", "setting": "auto", "summary": NATIVE_SUMMARY,
                                             "native": engine, "hbone": {"native": hbone}}}, now=0)
    assert "\n  HBONE engine: 40 streams, 15 of them delivered by the engine on the agent's routes; 4 route " \
           "sockets held, 1 route connects left to the agent\n" in text
    text = status.render_text({"data_path": {"engine": "python", "setting": "auto", "native": None,
                                             "summary": "python: native module not built"}}, now=0)
    assert "DATA PATH: python: native module not built [data_path_engine=auto]\n\n" in text


@pytest.mark.parametrize("setting", ["auto", "native"])
def test_an_engine_that_cannot_start_is_python_for_auto_and_an_error_for_native(monkeypatch, setting, caplog):
    require_native()

    def cannot_start(*args, **kwargs):
        raise OSError(24, "cannot start the native relay engine: Too many open files")
    monkeypatch.setattr(native.Engine, "start", cannot_start)
    if setting == "native":
        with pytest.raises(ConfigError, match="setting data_path_engine.*Too many open files"):
            _started(setting)
        return
    described = _started(setting)
    assert (described["engine"], described["summary"]) == (
        "python", "python: [Errno 24] cannot start the native relay engine: Too many open files")
    assert "data path: python relays" in caplog.text
