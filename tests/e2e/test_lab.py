"""The lab end to end: a two-node lab from a file with three namespaces, pods, a
Deployment and services; real traffic between pods, through ClusterIPs on both nodes
and by name; `exec`, `apply`, `status` and `down` (including after a crash and after a
failed `up`). Backends run the lab's echo app, which answers with the pod's name."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.timeout(180)

LAB_YAML = """
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
---
apiVersion: v1
kind: Namespace
metadata: {name: front, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: back}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: front, labels: {app: web}}
spec:
  nodeName: n1
  containers:
  - {name: echo, command: [nodeagent, lab, echo, --port, "8080", --tcp-port, "9000", --quiet]}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: front, labels: {app: legacy, istio.io/dataplane-mode: none}}
spec:
  containers:
  - {name: main, command: [sleep, infinity]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: back}
spec:
  clusterIP: 10.96.0.100
  selector: {app: db}
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: back}
spec:
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: back}
spec:
  replicas: 3
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers:
      - name: echo
        command: [nodeagent, lab, echo, --port, "8080", --tcp-port, "9000", --quiet]
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: back, labels: {app: db}}
spec:
  nodeName: n2
  containers:
  - {name: echo, command: [nodeagent, lab, echo, --port, "5432", --tcp-port, "9001", --quiet]}
---
apiVersion: v1
kind: Pod
metadata: {name: tool, namespace: ops}
spec:
  containers:
  - name: main
    command: [sleep, infinity]
    env: [{name: GREETING, value: hello}]
"""

# Placement (file order): web pinned n1; legacy to the emptier n2; api-N round-robin
# n1, n2, n1; db pinned n2; tool to n1 (3 pods each: a tie goes to the first node).
PODS = [
    {"namespace": "back", "name": "api-0", "ip": "10.244.1.3", "node": "n1", "meshed": False},
    {"namespace": "back", "name": "api-1", "ip": "10.244.2.3", "node": "n2", "meshed": False},
    {"namespace": "back", "name": "api-2", "ip": "10.244.1.4", "node": "n1", "meshed": False},
    {"namespace": "back", "name": "db", "ip": "10.244.2.4", "node": "n2", "meshed": False},
    {"namespace": "front", "name": "legacy", "ip": "10.244.2.2", "node": "n2", "meshed": False},
    {"namespace": "front", "name": "web", "ip": "10.244.1.2", "node": "n1", "meshed": True},
    {"namespace": "ops", "name": "tool", "ip": "10.244.1.5", "node": "n1", "meshed": False},
]


def fetch(lab, client: str, url: str, tries: int = 20) -> dict:
    """GET `url` from pod `client` with curl; the echo app's JSON answer."""
    for _ in range(tries):  # a just-started echo may not listen yet
        proc = lab.exec(client, "curl", "-sS", "-m", "5", url, check=False)
        if proc.returncode == 0:
            return json.loads(proc.stdout)
        time.sleep(0.25)
    raise AssertionError(f"{client} -> {url}: curl exited {proc.returncode}: {proc.stderr}")


def test_status_json_is_exact(module_lab):
    status = module_lab.status()
    assert (status["name"], status["agents"], status["supervisor"]["running"]) == (module_lab.name, False, True)
    # A lab without agents has no agent and so no waypoint on its nodes.
    assert status["nodes"] == [{"name": "n1", "fabricIP": "172.30.0.2", "podCIDR": "10.244.1.0/24", "agent": None,
                                "waypoint": None},
                               {"name": "n2", "fabricIP": "172.30.0.3", "podCIDR": "10.244.2.0/24", "agent": None,
                                "waypoint": None}]
    pods = [{k: p[k] for k in ("namespace", "name", "ip", "node", "meshed")} for p in status["pods"]]
    assert pods == PODS
    assert {(p["phase"], p["restarts"]) for p in status["pods"]} == {("Running", 0)}
    assert status["services"] == [
        {"namespace": "back", "name": "api", "clusterIP": "10.96.0.10",
         "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP",
                    "endpoints": ["10.244.1.3:8080", "10.244.2.3:8080", "10.244.1.4:8080"]}]},
        {"namespace": "back", "name": "db", "clusterIP": "10.96.0.100",
         "ports": [{"name": "", "port": 5432, "targetPort": 5432, "protocol": "TCP",
                    "endpoints": ["10.244.2.4:5432"]}]},
    ]
    table = module_lab.run("status").stdout
    assert "ops        tool    10.244.1.5  n1    Running  0         no" in table
    assert "front      web     10.244.1.2  n1    Running  0         yes" in table


def test_cluster_state_is_what_the_agents_read(module_lab):
    cluster = module_lab.state_dir / "cluster"
    pod = yaml.safe_load((cluster / "pod/back/api-1.yaml").read_text())
    uid = next(p["uid"] for p in module_lab.status()["pods"] if p["name"] == "api-1")
    assert pod["metadata"]["uid"] == uid
    assert (pod["spec"]["nodeName"], pod["status"]["phase"], pod["status"]["podIP"], pod["status"]["hostIP"]) == \
        ("n2", "Running", "10.244.2.3", "172.30.0.3")
    assert yaml.safe_load((cluster / "service/back/api.yaml").read_text())["spec"]["clusterIP"] == "10.96.0.10"
    assert sorted(p.name for p in (cluster / "namespace").iterdir()) == [
        "back.yaml", "default.yaml", "front.yaml", "ops.yaml"]


def test_pod_to_pod_by_ip_and_by_name_across_nodes(module_lab):
    assert fetch(module_lab, "ops/tool", "http://10.244.2.3:8080/")["pod"] == "api-1"  # n1 -> n2
    answer = fetch(module_lab, "ops/tool", "http://api-1.back:8080/")
    assert (answer["pod"], answer["remote_addr"].split(":")[0]) == ("api-1", "10.244.1.5")
    assert fetch(module_lab, "back/db", "http://web.front:8080/")["pod"] == "web"  # n2 -> n1


def test_service_names_resolve_and_work_across_nodes(module_lab):
    # db has its only endpoint on n2; the clients run on n1.
    assert fetch(module_lab, "front/web", "http://db.back.svc.cluster.local:5432/")["pod"] == "db"
    assert fetch(module_lab, "back/api-0", "http://db:5432/")["pod"] == "db"  # short name, own namespace
    assert fetch(module_lab, "back/api-0", "http://db.back.svc:5432/")["pod"] == "db"
    hosts = module_lab.exec("ops/tool", "cat", "/etc/hosts").stdout
    assert "10.96.0.100\tdb.back db.back.svc db.back.svc.cluster.local\n" in hosts
    assert "\tdb " not in hosts  # no short names for other namespaces' services
    # A ClusterIP port nobody serves is refused at once (reset), as with kube-proxy.
    probe = "import socket; s = socket.socket(); s.settimeout(5); print(s.connect_ex(('10.96.0.100', 1234)))"
    assert module_lab.exec("ops/tool", sys.executable, "-c", probe).stdout == f"{errno.ECONNREFUSED}\n"


def test_service_spreads_100_new_connections_over_endpoints_on_both_nodes(module_lab):
    fetch(module_lab, "ops/tool", "http://api.back/")  # every endpoint listens by now (status said Running)
    for pod in ("api-0", "api-1", "api-2"):
        fetch(module_lab, "ops/tool", f"http://{pod}.back:8080/")
    proc = module_lab.exec("ops/tool", "nodeagent", "lab", "request", "http://api.back:80/", "-n", "100",
                           "--new-connection", "--output", "json")
    summary = json.loads(proc.stdout)
    assert summary["codes"] == {"200": 100}
    assert sum(summary["pods"].values()) == 100
    assert sorted(summary["pods"]) == ["api-0", "api-1", "api-2"]  # n1, n2, n1: each answered


def test_exec_passes_exit_codes_stdin_env_netns_and_cgroup(module_lab):
    assert module_lab.exec("ops/tool", "true").returncode == 0
    assert module_lab.exec("ops/tool", "sh", "-c", "exit 3", check=False).returncode == 3
    assert module_lab.exec("ops/tool", "cat", input="through stdin\n").stdout == "through stdin\n"
    env = module_lab.exec("ops/tool", "sh", "-c", 'echo "$POD_NAME $POD_NAMESPACE $POD_IP $NODE_NAME '
                          '$SERVICE_ACCOUNT $GREETING $POD_LABELS"').stdout
    assert env == "tool ops 10.244.1.5 n1 default hello {}\n"
    assert "inet 10.244.1.5/32" in module_lab.exec("ops/tool", "ip", "-4", "-o", "addr", "show", "eth0").stdout
    uid = next(p["uid"] for p in module_lab.status()["pods"] if p["name"] == "tool")
    cgroup = module_lab.exec("ops/tool", "cat", "/proc/self/cgroup").stdout
    assert f"0::/nodeagent-{module_lab.name}/n1/kubepods/pod{uid}\n" in cgroup
    assert module_lab.exec("back/api", "sh", "-c", "echo $POD_NAME").stdout == "api-0\n"  # a Deployment's first pod
    missing = module_lab.exec("ops/nothing", "true", check=False)
    assert missing.returncode == 1 and f"no pod or deployment ops/nothing in lab {module_lab.name}" in missing.stderr


def test_each_container_runs_in_its_pod_cgroup_and_netns(module_lab):
    for pod in module_lab.status()["pods"]:
        cgroup = module_lab.pod_cgroup(pod["node"], pod["uid"])
        with open(os.path.join(cgroup, "cgroup.procs")) as f:
            pids = f.read().split()
        assert len(pids) == 1, (pod["name"], pids)  # the container (exec'd commands have exited)
        assert os.stat(f"/proc/{pids[0]}/ns/net").st_ino == \
            os.stat(f"/run/netns/{module_lab.name}-p-{pod['namespace']}-{pod['name']}").st_ino
        with open(f"/proc/{pids[0]}/environ", "rb") as f:
            assert f"POD_NAME={pod['name']}".encode() in f.read().split(b"\0")


BASE = """
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: app, labels: {app: a}}
spec:
  containers:
  - {name: main, command: [sleep, infinity]}
"""

CHANGES = """
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: app, labels: {app: a, team: blue}}
spec:
  containers:
  - {name: main, command: [sleep, infinity]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: app, labels: {app: b}}
spec:
  containers:
  - {name: echo, command: [nodeagent, lab, echo, --port, "8080", --tcp-port, "9000", --quiet]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: app}
spec: {selector: {app: b}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: app}
spec: {}
"""


def test_apply_adds_pods_and_services_and_changes_labels(lab_factory):
    lab = lab_factory(BASE)  # no Node objects: the default node1 and node2
    hosts = f"/etc/netns/{lab.name}-p-app-a/hosts"
    inode = os.stat(hosts).st_ino
    out = lab.apply(CHANGES).stdout.splitlines()
    assert out[:5] == ["Namespace app created", "Pod app/a configured", "Pod app/b created", "Service app/b created",
                       "AuthorizationPolicy app/deny-all created"]
    assert out[-1] == "1/1 pods Running"
    status = lab.status()
    assert [(p["name"], p["ip"], p["node"], p["phase"], p["meshed"]) for p in status["pods"]] == [
        ("a", "10.244.1.2", "node1", "Running", True), ("b", "10.244.2.2", "node2", "Running", True)]
    assert status["services"][0]["ports"][0]["endpoints"] == ["10.244.2.2:8080"]
    cluster = lab.state_dir / "cluster"
    assert yaml.safe_load((cluster / "namespace/app.yaml").read_text())["metadata"]["labels"] == \
        {"istio.io/dataplane-mode": "ambient"}
    assert yaml.safe_load((cluster / "pod/app/a.yaml").read_text())["metadata"]["labels"] == {"app": "a", "team": "blue"}
    assert (cluster / "authorizationpolicy.security.istio.io/app/deny-all.yaml").exists()
    assert os.stat(hosts).st_ino == inode  # rewritten in place: running processes see it
    assert "10.96.0.10\tb b.app b.app.svc b.app.svc.cluster.local\n" in open(hosts).read()
    assert fetch(lab, "app/a", "http://b/")["pod"] == "b"
    assert lab.apply(CHANGES).stdout.splitlines()[:2] == ["Namespace app unchanged", "Pod app/a unchanged"]
    # A new service for pods that already run: no pod changes, yet every node gets its rule.
    lab.apply("apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: app}\n"
              "spec: {selector: {app: a}, ports: [{port: 80}]}\n")
    assert [s["ports"][0]["endpoints"] for s in lab.status()["services"]] == [["10.244.1.2:80"], ["10.244.2.2:8080"]]
    for node in ("node1", "node2"):
        rules = subprocess.run(["ip", "netns", "exec", f"{lab.name}-n-{node}", "nft", "list", "chain", "ip",
                                "nodeagent-lab", "services"], capture_output=True, text=True, check=True).stdout
        assert "ip daddr 10.96.0.11 tcp dport 80 goto svc-app/a/tcp/80" in rules


def test_apply_refuses_changes_a_running_pod_cannot_take(lab_factory):
    lab = lab_factory(BASE)
    before = (lab.state_dir / "lab.json").read_bytes()
    moved = lab.apply(BASE.replace("spec:\n", "spec:\n  nodeName: node2\n"), check=False)
    assert moved.returncode == 1
    assert "(Pod app/a) spec.nodeName: cannot move a running pod to node2 (it runs on node1)" in moved.stderr
    changed = lab.apply(BASE.replace("sleep, infinity", "sleep, '1000'"), check=False)
    assert changed.returncode == 1 and "a running pod's spec cannot change" in changed.stderr
    bad = lab.apply(BASE.replace("kind: Pod", "kind: ReplicaSet"), check=False)
    assert bad.returncode == 1 and "the lab does not run v1 ReplicaSet" in bad.stderr
    assert (lab.state_dir / "lab.json").read_bytes() == before


def crash_loop(lab) -> tuple[dict, str]:
    """The crash pod as status shows it and its phase in the exported cluster, once it
    crashed and was restarted (polled: how soon depends on the machine, not the test)."""
    deadline = time.monotonic() + 60
    while True:
        pod = next(p for p in lab.status()["pods"] if p["name"] == "crash")
        state = yaml.safe_load((lab.state_dir / "cluster/pod/app/crash.yaml").read_text())["status"]
        if pod["phase"] == "CrashLoopBackOff" and pod["restarts"] >= 1 and state["phase"] == "Pending":
            return pod, state["phase"]
        assert time.monotonic() < deadline, f"no crash loop shown in 60 s: {pod}, exported {state}"
        time.sleep(0.1)


def test_crashing_container_is_restarted_and_shown_as_crash_loop(lab_factory):
    lab = lab_factory(BASE)
    crash = BASE.replace("name: a,", "name: crash,").replace("[sleep, infinity]", "[sh, -c, 'exit 3']")
    # Restarted 1, 3, 7, 15 s after its first start (backoff 1, 2, 4, 8 s): at apply's 12 s
    # deadline it waits out the 8 s backoff, however slowly it started, up to 5 s late.
    proc = lab.apply(crash, "--timeout", "12", check=False)
    assert proc.returncode == 1
    assert "pods not Running after 12s: app/crash (CrashLoopBackOff)" in proc.stderr
    pod, exported = crash_loop(lab)  # not an endpoint for the agents either: Pending
    assert (pod["phase"], exported) == ("CrashLoopBackOff", "Pending") and pod["restarts"] >= 1
    log = (lab.state_dir / "logs/supervisor.log").read_text()
    assert "pod:app/crash/main exited with code 3; restarting in 1s" in log


def test_builtin_demo_lab_comes_up(lab_factory):
    lab = lab_factory.new()
    lab.run("up", "--no-agents", "--timeout", "30")
    assert [(p["namespace"], p["name"], p["node"], p["meshed"]) for p in lab.status()["pods"]] == [
        ("legacy", "client", "node2", False), ("mesh", "backend-v1-0", "node1", True),
        ("mesh", "backend-v2-0", "node2", True), ("mesh", "client", "node1", True)]
    versions = {fetch(lab, "mesh/client", f"http://backend-v{v}-0.mesh:8080/")["labels"]["version"] for v in (1, 2)}
    assert versions == {"v1", "v2"}


def test_bad_file_leaves_nothing_behind(lab_factory):
    lab = lab_factory.new()
    proc = lab.up(BASE.replace("spec:\n", "spec:\n  nodeName: n9\n"), "--no-agents", check=False)
    assert proc.returncode == 1
    assert proc.stderr == (f"nodeagent: error: {lab.name}-up.yaml#1 (Pod app/a) spec.nodeName: no node named "
                           "'n9' (the lab's nodes are node1, node2)\n")
    assert lab.leftovers() == []


def test_failure_midway_through_up_rolls_everything_back(lab_factory):
    lab = lab_factory.new()
    os.makedirs("/etc/netns", exist_ok=True)
    blocker = f"/etc/netns/{lab.name}-p-app-a"
    with open(blocker, "w") as f:  # a file where the pod's hosts directory must go
        f.write("in the way\n")
    proc = lab.up(BASE, "--no-agents", check=False)
    assert proc.returncode == 1
    assert "writing hosts files and service rules" in proc.stderr
    assert f"lab {lab.name}: creation failed; removing what was made" in proc.stdout
    assert lab.leftovers() == []


def test_down_after_a_crash_finds_everything_by_name(lab_factory):
    lab = lab_factory(BASE + "---\n" + CHANGES.split("---\n", 3)[3])  # pods a and b, service b
    lab.remember_processes()
    record = json.loads((lab.state_dir / "lab.json").read_text())
    os.kill(record["supervisor_pid"], signal.SIGKILL)
    (lab.state_dir / "lab.json").unlink()  # as if `up` died before writing it
    os.makedirs(f"/sys/fs/bpf/nodeagent-{lab.name}/node1")  # as an agent would have made
    proc = lab.run("down")
    assert "network namespaces" in proc.stdout and "leftover processes" in proc.stdout
    assert lab.leftovers() == []
    assert lab.survivors() == []
    again = lab.run("down")
    assert again.stdout == f"no lab named {lab.name}; nothing to do\n"


def host_network() -> dict[str, str]:
    """The machine's own links, addresses, routes and nftables rules."""
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {"links": run("ip", "-o", "link", "show"), "addresses": run("ip", "-o", "addr", "show"),
            "routes": run("ip", "route", "show", "table", "all"), "nft": run("nft", "list", "ruleset")}


def test_nothing_is_added_to_the_machines_own_network_namespace(lab_factory):
    before = host_network()
    lab = lab_factory(BASE)
    assert lab.exec("app/a", "ip", "-4", "-o", "addr", "show", "eth0").stdout.split()[3] == "10.244.1.2/32"
    assert host_network() == before
