"""e2e fixtures: labs brought up from YAML under unique names and always taken down.

`lab_factory(yaml_text, agents=False, timeout=30) -> Lab` runs `nodeagent lab up` under
a fresh name (`t` + 7 random characters, so tests run beside a demo lab);
`lab_factory.new()` gives a named Lab without `up` (for tests of failing `up`s).
`module_lab` is one lab shared by a test module, made from the module's `LAB_YAML`;
`kube_lab` the same with the Kubernetes control plane (`up --kube`; the helpers that
talk to its API are tests/e2e/kubelab.py's).
At teardown, even after a failure or a failed `up`, every lab is taken down with
`nodeagent lab down` and the test fails if anything of it is left: a netns, /etc/netns
dir, cgroup, mount, bpffs dir, state dir or process.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import string
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

NODEAGENT = [sys.executable, "-m", "nodeagent"]


def cgroup2_root() -> str:
    with open("/proc/self/mounts") as f:
        return next(line.split()[1] for line in f if line.split()[2] == "cgroup2")


@dataclass
class Lab:
    """A lab under test; `run` is `nodeagent lab CMD --name NAME ARGS…`."""

    name: str
    workdir: Path
    pids: set[int] = field(default_factory=set)
    output: str = ""  # what `up` printed, for modules that check it

    def run(self, command: str, *args: str, input: str | None = None, timeout: float = 90,
            check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([*NODEAGENT, "lab", command, "--name", self.name, *map(str, args)],
                              input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"nodeagent lab {command} {' '.join(map(str, args))} exited "
                                 f"{proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def exec(self, target: str, *command: str, input: str | None = None, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run("exec", target, "--", *command, input=input, check=check, timeout=timeout)

    def spawn(self, target: str, *command: str, stdin: int | None = None) -> subprocess.Popen:
        """`exec` in the background (traffic while a test changes something); the caller
        waits for it (`communicate`) or kills it by its pid, always."""
        return subprocess.Popen([*NODEAGENT, "lab", "exec", "--name", self.name, target, "--", *map(str, command)],
                                stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def write(self, text: str, stem: str = "lab") -> Path:
        path = self.workdir / f"{self.name}-{stem}.yaml"
        path.write_text(text)
        return path

    def up(self, text: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("up", "-f", self.write(text, "up"), *args, check=check)

    def up_kube(self, text: str, *args: str) -> subprocess.CompletedProcess:
        """`up --kube --no-agents`: the control plane alone may take up to 180 s to be
        ready on a loaded machine (it waits for it; measured 37 s + 24 s for the CRDs
        at load 12), so the command gets 300 s before it counts as hung."""
        return self.run("up", "-f", self.write(text, "up"), "--kube", "--no-agents", "--timeout", "60", *args,
                        timeout=300)

    def apply(self, text: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("apply", "-f", self.write(text, "apply"), *args, check=check)

    def status(self) -> dict:
        return json.loads(self.run("status", "--output", "json").stdout)

    @property
    def state_dir(self) -> Path:
        return Path("/run/nodeagent") / self.name

    def pod_cgroup(self, node: str, uid: str) -> str:
        return os.path.join(cgroup2_root(), f"nodeagent-{self.name}", node, "kubepods", f"pod{uid}")

    def leftovers(self) -> list[str]:
        return leftovers(self.name)

    def survivors(self) -> list[int]:
        return sorted(pid for pid in self.pids if alive(pid))

    def remember_processes(self) -> None:
        """Pids of every process the lab runs now, to check `down` killed them."""
        for root, _dirs, _files in os.walk(os.path.join(cgroup2_root(), f"nodeagent-{self.name}")):
            with open(os.path.join(root, "cgroup.procs")) as f:
                self.pids.update(int(line) for line in f if line.strip())


def unique_name() -> str:
    return "t" + "".join(random.choices(string.ascii_lowercase + string.digits, k=7))


def leftovers(name: str) -> list[str]:
    """Everything of lab `name` still on the machine (design.md's names, spelled out)."""
    found = []
    for directory in ("/run/netns", "/etc/netns"):
        if os.path.isdir(directory):
            found += [f"{directory}/{n}" for n in os.listdir(directory) if n.startswith(f"{name}-")]
    for path in (os.path.join(cgroup2_root(), f"nodeagent-{name}"), f"/run/nodeagent/{name}",
                 f"/sys/fs/bpf/nodeagent-{name}"):
        if os.path.exists(path):
            found.append(path)
    with open("/proc/self/mountinfo") as f:
        found += [f"mount {line.split()[4]}" for line in f if f"/{name}-" in line.split()[4]]
    return found


def alive(pid: int) -> bool:
    """True for a live process; a zombie waiting for init to reap it is dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def take_down(lab: Lab) -> list[str]:
    """`lab down`, then what is left of the lab (processes included)."""
    lab.remember_processes()
    proc = lab.run("down", check=False)
    problems = [] if proc.returncode == 0 else [f"lab down exited {proc.returncode}: {proc.stderr}"]
    problems += leftovers(lab.name)
    problems += [f"process {pid} survived" for pid in sorted(lab.pids) if alive(pid)]
    return problems


class Labs:
    """Labs made by one fixture; `close` takes every one down and reports leftovers."""

    def __init__(self, workdir: Path):
        self.workdir, self.made = workdir, []

    def new(self, name: str | None = None) -> Lab:
        lab = Lab(name or unique_name(), self.workdir)
        self.made.append(lab)  # before `up`, so a half-made lab is taken down too
        return lab

    def __call__(self, text: str, *, agents: bool = False, timeout: float = 30) -> Lab:
        lab = self.new()
        lab.up(text, "--timeout", str(timeout), *([] if agents else ["--no-agents"]))
        return lab

    def close(self) -> None:
        problems = {lab.name: take_down(lab) for lab in self.made}
        problems = {name: found for name, found in problems.items() if found}
        assert not problems, f"labs not removed completely: {problems}"


ROOT = Path(__file__).resolve().parents[2]


def controlplane_built() -> bool:
    """The Kubernetes control plane is in the machine's cache (scripts/setup builds it)."""
    return subprocess.run([str(ROOT / "controlplane" / "build"), "--print"], capture_output=True).returncode == 0


@contextmanager
def kube_lab_up(tmp_path_factory: pytest.TempPathFactory, text: str, stem: str,
                name: str | None = None) -> Iterator[Lab]:
    """A `lab up --kube --no-agents` lab of `text` for a test module (named `name`, else
    a unique name), always taken down; `lab.output` is what `up` printed. Skipped when
    the control plane is not built (a skip fails under CI: tests/conftest.py)."""
    if not controlplane_built():
        pytest.skip("the control plane is not built: run scripts/setup")
    labs = Labs(tmp_path_factory.mktemp(stem))
    lab = labs.new(name)
    try:
        started = time.monotonic()
        lab.output = lab.up_kube(text).stdout
        print(lab.output, f"lab up --kube took {time.monotonic() - started:.1f}s")
        yield lab
    finally:
        labs.close()


@pytest.fixture
def lab_factory(tmp_path: Path) -> Iterator[Labs]:
    labs = Labs(tmp_path)
    try:
        yield labs
    finally:
        labs.close()


@pytest.fixture(scope="module")
def module_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One lab for a whole module, made from the module's LAB_YAML."""
    labs = Labs(tmp_path_factory.mktemp("lab"))
    try:
        yield labs(request.module.LAB_YAML)
    finally:
        labs.close()


@pytest.fixture(scope="module")
def kube_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One `lab up --kube --no-agents` lab for a whole module, made from the module's LAB_YAML."""
    with kube_lab_up(tmp_path_factory, request.module.LAB_YAML, request.module.__name__.rsplit(".", 1)[-1]) as lab:
        yield lab


@pytest.fixture(scope="module")
def lab_factory_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Labs]:
    """Like lab_factory, for labs shared by a whole module (e.g. with agents)."""
    labs = Labs(tmp_path_factory.mktemp("labs"))
    try:
        yield labs
    finally:
        labs.close()


class FabricCapture:
    """tcpdump on the fabric bridge (the only way between nodes), to a pcap file."""

    def __init__(self, fabric_netns: str, path: str):
        self.path = path
        self.proc = subprocess.Popen(
            ["timeout", "120", "ip", "netns", "exec", fabric_netns, "tcpdump", "-i", "br0", "-nn",
             "-U", "-s", "0", "-c", "20000", "-w", path, "tcp"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stderr], [], [], 10)
        assert ready and "listening on br0" in self.proc.stderr.readline(), "tcpdump did not start"

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def stop(self) -> bytes:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # `timeout` passes it on; tcpdump flushes and exits
        try:
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stderr.close()
        return self.read()

    def packets(self, bpf_filter: str) -> int:
        out = subprocess.run(["tcpdump", "-nn", "-r", self.path, bpf_filter], capture_output=True, text=True,
                             check=True).stdout
        return len(out.splitlines())
