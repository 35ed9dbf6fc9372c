"""Fixtures of the kernel tier: throwaway cgroups, pin dirs and network namespaces
(see kernel_sandbox.py), each made per test — or per module where compiling the
programs once matters — and always removed."""

from __future__ import annotations

import pathlib
from typing import Iterator

import pytest

from kernel_sandbox import Netns, link, netns_factory, throwaway_cgroup, throwaway_pin_dir
from nodeagent.capture.loader import CaptureLoader
from nodeagent.bench.sandbox import time_scale
from nodeagent.capture.preflight import mount_table

KERNEL_TIER = pathlib.Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def cgroup2_root() -> str:
    roots = [point for point, kind in mount_table() if kind == "cgroup2"]
    if not roots:
        pytest.fail("no cgroup2 mount: run scripts/setup")
    return roots[0]


@pytest.fixture(scope="module")
def module_cgroup(cgroup2_root: str) -> Iterator[str]:
    with throwaway_cgroup(cgroup2_root) as path:
        yield path


@pytest.fixture
def cgroup_dir(cgroup2_root: str) -> Iterator[str]:
    with throwaway_cgroup(cgroup2_root) as path:
        yield path


@pytest.fixture(scope="module")
def module_pin_dir() -> Iterator[str]:
    with throwaway_pin_dir() as path:
        yield path


@pytest.fixture
def pin_dir() -> Iterator[str]:
    with throwaway_pin_dir() as path:
        yield path


@pytest.fixture(scope="module")
def capture(module_cgroup: str, module_pin_dir: str) -> Iterator[CaptureLoader]:
    """The real programs, compiled and attached once per module to its throwaway cgroup."""
    with CaptureLoader(cgroup=module_cgroup, pin_dir=module_pin_dir) as loader:
        yield loader


@pytest.fixture
def make_netns() -> Iterator:
    with netns_factory() as make:
        yield make


@pytest.fixture
def pod_and_peer(make_netns) -> tuple[Netns, Netns]:
    """A pod netns (10.77.0.1, fd77::1) linked by a veth to a peer (10.77.0.2, fd77::2)."""
    pod, peer = make_netns(), make_netns()
    link(pod, peer, ["10.77.0.1/24", "fd77::1/64"], ["10.77.0.2/24", "fd77::2/64"])
    return pod, peer


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under a time scale (a kernel lab VM under emulation: NODEAGENT_TEST_TIME_SCALE),
    the per-test limit of pytest-timeout (`timeout` in pyproject.toml, or --timeout)
    scales with the tests' waits; a test's own timeout marker is left as it is."""
    scale = time_scale()
    base = config.getoption("timeout", None) or float(config.getini("timeout") or 0)
    if scale == 1 or not base:
        return
    for item in items:
        if item.path.resolve().is_relative_to(KERNEL_TIER) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(base * scale))
