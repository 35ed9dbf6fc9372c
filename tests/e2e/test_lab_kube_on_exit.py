"""What a DaemonSet agent leaves on its node when it stops (`--on-exit=owner`, issue 13),
on the lab's real API server (`lab up --kube --no-agents`, one node; daemonset/mesh
applied as it is, the lab's kubelet running the DaemonSet's pods).

1. `nodeagent status --kube` reads the installed DaemonSet: ok, one Ready agent on kn1;
2. a rolling update (`kubectl rollout restart`) and a pod deleted by hand keep capture:
   the node's pinned maps are the same maps (same BPF map IDs) once the next agent is
   Ready — it adopted them — and the stopped agent logged why it kept them;
3. deleting the DaemonSet alone (its Namespace stays) removes capture: no program on the
   node's cgroup, nothing pinned, and the agent logged the DaemonSet's UID deleted.
`kubectl delete -k daemonset/` (the Namespace terminating) is tests/e2e/test_lab_daemonset.py's.
Beside them, the agent's Role (daemonsets list/watch in its namespace, nothing else), and
the CA's lookup on a pod-watch miss (identity/ca/kubeauth.py PodLookup) asks
this API server with the CA's own ServiceAccount token: the field selectors it sends are
served and its RBAC allows them.

Needs the control plane built (`controlplane/build`, run by scripts/setup): without it
the test is skipped on a developer machine and fails under CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import yaml

from nodeagent.lab.layout import Layout
from tests.e2e.conftest import ROOT, Lab, cgroup2_root, kube_lab_up, unique_name
from tests.e2e.kubelab import (AGENT_ACCOUNT, MESH, NODEAGENT, SYSTEM, agent_pods, applied_kustomization,
                               attached_programs, can_i, container_log, get, kubectl, nodes_yaml, pinned, poll, ready)

pytestmark = pytest.mark.timeout(900)

LAB_YAML = nodes_yaml("kn1")


def ready_agent(lab: Lab) -> dict | None:
    """kn1's agent pod once it is Ready (and not terminating)."""
    for pod in agent_pods(lab):
        if not pod["metadata"].get("deletionTimestamp") and ready(pod):
            return pod
    return None


def capture(lab: Lab) -> dict[str, Any]:
    """kn1's capture: programs attached in its cgroup subtree, and pinned map IDs by pin."""
    layout = Layout(lab.name, cgroup_root=cgroup2_root())
    maps = {}
    root = os.path.join(layout.node_bpffs("kn1"), "nodeagent", "maps")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        shown = subprocess.run(["bpftool", "-j", "map", "show", "pinned", os.path.join(root, name)],
                               capture_output=True, text=True, check=True).stdout
        maps[name] = json.loads(shown)["id"]
    return {"programs": attached_programs(layout, "kn1"), "maps": maps, "pins": pinned(layout, "kn1")}


def stopping_line(lab: Lab, pod: str) -> str:
    """The 'agent stopping: …' message of that agent pod's log (JSON lines)."""
    with open(container_log(lab, SYSTEM, pod, "agent")) as f:
        found = [json.loads(line)["message"] for line in f if line.startswith("{") and "agent stopping" in line]
    assert len(found) == 1, found
    return found[0]


def replaced(lab: Lab, old: str) -> dict | None:
    """A Ready agent other than `old` whose predecessor has logged its stop."""
    pod = ready_agent(lab)
    if pod is None or pod["metadata"]["name"] == old:
        return None
    with open(container_log(lab, SYSTEM, old, "agent")) as f:
        return pod if "agent stopped:" in f.read() else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    name = "h2" + unique_name()[1:6]  # this module's labs are named h2*
    with kube_lab_up(tmp_path_factory, LAB_YAML, "onexit", name) as lab, applied_kustomization(lab, MESH):
        poll(lambda: ready_agent(lab), "kn1's agent to be Ready", 420, 1)
        yield lab


def test_status_kube_summarises_the_installed_daemonset(lab: Lab):
    layout = Layout(lab.name, cgroup_root="")
    proc = subprocess.run(["ip", "netns", "exec", layout.controlplane_netns, NODEAGENT, "status", "--kube",
                           "--kubeconfig", layout.admin_kubeconfig, "-o", "json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["ok"], summary["problems"], summary["nodes_listed"]) == (True, [], True)
    ds = summary["daemonset"]
    assert (ds["desired"], ds["ready"], ds["updated"], ds["available"]) == (1, 1, 1, 1)
    [row] = summary["nodes"]
    assert (row["node"], row["pod"], row["phase"], row["ready"], row["reason"]) == (
        "kn1", ready_agent(lab)["metadata"]["name"], "Running", True, "")


@pytest.mark.parametrize("how", ["rollout restart", "pod deleted by hand"])
def test_a_restart_keeps_capture_for_the_next_agent(lab: Lab, how: str):
    before = capture(lab)
    assert before["programs"] and before["maps"], before  # the check can see capture
    old = ready_agent(lab)["metadata"]["name"]
    uid = get(lab, "daemonset", "nodeagent", "-n", SYSTEM)["metadata"]["uid"]
    if how == "rollout restart":
        kubectl(lab, "rollout", "restart", "daemonset/nodeagent", "-n", SYSTEM)
    else:
        kubectl(lab, "delete", "pod", old, "-n", SYSTEM, "--wait=false")
    poll(lambda: replaced(lab, old), f"a Ready agent after the {how}", 300, 1)
    assert stopping_line(lab, old) == (
        f"agent stopping: keeping capture for the next agent: DaemonSet {SYSTEM}/nodeagent (uid {uid}) is in "
        "place (a rolling update, or the pod deleted by hand)")
    after = capture(lab)
    assert after["maps"] == before["maps"]  # the same maps: kept, then adopted, never re-created
    assert after["programs"] == before["programs"]


LOOKUP = """
import json, sys
from pathlib import Path
from nodeagent.identity.ca.kubeauth import PodLookup
from nodeagent.identity.spiffe import Identity
from nodeagent.kube.client import KubeClient, from_kubeconfig
lookup = PodLookup(KubeClient(from_kubeconfig(Path(sys.argv[1]))))
print(json.dumps([lookup(node, Identity("cluster.local", ns, sa)) for node, ns, sa in json.loads(sys.argv[2])]))
"""


def test_the_cas_lookup_of_a_pod_on_a_node_by_its_service_account(lab: Lab, tmp_path):
    """As the CA's ServiceAccount (its ClusterRole): kn1 runs the agent (nodeagent) and
    the CA (nodeagent-ca) pods of nodeagent-system; no pod there runs as `default`, and no
    node kn2 exists."""
    layout = Layout(lab.name, cgroup_root="")
    token = kubectl(lab, "create", "token", "nodeagent-ca", "-n", SYSTEM).stdout.strip()
    with open(layout.admin_kubeconfig) as f:
        admin = yaml.safe_load(f)
    admin["users"] = [{"name": "ca", "user": {"token": token}}]
    admin["contexts"] = [{"name": "ca", "context": {"cluster": admin["clusters"][0]["name"], "user": "ca"}}]
    admin["current-context"] = "ca"
    kubeconfig = tmp_path / "ca.kubeconfig"
    kubeconfig.write_text(json.dumps(admin))
    asks = [["kn1", SYSTEM, "nodeagent"], ["kn1", SYSTEM, "nodeagent-ca"], ["kn1", SYSTEM, "default"],
            ["kn2", SYSTEM, "nodeagent"], ["kn1", "default", "nodeagent"]]
    proc = subprocess.run(["ip", "netns", "exec", layout.controlplane_netns, sys.executable, "-c", LOOKUP,
                           str(kubeconfig), json.dumps(asks)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [True, True, False, False, False]

def test_the_agent_may_watch_the_daemonsets_of_its_namespace_only(lab: Lab):
    def can(*what: str) -> bool:
        return can_i(lab, AGENT_ACCOUNT, *what)

    assert can("list", "daemonsets.apps", "-n", SYSTEM) and can("watch", "daemonsets.apps", "-n", SYSTEM)
    for refused in (("get", "daemonsets.apps/nodeagent", "-n", SYSTEM), ("watch", "daemonsets.apps", "-A"),
                    ("list", "daemonsets.apps", "-n", "default"), ("delete", "daemonsets.apps", "-n", SYSTEM),
                    ("list", "deployments.apps", "-n", SYSTEM)):
        assert not can(*refused), refused


def test_deleting_the_daemonset_removes_capture(lab: Lab):
    assert capture(lab)["programs"]
    old = ready_agent(lab)["metadata"]["name"]
    uid = get(lab, "daemonset", "nodeagent", "-n", SYSTEM)["metadata"]["uid"]
    kubectl(lab, "delete", "daemonset", "nodeagent", "-n", SYSTEM, "--wait=false")
    poll(lambda: not agent_pods(lab),
         "the agent pod to be gone", 240, 1)
    assert stopping_line(lab, old) == (
        f"agent stopping: removing capture (as `nodeagent uninstall`): DaemonSet {SYSTEM}/nodeagent (uid {uid}) "
        "was deleted")
    assert capture(lab) == {"programs": [], "maps": {}, "pins": []}

