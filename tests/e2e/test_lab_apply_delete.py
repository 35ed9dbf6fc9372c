"""`lab apply` and `lab delete` with -f as kubectl reads it (issue 14, case 1): several
-f, directories (sorted, subdirectories only with -R) and `-` for standard input, the
later file winning; a malformed file refuses the whole command; `lab delete` prints
kubectl's lines, goes through the lab's record (nothing comes back at the next apply),
stops and removes deleted pods (processes, netns, cgroup, hosts files) and returns once
both agents have dropped what was deleted; objects not found are kubectl's NotFound
errors (exit 1) unless --ignore-not-found; nodes cannot be deleted. And a DestinationRule
in a client's own namespace takes precedence for that client. One lab with agents
(waypoints included) for the module."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from test_mtls import Mesh, eventually

from nodeagent.digests import spec_digest

pytestmark = pytest.mark.timeout(600)

LAB_YAML = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec:
  nodeName: node1
  containers:
  - {name: main, command: [sleep, infinity]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web, version: v1}}
spec:
  nodeName: node2
  containers:
  - {name: echo, command: [nodeagent, lab, echo, --port, "8080", --tcp-port, "9000", --quiet]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 8080}]}
"""

EXTRA = """apiVersion: v1
kind: Namespace
metadata: {name: extra, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: lone, namespace: extra, labels: {app: lone}}
spec:
  nodeName: node2
  containers:
  # sh leaves a child behind when the supervisor stops it: delete must kill it too
  - {name: main, command: [sh, -c, "sleep infinity & wait"]}
"""
ALLOW = {"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
         "rules": [{"from": [{"source": {"namespaces": ["shop"]}}]}]}
FIRST_ROUTE = {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}], "timeout": "5s"}]}
LATER_ROUTE = {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}}], "timeout": "7s"}]}
RULE = {"host": "web", "trafficPolicy": {"connectionPool": {"http": {"http2MaxRequests": 100}}}}
SUB_POLICY = {"selector": {"matchLabels": {"app": "nowhere"}}, "action": "DENY", "rules": [{}]}


def doc(api: str, kind: str, name: str, spec: dict, namespace: str = "shop") -> str:
    return json.dumps({"apiVersion": api, "kind": kind, "metadata": {"name": name, "namespace": namespace},
                       "spec": spec}) + "\n"


ISTIO = doc("security.istio.io/v1", "AuthorizationPolicy", "allow-web", ALLOW) + "---\n" + \
    doc("networking.istio.io/v1", "VirtualService", "web", FIRST_ROUTE)
LATER = doc("networking.istio.io/v1", "VirtualService", "web", LATER_ROUTE)
STDIN = doc("networking.istio.io/v1", "DestinationRule", "web", RULE)
SUB = doc("security.istio.io/v1", "AuthorizationPolicy", "sub-policy", SUB_POLICY)
NODES = ("node1", "node2")


@pytest.fixture(scope="module")
def mesh(lab_factory_module, tmp_path_factory):
    lab = lab_factory_module(LAB_YAML, agents=True, timeout=90)
    m = Mesh(lab)
    m.files = tmp_path_factory.mktemp("files")
    (m.files / "dir" / "sub").mkdir(parents=True)
    (m.files / "dir" / "20-istio.yaml").write_text(ISTIO)
    (m.files / "dir" / "10-extra.yml").write_text(EXTRA)
    (m.files / "dir" / "README.md").write_text("not read: not *.yaml, *.yml or *.json\n")
    (m.files / "dir" / "sub" / "policy.yaml").write_text(SUB)
    (m.files / "later.yaml").write_text(LATER)
    return m


def lab_json(mesh) -> bytes:
    return (mesh.lab.state_dir / "lab.json").read_bytes()


def held(mesh, node: str) -> dict:
    """What the node's agent holds: policies and waypoint resources in force, enrolled pods."""
    status = mesh.status(node)
    return {"policies": status["policy"]["resources"], "waypoint": status["waypoint"]["resources"],
            "pods": sorted(f"{p['namespace']}/{p['name']}" for p in status["pods"])}


def test_apply_reads_several_files_a_directory_and_standard_input_and_the_later_file_wins(mesh):
    proc = mesh.lab.run("apply", "-f", mesh.files / "dir", "-f", mesh.files / "later.yaml", "-f", "-",
                        "--timeout", "60", input=STDIN)
    lines = proc.stdout.splitlines()
    # dir's files sorted (10-extra.yml, 20-istio.yaml; not README.md, not sub/ without -R),
    # then later.yaml (its VirtualService replaces 20-istio.yaml's where it stood), then stdin.
    assert lines[:5] == ["Namespace extra created", "Pod extra/lone created",
                         "AuthorizationPolicy shop/allow-web created", "VirtualService shop/web created",
                         "DestinationRule shop/web created"], proc
    assert sorted(line for line in lines if line.endswith(" in force")) == [
        "AuthorizationPolicy shop/allow-web in force", "DestinationRule shop/web in force",
        "VirtualService shop/web in force"], proc
    for node in NODES:
        now = held(mesh, node)
        assert now["waypoint"]["VirtualService shop/web"] == spec_digest(LATER_ROUTE), now
        assert now["policies"]["AuthorizationPolicy shop/allow-web"] == spec_digest(ALLOW), now
        assert "AuthorizationPolicy shop/sub-policy" not in now["policies"], now
    assert "extra/lone" in held(mesh, "node2")["pods"]
    cluster = mesh.lab.state_dir / "cluster"
    assert yaml.safe_load((cluster / "virtualservice.networking.istio.io/shop/web.yaml").read_text())["spec"] == \
        LATER_ROUTE
    assert not (cluster / "authorizationpolicy.security.istio.io/shop/sub-policy.yaml").exists()


def test_malformed_yaml_in_any_file_refuses_the_whole_command_and_changes_nothing(mesh):
    bad = mesh.files / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Namespace\nmetadata:\n\tname: broken\n")
    before = lab_json(mesh)
    for command in ("apply", "delete"):
        proc = mesh.lab.run(command, "-f", mesh.files / "later.yaml", "-f", bad, check=False)
        assert proc.returncode == 1 and proc.stdout == "", proc
        assert proc.stderr.startswith("nodeagent: error: bad.yaml:4: malformed YAML: found character '\\t' "
                                      "that cannot start any token"), proc.stderr
        assert lab_json(mesh) == before


def test_deleting_a_node_is_refused_and_changes_nothing(mesh):
    node = mesh.files / "node.yaml"
    node.write_text("apiVersion: v1\nkind: Node\nmetadata: {name: node1}\n---\n" + LATER)
    before = lab_json(mesh)
    proc = mesh.lab.run("delete", "-f", node, check=False)
    assert (proc.returncode, proc.stdout) == (1, ""), proc
    assert proc.stderr == (f"nodeagent: error: node.yaml#1 (Node node1): a lab's nodes cannot be deleted: they are "
                           f"its shape (nodeagent lab down --name {mesh.lab.name}, then lab up with the nodes you "
                           "want)\n")
    assert lab_json(mesh) == before


def pod_traces(mesh, key: str) -> dict:
    pod = next(p for p in mesh.lab.status()["pods"] if f"{p['namespace']}/{p['name']}" == key)
    namespace, name = key.split("/")
    netns = f"{mesh.lab.name}-p-{namespace}-{name}"
    cgroup = mesh.lab.pod_cgroup(pod["node"], pod["uid"])
    with open(os.path.join(cgroup, "cgroup.procs")) as f:
        pids = [int(line) for line in f if line.strip()]
    return {"pids": pids, "paths": [f"/run/netns/{netns}", f"/etc/netns/{netns}", cgroup]}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_delete_removes_the_objects_stops_the_pods_and_the_agents_drop_them(mesh):
    traces = pod_traces(mesh, "extra/lone")
    assert len(traces["pids"]) == 2 and all(os.path.exists(p) for p in traces["paths"]), traces  # sh and sleep
    proc = mesh.lab.run("delete", "-f", mesh.files / "dir", "-f", "-", "--timeout", "60", input=STDIN)
    assert (proc.stdout.splitlines(), proc.stderr) == ([
        'namespace "extra" deleted', 'pod "lone" deleted', 'authorizationpolicy.security.istio.io "allow-web" deleted',
        'virtualservice.networking.istio.io "web" deleted', 'destinationrule.networking.istio.io "web" deleted'],
        ""), proc
    # Returned once stopped and removed, and once both agents let go: checked at once, no polling.
    assert [pid for pid in traces["pids"] if alive(pid)] == []
    assert [p for p in traces["paths"] if os.path.exists(p)] == []
    for node in NODES:
        now = held(mesh, node)
        assert "AuthorizationPolicy shop/allow-web" not in now["policies"], now
        assert [k for k in now["waypoint"] if k.endswith(" shop/web")] == [], now
        assert "extra/lone" not in now["pods"], now
    assert [f"{p['namespace']}/{p['name']}" for p in mesh.lab.status()["pods"]] == ["shop/client", "shop/web"]
    cluster = mesh.lab.state_dir / "cluster"
    assert sorted(os.listdir(cluster / "namespace")) == ["default.yaml", "shop.yaml"]
    assert not (cluster / "virtualservice.networking.istio.io/shop/web.yaml").exists()
    # The next apply brings none of it back: delete went through the lab's record.
    mesh.lab.run("apply", "-f", "-", input=doc("v1", "Service", "other", {"selector": {"app": "web"},
                                                                          "ports": [{"port": 80}]}))
    assert [f"{p['namespace']}/{p['name']}" for p in mesh.lab.status()["pods"]] == ["shop/client", "shop/web"]
    assert not (cluster / "virtualservice.networking.istio.io/shop/web.yaml").exists()
    assert "AuthorizationPolicy shop/allow-web" not in held(mesh, "node1")["policies"]


def test_deleting_what_the_lab_does_not_have_is_kubectls_not_found_unless_ignored(mesh):
    proc = mesh.lab.run("delete", "-f", mesh.files / "later.yaml", "-f", mesh.files / "dir", "-R", "-f", "-",
                        input=doc("v1", "Service", "other", {"ports": [{"port": 80}]}), check=False)
    assert (proc.returncode, proc.stdout.splitlines()) == (1, ['service "other" deleted']), proc
    where = 'Error from server (NotFound): error when deleting'
    # In input order, an object given twice standing where it came first (20-istio.yaml's
    # VirtualService replaced later.yaml's).
    assert proc.stderr.splitlines() == [
        f'{where} "20-istio.yaml": virtualservices.networking.istio.io "web" not found',
        f'{where} "10-extra.yml": namespaces "extra" not found',
        f'{where} "10-extra.yml": pods "lone" not found',
        f'{where} "20-istio.yaml": authorizationpolicies.security.istio.io "allow-web" not found',
        f'{where} "policy.yaml": authorizationpolicies.security.istio.io "sub-policy" not found'], proc.stderr
    before = lab_json(mesh)
    ignored = mesh.lab.run("delete", "-f", mesh.files / "dir", "--ignore-not-found")
    assert (ignored.stdout, ignored.stderr) == ("", "")
    assert lab_json(mesh) == before


TEAM = """apiVersion: v1
kind: Namespace
metadata: {name: team, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: team}
spec:
  nodeName: node1
  containers:
  - {name: main, command: [sleep, infinity]}
---
"""
ROUTE_V1 = {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web", "subset": "v1"}}]}]}
SHOP_RULE = {"host": "web", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}
# The team's own rule for web: its v1 selects no pod, so its clients get 503 where shop's get 200.
TEAM_RULE = {"host": "web.shop.svc.cluster.local", "subsets": [{"name": "v1", "labels": {"version": "none"}}]}


def codes(mesh, client: str, n: int = 10) -> dict:
    proc = mesh.lab.exec(client, "nodeagent", "lab", "request", "http://web.shop:8080/", "-n", str(n), "--timeout",
                         "5", "--output", "json", check=False, timeout=120)
    assert proc.returncode in (0, 1) and proc.stdout, proc
    return json.loads(proc.stdout)["codes"]


def test_a_destination_rule_in_the_clients_namespace_takes_precedence_for_its_clients(mesh):
    """Istio looks for a client's DestinationRule in its own namespace first. One waypoint
    serves both clients of node1: team's get routes and clusters of their own (matched by
    their identity's namespace), with team's rule; shop's keep shop's rule."""
    path = mesh.files / "team.yaml"
    path.write_text(TEAM + doc("networking.istio.io/v1", "VirtualService", "web", ROUTE_V1) + "---\n"
                    + doc("networking.istio.io/v1", "DestinationRule", "web", SHOP_RULE) + "---\n"
                    + doc("networking.istio.io/v1", "DestinationRule", "web", TEAM_RULE, namespace="team"))
    proc = mesh.lab.run("apply", "-f", path, "--timeout", "60")
    assert sorted(line for line in proc.stdout.splitlines() if line.endswith(" in force")) == [
        "DestinationRule shop/web in force", "DestinationRule team/web in force", "VirtualService shop/web in force"]
    assert codes(mesh, "shop/client") == {"200": 10}
    assert codes(mesh, "team/client") == {"503": 10}
    deleted = mesh.lab.run("delete", "-f", path, "--timeout", "60")
    assert deleted.stdout.splitlines() == [
        'namespace "team" deleted', 'pod "client" deleted', 'virtualservice.networking.istio.io "web" deleted',
        'destinationrule.networking.istio.io "web" deleted', 'destinationrule.networking.istio.io "web" deleted']
    assert codes(mesh, "shop/client") == {"200": 10}  # back to L4, straight to the pod
