"""The lab as the kubelet of its nodes (`--kube`): it runs the Pods the API binds to them.

Every second, each node lists the Pods bound to it (`spec.nodeName`, set by the real
scheduler or by the Pod itself), with its own credentials, as its kubelet would. A new
Pod is made as the lab makes the file's pods: an address from the node's pod CIDR, a
netns with its veth and routes, a hosts file, the cgroup `kubepods/pod<uid>` (the API's
UID, kubelet's naming), and one supervised process per container (`command` + `args`;
images are ignored). `hostNetwork: true` pods run in the node's netns with the node's
address. Its volumes (`volumes.py`) are made under `kube/pods/<uid>/` and bind-mounted
at each container's mountPaths in the container's own mount namespace only, among them
the projected `kube-api-access-*` volume the API server adds (a token the node requests
for the pod's ServiceAccount, bound to the pod, renewed as kubelet renews it; the
cluster CA; the namespace), which in-cluster clients read at
/var/run/secrets/kubernetes.io/serviceaccount. Its securityContext is applied as far as
`security.py` says; what the lab cannot give is a Warning event of the Pod.

What a node gives a pod, the lab gives from the node's share of the machine, in the
container's own mount namespace only (the machine's mount table never changes):
- hostPaths as the node sees them (`nodeview.py`): at or below /sys/fs/cgroup the node's
  cgroup directory (`Layout.node_cgroup`), at or below /sys/fs/bpf its bpffs directory
  (`Layout.node_bpffs`), bind-mounted there; so the DaemonSet's `--cgroup=/sys/fs/cgroup`
  attaches at its node's cgroup and pins in its node's bpffs, never at the machine's
  roots, and `lab down` removes both. A pod with its own netns gets that netns's sysfs
  over /sys (as `ip netns exec` gives one) and its hostPaths below /sys still.
- `$(VAR)` in command, args and env expanded as kubelet expands them (`expansion.py`;
  `--node=$(NODE_NAME)`, `--admin-address=$(NODE_IP):15020`).
- cluster DNS: the lab's DNS is a hosts file with the Services' names over /etc/hosts,
  rewritten in place as Services change; a hostNetwork pod gets one
  (`kube/pods/<uid>/etc-hosts`) only with `dnsPolicy: ClusterFirstWithHostNet`, and the
  node netns's service rules (services.py, output hook) take its connections to
  ClusterIPs.
- a private /dev/shm (unless hostIPC), and for a non-root runAsUser the machine's
  installation, which stands in for the image (`image.py`).
A volume source that an earlier mount of the same container hides (the pod's directory
under /run/nodeagent/<lab>/ once a volume is mounted at /run/nodeagent) is opened before
any mount and bound from its descriptor, as a runtime resolves sources on the machine.

What runs is reported through the Pod's status (phase, podIP, hostIP, conditions,
container states with restart counts, readiness from readinessProbes run by
`probes.py`), patched only when it changed. A Pod being deleted gets SIGTERM, SIGKILL after its grace period; once
its processes are gone its netns, hosts file, cgroup, volumes and mount points are
removed and the Pod deleted for good (grace 0, preconditioned on its UID), as kubelet
finishes a deletion. A Pod the lab cannot run (no command, an executable not
found, a name the file's pods hold, a volume kind it does not implement) stays Pending
with the reason in its container status (CreateContainerConfigError); one whose volume
cannot be set up yet (a missing ConfigMap or Secret) waits in ContainerCreating, retried
every round as kubelet retries.

Threads: `Kubelet.run` (the thread) talks to the API and does the kernel work; the
supervisor's loop owns the processes and, under `lock`, starts, restarts and stops the
units of the pods in `pods` (`step`).
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import logging
import os
import shutil
import signal
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

from nodeagent import netns
from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.kube.objects import object_from_dict
from nodeagent.lab import cgroups, dns, expansion, processes, spec, topology
from nodeagent.lab.ipam import FIRST_POD_HOST, PodAlloc
from nodeagent.lab.kube import controlplane, image, nodeview, probes, proxy, security, volumes
from nodeagent.lab.kube.api import STRATEGIC_PATCH, ApiClient, ApiError
from nodeagent.lab.state import LabRecord

POLL = 1.0
# A pod's own /dev/shm (not hostIPC), as runtimes mount one per pod (64 MiB is their default).
SHM_MOUNT = "mount -n -t tmpfs -o mode=1777,size=64m,nosuid,nodev,noexec shm /dev/shm"
# The sysfs of the pod's netns over /sys (/sys/class/net lists its interfaces), as `ip netns exec` mounts it.
SYSFS_MOUNT = "mount -n -t sysfs sysfs /sys"
TERMINAL = ("Succeeded", "Failed")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class KubePod:
    """A Pod of the API that the lab runs on one of its nodes."""

    uid: str
    pod: spec.PodSpec
    node: str
    ip: str
    host_ip: str
    host_network: bool
    units: dict  # container name -> supervisor.Unit
    images: dict[str, str]
    volumes: volumes.PodVolumes | None = None
    probers: dict = field(default_factory=dict)  # container -> probes.Prober (readinessProbe)
    start_time: str = field(default_factory=_now)
    started: dict[str, tuple[int, str]] = field(default_factory=dict)  # container -> (pid, startedAt)
    finished: dict[str, str] = field(default_factory=dict)  # container -> finishedAt
    transitions: dict[str, tuple[bool, str]] = field(default_factory=dict)  # condition -> (status, since)
    delete_grace: float | None = None  # set when the API asked to delete it
    kill_at: float | None = None  # monotonic: SIGKILL what is left
    stopped: bool = False  # every process gone after a deletion
    reported: dict | None = None
    hosts_file: str | None = None  # its hosts file (a hostNetwork pod: only with ClusterFirstWithHostNet)

    @property
    def key(self) -> str:
        return self.pod.key


def pods_path(node: str) -> str:
    return "/api/v1/pods?" + urllib.parse.urlencode({"fieldSelector": f"spec.nodeName={node}"})


def pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}"


class Kubelet:
    """The kubelet side of every node of `record`; see the module docstring."""

    def __init__(self, record: LabRecord, clients: dict[str, ApiClient], proxy_client: ApiClient,
                 make_unit: Callable, phase_of: Callable[[list], str], log: logging.Logger,
                 clock: Callable[[], dt.datetime] = utc_now, monotonic: Callable[[], float] = time.monotonic):
        """`clients`: each node's; `proxy_client` reads Services as kube-proxy;
        `make_unit(argv, env, cgroup, log_path, restart_policy)` makes a supervisor Unit;
        `phase_of(units)` is the supervisor's pod phase rule; `clock` decides token renewal."""
        self.record, self.clients, self.make_unit, self.phase_of, self.log = record, clients, make_unit, phase_of, log
        self.clock, self.monotonic = clock, monotonic
        self.proxy_client = proxy_client
        self.api_rules: tuple = ()  # the API's Services as service rules (proxy.rules)
        self.api_names: tuple = ()  # and as names for the hosts files
        self.hosts_names: tuple = controlplane.service_names(True)
        self.layout = record.layout
        self.lock = threading.Lock()
        self.pods: dict[str, KubePod] = {}  # uid -> pod
        self.refused: dict[str, tuple[str, str]] = {}  # uid -> (node, why the lab cannot run it)
        self.failing: dict[str, tuple[str, str]] = {}  # uid -> (node, why starting it failed last time)
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self._said: dict[str, str] = {}

    # --- the thread --------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="kubelet", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop_event.set()
        with self.lock:
            probers = [p for pod in self.pods.values() for p in pod.probers.values()]
        for prober in probers:
            prober.close()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def run(self) -> None:
        while not self.stop_event.is_set():
            for node, client in self.clients.items():
                try:
                    self.sync_node(node, client)
                    self._said.pop(node, None)
                except (ApiError, NodeagentError, OSError) as exc:
                    if self._said.get(node) != str(exc):
                        self.log.warning("kubelet of %s: %s (retrying)", node, exc)
                        self._said[node] = str(exc)
            try:
                svcs, slices = proxy.fetch(self.proxy_client)
                with self.lock:
                    files = set(self.record.desired.services)  # the lab serves those itself
                    self.api_rules = proxy.rules(svcs, slices, files)
                    self.api_names = proxy.names(svcs, files)
            except ApiError as exc:
                if self._said.get("proxy") != str(exc):
                    self.log.warning("kube-proxy: %s (retrying)", exc)
                    self._said["proxy"] = str(exc)
            self.stop_event.wait(POLL)

    def services(self) -> tuple[tuple, tuple]:
        """(rules, names) of the API's Services, as last read."""
        with self.lock:
            return self.api_rules, self.api_names

    def write_hosts(self, names: tuple) -> None:
        """Rewrite the hosts file of every API pod with these service names (and the file's)."""
        with self.lock:
            self.hosts_names = names
            pods = [(p.pod, p.hosts_file) for p in self.pods.values() if not p.stopped]
        for pod, path in pods:
            if path is None:  # a hostNetwork pod with the node's own /etc/hosts
                continue
            self._write_hosts(pod, path)

    def sync_node(self, node: str, client: ApiClient) -> None:
        items = client.call("GET", pods_path(node)).get("items", [])
        seen = set()
        for item in items:
            meta = item["metadata"]
            if "kubernetes.io/config.mirror" in (meta.get("annotations") or {}):
                continue  # a file pod's mirror (kube/mirror.py): the lab runs that pod from its file
            uid = meta["uid"]
            seen.add(uid)
            with self.lock:
                known = self.pods.get(uid)
            if known is not None:
                if meta.get("deletionTimestamp") and known.delete_grace is None:
                    self._delete_asked(known, float(meta.get("deletionGracePeriodSeconds") or 0))
            elif meta.get("deletionTimestamp"):
                self._finish_delete(client, meta["namespace"], meta["name"], uid)  # nothing of it runs
            elif item.get("status", {}).get("phase") not in TERMINAL:
                try:
                    self._admit(node, client, item)
                except (ApiError, NodeagentError, OSError) as exc:  # this pod only: retried next round
                    if self.failing.get(uid) != (node, str(exc)):
                        self.log.warning("pod %s/%s not started yet: %s", meta["namespace"], meta["name"], exc)
                        self.failing[uid] = (node, str(exc))
        with self.lock:
            gone = [p for p in self.pods.values() if p.node == node and p.uid not in seen and p.delete_grace is None]
        for pod in gone:  # deleted with --force: nothing waits for us
            self._delete_asked(pod, 0.0)
        with self.lock:
            mine = [p for p in self.pods.values() if p.node == node]
        for pod in mine:
            if pod.stopped:
                self._remove(client, pod, pod.uid in seen)
            elif pod.delete_grace is None:
                self._resync(pod)
                self._report(client, pod)
        for known in (self.refused, self.failing):
            for uid in [u for u, (n, _) in known.items() if n == node and (u not in seen or u in self.pods)]:
                known.pop(uid)

    # --- admission and removal ---------------------------------------------------
    def _refuse(self, node: str, client: ApiClient, item: dict, why: str,
                reason: str = "CreateContainerConfigError") -> None:
        uid = item["metadata"]["uid"]
        if self.refused.get(uid) == (node, why):
            return
        self.refused[uid] = (node, why)
        self.log.warning("cannot run pod %s/%s yet: %s", item["metadata"]["namespace"], item["metadata"]["name"],
                         why)
        containers = [c.get("name", "") for c in item.get("spec", {}).get("containers", [])]
        status = {"phase": "Pending", "conditions": [_condition("PodScheduled", True)],
                  "containerStatuses": [{"name": c, "ready": False, "restartCount": 0, "image": "", "imageID": "",
                                         "state": {"waiting": {"reason": reason, "message": why}}}
                                        for c in containers]}
        meta = item["metadata"]
        client.call("PATCH", pod_path(meta["namespace"], meta["name"]) + "/status", {"status": status},
                    STRATEGIC_PATCH)

    def _admit(self, node: str, client: ApiClient, item: dict) -> None:
        meta = item["metadata"]
        try:  # list items carry no apiVersion/kind
            volumes.check(item)
            item = resolve_env(client, item, lambda: self._allocatable(client, node))
            obj = object_from_dict({**item, "apiVersion": "v1", "kind": "Pod"},
                                   f"API Pod {meta['namespace']}/{meta['name']}")
            pod = spec.pod_of(obj, self.record.desired.node_names)
            plans = {c["name"]: security.plan(item, c) for c in item["spec"]["containers"]}
            readiness = {c["name"]: probes.readiness(c) for c in item["spec"]["containers"]}
        except ConfigError as exc:
            self._refuse(node, client, item, str(exc))
            return
        if pod.key in self.record.desired.pods:
            self._refuse(node, client, item, f"the lab file's pod {pod.key} holds this name")
            return
        with self.lock:
            if any(p.key == pod.key for p in self.pods.values()):
                return  # its predecessor of the same name is still being removed
        host_network = bool(item.get("spec", {}).get("hostNetwork"))
        host_ip = self.record.alloc.nodes[node].fabric_ip
        ip = host_ip if host_network else self._free_ip(node)
        alloc = PodAlloc(meta["uid"], node, ip)
        fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": alloc.uid,
                  "spec.nodeName": node, "spec.serviceAccountName": pod.service_account,
                  "status.podIP": ip, "status.hostIP": host_ip}
        commands = {c.name: processes.command_of(c, fields, True) for c in pod.containers}
        missing = next((c for c in pod.containers if processes.which(commands[c.name][0]) is None), None)
        if missing is not None:
            why = ConfigError(f"container {missing.name} command[0]",
                              f"{commands[missing.name][0]!r} not found on this machine")
            self._refuse(node, client, item, str(why))
            return
        pod_dir, user = self._pod_dir(alloc.uid), self._mount_user(alloc.uid)
        try:  # first the volumes: a pod waiting for a ConfigMap gets no netns made and unmade every round
            made, mounts = self._volumes(client, item, pod, pod_dir, fields, user)
        except (volumes.NotReady, ConfigError) as exc:
            self._drop_volumes(pod_dir, user)
            waiting = isinstance(exc, volumes.NotReady)
            self._refuse(node, client, item, str(exc), "ContainerCreating" if waiting else "CreateContainerConfigError")
            return
        except (ApiError, OSError) as exc:
            self._drop_volumes(pod_dir, user)
            raise NodeagentError(f"pod {pod.key}: volumes: {exc}") from None
        if not host_network:
            hosts: str | None = self.layout.hosts_file(self.layout.pod_netns(pod.namespace, pod.name))
        else:  # kubelet gives a hostNetwork pod cluster DNS only with ClusterFirstWithHostNet
            hosts = hosts_path(pod_dir) if cluster_dns_on_host(item) else None
        try:
            self._make(pod, alloc, host_network, hosts)
            views = {c.name: image_view(pod_dir, c.name, plans[c.name]) for c in pod.containers}
        except (OSError, NodeagentError) as exc:
            self._unmake(pod, alloc, host_network)
            self._drop_volumes(pod_dir, user)
            raise NodeagentError(f"creating pod {pod.key}: {exc}") from None
        cgroup = self.layout.pod_cgroup(node, alloc.uid)
        units = {}
        for c in pod.containers:
            argv = container_argv(self.layout, pod, node, host_network, mounts[c.name], plans[c.name],
                                  commands[c.name], views[c.name])
            units[c.name] = self.make_unit(argv, processes.pod_env(pod, c, fields, True), cgroup,
                                           self.layout.container_log(pod.namespace, pod.name, c.name),
                                           pod.restart_policy)
        images = {c["name"]: c.get("image", "") for c in item["spec"]["containers"]}
        kube_pod = KubePod(alloc.uid, pod, node, ip, host_ip, host_network, units, images, made, hosts_file=hosts)
        for c in pod.containers:
            if readiness[c.name] is not None:
                kube_pod.probers[c.name] = self._prober(kube_pod, c, readiness[c.name], mounts[c.name],
                                                        plans[c.name], fields, views[c.name])
        with self.lock:
            self.pods[alloc.uid] = kube_pod
        for prober in kube_pod.probers.values():
            prober.thread.start()
        self.log.info("pod %s (uid %s) admitted on %s with IP %s", pod.key, alloc.uid, node, ip)
        warnings = sorted({w for p in [*plans.values(), *views.values()] for w in p.warnings})
        warnings += [f"container {c['name']}: {kind} is not run by the lab" for c in item["spec"]["containers"]
                     for kind in ("livenessProbe", "startupProbe") if c.get(kind)]
        if warnings:
            self._warn(client, item, node, "LabSecurityContext", "; ".join(warnings))

    def _volumes(self, client: ApiClient, item: dict, pod: spec.PodSpec, pod_dir: str, fields: dict,
                 user: str) -> tuple[volumes.PodVolumes, dict[str, list[volumes.Mount]]]:
        """The pod's volumes made, each container's mounts planned and their mount points
        made on the machine (noted in the ledger under `user`)."""
        meta = item["metadata"]
        inputs = volumes.Inputs(item, fields, volume_reader(client, meta["namespace"]), token_requester(client, item),
                                lambda: self._allocatable(client, fields["spec.nodeName"]))
        made = volumes.PodVolumes(item, pod_dir, inputs, functools.partial(nodeview.host_path, self.layout,
                                                                            fields["spec.nodeName"]))
        try:
            made.set_up(self.clock(), self.monotonic())
        finally:  # hostPaths it created are the lab's to remove, even when set-up stopped half-way
            volumes.claim(self.layout.run_root, user, [], made.created)
        mounts, points = {}, []
        for c in pod.containers:
            env = processes.pod_env(pod, c, fields, True)
            mounts[c.name] = node_mounts(self.layout, item, fields["spec.nodeName"], pod_dir, c.name, env)
            volumes.mount_script(mounts[c.name])  # a plan it cannot run is refused now (ConfigError)
            points += volumes.mount_points(mounts[c.name])
        volumes.claim(self.layout.run_root, user, points, made.created)
        return made, mounts

    def _prober(self, pod: KubePod, container: spec.Container, probe: probes.Probe, mounts: list,
                plan: security.Plan, fields: dict, view: image.View) -> probes.Prober:
        """A readiness prober of `container`: exec as `lab exec` runs the command in it,
        httpGet/tcpSocket from the node's netns to the pod's address."""
        unit = pod.units[container.name]
        if probe.kind == "exec":
            argv = container_argv(self.layout, pod.pod, pod.node, pod.host_network, mounts, plan, list(probe.command),
                                  view)
            env = processes.pod_env(pod.pod, container, fields, True)
            join = functools.partial(cgroups.join, self.layout.pod_cgroup(pod.node, pod.uid))

            def check() -> bool:
                return probes.exec_check(argv, env, join, probe)
        else:
            make = probes.in_netns(netns.named_path(self.layout.node_netns(pod.node)))
            run = probes.http_check if probe.kind == "httpGet" else probes.tcp_check

            def check() -> bool:
                return run(make, pod.ip, probe)

        def started() -> tuple | None:
            proc = unit.proc
            return (proc.pid, unit.started_at) if proc is not None else None
        return probes.Prober(probe, check, started, lambda: None, self.monotonic)

    def _drop_volumes(self, pod_dir: str, user: str) -> None:
        for path in volumes.release(self.layout.run_root, user):
            self.log.warning("kept %s: not empty", path)
        shutil.rmtree(pod_dir, ignore_errors=True)

    def _pod_dir(self, uid: str) -> str:
        return os.path.join(self.layout.kube_dir, "pods", uid)

    def _mount_user(self, uid: str) -> str:
        return f"{self.layout.name}:{uid}"

    def _allocatable(self, client: ApiClient, node: str) -> dict:
        """The node's allocatable resources (what a resourceFieldRef of a limit not set gives)."""
        return client.call("GET", f"/api/v1/nodes/{node}")["status"].get("allocatable", {})

    def _resync(self, pod: KubePod) -> None:
        """Keep a running pod's written volumes current: a token due for renewal, new data."""
        now, mono = self.clock(), self.monotonic()
        if pod.volumes is None or not pod.volumes.due(now, mono):
            return
        try:
            changed = pod.volumes.resync(now, mono)
        except (ApiError, NodeagentError, OSError) as exc:
            self.log.warning("pod %s: volumes not updated: %s (retrying)", pod.key, exc)
            return
        if changed:
            self.log.info("pod %s: volumes %s updated", pod.key, ", ".join(changed))

    def _warn(self, client: ApiClient, item: dict, node: str, reason: str, message: str) -> None:
        """A Warning event of the Pod, as kubelet records what it could not do."""
        meta, now = item["metadata"], _now()
        event = {"apiVersion": "v1", "kind": "Event",
                 "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
                 "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                    "namespace": meta["namespace"], "uid": meta["uid"]},
                 "reason": reason, "message": message, "type": "Warning", "count": 1,
                 "firstTimestamp": now, "lastTimestamp": now, "source": {"component": "kubelet", "host": node},
                 "reportingComponent": "kubelet", "reportingInstance": node}
        self.log.warning("pod %s/%s: %s", meta["namespace"], meta["name"], message)
        try:
            client.call("POST", f"/api/v1/namespaces/{meta['namespace']}/events", event)
        except ApiError as exc:
            self.log.warning("event for pod %s/%s not recorded: %s", meta["namespace"], meta["name"], exc)

    def _free_ip(self, node: str) -> str:
        """The highest free address of the node's CIDR: the lab's IPAM gives the file's
        pods (also those `lab apply` adds later) the lowest, so the two never meet until
        the range is full."""
        cidr = ipaddress.IPv4Network(self.record.alloc.nodes[node].pod_cidr)
        used = {a.ip for a in self.record.alloc.pods.values()}
        with self.lock:
            used |= {p.ip for p in self.pods.values()}
        for host in reversed(list(cidr.hosts())[FIRST_POD_HOST - 1:]):
            if str(host) not in used:
                return str(host)
        raise NodeagentError(f"node {node}'s pod CIDR {cidr} is full")

    def _make(self, pod: spec.PodSpec, alloc: PodAlloc, host_network: bool, hosts: str | None) -> None:
        if not host_network:
            topology.add_pod(self.layout, pod.namespace, pod.name, alloc)
        if hosts is not None:
            self._write_hosts(pod, hosts)
        cgroups.make(self.layout.pod_cgroup(alloc.node, alloc.uid))

    def _write_hosts(self, pod: spec.PodSpec, path: str) -> None:
        record = self.record
        services = [dns.Name(*k.split("/"), ip) for k, ip in record.alloc.services.items()]
        services += list(self.hosts_names)
        pods = [dns.Name(*k.split("/"), a.ip) for k, a in record.alloc.pods.items()]
        dns.write_in_place(path, dns.hosts_text(self.layout.name, pod.namespace, pod.name, services, pods))

    def _unmake(self, pod: spec.PodSpec, alloc: PodAlloc, host_network: bool) -> None:
        if not host_network:
            netns = self.layout.pod_netns(pod.namespace, pod.name)
            topology.delete_netns(netns)
            shutil.rmtree(self.layout.hosts_dir(netns), ignore_errors=True)
        cgroups.remove_tree(self.layout.pod_cgroup(alloc.node, alloc.uid))

    def _delete_asked(self, pod: KubePod, grace: float) -> None:
        for prober in pod.probers.values():
            prober.close()
        with self.lock:
            pod.delete_grace = grace
        self.log.info("pod %s (uid %s) is being deleted (grace %.0fs)", pod.key, pod.uid, grace)

    def _remove(self, client: ApiClient, pod: KubePod, in_api: bool) -> None:
        self._unmake(pod.pod, PodAlloc(pod.uid, pod.node, pod.ip), pod.host_network)
        self._drop_volumes(self._pod_dir(pod.uid), self._mount_user(pod.uid))  # its processes are gone
        if in_api:
            self._finish_delete(client, pod.pod.namespace, pod.pod.name, pod.uid)
        with self.lock:
            self.pods.pop(pod.uid, None)
        self.log.info("pod %s (uid %s) removed from %s", pod.key, pod.uid, pod.node)

    def _finish_delete(self, client: ApiClient, namespace: str, name: str, uid: str) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        client.call("DELETE", pod_path(namespace, name), body, ok=(200, 202, 404, 409))

    # --- status --------------------------------------------------------------------
    def _report(self, client: ApiClient, pod: KubePod) -> None:
        with self.lock:
            status = pod_status(pod, self.phase_of(list(pod.units.values())))
        if status == pod.reported:
            return
        client.call("PATCH", pod_path(pod.pod.namespace, pod.pod.name) + "/status",
                    {"metadata": {"uid": pod.uid}, "status": status}, STRATEGIC_PATCH, ok=(200, 201))
        pod.reported = status

    # --- the supervisor's side (its loop, under `lock`) ------------------------------
    def units(self) -> list:
        return [u for p in self.pods.values() if not p.stopped for u in p.units.values()]

    def observe(self) -> None:
        """Note when containers started and ended (after the supervisor stepped them)."""
        wall = _now()
        for pod in self.pods.values():
            observe_units(pod, wall)

    def step(self, now: float) -> None:
        """Signal the processes of pods being deleted (before the supervisor steps units)."""
        for pod in self.pods.values():
            if pod.delete_grace is None or pod.stopped:
                continue
            if pod.kill_at is None:
                pod.kill_at = now + pod.delete_grace
                for unit in pod.units.values():
                    unit.restart_policy = "Never"
                    unit.finished = True
                    if unit.proc is not None:
                        _signal(unit.proc, signal.SIGTERM)
            live = [u for u in pod.units.values() if u.proc is not None and u.proc.poll() is None]
            if live and now >= pod.kill_at:
                for unit in live:
                    _signal(unit.proc, signal.SIGKILL)
            if not live:
                for unit in pod.units.values():
                    unit.proc = None
                pod.stopped = True


def _source(client: ApiClient, namespace: str, kind: str, name: str, cache: dict) -> dict[str, str] | None:
    """The data of ConfigMap or Secret `name` (Secrets decoded), None when it does not exist."""
    key = (kind, name)
    if key not in cache:
        status, obj = client.request("GET", f"/api/v1/namespaces/{namespace}/{kind}s/{name}")
        if status == 404:
            cache[key] = None
        elif status != 200 or not isinstance(obj, dict):
            raise ApiError(f"reading {kind} {namespace}/{name}: {status}", status)
        elif kind == "secret":
            cache[key] = {k: v.decode(errors="replace") for k, v in volumes.decode_data(kind, obj).items()}
        else:
            cache[key] = dict(obj.get("data") or {})
    return cache[key]


def volume_reader(client: ApiClient, namespace: str) -> volumes.Reader:
    """Reads ConfigMaps and Secrets of `namespace` for volumes (as bytes; None: absent)."""
    def read(kind: str, name: str) -> dict[str, bytes] | None:
        status, obj = client.request("GET", f"/api/v1/namespaces/{namespace}/{kind.lower()}s/{name}")
        if status == 404:
            return None
        if status != 200 or not isinstance(obj, dict):
            raise ApiError(f"reading {kind} {namespace}/{name}: {status}", status)
        return volumes.decode_data(kind.lower(), obj)
    return read


def token_requester(client: ApiClient, item: dict) -> volumes.TokenFn:
    """Requests tokens of the pod's ServiceAccount bound to the pod (TokenRequest, as its node)."""
    meta = item["metadata"]
    account = item["spec"].get("serviceAccountName") or "default"

    def request(audience: str, seconds: int) -> volumes.Token:
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": seconds,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                            "uid": meta["uid"]}}}
        if audience:
            body["spec"]["audiences"] = [audience]
        answer = client.call("POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token", body)
        expires = dt.datetime.strptime(answer["status"]["expirationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
        return volumes.Token(answer["status"]["token"], expires.replace(tzinfo=dt.timezone.utc),
                             int(answer["spec"].get("expirationSeconds") or seconds))
    return request


def _field(item: dict, path: str) -> str | None:
    """Downward-API field paths beyond the lab's own: labels and annotations by key."""
    for prefix, where in (("metadata.labels['", "labels"), ("metadata.annotations['", "annotations")):
        if path.startswith(prefix) and path.endswith("']"):
            return item["metadata"].get(where, {}).get(path[len(prefix):-2], "")
    return None


def _resolve_var(client: ApiClient, item: dict, container: str, var: dict, cache: dict,
                 allocatable: Callable[[], dict]) -> dict | None:
    """One `env` entry with a ConfigMap/Secret key, a label/annotation or a resource as
    its value; others unchanged (the lab's parser accepts or refuses them). kubelet does
    not expand `$(VAR)` in such values: they are escaped (expansion.escape)."""
    value_from = var.get("valueFrom") or {}
    if "resourceFieldRef" in value_from:
        ref = value_from["resourceFieldRef"]
        return {"name": var["name"], "value": volumes.resource_value(
            item, ref.get("containerName") or container, ref.get("resource", ""), ref.get("divisor"), allocatable)}
    for kind in ("configMap", "secret"):
        ref = value_from.get(f"{kind}KeyRef")
        if ref is None:
            continue
        data = _source(client, item["metadata"]["namespace"], kind.lower(), ref.get("name", ""), cache) or {}
        if ref.get("key") in data:
            return {"name": var["name"], "value": expansion.escape(data[ref["key"]])}
        if ref.get("optional"):
            return None
        raise ConfigError(f"container {container} env {var.get('name')}",
                          f"{kind} {ref.get('name')} has no key {ref.get('key')!r}")
    path = value_from.get("fieldRef", {}).get("fieldPath", "")
    value = _field(item, path) if path else None
    return var if value is None else {"name": var["name"], "value": expansion.escape(value)}


def resolve_env(client: ApiClient, item: dict, allocatable: Callable[[], dict] | None = None) -> dict:
    """The Pod with what kubelet resolves before a container starts written in as plain
    values: `envFrom` and `valueFrom` of ConfigMaps and Secrets (read as the node, which
    the Node authorizer allows for its own pods' references), labels and annotations,
    resourceFieldRef (a limit not set: the node's `allocatable()`). A missing source or
    key is a ConfigError unless marked optional."""
    namespace, cache = item["metadata"]["namespace"], {}
    if allocatable is None:
        node = item["spec"].get("nodeName", "")
        allocatable = functools.cache(lambda: client.call("GET", f"/api/v1/nodes/{node}")["status"]["allocatable"])
    containers = []
    for container in item.get("spec", {}).get("containers", []):
        env = []
        for source in container.get("envFrom") or []:
            for kind in ("configMap", "secret"):
                ref = source.get(f"{kind}Ref")
                if ref is None:
                    continue
                data = _source(client, namespace, kind.lower(), ref.get("name", ""), cache)
                if data is None and not ref.get("optional"):
                    raise ConfigError(f"container {container.get('name')} envFrom",
                                      f"{kind} {ref.get('name')} not found")
                env += [{"name": source.get("prefix", "") + k, "value": expansion.escape(v)}
                        for k, v in sorted((data or {}).items())]
        for var in container.get("env") or []:
            resolved = _resolve_var(client, item, container.get("name"), var, cache, allocatable)
            if resolved is not None:  # None: an optional key that is missing, so no variable
                env.append(resolved)
        containers.append({**container, "env": env})
    return {**item, "spec": {**item["spec"], "containers": containers}}


def hosts_path(pod_dir: str) -> str:
    """The hosts file of a hostNetwork pod with cluster DNS (kubelet's etc-hosts)."""
    return os.path.join(pod_dir, "etc-hosts")


def cluster_dns_on_host(item: dict) -> bool:
    """Whether the pod is a hostNetwork pod that asks for cluster DNS (ClusterFirstWithHostNet)."""
    pod_spec = item.get("spec", {})
    return bool(pod_spec.get("hostNetwork")) and pod_spec.get("dnsPolicy") == "ClusterFirstWithHostNet"


def node_mounts(layout, item: dict, node: str, pod_dir: str, container: str,
                env: dict[str, str]) -> list[volumes.Mount]:
    """The container's mounts on `node`: its volumes (hostPaths as the node sees them,
    nodeview.py) and the lab's DNS over /etc/hosts — the pod's hosts file (a hostNetwork
    pod's only with ClusterFirstWithHostNet: the node's own otherwise) —, unless the
    container mounts something there itself (kubelet leaves its etc-hosts out then)."""
    pod_spec, meta = item.get("spec", {}), item["metadata"]
    mounts = volumes.container_mounts(item, container, pod_dir, env,
                                      functools.partial(nodeview.host_path, layout, node))
    if not pod_spec.get("hostNetwork"):
        hosts: str | None = layout.hosts_file(layout.pod_netns(meta["namespace"], meta["name"]))
    else:
        hosts = hosts_path(pod_dir) if cluster_dns_on_host(item) else None
    if hosts is not None and not any(m.target == "/etc/hosts" for m in mounts):
        mounts = volumes.ordered([*mounts, volumes.Mount(hosts, "/etc/hosts", False)])
    return mounts


def image_view(pod_dir: str, container: str, plan: security.Plan) -> image.View:
    """The view giving a container that runs as another user than root the machine's
    installation, the lab's stand-in for its image (image.py); its staging directories
    are made in the pod's directory."""
    if plan.uid == 0:
        return image.View()
    cover, unreadable = image.blocked(image.installation(), plan.uid, plan.gids)
    stage = os.path.join(pod_dir, "image", container)
    for n in range(image.stage_count(cover)):
        os.makedirs(os.path.join(stage, str(n)), exist_ok=True)
    warnings = [f"container {container}: user {plan.uid} cannot read {path}, where the lab's installation (its "
                f"stand-in for the image) is" for path in unreadable]
    return image.View(tuple(image.mount_steps(cover, stage, plan.read_only_root)), tuple(cover), tuple(warnings))


def container_argv(layout, pod: spec.PodSpec, node: str, host_network: bool, mounts: list[volumes.Mount],
                   plan: security.Plan, command: list[str], view: image.View = image.View()) -> list[str]:
    """How a container (or `lab exec`) of an API pod runs: in the pod's netns (the node's
    for hostNetwork) and a mount namespace of its own (`unshare`; `nsenter --net` keeps
    the machine's), where a pod with its own netns first gets that netns's sysfs over
    /sys, as `ip netns exec` gives one, then /dev/shm, the image `view` (image_view) and
    its volumes are mounted; then its securityContext's setpriv."""
    command = [*plan.argv, *command]
    before, covers = ([], ()) if host_network else ([SYSFS_MOUNT], ("/sys",))
    before += [SHM_MOUNT] if plan.own_shm else []
    script = volumes.mount_script(mounts, plan.read_only_root, [*before, *view.steps], (*covers, *view.covers))
    if script:
        command = ["unshare", "--mount", "--propagation", "slave", "sh", "-c", f'{script} && exec "$@"',
                   "nodeagent-lab-mounts", *command]
    where = layout.node_netns(node) if host_network else layout.pod_netns(pod.namespace, pod.name)
    return ["nsenter", f"--net={netns.named_path(where)}", "--", *command]


def exec_plan(record: LabRecord, client: ApiClient, item: dict, container: str | None,
              command: list[str]) -> tuple[list[str], dict[str, str], str]:
    """(argv, env, cgroup) to run `command` in a running API pod as its container
    `container` (default: the first) sees it: `lab exec` for the API's pods."""
    item = resolve_env(client, item)
    meta, status = item["metadata"], item.get("status", {})
    pod = spec.pod_of(object_from_dict({**item, "apiVersion": "v1", "kind": "Pod"}, "API"),
                      record.desired.node_names)
    chosen = next((c for c in pod.containers if c.name == container), None) if container else pod.containers[0]
    if chosen is None:
        raise ConfigError(f"pod {pod.key}", f"has no container {container}",
                          f"it has {', '.join(c.name for c in pod.containers)}")
    node, uid = item["spec"].get("nodeName", ""), meta["uid"]
    if node not in record.alloc.nodes or status.get("phase") != "Running":
        raise ConfigError(f"pod {pod.key}", f"is not running on a node of this lab (phase {status.get('phase')})")
    layout = record.layout
    fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": uid,
              "spec.nodeName": node, "spec.serviceAccountName": pod.service_account,
              "status.podIP": status.get("podIP", ""), "status.hostIP": status.get("hostIP", "")}
    env = processes.pod_env(pod, chosen, fields, True)
    pod_dir = os.path.join(layout.kube_dir, "pods", uid)
    mounts = node_mounts(layout, item, node, pod_dir, chosen.name, env)
    raw = next(c for c in item["spec"]["containers"] if c["name"] == chosen.name)
    plan = security.plan(item, raw)
    argv = container_argv(layout, pod, node, bool(item["spec"].get("hostNetwork")), mounts,
                          plan, command, image_view(pod_dir, chosen.name, plan))
    return argv, env, layout.pod_cgroup(node, uid)


def release_mount_points(layout) -> list[str]:
    """At `lab down`: remove what the lab made on the machine for its pods' mounts (mount
    points, hostPaths it created) that no other lab uses; the paths it could not remove."""
    return volumes.release(layout.run_root, f"{layout.name}:", final=True)


def observe_units(pod: KubePod, wall: str) -> None:
    """Note when the pod's containers started and ended (`wall`: now, RFC 3339), for
    their statuses; the file pods' mirrors (kube/mirror.py) use it too."""
    for name, unit in pod.units.items():
        if unit.proc is not None and pod.started.get(name, (None,))[0] != unit.proc.pid:
            pod.started[name] = (unit.proc.pid, wall)
            pod.finished.pop(name, None)
        elif unit.proc is None and name in pod.started and name not in pod.finished:
            pod.finished[name] = wall


def _signal(proc, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)  # the container's session: its children too
    except ProcessLookupError:
        pass


def _condition(kind: str, true: bool, reason: str = "", since: str | None = None) -> dict:
    out = {"type": kind, "status": "True" if true else "False", "lastProbeTime": None,
           "lastTransitionTime": since or _now()}
    if reason:
        out["reason"] = reason
    return out


def container_status(name: str, image: str, unit, started: tuple[int, str] | None, finished: str | None,
                     ready: bool = True) -> dict:
    """`ready`: what its readiness probe says (True without one)."""
    running = unit.proc is not None
    if running and (started is None or started[0] != unit.proc.pid):
        started = (unit.proc.pid, _now())  # started since the supervisor's loop last looked
    if running:
        state = {"running": {"startedAt": started[1] if started else _now()}}
    elif unit.finished:
        state = {"terminated": {"exitCode": unit.exit_code if unit.exit_code is not None else 137,
                                "reason": "Completed" if unit.exit_code == 0 else "Error",
                                "startedAt": started[1] if started else None, "finishedAt": finished}}
    elif unit.starts:
        state = {"waiting": {"reason": "CrashLoopBackOff",
                             "message": f"back-off restarting the failed container (exit code {unit.exit_code})"}}
    else:
        state = {"waiting": {"reason": "ContainerCreating"}}
    return {"name": name, "image": image, "imageID": "", "ready": running and ready, "started": running,
            "restartCount": unit.restarts, "state": state,
            "containerID": f"nodeagent-lab://{started[0]}" if started else ""}


def pod_status(pod: KubePod, phase: str) -> dict:
    """The Pod's status from what runs: a running container is ready unless its readiness
    probe says otherwise; each condition keeps the time it last changed, so an unchanged
    pod gives an equal status."""
    statuses = [container_status(n, pod.images.get(n, ""), u, pod.started.get(n), pod.finished.get(n),
                                 n not in pod.probers or pod.probers[n].ready)
                for n, u in pod.units.items()]
    ready = phase == "Running" and all(s["ready"] for s in statuses)
    conditions = []
    for kind, true in (("PodReadyToStartContainers", True), ("Initialized", True), ("Ready", ready),
                       ("ContainersReady", ready), ("PodScheduled", True)):
        if pod.transitions.get(kind, (None,))[0] != true:
            pod.transitions[kind] = (true, _now())
        reason = "ContainersNotReady" if kind in ("Ready", "ContainersReady") and not true else ""
        conditions.append(_condition(kind, true, reason, pod.transitions[kind][1]))
    return {"phase": phase, "podIP": pod.ip, "podIPs": [{"ip": pod.ip}], "hostIP": pod.host_ip,
            "hostIPs": [{"ip": pod.host_ip}], "startTime": pod.start_time,
            "conditions": conditions, "containerStatuses": statuses}
