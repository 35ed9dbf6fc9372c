"""Test tiers: tests/unit needs nothing; tests/kernel and tests/e2e need root and a real
kernel. Where a privileged test cannot run it is skipped on a developer machine but
*fails* under CI=true, so a skip can never hide missing coverage (as ztunnel does)."""

from __future__ import annotations

import os
import pathlib

import pytest

PRIVILEGED_DIRS = ("kernel", "e2e")


def _privileged(item: pytest.Item) -> bool:
    parts = pathlib.Path(str(item.fspath)).parts
    return any(p in parts for p in PRIVILEGED_DIRS) and "tests" in parts


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _privileged(item) and os.geteuid() != 0:
        reason = "needs root and a real kernel (run scripts/test as root)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
