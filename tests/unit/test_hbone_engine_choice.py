"""Which engine carries the agent's HBONE (setting hbone_engine, hbone_native.HboneEngines)
and what status says about it: auto by default, which takes the built module and is
python without it, saying why; native takes the built module and refuses to start
without it, naming the setting; an engine that cannot start is an error for native and
python, saying why, for auto."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from engines import require_native_hbone
from nodeagent import native
from nodeagent.agent import config
from nodeagent.agent.datapath import engines_summary
from nodeagent.agent.proxy.hbone_native import HboneEngines
from nodeagent.errors import ConfigError
from nodeagent.native import hbone

LOG = logging.getLogger("test.hbone_engine")


def _started(setting: str) -> dict:
    async def main():
        engines = HboneEngines(setting, LOG)
        await engines.start()
        try:
            return engines.describe()
        finally:
            engines.close()
    return asyncio.run(main())


def test_native_takes_the_built_module():
    require_native_hbone()
    described = _started("native")
    assert (described["engine"], described["setting"], described["why"]) == (
        "native", "native", "hbone_engine=native: the native HBONE module is built from this tree's native/")
    assert described["native"]["conns_open"] == 0


def test_python_is_python_even_when_the_module_is_built():
    described = _started("python")
    assert (described["engine"], described["why"], described["native"]) == ("python", "hbone_engine=python", None)


def test_auto_takes_the_built_module():
    require_native_hbone()
    described = _started("auto")
    assert (described["engine"], described["setting"], described["why"]) == (
        "native", "auto", "hbone_engine=auto: the native HBONE module is built from this tree's native/")


def _unbuilt(monkeypatch) -> None:
    def unavailable():
        raise native.NativeUnavailable("native HBONE module not built (No module named '_hbone'); run scripts/setup")
    monkeypatch.setattr(hbone, "load", unavailable)


def test_without_the_module_native_fails_at_start_and_auto_says_why(monkeypatch):
    _unbuilt(monkeypatch)
    with pytest.raises(ConfigError) as caught:
        HboneEngines("native", LOG)
    assert "setting hbone_engine" in str(caught.value) and "scripts/setup" in str(caught.value)
    assert _started("auto")["why"] == "native HBONE module not built (No module named '_hbone'); run scripts/setup"


def test_an_engine_that_cannot_start_is_an_error_for_native(monkeypatch):
    require_native_hbone()

    def cannot_start(*args, **kwargs):
        raise OSError(24, "cannot start the native HBONE engine: Too many open files")
    monkeypatch.setattr(hbone.HboneEngine, "start", cannot_start)
    with pytest.raises(ConfigError, match="setting hbone_engine.*Too many open files"):
        _started("native")
    described = _started("auto")
    assert (described["engine"], described["why"]) == (
        "python", "[Errno 24] cannot start the native HBONE engine: Too many open files")


@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cg").mkdir()
    return {"node": "node-1", "source": f"files:{tmp_path / 'cluster'}", "cgroup": str(tmp_path / "cg")}


def test_the_setting_defaults_to_auto_and_reads_flag_and_environment(base):
    assert config.load(base, {}).hbone_engine == "auto"
    assert config.load(base, {"NODEAGENT_HBONE_ENGINE": "native"}).hbone_engine == "native"
    assert config.load({**base, "hbone_engine": "auto"}, {"NODEAGENT_HBONE_ENGINE": "native"}).hbone_engine == "auto"
    with pytest.raises(ConfigError, match="setting hbone_engine .*'nghttp2'"):
        config.load({**base, "hbone_engine": "nghttp2"}, {})


def test_the_status_line_says_who_carries_hbone():
    native_hbone = {"engine": "native", "setting": "native", "why": "", "native": {},
                    "tls_library": "OpenSSL 3.5.5 27 Jan 2026"}
    assert engines_summary("native (socket pairs); python for HBONE streams", native_hbone) == (
        "native (socket pairs); HBONE: native engine (OpenSSL 3.5.5) [hbone_engine=native]")
    assert engines_summary("python: data_path_engine=python", {"engine": "python", "why": "hbone_engine=python"}) == (
        "python: data_path_engine=python; HBONE: python (hbone_engine=python)")
