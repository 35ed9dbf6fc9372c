"""Issue 11, item 5 (footprint): what the agent's process does not carry. The command
line parses every sub-command, so the lab's machinery must not come with it; the C
libraries' heap is kept to two glibc malloc arenas however many threads allocate."""

from __future__ import annotations

import subprocess
import sys
import textwrap

LAB_MACHINERY = ("pyroute2", "sqlite3", "multiprocessing", "nodeagent.lab.status", "nodeagent.lab.lifecycle",
                 "nodeagent.lab.supervisor", "nodeagent.lab.kube.controlplane", "nodeagent.bench.mesh")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_the_agents_command_line_does_not_import_the_lab():
    run = python("""
        import sys
        from nodeagent.cli import build_parser
        import nodeagent.agent.daemon
        build_parser().parse_args(["status"])
        print(" ".join(sorted(m for m in sys.modules)))
        """)
    assert run.returncode == 0, run.stderr
    loaded = set(run.stdout.split())
    assert "nodeagent.agent.daemon" in loaded and "nodeagent.lab.cli" in loaded
    assert [m for m in LAB_MACHINERY if m in loaded] == []


ARENAS = """
    import ctypes, ctypes.util, sys, threading
    from nodeagent.agent.daemon import limit_malloc_arenas
    if sys.argv[1] == "limit":
        assert limit_malloc_arenas()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    start, hold = threading.Barrier(12), threading.Barrier(12)
    def allocate():
        start.wait()  # all at once: each thread contends, and glibc gives it an arena of its own
        blocks = [libc.malloc(4096) for _ in range(200)]
        hold.wait()
    threads = [threading.Thread(target=allocate) for _ in range(12)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    libc.malloc_stats()  # one "Arena N:" paragraph per arena, on stderr
    """


def arenas(mode: str) -> int:
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(ARENAS), mode], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return sum(1 for line in run.stderr.splitlines() if line.startswith("Arena "))


def test_twelve_allocating_threads_share_two_malloc_arenas():
    assert arenas("limit") <= 2
    assert arenas("default") > 2  # glibc's own default: what the limit changes


def test_the_agent_raises_its_open_files_soft_limit_to_the_hard_one():
    """Container runtimes start processes at 1024 open files soft (~300 relayed
    connections); the agent takes the hard limit at start, once."""
    run = python("""
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        from nodeagent.agent.daemon import raise_open_files
        print(raise_open_files(), resource.getrlimit(resource.RLIMIT_NOFILE), hard)
        print(raise_open_files())
        """)
    assert run.returncode == 0, run.stderr
    first, second = run.stdout.splitlines()
    hard = int(first.rsplit(" ", 1)[1])
    assert first == f"(256, {hard}) ({hard}, {hard}) {hard}" and second == f"({hard}, {hard})"
