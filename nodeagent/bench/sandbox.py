"""A throwaway node for the agent's kernel tests and `nodeagent bench capture`.

One node netns and pods on it, built with the lab's own helpers (`lab.layout` names,
`lab.topology.add_pod` for the routed pod network, `lab.cgroups` for kubelet-named pod
cgroups), a `files` source directory the sandbox writes Namespace/Pod YAML to, and the
agent started as `python -m nodeagent run` inside the node netns; optionally a mesh CA
(`start_ca`: provisioned as the lab does, `nodeagent ca` on the node's 127.0.0.1:15012)
so the agent gets workload certificates (`ca_args`). Nothing is added to
the machine's own netns. Every name carries the sandbox name (`<name>-…` netns,
`<cg2>/nodeagent-<name>/`, `/sys/fs/bpf/nodeagent-<name>/`); `close()` stops the
processes it started (by pid, then by cgroup) and removes everything by those names,
also after a failure half-way. Every wait for a condition (ready, serving, exited) is
multiplied by `time_scale()`, which the kernel lab's VMs raise (software emulation runs
Python ~30x slower); the tests scale their own waits with `scaled()`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml

from nodeagent import netns
from nodeagent.admin import fetch_status
from nodeagent.bench.timescale import TIME_SCALE_ENV, scaled, time_scale  # noqa: F401 (the tests' import)
from nodeagent.identity.spiffe import NODE_PATH
from nodeagent.capture.compiler import COMPILE_TIMEOUT, COMPILE_TIMEOUT_MAX
from nodeagent.errors import NodeagentError
from nodeagent.lab import cgroups, meshca, topology
from nodeagent.lab.ipam import PodAlloc
from nodeagent.lab.layout import Layout, short_hash
from nodeagent.tunnel.settings import SERVER_HANDSHAKE_TIMEOUT_MAX, TunnelSettings

NODE = "node1"
CA_PORT = 15012
POD_NET = "10.252.0."  # pods get .2, .3, ... (inside the sandbox netns only)
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def workload_identities(status: dict) -> list[dict]:
    """The identities an agent's status lists for its pods (not its node's own, which it
    vouches for its pods' requests with: spiffe.NODE_NAMESPACE)."""
    return [i for i in status["identity"]["identities"] if f"/{NODE_PATH}/" not in i["identity"]]
# Joins the cgroup given as $0, then runs the command: nsenter only enters the netns, and
# unlike `ip netns exec` keeps /sys (the agent needs /sys/fs/bpf and the cgroup2 mount).
JOIN_AND_EXEC = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


@dataclass
class SandboxPod:
    namespace: str
    name: str
    uid: str
    ip: str
    netns: str  # named netns
    cgroup: str
    labels: dict[str, str] = field(default_factory=dict)
    other_ips: list[str] = field(default_factory=list)  # status.podIPs after ip (a dual-stack pod's)
    probe_ports: list[int] = field(default_factory=list)  # tcpSocket readiness probes (kubelet's)


class Sandbox:
    def __init__(self, name: str, workdir: str | Path | None = None, node: str = NODE):
        self.name = name
        self.node = node
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"nodeagent-{name}-"))
        # State (CA keys, tokens, identities, flow log) lives in the workdir, removed with it.
        self.layout = Layout(name, cgroup_root=cgroups.cgroup2_root(), run_root=str(self.workdir))
        self._own_workdir = workdir is None
        self.source_dir = self.workdir / "cluster"
        self.admin_socket = self.workdir / "agent.sock"
        # Unix socket paths are short (108 bytes): the waypoint's live under /run, not the workdir.
        self.waypoint_dir = f"/run/nodeagent/sandbox/{name}-{short_hash(str(self.workdir))}"
        self.pods: dict[tuple[str, str], SandboxPod] = {}
        self.namespaces: dict[str, dict[str, str]] = {}
        self.procs: list[subprocess.Popen] = []
        self.agent: subprocess.Popen | None = None

    # --- building ---------------------------------------------------------------------
    def __enter__(self) -> "Sandbox":
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def node_netns(self) -> str:
        return self.layout.node_netns(self.node)

    @property
    def kubepods(self) -> str:
        return self.layout.kubepods_cgroup(self.node)

    @property
    def bpffs(self) -> str:
        return self.layout.node_bpffs(self.node)

    def setup(self) -> None:
        self.source_dir.mkdir(parents=True, exist_ok=True)
        topology.create_netns(self.node_netns)
        with topology.rtnl(self.node_netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        topology.sysctl(self.node_netns, "net/ipv4/ip_forward", "1")
        cgroups.make(self.kubepods)
        cgroups.make(self.layout.system_cgroup(self.node))

    def add_pod(self, namespace: str, name: str) -> SandboxPod:
        uid = str(uuid.uuid4())
        ip = f"{POD_NET}{len(self.pods) + 2}"
        topology.add_pod(self.layout, namespace, name, PodAlloc(uid, self.node, ip))
        pod = SandboxPod(namespace, name, uid, ip, self.layout.pod_netns(namespace, name),
                         self.layout.pod_cgroup(self.node, uid))
        cgroups.make(pod.cgroup)
        self.pods[(namespace, name)] = pod
        self.namespaces.setdefault(namespace, {})
        return pod

    # --- processes ----------------------------------------------------------------------
    def spawn(self, netns_name: str, cgroup: str, argv: list[str], **popen) -> subprocess.Popen:
        cmd = ["nsenter", f"--net={netns.named_path(netns_name)}", "--", "sh", "-c", JOIN_AND_EXEC, cgroup, *argv]
        proc = subprocess.Popen(cmd, **popen)
        self.procs.append(proc)
        return proc

    def in_pod(self, pod: SandboxPod, argv: list[str], **popen) -> subprocess.Popen:
        return self.spawn(pod.netns, pod.cgroup, argv, **popen)

    def probe(self, pod: SandboxPod, *args: str, **popen) -> subprocess.Popen:
        return self.in_pod(pod, [sys.executable, "-m", "nodeagent.bench.probe", *args], **popen)

    def serve(self, pod: SandboxPod, port: int = 9000) -> subprocess.Popen:
        proc = self.probe(pod, "serve", "--port", str(port), stderr=subprocess.PIPE, text=True)
        proc.stderr.readline()  # "probe: serving on ..." once listening
        return proc

    def agent_argv(self, *extra: str) -> list[str]:
        """The agent's command line; its compile process's limit and its HBONE server's
        handshake timeout scaled as the waits are (software emulation compiles 15-100 s
        against ~1 s, and takes the agent past 5 s to answer a flood of handshakes)."""
        return [sys.executable, "-m", "nodeagent", "run", "--node", self.node,
                "--source", f"files:{self.source_dir}", "--cgroup", self.kubepods, "--bpffs", self.bpffs,
                "--admin-socket", str(self.admin_socket), "--waypoint-dir", self.waypoint_dir,
                "--compile-timeout", f"{min(COMPILE_TIMEOUT_MAX, scaled(COMPILE_TIMEOUT)):g}",
                "--hbone-handshake-timeout",
                f"{min(SERVER_HANDSHAKE_TIMEOUT_MAX, scaled(TunnelSettings.server_handshake_timeout)):g}", *extra]

    def start_agent(self, *extra: str, timeout: float = 30.0, cgroup: str | None = None) -> subprocess.Popen:
        """Start the agent in the node netns and wait until it reports ready (`timeout`
        scaled, as every wait of `wait_for`). `cgroup`: a cgroup of another hierarchy it
        joins too (a memory cgroup of cgroup v1's: its container's, as it were)."""
        argv = self.agent_argv(*extra)
        if cgroup:
            argv = ["sh", "-c", JOIN_AND_EXEC, cgroup, *argv]
        log = open(self.workdir / "agent.log", "ab")
        self.agent = self.spawn(self.node_netns, self.layout.system_cgroup(self.node), argv,
                                stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.wait_for(lambda s: s.get("ready"), timeout, "the agent to become ready")
        return self.agent

    def stop_agent(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        agent, self.agent = self.agent, None
        if agent is None:
            return 0
        agent.send_signal(sig)
        return agent.wait(scaled(timeout))

    def status(self) -> dict:
        return fetch_status(self.admin_socket, timeout=scaled(5))

    # --- the mesh CA ----------------------------------------------------------------------
    def start_ca(self, timeout: float = 20.0) -> subprocess.Popen:
        """Provision and start `nodeagent ca` on the node's loopback; wait until it serves."""
        os.makedirs(self.layout.logs_dir, exist_ok=True)
        meshca.provision(self.layout, [self.node], logging.getLogger("nodeagent.sandbox.ca"))
        argv = [sys.executable, "-m", "nodeagent", "ca", "--listen", f"127.0.0.1:{CA_PORT}",
                "--state-dir", self.layout.ca_dir, "--tokens", self.layout.ca_tokens,
                "--source", f"files:{self.source_dir}", "--metrics-address", "off"]
        log_path = Path(self.layout.ca_log)
        with open(log_path, "ab") as log:
            proc = self.spawn(self.node_netns, self.layout.system_cgroup(self.node), argv, stdout=log,
                              stderr=subprocess.STDOUT)
        deadline = time.monotonic() + scaled(timeout)
        while "listening" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise NodeagentError(f"the sandbox CA did not start: {log_path.read_text().strip() or 'no output'}")
            time.sleep(0.05)
        return proc

    def ca_args(self) -> list[str]:
        """`nodeagent run` flags for the CA of `start_ca`."""
        return ["--ca-address", f"127.0.0.1:{CA_PORT}", "--ca-root-cert", self.layout.root_cert,
                "--ca-token-file", self.layout.node_token(self.node), "--identity-dir",
                self.layout.identity_dir(self.node), "--flow-log", self.layout.flow_log(self.node)]

    def flows(self) -> list[dict]:
        """The agent's flow-log lines so far (its writer thread writes them within 50 ms)."""
        try:
            with open(self.layout.flow_log(self.node)) as f:
                return [json.loads(line) for line in f]
        except FileNotFoundError:
            return []

    def wait_for(self, predicate: Callable[[dict], object], timeout: float, what: str) -> dict:
        """Poll the agent's status until `predicate(status)` holds, for `scaled(timeout)` s."""
        timeout = scaled(timeout)
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            if self.agent is not None and self.agent.poll() is not None:
                raise NodeagentError(f"the agent exited ({self.agent.returncode}) waiting for {what}",
                                     f"see {self.workdir / 'agent.log'}")
            try:
                status = self.status()
                if predicate(status):
                    return status
                last = "condition not met"
            except (NodeagentError, OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.02)
        raise NodeagentError(f"timed out after {timeout:g}s waiting for {what} ({last})",
                             f"see {self.workdir / 'agent.log'}")

    # --- the files source ---------------------------------------------------------------
    def write_pods(self) -> None:
        docs = [{"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.uid, "labels": p.labels},
                 "spec": {"nodeName": self.node,
                          **({"containers": [{"name": "app", "readinessProbe" if i == 0 else "livenessProbe":
                                              {"tcpSocket": {"port": port}}}
                                             for i, port in enumerate(p.probe_ports)]} if p.probe_ports else {})},
                 "status": {"phase": "Running", "podIP": p.ip,
                            **({"podIPs": [{"ip": ip} for ip in (p.ip, *p.other_ips)]} if p.other_ips else {})}}
                for p in self.pods.values()]
        _write_atomic(self.source_dir / "pods.yaml", yaml.safe_dump_all(docs))

    def write_policy(self, name: str, doc: dict) -> None:
        """An Istio resource (one document) in the source, as `<name>.yaml`."""
        _write_atomic(self.source_dir / f"{name}.yaml", yaml.safe_dump(doc))

    def label_pod(self, pod: SandboxPod, labels: dict[str, str]) -> None:
        """Set a pod's labels (e.g. istio.io/dataplane-mode: none to opt out) in the source."""
        pod.labels = dict(labels)
        self.write_pods()

    def label_namespace(self, namespace: str, labels: dict[str, str]) -> None:
        """Set a namespace's labels (AMBIENT meshes it, {} unmeshes it) in the source."""
        self.namespaces[namespace] = dict(labels)
        docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": lb}}
                for ns, lb in sorted(self.namespaces.items())]
        _write_atomic(self.source_dir / "namespaces.yaml", yaml.safe_dump_all(docs))

    # --- teardown -----------------------------------------------------------------------
    def close(self) -> list[str]:
        """Remove everything; returns what could not be removed (empty when clean)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        left = [] if cgroups.kill_tree(self.layout.lab_cgroup) else [f"processes in {self.layout.lab_cgroup}"]
        for name in topology.list_netns(self.layout.netns_prefix):
            error = topology.delete_netns(name)
            if error:
                left.append(error)
        left += cgroups.remove_tree(self.layout.lab_cgroup)
        if os.path.exists(self.layout.bpffs_dir):
            shutil.rmtree(self.layout.bpffs_dir, ignore_errors=True)
            if os.path.exists(self.layout.bpffs_dir):
                left.append(f"{self.layout.bpffs_dir} could not be removed")
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.waypoint_dir, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.waypoint_dir))  # the shared parent, once no sandbox uses it
        except OSError:
            pass  # another sandbox's directory is still in it, or it is gone
        return left

    def leftovers(self) -> list[str]:
        """Anything of this sandbox still on the machine."""
        found = [f"netns {n}" for n in topology.list_netns(self.layout.netns_prefix)]
        found += [p for p in (self.layout.lab_cgroup, self.layout.bpffs_dir, self.waypoint_dir) if os.path.exists(p)]
        return found


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
