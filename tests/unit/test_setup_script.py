"""scripts/setup's command line: --no-kube (the kernel lab's VMs skip the Kubernetes
control plane, a Go build of hours under emulation), --help, and a clear refusal of
anything else — before it touches the machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "scripts" / "setup"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SETUP), *argv], capture_output=True, text=True, timeout=30)


def test_help_names_no_kube_and_changes_nothing() -> None:
    out = run("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Set up this machine to build, run and test nodeagent.")
    assert "Usage: sudo scripts/setup [--no-kube]" in out.stdout
    assert "--no-kube   skip the lab's Kubernetes control plane" in out.stdout
    assert "==>" not in out.stdout  # no step ran


def test_an_unknown_argument_is_refused_with_the_usage() -> None:
    out = run("--no-kube", "--kube-only")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr == "setup: error: unknown argument --kube-only (usage: scripts/setup [--no-kube])\n"


def test_no_kube_ends_before_the_control_plane_and_the_crd_check() -> None:
    text = SETUP.read_text()
    stop = text.index('if [ "$KUBE" = 0 ]; then')
    assert text.index('"$ROOT/controlplane/build"') > stop
    assert text.index('"$ROOT/daemonset/crds/check"') > stop
    # ... and after everything the kernel tier needs: packages, headers, mounts, .venv, native
    for needed in ("apt-get install", "mount -t cgroup2", "mount -t bpf", "pip\" install", "nodeagent.native.build"):
        assert text.index(needed) < stop, needed
