"""Checks that the machine can run the capture programs, before anything is touched.

Each check raises a typed error (nodeagent.capture.errors) naming what is missing and
how to fix it; `check_all` runs them in the order an operator would fix them, then
probes the kernel for every program type, helper, map and link the programs use
(features.py) and returns what it found (a KernelSupport: the fallbacks in force), or
raises KernelFeatureMissing. Compile and verifier failures are caught later, where they
happen (compiler.py). The agent only looks bcc up (check_bcc_found): importing it maps
LLVM, which is the compile process's job (check_bcc). `python -m
nodeagent.capture.preflight [--cgroup DIR] [--json]` prints the probes alone (root; exit
status 1 when a feature without fallback is missing), for kernel matrices and operators.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
import types

from nodeagent.capture import bpfsys, features
from nodeagent.capture.errors import (BccMissing, BpffsMissing, BtfMissing, Cgroup2Missing,
                                      KernelFeatureMissing, KernelHeadersMissing, NotPrivileged)

MOUNTS = "/proc/self/mounts"
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"
CAP_LAST_CAP = "/proc/sys/kernel/cap_last_cap"
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39


def mount_table(mounts: str = MOUNTS) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every mount, in mount order."""
    table = []
    with open(mounts) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2:
                # /proc/self/mounts escapes blanks as octal (\040).
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
                table.append((point, parts[2]))
    return table


def fs_type_of(path: str, mounts: str = MOUNTS) -> str | None:
    """Filesystem type of the mount holding `path` (the longest matching mount point)."""
    path = os.path.realpath(path)
    best, fstype = "", None
    for point, kind in mount_table(mounts):
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, fstype = point, kind
    return fstype


def check_bcc() -> types.ModuleType:
    """Import bcc (in the compile process: it maps libbcc, LLVM and clang)."""
    try:
        return importlib.import_module("bcc")
    except (ImportError, OSError) as exc:
        raise BccMissing(str(exc)) from None


def check_bcc_found() -> None:
    """bcc's Python package can be found, without importing it. A libbcc that fails to
    load is reported by the compile process (check_bcc), as the same BccMissing."""
    try:
        found = importlib.util.find_spec("bcc")
    except (ImportError, ValueError) as exc:
        raise BccMissing(str(exc)) from None
    if found is None:
        raise BccMissing("No module named 'bcc'")


def check_kernel_headers(release: str | None = None) -> None:
    build = f"/lib/modules/{release or os.uname().release}/build"
    if not (os.path.isdir(os.path.join(build, "include")) or os.path.exists(os.path.join(build, "Makefile"))):
        raise KernelHeadersMissing(build)


def check_cgroup(cgroup: str, mounts: str = MOUNTS) -> None:
    if not any(kind == "cgroup2" for _, kind in mount_table(mounts)):
        raise Cgroup2Missing(f"no cgroup2 mount in {mounts}")
    if not os.path.isdir(cgroup):
        raise Cgroup2Missing(f"cgroup directory {cgroup} does not exist")
    if fs_type_of(cgroup, mounts) != "cgroup2":
        raise Cgroup2Missing(f"{cgroup} is not on a cgroup2 mount (cgroup v1 cannot hold these programs)")


def check_btf(path: str = BTF_VMLINUX) -> None:
    """Not part of check_all: bcc loads our programs without kernel BTF (features.py's
    `btf` row says so and shows whether it is there)."""
    if not os.path.exists(path):
        raise BtfMissing(path)


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = _effective_caps()
    wanted = {"CAP_NET_ADMIN": CAP_NET_ADMIN, "CAP_SYS_ADMIN": CAP_SYS_ADMIN}
    with open(CAP_LAST_CAP) as f:
        if int(f.read()) >= CAP_BPF:  # before Linux 5.8 CAP_SYS_ADMIN covered bpf(2)
            wanted["CAP_BPF"] = CAP_BPF
    missing = [name for name, bit in wanted.items() if not caps & (1 << bit)]
    if missing:
        raise NotPrivileged(missing)


def check_bpffs(pin_dir: str, mounts: str = MOUNTS) -> None:
    """`pin_dir` (or, if it does not exist yet, its nearest existing parent) is on bpffs."""
    probe = os.path.abspath(pin_dir)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if fs_type_of(probe, mounts) != "bpf":
        raise BpffsMissing(pin_dir)


def check_all(cgroup: str, pin_dir: str, bpf: features.Syscall = bpfsys.call) -> features.KernelSupport:
    """Run every check (bcc is looked up, not imported), then the kernel feature probes
    (through `bpf`: tests inject a failing one); what the kernel offers, with the
    fallbacks in force. KernelFeatureMissing when a feature without fallback is missing."""
    check_privileges()
    check_bcc_found()
    check_kernel_headers()
    check_cgroup(cgroup)
    check_bpffs(pin_dir)
    support = features.probe(cgroup, bpf)
    support.check()
    return support


def main(argv: list[str]) -> int:
    """Print what the feature probes find on this kernel, one line per feature."""
    parser = argparse.ArgumentParser(prog="python -m nodeagent.capture.preflight",
                                     description="Probe this kernel for what the capture programs use.")
    parser.add_argument("--cgroup", help="a cgroup v2 directory (default: the first cgroup2 mount)")
    parser.add_argument("--json", action="store_true", help="print capture.kernel as the agent's status has it")
    args = parser.parse_args(argv)
    cgroup = args.cgroup or next((point for point, kind in mount_table() if kind == "cgroup2"), None)
    if cgroup is None:
        raise Cgroup2Missing(f"no cgroup2 mount in {MOUNTS}")
    support = features.probe(cgroup)
    if args.json:
        print(json.dumps(support.describe(), indent=2))
    else:
        for row in support.rows:
            detail = f" ({row.detail})" if row.detail else ""
            print(f"{row.feature.name:<18} {row.feature.since:<5} {row.outcome}{detail}")
    try:
        support.check()
    except KernelFeatureMissing as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
