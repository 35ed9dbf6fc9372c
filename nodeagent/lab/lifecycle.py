"""`lab up` and `lab apply`: validate, allocate, then build, in that order.

The whole file is validated and every address allocated in memory before the kernel is
touched, so a bad file leaves nothing behind. If building still fails midway, `up`
rolls back with the same code as `lab down`, and `apply` removes the pods it added.
Both write lab.json and the cluster/ state, then let the supervisor (started detached
by `up`, poked with SIGHUP by `apply`) start the processes, and wait until the pods
run.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from pyroute2.netlink.exceptions import NetlinkError

from nodeagent.errors import ConfigError, EnvironmentProblem, LabError, NodeagentError
from nodeagent.kube.objects import STDIN, KubeObject, parse_documents, read_inputs, resource_type
from nodeagent.lab import (cgroups, dns, ipam, meshca, processes, services, spec, supervisor, teardown,
                           topology)
from nodeagent.lab import verdicts
from nodeagent.lab.kube import controlplane, crds, nodes
from nodeagent.lab.kube import fileobjects
from nodeagent.lab.layout import Layout
from nodeagent.lab.state import LabRecord, Runtime, StateDir, lab_model

Out = Callable[[str], None]
DEMO = "demo.yaml"
STABLE = 0.5  # seconds a pod must stay Running before `up`/`apply` call it so
KUBE_TIMEOUT = 180.0  # at least this long for the control plane to serve (a loaded machine)
POLL = 0.1


def read_objects(paths: list[str] | None, recursive: bool = False, stdin=None) -> list[KubeObject]:
    """The objects of `-f` arguments read as kubectl reads them (files, directories, `-`:
    kube/objects.py), or of the built-in demo when `paths` is None. Any file that cannot
    be read or parsed refuses the whole input (ConfigError naming the file and line). An
    object given again in a later file replaces the earlier one where it stood (kubectl
    applies them in order, so the later wins); twice in one file is refused by spec.py."""
    if paths is None:
        text = importlib.resources.files("nodeagent.lab").joinpath(DEMO).read_text()
        return parse_documents(text, DEMO)
    objects: list[KubeObject] = []
    inputs = read_inputs(paths, recursive, stdin)
    for given in inputs:
        if given.error is not None:
            raise given.error
        source = given.name if given.path == STDIN else os.path.basename(given.path)
        objects = merge(objects, parse_documents(given.text, source, syntax=given.syntax))
    if not objects:
        raise ConfigError(", ".join(i.name for i in inputs) or "-f", "no objects in the input",
                          "give files or directories holding Kubernetes-shaped YAML")
    return objects


def preflight() -> str:
    """Check the machine can run a lab; returns the cgroup2 root."""
    if os.geteuid() != 0:
        raise EnvironmentProblem("the lab needs root (it makes network namespaces and cgroups)",
                                 "run it with sudo")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("nsenter", "util-linux")):
        if shutil.which(tool, path=processes.search_path()) is None:
            raise EnvironmentProblem(f"{tool} not found", f"install {package} (scripts/setup does)")
    return cgroups.cgroup2_root()


@contextlib.contextmanager
def kernel_step(what: str) -> Iterator[None]:
    """Turn a kernel refusal into a LabError saying what the lab was doing."""
    try:
        yield
    except (OSError, NetlinkError) as exc:
        raise LabError(f"{what}: {exc}") from None


def _make_pod(record: LabRecord, pod: spec.PodSpec) -> None:
    with kernel_step(f"creating pod {pod.key}"):
        topology.add_pod(record.layout, pod.namespace, pod.name, record.alloc.pods[pod.key])
        cgroups.make(processes.pod_cgroup(record, pod))


def _remove_pod(record: LabRecord, pod: spec.PodSpec) -> None:
    netns = record.layout.pod_netns(pod.namespace, pod.name)
    topology.delete_netns(netns)
    shutil.rmtree(record.layout.hosts_dir(netns), ignore_errors=True)
    cgroups.remove_tree(processes.pod_cgroup(record, pod))


def _publish(state: StateDir, record: LabRecord, runtime: Runtime) -> None:
    """Hosts files, service rules, lab.json and cluster/ for `record`."""
    with kernel_step("writing hosts files and service rules"):
        dns.sync(record.layout, record.desired, record.alloc, controlplane.service_names(record.kube))
        services.sync(record.layout, record.desired, record.alloc, runtime.running(),
                      controlplane.service_rules(record.kube))
    state.save(record)
    state.export_cluster(record, runtime)


def _build(state: StateDir, record: LabRecord) -> None:
    layout = record.layout
    with kernel_step("building the lab network"):
        topology.build_fabric(layout, record.alloc.nodes)
        if record.kube:
            controlplane.build_netns(layout, record.alloc.nodes)
    if record.kube:
        with kernel_step("provisioning the control plane (CA, certificates, service-account key, cgroup)"):
            controlplane.provision(layout, record.desired.node_names)
            cgroups.make(layout.controlplane_cgroup)
    with kernel_step("creating the nodes' cgroups and bpffs directories"):
        for node in record.desired.node_names:
            cgroups.make(layout.kubepods_cgroup(node))
            cgroups.make(layout.system_cgroup(node))
            if record.agents or record.kube:  # a --kube node's bpffs: what its pods' /sys/fs/bpf is (kube/nodeview.py)
                os.makedirs(layout.node_bpffs(node), exist_ok=True)
    if record.agents:
        with kernel_step("provisioning the mesh CA (tokens, keys, root bundle)"):
            meshca.provision(layout, record.desired.node_names, logging.getLogger("nodeagent.lab.ca"))
    for pod in record.desired.pods.values():
        _make_pod(record, pod)
    _publish(state, record, Runtime())


def _start_supervisor(layout: Layout) -> int:
    env = {**os.environ, "PATH": processes.search_path()}
    with open(layout.supervisor_log, "ab") as log:
        proc = subprocess.Popen(supervisor.command(layout.name), env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    # Popen returns mid-exec, before /proc/PID/cmdline is filled in: wait until the pid
    # is recognisable, which every later check (wait, apply, down) relies on.
    deadline = time.monotonic() + 5
    while not supervisor.is_supervisor(proc.pid, layout.name):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the supervisor did not start (exit code {proc.poll()})", f"see {layout.supervisor_log}")
        time.sleep(0.01)
    return proc.pid


def _secondary(out: Out, undo: Callable, *args) -> None:
    """Run a rollback step; its own failure is reported, never raised over the cause."""
    try:
        undo(*args)
    except (NodeagentError, OSError) as exc:
        out(f"rollback incomplete: {exc}")


def _leftovers(layout: Layout) -> bool:
    return bool(os.path.exists(layout.state_dir) or topology.list_netns(layout.netns_prefix)
                or os.path.isdir(layout.lab_cgroup))


def up(name: str, objects: list[KubeObject], agents: bool, out: Out, timeout: float,
       kube: bool = False) -> LabRecord:
    layout = Layout(name, preflight())
    binary = controlplane.binary() if kube else ""
    desired = spec.load(objects)
    spec.check_commands(desired, processes.which)
    alloc = ipam.allocate(desired)
    if _leftovers(layout):
        raise LabError(f"lab {name} already exists (or was left over by a crash)",
                       f"remove it first: nodeagent lab down --name {name}")
    record = LabRecord(name, layout.cgroup_root, agents, desired.objects, alloc, controlplane=binary)
    state = StateDir(layout)
    state.create()
    try:
        with state.lock():
            _build(state, record)
            record.supervisor_pid = _start_supervisor(layout)
            state.save(record)
    except BaseException:
        out(f"lab {name}: creation failed; removing what was made")
        _secondary(out, teardown.down, layout)
        raise
    out(f"lab {name}: {len(alloc.nodes)} nodes, {len(alloc.pods)} pods, {len(alloc.services)} services; "
        f"supervisor pid {record.supervisor_pid}{'' if agents else ' (no agents)'}")
    if kube:
        wait_kube(layout, desired.node_names, out, max(timeout, KUBE_TIMEOUT))
        sync_kube_objects(layout, desired, alloc, out)
    wait_running(state, record.supervisor_pid, list(desired.pods), out, timeout)
    if agents:
        wait_agents(state, out, timeout)
    return record


def wait_kube(layout: Layout, node_names: list[str], out: Out, timeout: float) -> None:
    """Wait until the control plane serves, every node is registered and Ready, and Istio's
    CRDs are Established (kube/crds.py)."""
    started = time.monotonic()
    took = controlplane.wait_ready(layout, out, timeout)
    out(f"control plane ready in {took:.1f}s at {controlplane.server()} "
        f"(kubeconfig: nodeagent lab kubeconfig --name {layout.name})")
    try:
        nodes.wait_ready(controlplane.admin_client(layout), node_names, out,
                         max(1.0, timeout - (time.monotonic() - started)))
        crds.install(controlplane.admin_client(layout), out, max(1.0, timeout - (time.monotonic() - started)))
    except NodeagentError as exc:
        raise LabError(str(exc), f"see {layout.supervisor_log}; the lab stays up") from None


def sync_kube_objects(layout: Layout, desired: spec.DesiredState, alloc: ipam.Allocations, out: Out) -> None:
    """The lab's objects in the API: applied, and deleted once the lab drops them (see
    kube/fileobjects.py; its pods are mirror pods the supervisor keeps: kube/mirror.py)."""
    try:
        changes = fileobjects.sync(controlplane.admin_client(layout), desired, alloc)
    except NodeagentError as exc:
        raise LabError(f"the file's objects could not be applied to the API: {exc}",
                       "the lab stays up; lab apply retries") from None
    for verb, items in (("created in", changes.created), ("deleted from", changes.deleted)):
        if items:
            out(f"{verb} the API: {', '.join(items)}")


def merge(old: list[KubeObject], new: list[KubeObject]) -> list[KubeObject]:
    """`old` with objects of the same key replaced by `new`, and the others appended."""
    spec.check_unique(new)
    replaced = {o.key: o for o in new}
    merged = [replaced.pop(o.key, o) for o in old]
    return merged + [o for o in new if o.key in replaced]


def _check_changes(old: LabRecord, new: spec.DesiredState) -> None:
    for key, pod in old.desired.pods.items():
        changed = new.pods.get(key)
        if changed is None:
            raise ConfigError(pod.where, "removing a pod from a running lab is not supported",
                              "lab down and up with the new file")
        if changed.immutable() != pod.immutable():
            raise ConfigError(changed.where, "a running pod's spec cannot change (only labels and "
                              "annotations can)", "lab down and up with the new file")


def apply(name: str, objects: list[KubeObject], out: Out, timeout: float) -> None:
    layout = Layout(name, preflight())
    state = StateDir(layout)
    started = time.time()
    with state.lock():
        old = state.load()
        merged = merge(old.objects, objects)
        desired = spec.load(merged)
        spec.check_commands(desired, processes.which)
        _check_changes(old, desired)
        record = LabRecord(name, old.cgroup_root, old.agents, desired.objects,
                           ipam.allocate(desired, old.alloc), old.supervisor_pid, old.controlplane)
        added = [p for key, p in desired.pods.items() if key not in old.alloc.pods]
        _apply_record(state, old, record, added, out)
    before = {o.key: o.body for o in old.objects}
    changed = [o for o in objects if before.get(o.key) != o.body]
    for obj in objects:
        verb = "created" if obj.key not in before else "configured" if obj in changed else "unchanged"
        out(f"{obj} {verb}")
    if supervisor.is_supervisor(old.supervisor_pid, name):
        os.kill(old.supervisor_pid, signal.SIGHUP)
    if old.kube:
        sync_kube_objects(layout, desired, record.alloc, out)
    wait_running(state, old.supervisor_pid, [p.key for p in added], out, timeout)
    if old.agents and added:
        wait_agents(state, out, timeout)
    if old.agents:
        report_verdicts(state, changed, started, out, timeout)


# Namespaces an API server never deletes (it answers Forbidden).
UNDELETABLE_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True)
class Deletion:
    """What `lab delete` did: the objects deleted and those not found, in input order."""

    deleted: list[KubeObject]
    missing: list[KubeObject]


def delete(name: str, objects: list[KubeObject], out: Out, timeout: float) -> Deletion:
    """Remove `objects` from the lab as `kubectl delete -f` removes them from a cluster.

    Through the same record as `apply` (lab.json, cluster/, hosts files, service rules),
    so nothing comes back at the next apply. A Namespace takes every object in it along;
    a Deployment its pods. Deleted pods are stopped by the supervisor, then their cgroup,
    netns and hosts files removed; then, with agents, this waits until every agent has
    let go of the deleted pods and Istio resources. Nodes cannot be deleted: they are
    the lab's shape."""
    for obj in objects:
        if obj.kind == "Node" and obj.group == "":
            raise ConfigError(f"{obj.source} (Node {obj.name})", "a lab's nodes cannot be deleted: they are "
                              "its shape", f"nodeagent lab down --name {name}, then lab up with the nodes you want")
        if obj.kind == "Namespace" and obj.group == "" and obj.name in UNDELETABLE_NAMESPACES:
            raise ConfigError(f"{obj.source} (Namespace {obj.name})", "this namespace may not be deleted "
                              "(an API server forbids it too)", "delete the objects in it instead")
    layout = Layout(name, preflight())
    state = StateDir(layout)
    started = time.time()
    with state.lock():
        old = state.load()
        wanted = list({o.key: o for o in objects}.values())  # an object given twice is deleted once
        present = {o.key for o in old.objects}
        deleted = [o for o in wanted if (o.name in old.desired.namespaces if _is_namespace(o) else o.key in present)]
        gone = {o.key for o in deleted}
        namespaces = {o.name for o in deleted if _is_namespace(o)}
        kept = [o for o in old.objects if o.key not in gone and o.namespace not in namespaces]
        desired = spec.load(kept)
        record = LabRecord(name, old.cgroup_root, old.agents, desired.objects,
                           ipam.allocate(desired, old.alloc), old.supervisor_pid, old.controlplane)
        try:
            _publish(state, record, state.load_runtime())
        except BaseException:  # hosts files and rules as they were, with lab.json
            _secondary(out, _publish, state, old, state.load_runtime())
            raise
    left = {o.key for o in kept}
    removed = [o for o in old.objects if o.key not in left]
    pods = [p for key, p in old.desired.pods.items() if key not in desired.pods]
    for obj in deleted:
        out(f'{resource_type(obj)} "{obj.name}" deleted')
    if supervisor.is_supervisor(old.supervisor_pid, name):
        os.kill(old.supervisor_pid, signal.SIGHUP)
    if old.kube:  # the API drops what the lab put there and no longer has
        sync_kube_objects(layout, desired, record.alloc, out)
    if pods:
        _stop_pods(state, old, pods, timeout)
    if old.agents and removed:
        wait_dropped(state, removed, pods, started, timeout)
    return Deletion(deleted, [o for o in wanted if o.key not in gone])


def _is_namespace(obj: KubeObject) -> bool:
    return obj.kind == "Namespace" and obj.group == ""


def _stop_pods(state: StateDir, old: LabRecord, pods: list[spec.PodSpec], timeout: float) -> None:
    """Once the supervisor has dropped the deleted pods (runtime.json no longer lists them:
    it stopped their containers), kill what is left in their cgroups (a container's own
    children) and remove their cgroups, netns and hosts files."""
    layout = state.layout

    def step() -> tuple[list[str], str]:
        if not supervisor.is_supervisor(old.supervisor_pid, layout.name):
            return [], ""  # nothing restarts them: what is left is killed below
        runtime = state.load_runtime()
        return [p.key for p in pods if p.key in runtime.pods], ""

    _until(step, lambda _line: None, timeout, lambda waiting: LabError(
        f"the supervisor did not stop the deleted pods within {timeout:.0f}s: {', '.join(waiting)}",
        f"see {layout.supervisor_log}; nodeagent lab down removes everything"))
    for pod in pods:
        cgroup = processes.pod_cgroup(old, pod)
        if not cgroups.kill_tree(cgroup):
            raise LabError(f"processes of deleted pod {pod.key} survived SIGKILL in {cgroup}",
                           "nodeagent lab down removes everything")
        _remove_pod(old, pod)


def wait_dropped(state: StateDir, removed: list[KubeObject], pods: list[spec.PodSpec], since: float,
                 timeout: float) -> None:
    """Wait until every node's agent has rebuilt its configuration since `since` without
    the `removed` Istio resources (in force, refused or warned about) and the deleted
    `pods` (enrolled or waiting); LabError naming what an agent still holds."""
    layout = state.layout
    nodes = state.load().desired.node_names
    keys = [f"{o.kind} {o.namespace}/{o.name}" for o in removed if verdicts.held_by_agents(o)]
    names = {p.key for p in pods}
    held: dict[str, list[str]] = {}

    def step() -> tuple[list[str], str]:
        for node in nodes:
            held[node] = verdicts.held(keys, names, _agent_status(layout.agent_socket(node)), since)
        return [n for n in nodes if held[n]], ""

    _until(step, lambda _line: None, timeout, lambda waiting: LabError(
        f"after {timeout:.0f}s " + "; ".join(f"the agent of {n} still holds {', '.join(held[n])}" for n in waiting),
        "see nodeagent status --lab " + layout.name + " --node " + waiting[0]))


def report_verdicts(state: StateDir, objects: list[KubeObject], since: float, out: Out, timeout: float) -> None:
    """Print what the agents made of the changed Istio resources; LabError when one refused any."""
    layout = state.layout
    nodes = state.load().desired.node_names
    found, silent = verdicts.wait(objects, nodes, lambda n: _agent_status(layout.agent_socket(n)), since, timeout)
    for verdict in found:
        out(verdict.line())
    for obj, node in silent:
        out(f"{obj}: no verdict from {node}'s agent within {timeout:.0f}s (see nodeagent status --lab "
            f"{layout.name} --node {node})")
    refused = [v for v in found if v.refused]
    if refused:
        raise LabError(f"{len({v.obj.key for v in refused})} of the applied resources refused or not supported; "
                       "the last good version of each stays in force", "fix them and apply again")


def _apply_record(state: StateDir, old: LabRecord, record: LabRecord, added: list[spec.PodSpec], out: Out) -> None:
    made: list[spec.PodSpec] = []
    try:
        for pod in added:
            made.append(pod)
            _make_pod(record, pod)
        _publish(state, record, state.load_runtime())
    except BaseException:
        for pod in made:
            _remove_pod(record, pod)
        _secondary(out, _publish, state, old, state.load_runtime())
        raise


def _until(step: Callable[[], tuple[list[str], str]], out: Out, timeout: float,
           failed: Callable[[list[str]], LabError]) -> None:
    """Call `step` (-> still waiting, progress line) until nothing waits; print progress
    when it changes; raise `failed(waiting)` after `timeout` seconds."""
    deadline, shown = time.monotonic() + timeout, None
    while True:
        waiting, progress = step()
        if progress and progress != shown:
            out(progress)
            shown = progress
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise failed(waiting)
        time.sleep(POLL)


def wait_running(state: StateDir, supervisor_pid: int, keys: list[str], out: Out, timeout: float) -> None:
    """Wait until every pod in `keys` has been Running for STABLE seconds without a
    restart (a container that exits at once is briefly Running too)."""
    since: dict[str, tuple[float, int]] = {}  # pod -> (first seen Running, restarts then)
    layout = state.layout

    def step() -> tuple[list[str], str]:
        if not supervisor.is_supervisor(supervisor_pid, layout.name):
            raise LabError(f"the supervisor of lab {layout.name} is not running",
                           f"see {layout.supervisor_log}; nodeagent lab down, then up again")
        runtime, now = state.load_runtime(), time.monotonic()
        for k in keys:
            if runtime.phase(k) != "Running":
                since.pop(k, None)
            elif since.get(k, (0, None))[1] != runtime.restarts(k):
                since[k] = (now, runtime.restarts(k))
        waiting = [k for k in keys if k not in since or now - since[k][0] < STABLE]
        return waiting, f"{len(keys) - len(waiting)}/{len(keys)} pods Running" if keys else ""

    def failed(waiting: list[str]) -> LabError:
        runtime = state.load_runtime()
        detail = ", ".join(f"{k} ({runtime.shown_phase(k)})" for k in waiting)
        return LabError(f"pods not Running after {timeout:.0f}s: {detail}",
                        f"see their logs in {layout.logs_dir}; the lab stays up")

    _until(step, out, timeout, failed)


def agent_problem(status: dict | None, meshed: set[str]) -> str | None:
    """Why an agent (its /debug/status) cannot carry its node's mesh traffic yet, or None:
    not ready, a meshed Running pod not enrolled, an identity without a certificate, or
    (when it runs one) its waypoint Envoy not running the latest configuration."""
    if status is None:
        return "not ready"
    if not status.get("ready"):
        reasons = status.get("not_ready") or []
        return f"not ready: {'; '.join(reasons)}" if reasons else "not ready"
    enrolled = {f"{p['namespace']}/{p['name']}" for p in status.get("pods", [])}
    if meshed - enrolled:
        return f"not enrolled yet: {', '.join(sorted(meshed - enrolled))}"
    identity = status.get("identity", {})
    identities = identity.get("identities", [])
    pending = [i["identity"] for i in identities if not i.get("valid")]
    if identity.get("enabled") and (pending or (enrolled and not identities)):
        return f"no certificate yet for {', '.join(pending) or 'its pods'}"
    waypoint = status.get("waypoint")
    if waypoint is not None and not waypoint.get("xds", {}).get("in_sync"):
        return "waypoint Envoy not in sync yet" if waypoint.get("envoy", {}).get("running") \
            else "waypoint Envoy not running yet"
    return None


def _agent_status(socket_path: str) -> dict | None:
    from nodeagent.admin import fetch_status  # the agent's own status API
    try:
        return fetch_status(socket_path, timeout=1) if os.path.exists(socket_path) else None
    except (NodeagentError, OSError, ValueError):
        return None


def wait_agents(state: StateDir, out: Out, timeout: float) -> None:
    """Wait until every node's agent is ready, has enrolled its node's meshed Running
    pods and holds certificates for them, so the mesh carries traffic when this returns."""
    layout, record = state.layout, state.load()
    nodes = record.desired.node_names
    problems: dict[str, str] = {}

    def step() -> tuple[list[str], str]:
        model = lab_model(record, state.load_runtime())
        for node in nodes:
            meshed = {f"{p.namespace}/{p.name}" for p in model.pods_on_node(node)
                      if model.is_meshed(p) and p.phase == "Running"}
            problems[node] = agent_problem(_agent_status(layout.agent_socket(node)), meshed)
        waiting = [n for n in nodes if problems[n]]
        return waiting, f"{len(nodes) - len(waiting)}/{len(nodes)} agents ready"

    _until(step, out, timeout, lambda waiting: LabError(
        f"agents not ready after {timeout:.0f}s: " + "; ".join(f"{n}: {problems[n]}" for n in waiting),
        f"see {', '.join(layout.agent_log(n) for n in waiting)} and {layout.ca_log}; the lab stays up"))
