"""Test tiers: tests/unit needs nothing; tests/kernel and tests/e2e need root and a real
kernel, so every test there carries the `root` marker (a test elsewhere may carry it
too). A `root` test is skipped on a developer machine that is not root, but under CI
(the CI variable set to anything but "", "0", "false" or "no") any skip of it — not
root, importorskip, a skip marker, pytest.skip in a fixture — *fails*, so a skip can
never hide missing coverage (as ztunnel does). `-m "not root"` selects the unit tier."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from typing import Iterator, Mapping

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
PRIVILEGED_DIRS = ("kernel", "e2e")
NOT_CI = ("", "0", "false", "no")


def ci_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this run is CI: CI set to anything but "", "0", "false" or "no" (any case)."""
    value = environ.get("CI")
    return value is not None and value.strip().lower() not in NOT_CI


def _privileged_path(path: pathlib.Path) -> bool:
    """Whether `path` lies in tests/kernel or tests/e2e."""
    try:
        return path.resolve().relative_to(TESTS).parts[0] in PRIVILEGED_DIRS
    except (ValueError, IndexError):
        return False


def _ci_reason(what: str) -> str:
    return f"CI={os.environ.get('CI')!r}: {what} (under CI a root test must run, not skip)"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _privileged_path(item.path) and item.get_closest_marker("root") is None:
            item.add_marker(pytest.mark.root)


@pytest.hookimpl(tryfirst=True)  # before xfail marks are read: not being root is no expected failure
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        reason = "needs root and a real kernel (run scripts/test as root)"
        if ci_enabled():
            pytest.fail(_ci_reason(reason), pytrace=False)
        pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A skipped root test (any phase, any cause) is a failure under CI; xfail is not a skip."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("root") is not None \
            and ci_enabled():
        report.outcome = "failed"
        report.longrepr = _ci_reason(f"skipped: {_skip_reason(report.longrepr)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A module of the root tiers skipped as a whole (importorskip at import) fails under CI."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and ci_enabled() and _privileged_path(collector.path):
        report.outcome = "failed"
        report.longrepr = _ci_reason(f"{collector.nodeid} skipped: {_skip_reason(report.longrepr)}")


def _skip_reason(longrepr) -> str:
    # A skip's longrepr is (path, line, "Skipped: reason").
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.fixture
def envoy_tmp() -> Iterator[pathlib.Path]:
    """A directory every user may enter, as a waypoint Envoy run as its own user (the
    agent's default when root) must: a new one in /tmp, mode 0711 (pytest's base
    directory is 0700), removed after the test."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix="nodeagent-test-", dir="/tmp"))
    try:
        directory.chmod(0o711)
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
