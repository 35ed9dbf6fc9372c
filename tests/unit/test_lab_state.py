"""lab/layout.py and lab/state.py: names of what a lab makes, lab.json round trip, and the
Kubernetes-shaped cluster/ export the agents read."""

from __future__ import annotations

import os
import textwrap

import pytest
import yaml

from nodeagent.errors import ConfigError, LabError
from nodeagent.kube.objects import parse_documents
from nodeagent.lab import ipam, layout, spec
from nodeagent.lab.layout import Layout
from nodeagent.lab.state import LabRecord, Runtime, StateDir, cluster_documents
from nodeagent.model import Model

LAB = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, command: [sleep, infinity]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec: {hosts: [web]}
"""


def record(tmp_path=None) -> LabRecord:
    desired = spec.load(parse_documents(textwrap.dedent(LAB), "lab.yaml"))
    counter = iter(range(1, 100))
    alloc = ipam.allocate(desired, new_uid=lambda: f"uid-{next(counter)}")
    return LabRecord("t1", "/cg", False, desired.objects, alloc, supervisor_pid=42)


def test_names_carry_the_lab_name_and_stay_unambiguous():
    lay = Layout("t1", "/sys/fs/cgroup/unified")
    assert lay.fabric_netns == "t1-fabric"
    assert lay.node_netns("node1") == "t1-n-node1"
    assert lay.pod_netns("shop", "web-0") == "t1-p-shop-web-0"
    # "a-b"/"c" and "a"/"b-c" must not share a netns: a dash in the namespace adds a hash.
    assert lay.pod_netns("a-b", "c") != lay.pod_netns("a", "b-c")
    assert lay.pod_netns("a-b", "c") == f"t1-p-a-b-c-{layout.short_hash('a-b/c')}"
    long = lay.pod_netns("shop", "x" * 60)
    assert len(long) == layout.NETNS_MAX and long.startswith("t1-p-shop-xxx")
    assert lay.pod_cgroup("node1", "u-1") == "/sys/fs/cgroup/unified/nodeagent-t1/node1/kubepods/podu-1"
    assert lay.system_cgroup("node1") == "/sys/fs/cgroup/unified/nodeagent-t1/node1/system"
    assert lay.hosts_file("t1-p-shop-web-0") == "/etc/netns/t1-p-shop-web-0/hosts"
    assert lay.state_dir == "/run/nodeagent/t1" and lay.node_bpffs("n") == "/sys/fs/bpf/nodeagent-t1/n"
    assert len(layout.host_veth("a-very-long-namespace", "and-a-long-pod-name")) <= 15


@pytest.mark.parametrize("name", ["nalab", "t1", "a2345678"])
def test_valid_lab_names(name):
    assert layout.check_name(name) == name


@pytest.mark.parametrize("name", ["", "1lab", "Lab", "a23456789", "a-b"])
def test_invalid_lab_names_are_config_errors(name):
    with pytest.raises(ConfigError, match=r"must match \[a-z\]\[a-z0-9\]\{0,7\}"):
        layout.check_name(name)


def test_default_name_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(layout.NAME_ENV, raising=False)
    assert layout.default_name() == "nalab"
    monkeypatch.setenv(layout.NAME_ENV, "mine")
    assert layout.default_name() == "mine"


def test_lab_json_round_trip():
    rec = record()
    again = LabRecord.from_json(rec.to_json())
    assert again.to_json() == rec.to_json()
    assert list(again.desired.pods) == ["shop/web-0", "shop/web-1"]


def test_cluster_documents_look_like_an_api_server_and_build_the_model():
    rec = record()
    runtime = Runtime(pods={"shop/web-0": {"phase": "Running", "reason": "", "containers": {
        "c": {"pid": 7, "restarts": 2, "state": "running", "exit_code": 1}}}})
    docs = cluster_documents(rec, runtime)
    assert sorted(docs) == ["deployment.apps/shop/web.yaml", "namespace/default.yaml", "namespace/shop.yaml",
                            "node/node1.yaml", "node/node2.yaml", "pod/shop/web-0.yaml", "pod/shop/web-1.yaml",
                            "service/shop/web.yaml", "virtualservice.networking.istio.io/shop/web.yaml"]
    pod = docs["pod/shop/web-0.yaml"]
    assert pod["metadata"] == {"labels": {"app": "web"}, "name": "web-0", "namespace": "shop", "uid": "uid-1",
                               "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"}]}
    assert pod["spec"]["nodeName"] == "node1"
    assert pod["status"] == {"phase": "Running", "podIP": "10.244.1.2", "podIPs": [{"ip": "10.244.1.2"}],
                             "hostIP": "172.30.0.2", "containerStatuses": [
                                 {"name": "c", "ready": True, "restartCount": 2, "state": {"running": {}}}]}
    assert docs["pod/shop/web-1.yaml"]["status"]["phase"] == "Pending"
    assert docs["node/node2.yaml"]["spec"] == {"podCIDR": "10.244.2.0/24", "podCIDRs": ["10.244.2.0/24"]}
    assert docs["service/shop/web.yaml"]["spec"]["clusterIP"] == "10.96.0.10"
    assert docs["virtualservice.networking.istio.io/shop/web.yaml"]["spec"] == {"hosts": ["web"]}
    from nodeagent.kube.objects import object_from_dict
    model = Model.build(object_from_dict(b, p) for p, b in docs.items())
    web0 = model.pods[("shop", "web-0")]
    assert (web0.ip, web0.node, web0.uid, model.is_meshed(web0)) == ("10.244.1.2", "node1", "uid-1", True)
    assert [p.name for p in model.endpoints(model.services[("shop", "web")])] == ["web-0"]
    assert [o.name for o in model.resources["VirtualService"]] == ["web"]


def test_state_dir_save_load_export_and_lock(tmp_path):
    lay = Layout("t1", "/cg", run_root=str(tmp_path))
    state = StateDir(lay)
    with pytest.raises(LabError, match="no lab named t1 is up"):
        state.load()
    state.create()
    with pytest.raises(LabError, match="lab t1 is already up"):
        state.create()
    rec = record()
    with state.lock():
        state.save(rec)
        state.export_cluster(rec, Runtime())
    assert state.load().to_json() == rec.to_json()
    path = os.path.join(lay.cluster_dir, "pod", "shop", "web-0.yaml")
    with open(path) as f:
        assert yaml.safe_load(f)["status"]["phase"] == "Pending"
    stale = os.path.join(lay.cluster_dir, "pod", "shop", "gone.yaml")
    with open(stale, "w") as f:
        f.write("{}")
    before = os.stat(path).st_mtime_ns
    state.export_cluster(rec, Runtime())
    assert not os.path.exists(stale)
    assert os.stat(path).st_mtime_ns == before  # unchanged files are not rewritten
    assert sorted(os.listdir(lay.state_dir)) == ["agents", "cluster", "lab.json", "logs"]


def test_lab_status_shows_each_nodes_waypoint():
    from nodeagent.lab.status import _envoy

    running = {"enabled": True, "envoy": {"running": True, "pid": 42, "restarts": 1}, "inSync": True,
               "accepted": "7", "errors": 0}
    assert _envoy(running) == "envoy pid 42, 1 restarts, config 7 in sync"
    down = {**running, "envoy": {"running": False, "pid": None, "restarts": 3}, "inSync": False, "errors": 2}
    assert _envoy(down) == "ENVOY NOT RUNNING, 3 restarts, syncing, 2 config errors"
    assert (_envoy({"enabled": False}), _envoy(None)) == ("off", "-")
