"""Where a process's memory goes: /proc/<pid>/smaps summed by what is mapped, and the
shared libraries it has mapped (issue 11: the agent must not carry bcc/LLVM).

Run as a script it starts a sandbox node (nodeagent.bench.sandbox) with a CA and N
meshed pods, waits until the agent has enrolled them all and holds their certificate,
and prints the agent's VmRSS/VmHWM/Pss by origin and the waypoint Envoy's RSS:

    CI=true .venv/bin/python tests/kernel/footprint.py --pods 50

File-backed lines count the library's own pages (code, data); memory a library
allocates (LLVM's heap during a compile, grpc's arenas) lands in [heap] or anonymous.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import subprocess
import sys
import time

# (label, pattern on the mapping's path); first match wins, unmatched files are "other libs".
ORIGINS = (
    ("bcc/LLVM/clang", re.compile(r"lib(bcc|bpf|LLVM|clang|clang-cpp)[-.\w]*\.so")),
    ("grpc", re.compile(r"/grpc/|cygrpc")),
    ("cryptography", re.compile(r"/cryptography/")),
    ("OpenSSL", re.compile(r"lib(ssl|crypto)\.so")),
    ("python + stdlib", re.compile(r"python3|libpython|/lib-dynload/")),
    ("other site-packages", re.compile(r"site-packages")),
)
LLVM_BCC = re.compile(r"lib(bcc|bcc_bpf|LLVM|clang|clang-cpp)[-.\w]*\.so")


def _origin(path: str) -> str:
    if not path:
        return "anonymous (Python heap, arenas, malloc mmaps)"
    if path == "[heap]":
        return "[heap] (brk: malloc)"
    if path.startswith("["):
        return "stack/vdso"
    return next((label for label, pattern in ORIGINS if pattern.search(path)), "other libs/files")


def smaps_by_origin(pid: int) -> dict[str, dict[str, int]]:
    """{origin: {"rss": KiB, "pss": KiB}} from /proc/<pid>/smaps."""
    out: dict[str, dict[str, int]] = {}
    current = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                current = out.setdefault(_origin(head[5].strip() if len(head) > 5 else ""),
                                         {"rss": 0, "pss": 0})
            elif head[0] in ("Rss:", "Pss:") and current is not None:
                current[head[0][:-1].lower()] += int(head[1])
    return out


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon, RssFile of /proc/<pid>/status, in KiB."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in wanted}


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))


def mapped_files(pid: int) -> set[str]:
    """Every file the process has mapped (/proc/<pid>/maps)."""
    with open(f"/proc/{pid}/maps") as f:
        return {parts[5] for parts in (line.split(maxsplit=5) for line in f) if len(parts) > 5
                and parts[5].startswith("/")}


def llvm_or_bcc(pid: int) -> list[str]:
    """The bcc, libbpf, LLVM and clang libraries the process has mapped (none wanted)."""
    return sorted(path.strip() for path in mapped_files(pid) if LLVM_BCC.search(path))


def grpcio(pid: int) -> list[str]:
    """grpcio's core library if the process has it mapped (the agent speaks gRPC with grpclib)."""
    return sorted(path.strip() for path in mapped_files(pid) if dict(ORIGINS)["grpc"].search(path))


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def report(pid: int, title: str) -> str:
    st, rows = status_kib(pid), smaps_by_origin(pid)
    lines = [f"{title} (pid {pid}): VmRSS {st['VmRSS'] / 1024:.1f} MiB, peak VmHWM {st['VmHWM'] / 1024:.1f} MiB, "
             f"Pss {pss_kib(pid) / 1024:.1f} MiB (anon {st['RssAnon'] / 1024:.1f}, file {st['RssFile'] / 1024:.1f})"]
    for origin, kib in sorted(rows.items(), key=lambda kv: -kv[1]["rss"]):
        lines.append(f"  {origin:<48} RSS {kib['rss'] / 1024:7.1f} MiB  Pss {kib['pss'] / 1024:7.1f} MiB")
    lines.append(f"  bcc/LLVM libraries mapped: {llvm_or_bcc(pid) or 'none'}")
    return "\n".join(lines)


def main() -> int:
    from nodeagent.bench.sandbox import AMBIENT, Sandbox

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to wait once all are enrolled")
    args = parser.parse_args()
    sb = Sandbox(f"fp-{secrets.token_hex(3)}")
    try:
        sb.setup()
        pods = [sb.add_pod("app", f"pod{i}") for i in range(args.pods)]
        sb.write_pods()
        sb.label_namespace("app", AMBIENT)
        for pod in pods:
            sb.in_pod(pod, ["sleep", "infinity"], stdout=subprocess.DEVNULL)  # a pod is found by its processes
        sb.start_ca()
        started = time.monotonic()
        agent = sb.start_agent(*sb.ca_args(), timeout=120)
        sb.wait_for(lambda s: len(s["pods"]) == args.pods and s["ready"], 120, f"{args.pods} pods enrolled, ready")
        print(f"agent ready with {args.pods} pods enrolled in {time.monotonic() - started:.1f} s")
        time.sleep(args.settle)
        print(report(agent.pid, "agent"))
        for child in children(agent.pid):
            with open(f"/proc/{child}/comm") as f:
                comm = f.read().strip()
            print(f"child {comm} (pid {child}): VmRSS {status_kib(child)['VmRSS'] / 1024:.1f} MiB, "
                  f"Pss {pss_kib(child) / 1024:.1f} MiB")
    finally:
        left = sb.close()
        if left:
            print(f"left behind: {left}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
