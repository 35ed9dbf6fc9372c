"""`nodeagent status --kube` (nodeagent/agent/kubestatus.py, issue 13): the summary and its
text and JSON from recorded API objects (plain dicts shaped as kube-apiserver 1.34 answers:
a DaemonSet mid rolling update, its pods, the Nodes, Warning Events), the exit status, and
the command line. Reading them from a real API server is the e2e tier's."""

from __future__ import annotations

import json

import pytest

from nodeagent.agent import kubestatus
from nodeagent.cli import build_parser, main
from nodeagent.errors import ConfigError

NOW = 1_764_691_200.0  # 2025-12-02T16:00:00Z
DS_UID = "5f0c8a4e-0000-4000-8000-000000000001"


def stamp(seconds_ago: float) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(NOW - seconds_ago, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def daemonset(desired=3, ready=2, updated=3, available=2, node_selector=None) -> dict:
    template = {"containers": [{"name": "agent", "image": "localhost/nodeagent:0.1.0"}]}
    if node_selector:
        template["nodeSelector"] = node_selector
    return {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "nodeagent", "namespace": "nodeagent-system", "uid": DS_UID, "generation": 2},
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "nodeagent"}},
                     "template": {"spec": template}},
            "status": {"desiredNumberScheduled": desired, "currentNumberScheduled": desired, "numberReady": ready,
                       "updatedNumberScheduled": updated, "numberAvailable": available, "observedGeneration": 2}}


def pod(name, node, ready=True, phase="Running", restarts=0, age=600, waiting=None, owner=DS_UID,
        deleting=False) -> dict:
    state = {"waiting": waiting} if waiting else {"running": {"startedAt": stamp(age)}}
    meta = {"name": name, "namespace": "nodeagent-system", "creationTimestamp": stamp(age),
            "labels": {"app.kubernetes.io/name": "nodeagent"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "nodeagent", "uid": owner,
                                 "controller": True, "blockOwnerDeletion": True}]}
    if deleting:
        meta["deletionTimestamp"] = stamp(1)
    conditions = [{"type": "PodScheduled", "status": "True"},
                  {"type": "Ready", "status": "True" if ready else "False",
                   **({} if ready else {"reason": "ContainersNotReady",
                                        "message": "containers with unready status: [agent]"})}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "localhost/nodeagent:0.1.0"}]},
            "status": {"phase": phase, "conditions": conditions,
                       "containerStatuses": [{"name": "agent", "ready": ready, "restartCount": restarts,
                                              "image": "localhost/nodeagent:0.1.0", "state": state}]}}


def node(name, labels=None) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels or {}}}


def warning(pod_name, reason, message, count=1, seconds_ago=30) -> dict:
    return {"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": reason, "message": message,
            "count": count, "lastTimestamp": stamp(seconds_ago),
            "metadata": {"name": f"{pod_name}.18", "namespace": "nodeagent-system"},
            "involvedObject": {"kind": "Pod", "namespace": "nodeagent-system", "name": pod_name}}


def objects(**kw) -> dict:
    base = {"namespace": "nodeagent-system", "name": "nodeagent", "daemonset": daemonset(),
            "pods": [pod("nodeagent-a1", "kn1"), pod("nodeagent-b2", "kn2", ready=False, age=40),
                     pod("nodeagent-old", "kn1", owner="an-older-daemonset")],
            "nodes": [node("kn1"), node("kn2"), node("kn3")],
            "events": [warning("nodeagent-b2", "Unhealthy", "Readiness probe failed: HTTP probe failed with "
                                                            "statuscode: 503", count=7, seconds_ago=2),
                       warning("nodeagent-b2", "FailedMount", "configmap \"nodeagent-ca-root-cert\" not found",
                               count=2, seconds_ago=35),
                       warning("nodeagent-a1", "BackOff", "Back-off restarting failed container", count=1),
                       {**warning("nodeagent-a1", "Started", "x"), "type": "Normal"}]}
    base.update(kw)
    return base


def test_a_rolling_update_with_one_node_not_ready_and_one_without_an_agent():
    summary = kubestatus.summarise(objects(), NOW)
    assert summary["daemonset"] == {"namespace": "nodeagent-system", "name": "nodeagent", "desired": 3, "current": 3,
                                    "ready": 2, "updated": 3, "available": 2, "generation": 2,
                                    "observed_generation": 2, "image": "localhost/nodeagent:0.1.0"}
    assert summary["nodes"] == [
        {"node": "kn1", "pod": "nodeagent-a1", "phase": "Running", "ready": True, "reason": "", "restarts": 0,
         "age_seconds": 600, "image": "localhost/nodeagent:0.1.0", "warnings": 1},
        {"node": "kn2", "pod": "nodeagent-b2", "phase": "Running", "ready": False,
         "reason": "Unhealthy: Readiness probe failed: HTTP probe failed with statuscode: 503", "restarts": 0,
         "age_seconds": 40, "image": "localhost/nodeagent:0.1.0", "warnings": 9},
        {"node": "kn3", "pod": None, "phase": None, "ready": False, "reason": "no agent pod", "restarts": 0,
         "age_seconds": None, "image": None, "warnings": 0},
    ]  # nodeagent-old belongs to another DaemonSet: not this one's agent
    assert summary["ok"] is False and summary["nodes_listed"] is True
    assert summary["problems"] == [
        "node kn2: nodeagent-b2: Unhealthy: Readiness probe failed: HTTP probe failed with statuscode: 503",
        "node kn3: no agent pod", "DaemonSet nodeagent-system/nodeagent: 2 of 3 agents ready"]


def test_the_text_is_one_line_per_node_after_the_daemonsets_counts():
    text = kubestatus.render(kubestatus.summarise(objects(), NOW), "text")
    assert text.splitlines() == [
        "DaemonSet nodeagent-system/nodeagent: desired 3, ready 2, updated 3, available 2 "
        "(image localhost/nodeagent:0.1.0)",
        "",
        "NODE  AGENT POD     PHASE    READY  RESTARTS  AGE  IMAGE                      WARNINGS  NOT READY BECAUSE",
        "kn1   nodeagent-a1  Running  yes           0  10m  localhost/nodeagent:0.1.0         1",
        "kn2   nodeagent-b2  Running  no            0  40s  localhost/nodeagent:0.1.0         9  Unhealthy: Readiness "
        "probe failed: HTTP probe failed with statuscode: 503",
        "kn3   -             -        no            0  -    -                                 0  no agent pod",
        "",
        "NOT OK: node kn2: nodeagent-b2: Unhealthy: Readiness probe failed: HTTP probe failed with statuscode: 503",
        "NOT OK: node kn3: no agent pod",
        "NOT OK: DaemonSet nodeagent-system/nodeagent: 2 of 3 agents ready",
    ]


def test_json_is_the_summary():
    summary = kubestatus.summarise(objects(), NOW)
    assert json.loads(kubestatus.render(summary, "json")) == summary


def test_every_node_ready_is_ok():
    summary = kubestatus.summarise(objects(daemonset=daemonset(desired=2, ready=2, available=2),
                                           pods=[pod("nodeagent-a1", "kn1", restarts=3, age=3 * 86400),
                                                 pod("nodeagent-b2", "kn2", age=7300)],
                                           nodes=[node("kn1"), node("kn2")], events=[]), NOW)
    assert summary["ok"] and summary["problems"] == []
    assert [(r["restarts"], kubestatus.age(r["age_seconds"])) for r in summary["nodes"]] == [(3, "3d"), (0, "2h")]
    assert kubestatus.render_text(summary).endswith("\nok: every node has a Ready agent\n")


@pytest.mark.parametrize("agent, reason", [
    (pod("p", "kn1", ready=False, phase="Pending", waiting={"reason": "ContainerCreating"}),
     "agent waiting: ContainerCreating"),
    (pod("p", "kn1", ready=False, waiting={"reason": "CrashLoopBackOff",
                                           "message": "back-off 40s restarting failed container=agent"}),
     "agent waiting: CrashLoopBackOff: back-off 40s restarting failed container=agent"),
    (pod("p", "kn1", deleting=True), "terminating"),  # Ready until killed, but going
    (pod("p", "kn1", ready=False), "ContainersNotReady: containers with unready status: [agent]"),
])
def test_why_an_agent_is_not_ready(agent, reason):
    summary = kubestatus.summarise(objects(pods=[agent], nodes=[node("kn1")], events=[]), NOW)
    assert [(r["ready"], r["reason"]) for r in summary["nodes"]] == [(False, reason)]


def test_the_newest_failed_probe_says_why_not_other_warnings():
    agent = pod("p", "kn1", ready=False)
    events = [warning("p", "Unhealthy", "Readiness probe failed: HTTP probe failed with statuscode: 503",
                      seconds_ago=20),
              warning("p", "Unhealthy", "Readiness probe failed: Get \"http://10.0.0.1:15020/healthz/ready\": "
                                        "connection refused", seconds_ago=60),
              warning("p", "FailedMount", "MountVolume.SetUp failed", seconds_ago=1)]
    summary = kubestatus.summarise(objects(pods=[agent], nodes=[node("kn1")], events=events), NOW)
    assert [(r["reason"], r["warnings"]) for r in summary["nodes"]] == [
        ("Unhealthy: Readiness probe failed: HTTP probe failed with statuscode: 503", 3)]


def test_the_daemonsets_node_selector_says_which_nodes_need_an_agent():
    summary = kubestatus.summarise(objects(daemonset=daemonset(desired=1, ready=1, available=1,
                                                               node_selector={"mesh": "yes"}),
                                           pods=[pod("nodeagent-a1", "kn1")], events=[],
                                           nodes=[node("kn1", {"mesh": "yes"}), node("kn2")]), NOW)
    assert [r["node"] for r in summary["nodes"]] == ["kn1"] and summary["ok"]


def test_without_permission_to_list_nodes_the_counts_decide():
    summary = kubestatus.summarise(objects(nodes=None, pods=[pod("nodeagent-a1", "kn1")], events=[]), NOW)
    assert [r["node"] for r in summary["nodes"]] == ["kn1"] and not summary["nodes_listed"]
    assert summary["problems"] == ["DaemonSet nodeagent-system/nodeagent: 2 of 3 agents ready"]
    assert "Nodes not listed (no permission to list them)" in kubestatus.render_text(summary)


def test_no_daemonset_says_how_to_install():
    summary = kubestatus.summarise(objects(daemonset=None, pods=[], nodes=None, events=[]), NOW)
    assert not summary["ok"]
    assert kubestatus.render_text(summary) == ("NOT OK: no DaemonSet nodeagent-system/nodeagent: is nodeagent "
                                               "installed (kubectl apply -k daemonset/)?\n")


def test_the_command_line(tmp_path, monkeypatch):
    args = build_parser().parse_args(["status", "--kube", "--kubeconfig", "k", "--json"])
    assert (args.kube, args.kubeconfig, args.output, args.namespace) == (True, "k", "json", "nodeagent-system")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["status", "--kube", "--node", "kn1"])
    assert main(["status", "--kubeconfig", "k"]) == 1  # --kubeconfig without --kube: refused, naming it
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError, match="cannot read"):
        kubestatus.kube_config(str(missing))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigError, match="not running in a pod"):  # no kubeconfig anywhere: in-cluster
        kubestatus.kube_config(None, {"HOME": str(tmp_path)})
