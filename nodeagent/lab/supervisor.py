"""The lab's supervisor daemon (`nodeagent lab supervise`): the lab's kubelet.

It runs every container of every pod; with `--kube` the control plane (kube/
controlplane.py; the API server's clients once it is ready) and, in threads, the nodes'
registration and heartbeats (kube/nodes.py), the pods the API binds to them
(kube/kubelet.py) and the file pods' mirror pods (kube/mirror.py); unless the lab was
made with `--no-agents`, the mesh CA (meshca.py) and one agent per node; restarts what
exits with exponential backoff according to the pod's restartPolicy; and publishes what
runs: `runtime.json` (pids, restarts, phases), pod phases in `cluster/`, and the service
rules, whose endpoints are the Running pods. It reconciles from `lab.json` every second,
on SIGHUP (sent by `lab apply`) and when a child exits. SIGTERM stops the children
(SIGTERM, then SIGKILL) and exits; it exits by itself when the lab's state directory
goes away. It lives in its own cgroup below the lab's, so `lab down` can always kill it
with everything else.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from nodeagent.backoff import Backoff
from nodeagent.errors import NodeagentError
from nodeagent.lab import cgroups, dns, meshca, processes, services
from nodeagent.lab.kube import controlplane, kubelet, mirror, nodes
from nodeagent.lab.state import LabRecord, Runtime, StateDir

RESTART_BACKOFF = Backoff(first=1.0, maximum=30.0)
BACKOFF_RESET_AFTER = 10.0  # a process that ran this long starts its backoff over
STOP_GRACE = 3.0
GATE_POLL = 0.2  # how often a unit waiting for its `after` condition asks again


@dataclass
class Unit:
    """One supervised process: a container or an agent."""

    argv: list[str]
    env: dict[str, str]
    cgroup: str
    log_path: str
    restart_policy: str = "Always"
    proc: subprocess.Popen | None = None
    restarts: int = 0
    starts: int = 0
    exit_code: int | None = None
    started_at: float = 0.0
    next_start: float = 0.0
    failures: int = 0  # exits and failed starts in a row: the restart backoff's attempt
    finished: bool = False  # exited and will not be restarted
    after: Callable[[], bool] | None = None  # the first start waits until this is true

    def state(self) -> str:
        if self.proc is not None:
            return "running"
        return "terminated" if self.finished else "waiting"

    def status(self) -> dict:
        return {"pid": self.proc.pid if self.proc else None, "restarts": self.restarts,
                "state": self.state(), "exit_code": self.exit_code}


@dataclass
class Supervisor:
    state: StateDir
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("nodeagent.lab.supervisor"))
    clock: object = time.monotonic
    units: dict[str, Unit] = field(default_factory=dict)  # "pod:ns/name/container" | "agent:node" | "cp:component"
    heartbeats: nodes.Heartbeats | None = None  # `--kube`: the nodes' kubelet heartbeats
    kubelet: kubelet.Kubelet | None = None  # `--kube`: runs the pods the API binds to the nodes
    mirrors: mirror.MirrorPods | None = None  # `--kube`: the file's pods in the API
    record: LabRecord | None = None
    stamp: tuple | None = None  # lab.json (inode, mtime) of `record`
    published: tuple = ()  # (pods, agents, stamp) last written
    synced: tuple = ()  # (Running pods, stamp, API rules) the service rules were last made for
    named: tuple | None = None  # (API service names, stamp) the hosts files were last written with
    stopping: bool = False

    # --- desired units -----------------------------------------------------------
    def reload(self) -> bool:
        """Re-read lab.json if it changed; False when the lab is gone."""
        stamp = self._stamp()
        if stamp is None:
            return False
        if stamp == self.stamp:
            return True
        self.record, self.stamp = self.state.load(), stamp
        if self.kubelet is not None:  # it sees the file's pods and services `apply` added
            self.kubelet.record = self.record
        wanted = self._wanted(self.record)
        for key in set(self.units) - wanted.keys():
            self.log.info("%s is no longer in the lab; stopping it", key)
            self._stop([self.units.pop(key)])
        for key, unit in wanted.items():
            self.units.setdefault(key, unit)
        return True

    def _wanted(self, record: LabRecord) -> dict[str, Unit]:
        layout, out = self.state.layout, {}
        if record.kube:  # the control plane first: etcd, then what needs it
            ready = controlplane.ApiReadiness(layout)
            for component in controlplane.COMPONENTS:
                out[f"cp:{component}"] = Unit(controlplane.argv(layout, record.controlplane, component),
                                              processes.base_env(), layout.controlplane_cgroup,
                                              layout.controlplane_log(component),
                                              after=ready if component in controlplane.API_CLIENTS else None)
        if record.agents:  # first, so it starts before the agents ask it for certificates
            out["ca"] = Unit(meshca.ca_argv(layout, record), processes.base_env(),
                             layout.system_cgroup(meshca.ca_node(record)), layout.ca_log)
        for pod in record.desired.pods.values():
            fields = processes.pod_fields(record, pod)
            for c in pod.containers:
                out[f"pod:{pod.key}/{c.name}"] = Unit(
                    processes.in_pod(layout, pod, processes.command_of(c, fields, record.kube)),
                    processes.container_env(record, pod, c),
                    processes.pod_cgroup(record, pod), layout.container_log(pod.namespace, pod.name, c.name),
                    pod.restart_policy)
        if record.agents:
            for node in record.desired.node_names:
                out[f"agent:{node}"] = Unit(processes.agent_argv(layout, node, meshca.agent_args(layout, record, node)),
                                            processes.agent_env(node),
                                            layout.system_cgroup(node), layout.agent_log(node))
        return out

    # --- processes ---------------------------------------------------------------
    def step(self) -> None:
        now = self.clock()
        for key, unit in self.units.items():
            self._step_unit(key, unit, now)
        if self.kubelet is not None:  # the API's pods: their units, and the ones being deleted
            with self.kubelet.lock:
                self.kubelet.step(now)
                for pod in self.kubelet.pods.values():
                    for name, unit in pod.units.items():
                        self._step_unit(f"pod:{pod.key}/{name} (uid {pod.uid})", unit, now)
                self.kubelet.observe()
        if self.mirrors is not None:
            self.mirrors.observe(self.record, self.units, pod_phase)

    def _step_unit(self, key: str, unit: Unit, now: float) -> None:
        if unit.proc is not None and unit.proc.poll() is not None:
            self._exited(key, unit, now)
        if unit.proc is None and not unit.finished and now >= unit.next_start:
            if unit.after is not None and not unit.starts and not unit.after():
                unit.next_start = now + GATE_POLL
                return
            self._start(key, unit, now)

    def _exited(self, key: str, unit: Unit, now: float) -> None:
        unit.exit_code, unit.proc = unit.proc.returncode, None
        if now - unit.started_at >= BACKOFF_RESET_AFTER:
            unit.failures = 0
        restart = unit.restart_policy == "Always" or (unit.restart_policy == "OnFailure" and unit.exit_code != 0)
        if not restart:
            unit.finished = True
            self.log.info("%s exited with code %s; restartPolicy %s: not restarting",
                          key, unit.exit_code, unit.restart_policy)
            return
        unit.failures += 1
        delay = RESTART_BACKOFF.delay(unit.failures)
        unit.next_start = now + delay
        self.log.warning("%s exited with code %s; restarting in %.0fs", key, unit.exit_code, delay)

    def _start(self, key: str, unit: Unit, now: float) -> None:
        try:
            unit.proc = processes.spawn(unit.argv, unit.env, unit.cgroup, unit.log_path)
        except (OSError, subprocess.SubprocessError) as exc:
            unit.failures += 1
            unit.exit_code, unit.next_start = None, now + RESTART_BACKOFF.delay(unit.failures)
            self.log.error("cannot start %s: %s", key, exc)
            return
        unit.restarts += 1 if unit.starts else 0
        unit.starts += 1
        unit.started_at = now
        self.log.info("started %s (pid %d): %s", key, unit.proc.pid, " ".join(unit.argv))

    def _stop(self, units: list[Unit]) -> None:
        live = [u.proc for u in units if u.proc is not None]
        if live:
            self.log.info("stopping %d processes", len(live))
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # --- what runs, published ----------------------------------------------------
    def runtime(self) -> Runtime:
        rt = Runtime()
        for pod in self.record.desired.pods.values():
            units = [self.units[f"pod:{pod.key}/{c.name}"] for c in pod.containers]
            rt.pods[pod.key] = {"phase": pod_phase(units), "reason": pod_reason(units),
                                "containers": {c.name: u.status() for c, u in zip(pod.containers, units)}}
        rt.agents = {k.split(":", 1)[1]: u.status() for k, u in self.units.items() if k.startswith("agent:")}
        rt.ca = self.units["ca"].status() if "ca" in self.units else {}
        rt.controlplane = {k.split(":", 1)[1]: u.status() for k, u in self.units.items() if k.startswith("cp:")}
        return rt

    def publish(self) -> None:
        """Write what runs; re-sync the service rules when the Running pods or the lab changed."""
        rt = self.runtime()
        api_rules, api_names = self.kubelet.services() if self.kubelet is not None else ((), ())
        published = (rt.pods, rt.agents, rt.ca, rt.controlplane, self.stamp, api_rules, api_names)
        if published == self.published:
            return
        with self.state.lock():
            if self._stamp() != self.stamp:
                return  # `apply` changed the lab meanwhile: publish after the next reload
            self.state.save_runtime(rt)
            self.state.export_cluster(self.record, rt)
            synced = (rt.running(), self.stamp, api_rules)
            if synced != self.synced:
                services.sync(self.state.layout, self.record.desired, self.record.alloc, rt.running(),
                              controlplane.service_rules(self.record.kube) + api_rules)
                self.synced = synced
            if self.kubelet is not None and (api_names, self.stamp) != self.named:
                names = controlplane.service_names(True) + api_names  # the API's services by name, everywhere
                dns.sync(self.state.layout, self.record.desired, self.record.alloc, names)
                self.kubelet.write_hosts(names)
                self.named = (api_names, self.stamp)  # `apply` rewrote the file pods' hosts files
        self.published = published

    def _stamp(self) -> tuple | None:
        try:
            st = os.stat(self.state.layout.lab_json)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    # --- main loop ---------------------------------------------------------------
    def run(self) -> int:
        cgroups.make(self.state.layout.supervisor_cgroup)
        cgroups.join(self.state.layout.supervisor_cgroup)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGHUP, lambda *_: None)  # the wakeup fd does the work
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_term)
        self.log.info("supervising lab %s (pid %d)", self.state.layout.name, os.getpid())
        while not self.stopping:
            try:
                if not self.reload():
                    self.log.info("lab %s is gone; exiting", self.state.layout.name)
                    break
                if self.record.kube and self.heartbeats is None:
                    self.heartbeats = self._heartbeats(self.record)
                    self.heartbeats.start()
                    self.kubelet = self._kubelet(self.record)
                    self.kubelet.start()
                    self.mirrors = self._mirrors(self.record)
                    self.mirrors.start()
                self.step()
                self.publish()
            except NodeagentError as exc:
                if not self.state.exists():
                    break
                self.log.error("%s", exc)
            select.select([wake_r], [], [], self._idle())
            while _drain(wake_r):
                pass
        if self.heartbeats is not None:
            self.heartbeats.close()
        if self.mirrors is not None:
            self.mirrors.close()
        groups = stop_order(self.units)
        if self.kubelet is not None:
            self.kubelet.close()
            groups[0] += self.kubelet.units()
        for group in groups:
            self._stop(group)
        return 0

    def _kubelet(self, record: LabRecord) -> kubelet.Kubelet:
        layout = self.state.layout
        clients = {node: controlplane.node_client(layout, node) for node in record.desired.node_names}
        return kubelet.Kubelet(record, clients, controlplane.proxy_client(layout), Unit, pod_phase,
                               logging.getLogger("nodeagent.lab.kube.kubelet"))

    def _mirrors(self, record: LabRecord) -> mirror.MirrorPods:
        layout = self.state.layout
        clients = {node: controlplane.node_client(layout, node) for node in record.desired.node_names}
        return mirror.MirrorPods(record, clients, logging.getLogger("nodeagent.lab.kube.mirror"))

    def _idle(self) -> float:
        """How long the loop may sleep: 1 s, less while a unit waits for its condition."""
        gated = [u.next_start for u in self.units.values() if u.after is not None and not u.starts and u.proc is None]
        return max(0.05, min([1.0] + [t - self.clock() for t in gated]))

    def _heartbeats(self, record: LabRecord) -> nodes.Heartbeats:
        layout = self.state.layout
        admin = controlplane.admin_client(layout)
        beats = []
        for obj in record.desired.nodes:
            metadata = {k: v for k, v in (("labels", obj.labels), ("annotations", obj.annotations)) if v}
            beats.append(nodes.NodeHeartbeat(obj.name, record.alloc.nodes[obj.name],
                                             controlplane.node_client(layout, obj.name), admin, metadata))
        return nodes.Heartbeats(beats, logging.getLogger("nodeagent.lab.kube.nodes"))

    def _on_term(self, *_args) -> None:
        self.stopping = True


def stop_order(units: dict[str, Unit]) -> list[list[Unit]]:
    """Groups of units to stop one after the other: pods, agents and the clients of the
    API server first, then the API server, then etcd, so each stops while what it talks
    to still answers (an API server whose etcd is gone waits out its grace period)."""
    last = ("cp:kube-apiserver", "cp:etcd")
    return [[u for k, u in units.items() if k not in last]] + [[units[k]] for k in last if k in units]


def command(name: str) -> list[str]:
    """How `lab up` starts the supervisor of lab `name` (and how it is recognised)."""
    return [sys.executable, "-m", "nodeagent", "lab", "supervise", "--name", name]


def is_supervisor(pid: int, name: str) -> bool:
    """True if `pid` is alive and is lab `name`'s supervisor (pids get reused)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")[:-1]
        with open(f"/proc/{pid}/stat") as f:
            zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return not zombie and args[1:] == command(name)[1:]


def _drain(fd: int) -> bool:
    try:
        return bool(os.read(fd, 512))
    except BlockingIOError:
        return False


def pod_phase(units: list[Unit]) -> str:
    states = [u.state() for u in units]
    if "waiting" in states:
        return "Pending"
    if "running" in states:
        return "Running"
    return "Succeeded" if all(u.exit_code == 0 for u in units) else "Failed"


def pod_reason(units: list[Unit]) -> str:
    """CrashLoopBackOff while a container that exited waits for its restart."""
    return "CrashLoopBackOff" if any(u.state() == "waiting" and u.starts for u in units) else ""
