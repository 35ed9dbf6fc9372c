"""The lab as the kubelet of its nodes (`--kube`): it runs the Pods the API binds to them.

Every second, each node lists the Pods bound to it (`spec.nodeName`, set by the real
scheduler or by the Pod itself), with its own credentials, as its kubelet would. A new
Pod is made as the lab makes the file's pods: an address from the node's pod CIDR, a
netns with its veth and routes, a hosts file, the cgroup `kubepods/pod<uid>` (the API's
UID, kubelet's naming), and one supervised process per container (`command` + `args`;
images are ignored). `hostNetwork: true` pods run in the node's netns with the node's
address. Unless `automountServiceAccountToken: false`, the pod gets what in-cluster
clients read at /var/run/secrets/kubernetes.io/serviceaccount: a token the node requests
for the pod's ServiceAccount, bound to the pod (TokenRequest), the cluster CA and the
namespace, bind-mounted in the container's own mount namespace only. What runs is
reported through the Pod's status (phase, podIP, hostIP, conditions, container states
with restart counts), patched only when it changed. A Pod being deleted gets SIGTERM,
SIGKILL after its grace period; once its processes are gone its netns, hosts file and
cgroup are removed and the Pod deleted for good (grace 0, preconditioned on its UID), as
kubelet finishes a deletion. A Pod the lab cannot run (no command, an executable not
found, a name the file's pods hold) stays Pending with the reason in its container
status.

Threads: `Kubelet.run` (the thread) talks to the API and does the kernel work; the
supervisor's loop owns the processes and, under `lock`, starts, restarts and stops the
units of the pods in `pods` (`step`).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
import os
import shutil
import signal
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Callable

from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.kube.objects import object_from_dict
from nodeagent.lab import cgroups, dns, processes, spec, topology
from nodeagent.lab.ipam import FIRST_POD_HOST, PodAlloc
from nodeagent.lab.kube import controlplane, proxy
from nodeagent.lab.kube.api import STRATEGIC_PATCH, ApiClient, ApiError
from nodeagent.lab.state import LabRecord

POLL = 1.0
TERMINAL = ("Succeeded", "Failed")
# Where in-cluster clients look for their credentials. It exists only inside a pod's own
# mount namespace (a bind mount of the pod's files); on the machine it is an empty
# directory, the mount point, removed when the last lab goes (`remove_mount_point`).
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_SECONDS = 3607  # kubelet's request; the API server extends such tokens (warning after 1 h)
# Run in the container's private mount namespace (made by `ip netns exec`, or by unshare
# for hostNetwork pods) before exec'ing the command: $0 is the pod's directory.
MOUNT_SCRIPT = f'mount --bind "$0" {SERVICE_ACCOUNT_DIR} && exec "$@"'


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    files: str = ""  # the pod's service-account files, mounted at SERVICE_ACCOUNT_DIR; "" = none
    start_time: str = field(default_factory=_now)
    started: dict[str, tuple[int, str]] = field(default_factory=dict)  # container -> (pid, startedAt)
    finished: dict[str, str] = field(default_factory=dict)  # container -> finishedAt
    transitions: dict[str, tuple[bool, str]] = field(default_factory=dict)  # condition -> (status, since)
    delete_grace: float | None = None  # set when the API asked to delete it
    kill_at: float | None = None  # monotonic: SIGKILL what is left
    stopped: bool = False  # every process gone after a deletion
    reported: dict | None = None

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
                 make_unit: Callable, phase_of: Callable[[list], str], log: logging.Logger):
        """`clients`: each node's; `proxy_client` reads Services as kube-proxy;
        `make_unit(argv, env, cgroup, log_path, restart_policy)` makes a supervisor Unit;
        `phase_of(units)` is the supervisor's pod phase rule."""
        self.record, self.clients, self.make_unit, self.phase_of, self.log = record, clients, make_unit, phase_of, log
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
            pods = [p.pod for p in self.pods.values() if not p.host_network]
        for pod in pods:
            self._write_hosts(pod)

    def sync_node(self, node: str, client: ApiClient) -> None:
        items = client.call("GET", pods_path(node)).get("items", [])
        seen = set()
        for item in items:
            meta = item["metadata"]
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
                self._report(client, pod)
        for known in (self.refused, self.failing):
            for uid in [u for u, (n, _) in known.items() if n == node and (u not in seen or u in self.pods)]:
                known.pop(uid)

    # --- admission and removal ---------------------------------------------------
    def _refuse(self, node: str, client: ApiClient, item: dict, why: str) -> None:
        uid = item["metadata"]["uid"]
        if self.refused.get(uid) == (node, why):
            return
        self.refused[uid] = (node, why)
        self.log.warning("cannot run pod %s/%s: %s", item["metadata"]["namespace"], item["metadata"]["name"], why)
        containers = [c.get("name", "") for c in item.get("spec", {}).get("containers", [])]
        status = {"phase": "Pending", "conditions": [_condition("PodScheduled", True)],
                  "containerStatuses": [{"name": c, "ready": False, "restartCount": 0, "image": "", "imageID": "",
                                         "state": {"waiting": {"reason": "CreateContainerConfigError",
                                                               "message": why}}} for c in containers]}
        meta = item["metadata"]
        client.call("PATCH", pod_path(meta["namespace"], meta["name"]) + "/status", {"status": status},
                    STRATEGIC_PATCH)

    def _admit(self, node: str, client: ApiClient, item: dict) -> None:
        meta = item["metadata"]
        try:  # list items carry no apiVersion/kind
            item = resolve_env(client, item)
            obj = object_from_dict({**item, "apiVersion": "v1", "kind": "Pod"},
                                   f"API Pod {meta['namespace']}/{meta['name']}")
            pod = spec.pod_of(obj, self.record.desired.node_names)
            for c in pod.containers:
                if processes.which(c.command[0]) is None:
                    raise ConfigError(f"container {c.name} command[0]", f"{c.command[0]!r} not found on this machine")
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
        try:
            self._make(pod, alloc, host_network)
        except (OSError, NodeagentError) as exc:
            self._unmake(pod, alloc, host_network)
            raise NodeagentError(f"creating pod {pod.key}: {exc}") from None
        try:
            files = self._service_account(client, item, alloc) if _automount(item) else ""
        except (ApiError, OSError) as exc:
            self._unmake(pod, alloc, host_network)
            raise NodeagentError(f"pod {pod.key}: service-account token: {exc}") from None
        fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": alloc.uid,
                  "spec.nodeName": node, "spec.serviceAccountName": pod.service_account,
                  "status.podIP": ip, "status.hostIP": host_ip}
        cgroup = self.layout.pod_cgroup(node, alloc.uid)
        units = {}
        for c in pod.containers:
            argv = container_argv(self.layout, pod, node, host_network, files, list(c.command))
            units[c.name] = self.make_unit(argv, processes.pod_env(pod, c, fields, True), cgroup,
                                           self.layout.container_log(pod.namespace, pod.name, c.name),
                                           pod.restart_policy)
        images = {c["name"]: c.get("image", "") for c in item["spec"]["containers"]}
        with self.lock:
            self.pods[alloc.uid] = KubePod(alloc.uid, pod, node, ip, host_ip, host_network, units, images, files)
        self.log.info("pod %s (uid %s) admitted on %s with IP %s", pod.key, alloc.uid, node, ip)

    def _service_account(self, client: ApiClient, item: dict, alloc: PodAlloc) -> str:
        """The pod's token (TokenRequest bound to the pod, as its node), the cluster CA
        and its namespace, in `kube/pods/<uid>/serviceaccount/`, as a projected volume."""
        meta, pod_spec = item["metadata"], item["spec"]
        account = pod_spec.get("serviceAccountName") or "default"
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                   "spec": {"expirationSeconds": TOKEN_SECONDS,
                            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"],
                                               "uid": alloc.uid}}}
        answer = client.call("POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token",
                             request)
        directory = os.path.join(self.layout.kube_dir, "pods", alloc.uid, "serviceaccount")
        os.makedirs(directory, mode=0o755, exist_ok=True)
        for name, text in (("token", answer["status"]["token"]), ("namespace", meta["namespace"])):
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        shutil.copyfile(controlplane.credentials(self.layout, "admin").ca_cert, os.path.join(directory, "ca.crt"))
        os.makedirs(SERVICE_ACCOUNT_DIR, exist_ok=True)
        return directory

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

    def _make(self, pod: spec.PodSpec, alloc: PodAlloc, host_network: bool) -> None:
        if not host_network:
            topology.add_pod(self.layout, pod.namespace, pod.name, alloc)
            self._write_hosts(pod)
        cgroups.make(self.layout.pod_cgroup(alloc.node, alloc.uid))

    def _write_hosts(self, pod: spec.PodSpec) -> None:
        record = self.record
        services = [dns.Name(*k.split("/"), ip) for k, ip in record.alloc.services.items()]
        services += list(self.hosts_names)
        pods = [dns.Name(*k.split("/"), a.ip) for k, a in record.alloc.pods.items()]
        netns = self.layout.pod_netns(pod.namespace, pod.name)
        dns.write_in_place(self.layout.hosts_file(netns), dns.hosts_text(self.layout.name, pod.namespace, pod.name,
                                                                         services, pods))

    def _unmake(self, pod: spec.PodSpec, alloc: PodAlloc, host_network: bool) -> None:
        if not host_network:
            netns = self.layout.pod_netns(pod.namespace, pod.name)
            topology.delete_netns(netns)
            shutil.rmtree(self.layout.hosts_dir(netns), ignore_errors=True)
        cgroups.remove_tree(self.layout.pod_cgroup(alloc.node, alloc.uid))

    def _delete_asked(self, pod: KubePod, grace: float) -> None:
        with self.lock:
            pod.delete_grace = grace
        self.log.info("pod %s (uid %s) is being deleted (grace %.0fs)", pod.key, pod.uid, grace)

    def _remove(self, client: ApiClient, pod: KubePod, in_api: bool) -> None:
        self._unmake(pod.pod, PodAlloc(pod.uid, pod.node, pod.ip), pod.host_network)
        if pod.files:
            shutil.rmtree(os.path.dirname(pod.files), ignore_errors=True)
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
            for name, unit in pod.units.items():
                if unit.proc is not None and pod.started.get(name, (None,))[0] != unit.proc.pid:
                    pod.started[name] = (unit.proc.pid, wall)
                    pod.finished.pop(name, None)
                elif unit.proc is None and name in pod.started and name not in pod.finished:
                    pod.finished[name] = wall

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
            cache[key] = {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        else:
            cache[key] = dict(obj.get("data") or {})
    return cache[key]


def _field(item: dict, path: str) -> str | None:
    """Downward-API field paths beyond the lab's own: labels and annotations by key."""
    for prefix, where in (("metadata.labels['", "labels"), ("metadata.annotations['", "annotations")):
        if path.startswith(prefix) and path.endswith("']"):
            return item["metadata"].get(where, {}).get(path[len(prefix):-2], "")
    return None


def _resolve_var(client: ApiClient, item: dict, container: str, var: dict, cache: dict) -> dict | None:
    """One `env` entry with a ConfigMap/Secret key or a label/annotation as its value;
    others unchanged (the lab's parser accepts or refuses them)."""
    value_from = var.get("valueFrom") or {}
    for kind in ("configMap", "secret"):
        ref = value_from.get(f"{kind}KeyRef")
        if ref is None:
            continue
        data = _source(client, item["metadata"]["namespace"], kind.lower(), ref.get("name", ""), cache) or {}
        if ref.get("key") in data:
            return {"name": var["name"], "value": data[ref["key"]]}
        if ref.get("optional"):
            return None
        raise ConfigError(f"container {container} env {var.get('name')}",
                          f"{kind} {ref.get('name')} has no key {ref.get('key')!r}")
    path = value_from.get("fieldRef", {}).get("fieldPath", "")
    value = _field(item, path) if path else None
    return var if value is None else {"name": var["name"], "value": value}


def resolve_env(client: ApiClient, item: dict) -> dict:
    """The Pod with what kubelet resolves before a container starts written in as plain
    values: `envFrom` and `valueFrom` of ConfigMaps and Secrets (read as the node, which
    the Node authorizer allows for its own pods' references), labels and annotations.
    A missing source or key is a ConfigError unless marked optional."""
    namespace, cache = item["metadata"]["namespace"], {}
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
                env += [{"name": source.get("prefix", "") + k, "value": v} for k, v in sorted((data or {}).items())]
        for var in container.get("env") or []:
            resolved = _resolve_var(client, item, container.get("name"), var, cache)
            if resolved is not None:  # None: an optional key that is missing, so no variable
                env.append(resolved)
        containers.append({**container, "env": env})
    return {**item, "spec": {**item["spec"], "containers": containers}}


def container_argv(layout, pod: spec.PodSpec, node: str, host_network: bool, files: str,
                   command: list[str]) -> list[str]:
    """How a container (or `lab exec`) of an API pod runs: in the pod's netns (the node's
    for hostNetwork), with the pod's service-account files mounted when it has them."""
    if files:
        command = ["sh", "-c", MOUNT_SCRIPT, files, *command]
        if host_network:  # nsenter --net keeps the machine's mount namespace
            command = ["unshare", "--mount", "--propagation", "slave", *command]
    return processes.in_node(layout, node, command) if host_network else processes.in_pod(layout, pod, command)


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
    files = os.path.join(layout.kube_dir, "pods", uid, "serviceaccount")
    fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": uid,
              "spec.nodeName": node, "spec.serviceAccountName": pod.service_account,
              "status.podIP": status.get("podIP", ""), "status.hostIP": status.get("hostIP", "")}
    argv = container_argv(layout, pod, node, bool(item["spec"].get("hostNetwork")),
                          files if os.path.isdir(files) else "", command)
    return argv, processes.pod_env(pod, chosen, fields, True), layout.pod_cgroup(node, uid)


def _automount(item: dict) -> bool:
    return item.get("spec", {}).get("automountServiceAccountToken") is not False


def remove_mount_point(run_root: str) -> None:
    """Remove SERVICE_ACCOUNT_DIR (empty directories only) once no lab is left in `run_root`."""
    try:
        if [n for n in os.listdir(run_root) if not n.startswith(".")]:
            return
    except FileNotFoundError:
        pass
    path = SERVICE_ACCOUNT_DIR
    while path not in ("/var/run", "/run", "/"):
        try:
            os.rmdir(path)
        except OSError:
            return  # not ours alone, or in use
        path = os.path.dirname(path)


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


def container_status(name: str, image: str, unit, started: tuple[int, str] | None, finished: str | None) -> dict:
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
    return {"name": name, "image": image, "imageID": "", "ready": running, "started": running,
            "restartCount": unit.restarts, "state": state,
            "containerID": f"nodeagent-lab://{started[0]}" if started else ""}


def pod_status(pod: KubePod, phase: str) -> dict:
    """The Pod's status from what runs (no probes: a running container is ready); each
    condition keeps the time it last changed, so an unchanged pod gives an equal status."""
    ready = phase == "Running"
    statuses = [container_status(n, pod.images.get(n, ""), u, pod.started.get(n), pod.finished.get(n))
                for n, u in pod.units.items()]
    conditions = []
    for kind, true in (("PodReadyToStartContainers", True), ("Initialized", True), ("Ready", ready),
                       ("ContainersReady", ready), ("PodScheduled", True)):
        if pod.transitions.get(kind, (None,))[0] != true:
            pod.transitions[kind] = (true, _now())
        reason = "ContainersNotReady" if kind in ("Ready", "ContainersReady") and not true else ""
        conditions.append(_condition(kind, true, reason, pod.transitions[kind][1]))
    return {"phase": phase, "podIP": pod.ip, "podIPs": [{"ip": pod.ip}], "hostIP": pod.host_ip,
            "hostIPs": [{"ip": pod.host_ip}], "startTime": pod.start_time, "qosClass": "BestEffort",
            "conditions": conditions, "containerStatuses": statuses}
