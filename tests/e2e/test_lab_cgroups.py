"""lab/cgroups.py on the real cgroup2 tree: `kill_tree` empties a lab's cgroups with
`cgroup.kill` and, on kernels without it (< 5.14), by SIGKILLing every pid it lists;
`remove_tree` then removes them deepest first."""

from __future__ import annotations

import functools
import os
import random
import string
import subprocess

import pytest

from nodeagent.lab import cgroups


@pytest.fixture
def lab_cgroup():
    """A throwaway `nodeagent-t…` cgroup with sleeps in it and in two nested children."""
    name = "nodeagent-t" + "".join(random.choices(string.ascii_lowercase, k=7))
    top = os.path.join(cgroups.cgroup2_root(), name)
    procs = []
    for sub in ("", "node1/kubepods/poda", "node2/system"):
        path = os.path.join(top, sub)
        cgroups.make(path)
        procs.append(subprocess.Popen(["sleep", "600"], preexec_fn=functools.partial(cgroups.join, path)))
    try:
        yield top, procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        cgroups.remove_tree(top)


@pytest.mark.parametrize("with_kill_file", [True, False], ids=["cgroup.kill", "per-pid SIGKILL"])
def test_kill_tree_then_remove_tree_leaves_nothing(lab_cgroup, monkeypatch, with_kill_file):
    top, procs = lab_cgroup
    assert sorted(cgroups.procs(top)) == sorted(p.pid for p in procs)
    if not with_kill_file:
        real_exists = os.path.exists
        monkeypatch.setattr(os.path, "exists", lambda p: not p.endswith("cgroup.kill") and real_exists(p))
    assert cgroups.kill_tree(top) is True
    assert [p.wait(timeout=5) for p in procs] == [-9, -9, -9]
    assert cgroups.procs(top) == []
    assert cgroups.remove_tree(top) == []
    assert not os.path.exists(top)
