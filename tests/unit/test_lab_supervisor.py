"""lab/supervisor.py and lab/processes.py without root: what runs where with which
environment, restart backoff and policies, pod phases; lab/lifecycle.py's merge and
change checks for `apply`."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import parse_documents
from nodeagent.lab import ipam, lifecycle, services, spec
from nodeagent.lab.layout import Layout
from nodeagent.lab.state import LabRecord, StateDir
from nodeagent.lab.supervisor import Supervisor, Unit, is_supervisor, pod_phase, pod_reason

LAB = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web, tier: front}}
spec:
  nodeName: node2
  serviceAccountName: web-sa
  restartPolicy: OnFailure
  containers:
  - name: app
    command: [nodeagent, lab, echo]
    args: [--port, "8080"]
    env:
    - {name: MODE, value: fast}
    - name: HOST_IP
      valueFrom: {fieldRef: {fieldPath: status.hostIP}}
"""


def objects(text: str = LAB):
    return parse_documents(textwrap.dedent(text), "lab.yaml")


def make_record(agents: bool = True) -> LabRecord:
    desired = spec.load(objects())
    alloc = ipam.allocate(desired, new_uid=lambda: "uid-1")
    return LabRecord("t1", "/cg", agents, desired.objects, alloc, supervisor_pid=0)


def supervisor(tmp_path, agents: bool = True) -> Supervisor:
    state = StateDir(Layout("t1", "/cg", run_root=str(tmp_path)))
    state.create()
    state.save(make_record(agents))
    sup = Supervisor(state)
    assert sup.reload() is True
    return sup


def test_container_unit_runs_in_the_pod_netns_cgroup_and_env(tmp_path):
    sup = supervisor(tmp_path)
    unit = sup.units["pod:shop/web/app"]
    assert unit.argv == ["ip", "netns", "exec", "t1-p-shop-web", "nodeagent", "lab", "echo", "--port", "8080"]
    assert unit.cgroup == "/cg/nodeagent-t1/node2/kubepods/poduid-1"
    assert unit.log_path == f"{tmp_path}/t1/logs/shop_web_app.log"
    assert unit.restart_policy == "OnFailure"
    env = dict(unit.env)
    assert env.pop("PATH").startswith(os.path.dirname(sys.executable) + ":")
    env.pop("HOME")
    assert env == {"LANG": "C.UTF-8", "POD_NAME": "web", "POD_NAMESPACE": "shop", "POD_IP": "10.244.2.2",
                   "POD_UID": "uid-1", "NODE_NAME": "node2", "POD_LABELS": json.dumps({"app": "web", "tier": "front"}),
                   "SERVICE_ACCOUNT": "web-sa", "MODE": "fast", "HOST_IP": "172.30.0.3"}


def test_agent_units_run_nodeagent_run_per_node_in_the_node_netns(tmp_path):
    sup = supervisor(tmp_path)
    assert sorted(k for k in sup.units if k.startswith("agent:")) == ["agent:node1", "agent:node2"]
    agent = sup.units["agent:node1"]
    assert agent.argv == ["nsenter", "--net=/run/netns/t1-n-node1", "--", "nodeagent", "run", "--node", "node1",
                          "--source", f"files:{tmp_path}/t1/cluster",
                          "--cgroup", "/cg/nodeagent-t1/node1/kubepods",
                          "--bpffs", "/sys/fs/bpf/nodeagent-t1/node1",
                          "--admin-socket", f"{tmp_path}/t1/agents/node1.sock",
                          "--waypoint-dir", f"{tmp_path}/t1/waypoint/node1",
                          "--ca-address", "172.30.0.2:15012", "--ca-root-cert", f"{tmp_path}/t1/root-cert.pem",
                          "--ca-token-file", f"{tmp_path}/t1/tokens/node1.token", "--trust-domain", "cluster.local",
                          "--identity-dir", f"{tmp_path}/t1/identity/node1",
                          "--flow-log", f"{tmp_path}/t1/logs/flows-node1.log"]
    assert agent.cgroup == "/cg/nodeagent-t1/node1/system"
    assert agent.restart_policy == "Always"


def test_the_ca_runs_first_on_the_first_node_on_its_fabric_ip(tmp_path):
    sup = supervisor(tmp_path)
    assert list(sup.units)[0] == "ca"
    ca = sup.units["ca"]
    assert ca.argv == ["nsenter", "--net=/run/netns/t1-n-node1", "--", "nodeagent", "ca",
                       "--listen", "172.30.0.2:15012", "--trust-domain", "cluster.local",
                       "--state-dir", f"{tmp_path}/t1/ca", "--tokens", f"{tmp_path}/t1/tokens/ca-tokens.yaml",
                       "--source", f"files:{tmp_path}/t1/cluster"]
    assert ca.cgroup == "/cg/nodeagent-t1/node1/system" and ca.log_path == f"{tmp_path}/t1/logs/ca.log"
    assert ca.restart_policy == "Always"
    assert "ca" not in supervisor(tmp_path / "other", agents=False).units


def test_no_agents_lab_has_only_containers(tmp_path):
    assert list(supervisor(tmp_path, agents=False).units) == ["pod:shop/web/app"]


class Exited:
    def __init__(self, code: int):
        self.returncode, self.pid = code, 99

    def poll(self):
        return self.returncode


def test_restart_backoff_doubles_up_to_the_cap_and_resets_after_a_long_run():
    sup = Supervisor(state=None)
    unit = Unit(["x"], {}, "/cg", "/log")
    delays = []
    for now in range(0, 400, 50):
        unit.proc, unit.started_at = Exited(1), float(now)
        sup._exited("k", unit, float(now) + 1)
        delays.append(unit.next_start - (now + 1))
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    unit.proc, unit.started_at = Exited(1), 1000.0
    sup._exited("k", unit, 1100.0)  # ran 100 s: back to the first delay
    assert unit.next_start == 1101.0 and unit.state() == "waiting"


@pytest.mark.parametrize("policy, code, finished", [
    ("Always", 0, False), ("Always", 1, False), ("OnFailure", 0, True), ("OnFailure", 2, False),
    ("Never", 0, True), ("Never", 2, True)])
def test_restart_policies(policy, code, finished):
    unit = Unit(["x"], {}, "/cg", "/log", policy, proc=Exited(code))
    Supervisor(state=None)._exited("k", unit, 5.0)
    assert (unit.finished, unit.exit_code, unit.proc) == (finished, code, None)


def unit(state: str, starts: int = 1, code: int | None = None) -> Unit:
    u = Unit(["x"], {}, "/cg", "/log", starts=starts, exit_code=code, finished=state == "terminated")
    u.proc = Exited(0) if state == "running" else None
    return u


def test_pod_phase_and_reason():
    assert (pod_phase([unit("running"), unit("running")]), pod_reason([unit("running")])) == ("Running", "")
    assert pod_phase([unit("waiting", starts=0)]) == "Pending"
    assert pod_reason([unit("waiting", starts=0)]) == ""  # not started yet: ContainerCreating
    crashing = [unit("running"), unit("waiting", starts=3)]
    assert (pod_phase(crashing), pod_reason(crashing)) == ("Pending", "CrashLoopBackOff")
    assert pod_phase([unit("terminated", code=0), unit("terminated", code=0)]) == "Succeeded"
    assert pod_phase([unit("terminated", code=0), unit("terminated", code=3)]) == "Failed"
    assert pod_phase([unit("running"), unit("terminated", code=3)]) == "Running"


def test_is_supervisor_checks_the_command_line():
    assert is_supervisor(0, "t1") is False
    assert is_supervisor(os.getpid(), "t1") is False  # alive, but not a supervisor


def test_merge_replaces_by_key_and_appends_new_objects():
    old = objects(LAB + "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
    new = objects("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {a: b}}\n---\n"
                  "apiVersion: v1\nkind: Namespace\nmetadata: {name: extra}\n")
    merged = lifecycle.merge(old, new)
    assert [(o.kind, o.name, o.labels) for o in merged] == [
        ("Pod", "web", {"app": "web", "tier": "front"}), ("Namespace", "shop", {"a": "b"}),
        ("Namespace", "extra", {})]


def test_merge_refuses_an_object_twice_in_the_applied_file():
    twice = objects("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n"
                    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {a: b}}\n")
    with pytest.raises(ConfigError, match=r"lab.yaml#2 \(Namespace shop\): defined twice \(also at lab.yaml#1\)"):
        lifecycle.merge(objects(), twice)


def test_apply_may_relabel_a_pod_but_not_change_or_remove_it():
    old = make_record()
    relabelled = spec.load(objects(LAB.replace("tier: front", "tier: back")))
    lifecycle._check_changes(old, relabelled)
    changed = spec.load(objects(LAB.replace('"8080"', '"9090"')))
    with pytest.raises(ConfigError, match=r"lab.yaml#1 \(Pod shop/web\): a running pod's spec cannot change"):
        lifecycle._check_changes(old, changed)
    with pytest.raises(ConfigError, match=r"removing a pod from a running lab is not supported"):
        lifecycle._check_changes(old, spec.load([]))


def test_publish_waits_for_a_reload_when_apply_changed_the_lab(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(services, "sync",
                        lambda layout, desired, alloc, running, extra=(): synced.append(sorted(running)))
    sup = supervisor(tmp_path, agents=False)
    runtime_json = sup.state.layout.runtime_json
    sup.publish()
    assert os.path.exists(runtime_json) and synced == [[]]
    os.unlink(runtime_json)
    time.sleep(0.01)
    sup.state.save(make_record(agents=False))  # what `apply` does under the lock
    sup.publish()  # with the old record: must not overwrite the newer state
    assert not os.path.exists(runtime_json) and synced == [[]]
    assert sup.reload() is True
    sup.publish()  # same pods, but a new lab.json: the service rules are made again
    assert os.path.exists(runtime_json) and synced == [[], []]
    sup.publish()
    assert synced == [[], []]
