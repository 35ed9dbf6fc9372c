"""Talking to a `lab up --kube` lab in e2e tests: kubectl as the lab's admin and the JSON
it prints, waiting for a condition, a pod's readiness, a container's log, and the mesh as
daemonset/ installs it (its pods, its RBAC, what capture leaves on a node).

The lab itself (up, always down, skipped when the control plane is not built) is
tests/e2e/conftest.py's: `kube_lab_up` and the module-scoped `kube_lab` fixture."""

from __future__ import annotations

import json
import os
import subprocess
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from nodeagent.lab.layout import Layout
from tests.e2e.conftest import ROOT, Lab

SYSTEM = "nodeagent-system"  # the mesh's namespace
DAEMONSET = os.path.join(ROOT, "daemonset")  # kustomize base: Istio's CRDs, the CA, the agents
MESH = os.path.join(DAEMONSET, "mesh")  # the same without the CRDs
MESH_RBAC = [a for f in ("namespace.yaml", "rbac-agent.yaml", "rbac-ca.yaml") for a in ("-f", os.path.join(MESH, f))]
NODEAGENT = os.path.join(ROOT, ".venv", "bin", "nodeagent")  # the command the lab's kubelet runs in pods
AGENT_ACCOUNT = f"system:serviceaccount:{SYSTEM}:nodeagent"  # the agents' ServiceAccount, as RBAC names it
AGENT_PODS = "app.kubernetes.io/name=nodeagent"  # the DaemonSet's pods


def nodes_yaml(*names: str) -> str:
    """A lab file of bare Nodes: the lab's machines, nothing on them."""
    return "---".join(f"\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n" for name in names)


def kubectl(lab: Lab, *args: str, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """`kubectl ARGS` as the lab's admin; `timeout` bounds a hang (an apply or a
    `delete --wait` on a loaded machine takes tens of seconds), it is no expected time."""
    return lab.run("kubectl", "--", *args, input=input, check=check, timeout=timeout)


def get(lab: Lab, *args: str) -> dict:
    """`kubectl get ARGS -o json`, parsed."""
    return json.loads(kubectl(lab, "get", *args, "-o", "json").stdout)


def poll(condition: Callable[[], Any], what: str, timeout: float = 120, every: float = 0.3) -> Any:
    """`condition()` once it is truthy; AssertionError naming `what` after `timeout` (a hang's bound)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def ready(pod: dict) -> bool:
    """The pod's Ready condition is True."""
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def container_log(lab: Lab, namespace: str, pod: str, container: str) -> str:
    """Where the lab's kubelet writes that container's output (it outlives the pod)."""
    return Layout(lab.name, cgroup_root="").container_log(namespace, pod, container)


def can_i(lab: Lab, who: str, *what: str) -> bool:
    """`kubectl auth can-i --as=WHO WHAT`: whether RBAC allows it."""
    proc = kubectl(lab, "auth", "can-i", f"--as={who}", *what, check=False)
    assert proc.stdout.strip() in ("yes", "no"), (what, proc.stdout, proc.stderr)
    return proc.stdout.strip() == "yes"


def agent_pods(lab: Lab) -> list[dict]:
    """Every pod of the agents' DaemonSet, terminating ones included."""
    return get(lab, "pods", "-n", SYSTEM, "-l", AGENT_PODS)["items"]


@contextmanager
def applied_kustomization(lab: Lab, kustomization: str) -> Iterator[None]:
    """`kubectl apply -k KUSTOMIZATION`, deleted again at the end (whatever a test
    already deleted of it is skipped), before the lab is taken down."""
    kubectl(lab, "apply", "-k", kustomization)
    try:
        yield
    finally:
        kubectl(lab, "delete", "-k", kustomization, "--ignore-not-found", "--wait=true", check=False)


def attached_programs(layout: Layout, node: str) -> list[tuple[str, str]]:
    """(name, attach type) of every BPF program attached in the node's cgroup subtree."""
    tree = subprocess.run(["bpftool", "-j", "cgroup", "tree", layout.node_cgroup(node)], capture_output=True,
                          text=True, check=True).stdout
    return sorted((a["name"], a["attach_type"]) for cg in json.loads(tree or "[]") for a in cg.get("programs", []))


def pinned(layout: Layout, node: str) -> list[str]:
    """Every file pinned in the node's bpffs, relative to it."""
    root = layout.node_bpffs(node)
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)
