"""scripts/setup's command line: --no-kube (the kernel lab's VMs skip the Kubernetes
control plane, a Go build of hours under emulation), --packages (the Debian packages it
installs, which tests/vm/build-box puts in its boxes), --help, and a clear refusal of
anything else — before it touches the machine."""

from __future__ import annotations

import subprocess
import sys
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
    assert out.stderr == "setup: error: unknown argument --kube-only (usage: scripts/setup [--no-kube] [--packages])\n"


def test_packages_lists_what_it_installs_and_does_nothing_else() -> None:
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    out = run("--packages")
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.splitlines() == [
        "python3-bpfcc", "bpftool", "iproute2", "nftables", "curl", "iperf3", "wrk", "tcpdump", "ca-certificates",
        "gcc", "libc6-dev", "python3-dev", "libnghttp2-dev", "make", "perl", f"linux-headers-{arch}"]
    # the list it prints is the one it installs from: one PACKAGES array, read by the install loop
    text = SETUP.read_text()
    assert text.count("PACKAGES=(") == 1 and 'for p in "${PACKAGES[@]}"; do' in text


def test_no_kube_ends_before_the_control_plane_and_the_crd_check() -> None:
    text = SETUP.read_text()
    stop = text.index('if [ "$KUBE" = 0 ]; then')
    assert text.index('"$ROOT/controlplane/build"') > stop
    assert text.index('"$ROOT/daemonset/crds/check"') > stop
    # ... and after everything the kernel tier needs: packages, headers, mounts, .venv, native
    for needed in ("apt-get install", "mount -t cgroup2", "mount -t bpf", "pip\" install", "nodeagent.native.build"):
        assert text.index(needed) < stop, needed


def test_the_boxes_carry_setups_packages_read_from_it() -> None:
    """tests/vm/build-box debootstraps its boxes with what scripts/setup installs, so the
    set-up inside a VM under emulation finds them (apt there took 22 of its 30 minutes)."""
    sys.path.insert(0, str(SETUP.parents[1] / "tests" / "vm"))
    try:
        import box
    finally:
        sys.path.pop(0)
    listed = run("--packages").stdout.split()
    for suite in ("bullseye", "bookworm", "trixie", "sid"):
        packages = box.guest_packages(suite)
        assert set(listed) <= set(packages) and len(packages) == len(set(packages)), suite
        assert packages[:len(box.GUEST_PACKAGES)] == box.GUEST_PACKAGES
