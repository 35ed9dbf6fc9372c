"""How the lab starts a process: argv, environment, cgroup and log of containers and agents.

A container runs as `ip netns exec <pod-netns> <command…>`: `ip` enters the pod netns,
bind-mounts the pod's hosts file over /etc/hosts in a private mount namespace and execs
the command, so the pid we get is the container's. It joins the pod cgroup before the
exec (the agent finds pods by cgroup). The environment is clean, as in a container:
PATH with this interpreter's directory first (so `nodeagent` is the project's), the
Kubernetes-style pod variables and the container's own `env`. `lab exec` uses the same
argv and environment, so an exec'd command sees exactly what a container sees.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import shutil
import subprocess
import sys

from nodeagent import netns
from nodeagent.lab import cgroups, expansion
from nodeagent.lab.kube import controlplane
from nodeagent.lab.layout import Layout
from nodeagent.lab.spec import Container, PodSpec
from nodeagent.lab.state import LabRecord

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def search_path() -> str:
    return f"{os.path.dirname(sys.executable)}:{SYSTEM_PATH}"


def which(command: str) -> str | None:
    return shutil.which(command, path=search_path())


def base_env() -> dict[str, str]:
    return {"PATH": search_path(), "HOME": pwd.getpwuid(os.getuid()).pw_dir, "LANG": "C.UTF-8"}


def pod_fields(record: LabRecord, pod: PodSpec) -> dict[str, str]:
    """Values of the downward-API field paths for `pod`."""
    alloc = record.alloc.pods[pod.key]
    return {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "metadata.uid": alloc.uid,
            "spec.nodeName": alloc.node, "spec.serviceAccountName": pod.service_account,
            "status.podIP": alloc.ip, "status.hostIP": record.alloc.nodes[alloc.node].fabric_ip}


def container_env(record: LabRecord, pod: PodSpec, container: Container) -> dict[str, str]:
    return pod_env(pod, container, pod_fields(record, pod), record.kube)


def pod_env(pod: PodSpec, container: Container, fields: dict[str, str], kube: bool) -> dict[str, str]:
    """A container's environment from its pod's downward-API `fields` (see pod_fields)."""
    env = base_env()
    env.update(POD_NAME=pod.name, POD_NAMESPACE=pod.namespace, POD_IP=fields["status.podIP"],
               POD_UID=fields["metadata.uid"], NODE_NAME=fields["spec.nodeName"],
               POD_LABELS=json.dumps(dict(pod.labels), sort_keys=True), SERVICE_ACCOUNT=pod.service_account)
    env.update(declared_env(container, fields, kube))
    return env


def declared_env(container: Container, fields: dict[str, str], kube: bool) -> dict[str, str]:
    """The variables kubelet gives a container and expands its `$(VAR)`s with: the
    Services' (`kube`), then its `env` in order, each literal value expanded with the
    variables before it, then the Services' (kubelet's makeEnvironmentVariables)."""
    services = controlplane.service_env() if kube else {}
    declared: dict[str, str] = {}
    for var in container.env:
        declared[var.name] = fields[var.field_path] if var.field_path else \
            expansion.expand(var.value, declared, services)
    return {**services, **declared}


def command_of(container: Container, fields: dict[str, str], kube: bool) -> list[str]:
    """The container's command and args with their `$(VAR)`s expanded as kubelet does."""
    env = declared_env(container, fields, kube)
    return [expansion.expand(arg, env) for arg in container.command]


def in_pod(layout: Layout, pod: PodSpec, command: list[str] | tuple[str, ...]) -> list[str]:
    """argv running `command` in the pod's netns, with its hosts file."""
    return ["ip", "netns", "exec", layout.pod_netns(pod.namespace, pod.name), *command]


def pod_cgroup(record: LabRecord, pod: PodSpec) -> str:
    alloc = record.alloc.pods[pod.key]
    return record.layout.pod_cgroup(alloc.node, alloc.uid)


def in_node(layout: Layout, node: str, command: list[str]) -> list[str]:
    """argv running `command` as a hostNetwork pod on `node`: in the node netns with the
    machine's /sys (`ip netns exec` would mount a fresh sysfs over /sys, hiding the
    cgroup2 and bpffs mounts the agent works on, as hostPath mounts give a DaemonSet)."""
    return ["nsenter", f"--net={netns.named_path(layout.node_netns(node))}", "--", *command]


def agent_argv(layout: Layout, node: str, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The per-node agent, run as its DaemonSet pod would run (`extra`: more flags)."""
    return in_node(layout, node, [
        "nodeagent", "run", "--node", node,
        "--source", f"files:{layout.cluster_dir}", "--cgroup", layout.kubepods_cgroup(node),
        "--bpffs", layout.node_bpffs(node), "--admin-socket", layout.agent_socket(node),
        "--waypoint-dir", layout.waypoint_dir(node), *extra])


def agent_env(node: str) -> dict[str, str]:
    return {**base_env(), "NODE_NAME": node}


def spawn(argv: list[str], env: dict[str, str], cgroup: str, log_path: str) -> subprocess.Popen:
    """Start `argv` in `cgroup` (joined before exec), output appended to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=functools.partial(cgroups.join, cgroup), start_new_session=True)


def exec_in_pod(record: LabRecord, pod: PodSpec, container: Container, command: list[str]) -> None:
    """Replace this process with `command` inside the pod (netns, cgroup, hosts, env)."""
    env = container_env(record, pod, container)
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    cgroups.join(pod_cgroup(record, pod))
    argv = in_pod(record.layout, pod, command)
    os.execvpe(argv[0], argv, env)
