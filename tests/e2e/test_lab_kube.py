"""`nodeagent lab up --kube`: the lab with a real Kubernetes control plane (etcd,
kube-apiserver, kube-controller-manager, kube-scheduler built from the upstream modules
by scripts/setup). Two nodes from a file register through the API as their kubelets
would: Ready, with the lab's pod CIDRs and fabric addresses, leases renewed; the
controller manager works (the `default` ServiceAccount appears); the Node authorizer
confines a node to itself; `lab down` leaves no process, netns, mount or file of it.

Needs the control plane built (`controlplane/build`, run by scripts/setup): without it
the test is skipped on a developer machine and fails under CI."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import yaml

from tests.e2e.conftest import ROOT, Lab, Labs, alive, controlplane_built, take_down
from tests.e2e.kubelab import container_log, get, kubectl, ready

pytestmark = pytest.mark.timeout(300)

LAB_YAML = """
apiVersion: v1
kind: Node
metadata: {name: kn1, labels: {topology.kubernetes.io/zone: z1, lab.example/role: edge}}
---
apiVersion: v1
kind: Node
metadata: {name: kn2}
---
apiVersion: v1
kind: Pod
metadata: {name: idle1, namespace: default}
spec:
  nodeName: kn1
  containers:
  - {name: main, command: [sleep, infinity]}
---
apiVersion: v1
kind: Namespace
metadata: {name: apps, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: apps, labels: {tier: data}}
spec:
  clusterIP: 10.96.0.100
  selector: {app: db}
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: idle2, namespace: apps}
spec:
  nodeName: kn2
  containers:
  - {name: main, command: [sleep, infinity]}
"""


def test_nodes_are_registered_ready_with_the_labs_addresses(kube_lab: Lab):
    items = get(kube_lab, "nodes")["items"]
    nodes = {n["metadata"]["name"]: n for n in items}
    assert sorted(nodes) == ["kn1", "kn2"]
    for index, name in enumerate(["kn1", "kn2"], start=1):
        node = nodes[name]
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert [c["status"] for c in ready] == ["True"], ready
        assert node["spec"]["podCIDR"] == f"10.244.{index}.0/24"
        assert {"type": "InternalIP", "address": f"172.30.0.{index + 1}"} in node["status"]["addresses"]
        assert node["status"]["nodeInfo"]["kubeletVersion"] == "v1.34.4"
        assert not [t for t in node["spec"].get("taints", []) if t["key"].startswith("node.kubernetes.io/")]
    assert nodes["kn1"]["metadata"]["labels"]["lab.example/role"] == "edge"  # the file's labels, set as admin
    assert nodes["kn1"]["metadata"]["labels"]["kubernetes.io/hostname"] == "kn1"


def test_the_files_namespaces_are_in_the_api(kube_lab: Lab):
    items = get(kube_lab, "namespaces")["items"]
    labels = {n["metadata"]["name"]: n["metadata"].get("labels", {}) for n in items}
    assert {"default", "apps", "kube-system", "kube-node-lease"} <= set(labels)
    assert labels["apps"]["istio.io/dataplane-mode"] == "ambient"


def test_the_files_services_hold_their_cluster_ips_in_the_api(kube_lab: Lab):
    svc = get(kube_lab, "service", "db", "-n", "apps")
    assert (svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["port"]) == ("10.96.0.100", 5432)
    assert svc["metadata"]["labels"] == {"tier": "data"}
    taken = kubectl(kube_lab, "create", "service", "clusterip", "thief", "-n", "apps", "--tcp=80:80",
                    "--clusterip=10.96.0.100", check=False)
    assert taken.returncode != 0 and "already allocated" in taken.stderr, taken.stderr


def test_leases_are_renewed(kube_lab: Lab):
    def renew_times() -> dict[str, str]:
        leases = get(kube_lab, "leases", "-n", "kube-node-lease")["items"]
        return {le["metadata"]["name"]: le["spec"]["renewTime"] for le in leases}

    first = renew_times()
    assert sorted(first) == ["kn1", "kn2"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        later = renew_times()
        if all(later[n] != first[n] for n in first):
            return
        time.sleep(1)
    pytest.fail(f"leases not renewed within 30 s: {first} -> {renew_times()}")


def test_controller_manager_and_scheduler_work(kube_lab: Lab):
    deadline = time.monotonic() + 60
    while kubectl(kube_lab, "get", "serviceaccount", "default", "-n", "default", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the controller manager made no default ServiceAccount in 60 s"
        time.sleep(1)
    raw = kubectl(kube_lab, "get", "--raw", "/readyz?verbose").stdout
    assert "readyz check passed" in raw
    version = json.loads(kubectl(kube_lab, "version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == "v1.34.4"
    assert version["clientVersion"]["gitVersion"] == "v1.34.4"


def test_a_node_may_not_touch_another_node(kube_lab: Lab):
    """The lab's kubelet credentials are real node identities (Node authorizer + NodeRestriction)."""
    pki = os.path.join(os.path.dirname(kube_lab.run("kubeconfig").stdout.strip()))
    config = os.path.join(pki, "node-kn1.kubeconfig")
    assert yaml.safe_load(open(config))["users"][0]["name"] == "system:node:kn1"
    own = kubectl(kube_lab, "--kubeconfig", config, "label", "node", "kn1", "lab.example/x=1", check=False)
    other = kubectl(kube_lab, "--kubeconfig", config, "label", "node", "kn2", "lab.example/x=1", check=False)
    assert own.returncode == 0, own.stderr
    assert other.returncode != 0 and "Forbidden" in other.stderr, other.stderr


@pytest.mark.parametrize("pod", ["default/idle1", "apps/idle2"])
def test_pods_reach_the_api_server_through_the_kubernetes_service(kube_lab: Lab, pod: str):
    """As in a cluster: kubelet's KUBERNETES_SERVICE_* variables, the service's names,
    10.96.0.1:443 DNATed by the node to the API server, whose certificate names them."""
    ca = f"/run/nodeagent/{kube_lab.name}/kube/pki/ca.crt"
    env = dict(line.split("=", 1) for line in kube_lab.exec(pod, "env").stdout.splitlines() if "=" in line)
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("10.96.0.1", "443")
    for url in ("https://kubernetes.default.svc/readyz", "https://10.96.0.1/livez",
                "https://kubernetes.default.svc.cluster.local:443/version"):
        proc = kube_lab.exec(pod, "curl", "-sS", "--max-time", "10", "--cacert", ca, url, check=False)
        assert proc.returncode == 0, (url, proc.stderr)
        assert "ok" in proc.stdout or "v1.34.4" in proc.stdout, (url, proc.stdout)
    anonymous = kube_lab.exec(pod, "curl", "-sS", "--cacert", ca, "-o", "/dev/null", "-w", "%{http_code}",
                              "https://kubernetes.default.svc/api/v1/namespaces/default/pods")
    assert anonymous.stdout == "403"  # RBAC: no identity, no pods


def test_kubeconfig_names_the_admin(kube_lab: Lab):
    path = kube_lab.run("kubeconfig").stdout.strip()
    assert path == f"/run/nodeagent/{kube_lab.name}/kube/pki/admin.kubeconfig"
    config = yaml.safe_load(open(path))
    assert config["clusters"][0]["cluster"]["server"] == "https://172.30.0.1:6443"
    assert os.stat(path).st_mode & 0o777 == 0o600
    status = kube_lab.status()["controlplane"]
    assert status["kubeconfig"] == path
    assert {c: s["state"] for c, s in status["components"].items()} == {
        "etcd": "running", "kube-apiserver": "running", "kube-controller-manager": "running",
        "kube-scheduler": "running"}
    assert "Control plane at https://172.30.0.1:6443" in kube_lab.run("status").stdout


def test_down_leaves_nothing_of_the_control_plane(lab_factory: Labs):
    if not controlplane_built():
        pytest.skip("the control plane is not built: run scripts/setup")
    lab = lab_factory.new()
    lab.up_kube(LAB_YAML)
    runtime = json.loads((lab.state_dir / "runtime.json").read_text())
    pids = [c["pid"] for c in runtime["controlplane"].values()]
    assert sorted(runtime["controlplane"]) == ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"]
    assert all(pids), runtime["controlplane"]
    assert os.path.exists(f"/run/netns/{lab.name}-cp")
    lab.pids.update(pids)
    kubectl(lab, "apply", "-f", "-", input=DAEMONSET)  # pods of the API, with tokens mounted
    wait_pods(lab, "daemons", "app=everywhere", 2)
    problems = take_down(lab)
    assert problems == []
    assert not os.path.exists(f"/run/nodeagent/{lab.name}/kube")
    if not [n for n in os.listdir("/run/nodeagent") if not n.startswith(".")]:  # no other lab holds it
        assert not os.path.exists("/run/secrets"), "the pods' token mount point outlived the last lab"
    lab_factory.made.remove(lab)  # already down; the fixture would only find nothing


WEB = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
      - name: echo
        image: nodeagent-lab/echo
        command: [nodeagent, lab, echo, --port, "8080", --quiet]
        ports: [{containerPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"""

DAEMONSET = """
apiVersion: v1
kind: Namespace
metadata: {name: daemons}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: everywhere, namespace: daemons}
spec:
  selector: {matchLabels: {app: everywhere}}
  template:
    metadata: {labels: {app: everywhere}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - {name: main, image: busybox, command: [sleep, infinity]}
"""


def api_pods(lab: Lab, namespace: str, selector: str) -> list[dict]:
    return get(lab, "pods", "-n", namespace, "-l", selector)["items"]


def wait_pods(lab: Lab, namespace: str, selector: str, count: int, timeout: float = 60) -> list[dict]:
    """The pods once exactly `count` of them are Running and Ready (and no others exist)."""
    deadline = time.monotonic() + timeout
    while True:
        pods = api_pods(lab, namespace, selector)
        running = [p for p in pods if p["status"].get("phase") == "Running" and ready(p)]
        if len(pods) == count and len(running) == count:
            return pods
        assert time.monotonic() < deadline, f"wanted {count} Running pods {selector}, have " + \
            str([(p["metadata"]["name"], p["status"].get("phase")) for p in pods])
        time.sleep(0.5)


def ready_endpoints(lab: Lab, namespace: str, service: str) -> set[str]:
    """The pods the Service's EndpointSlices list as ready (what the lab's proxy routes to)."""
    slices = get(lab, "endpointslices", "-n", namespace, "-l", f"kubernetes.io/service-name={service}")["items"]
    return {e["targetRef"]["name"] for s in slices for e in s.get("endpoints") or []
            if e.get("conditions", {}).get("ready")}


def what_runs(lab: Lab, pod: dict) -> tuple[str, str, list[int]]:
    """The pod's netns, cgroup and the pids in that cgroup, as the lab made them."""
    node, uid = pod["spec"]["nodeName"], pod["metadata"]["uid"]
    netns = f"/run/netns/{lab.name}-p-{pod['metadata']['namespace']}-{pod['metadata']['name']}"
    cgroup = lab.pod_cgroup(node, uid)
    pids = [int(p) for p in open(os.path.join(cgroup, "cgroup.procs")).read().split()] if os.path.isdir(cgroup) else []
    return netns, cgroup, pids


def test_a_deployment_runs_where_the_scheduler_puts_it_and_answers_by_service_name(kube_lab: Lab):
    kubectl(kube_lab, "apply", "-f", "-", input=WEB)
    pods = wait_pods(kube_lab, "default", "app=web", 3)
    cidrs = {"kn1": "10.244.1.", "kn2": "10.244.2."}
    for pod in pods:
        assert pod["status"]["podIP"].startswith(cidrs[pod["spec"]["nodeName"]]), pod["status"]
        assert pod["status"]["hostIP"] == {"kn1": "172.30.0.2", "kn2": "172.30.0.3"}[pod["spec"]["nodeName"]]
        status = pod["status"]["containerStatuses"][0]
        assert (status["name"], status["ready"], status["restartCount"]) == ("echo", True, 0)
        netns, cgroup, pids = what_runs(kube_lab, pod)
        assert os.path.exists(netns) and len(pids) >= 1
        assert f"nodeagent-lab://{pids[0]}" == status["containerID"] or \
            status["containerID"].removeprefix("nodeagent-lab://") in map(str, pids)
    # By name through the API's Service, from the file's pods on both nodes (one of them
    # is on another node than some of the Deployment's pods) and from a pod of the API.
    # Ready pods reach the EndpointSlices (the controller), then the lab's proxy (a watch):
    # wait for the first, and send rounds until every pod answered (CI once saw 30 requests
    # miss one of three pods that had just become ready).
    names = {p["metadata"]["name"] for p in pods}
    deadline = time.monotonic() + 60
    while ready_endpoints(kube_lab, "default", "web") != names:
        assert time.monotonic() < deadline, ready_endpoints(kube_lab, "default", "web")
        time.sleep(0.5)
    answered: set[str] = set()
    while answered != names:
        assert time.monotonic() < deadline, (answered, names)
        for client in ("default/idle1", "apps/idle2"):  # 15 requests in one exec: a loaded machine starts each slowly
            replies = kube_lab.exec(client, "sh", "-c", "for i in $(seq 15); do curl -sS --max-time 5 "
                                    "http://web.default/; done").stdout.splitlines()  # each reply is one line
            assert len(replies) == 15, replies
            answered |= {json.loads(reply)["pod"] for reply in replies}
        assert answered <= names, answered
    inside = kube_lab.exec(f"default/{pods[0]['metadata']['name']}", "sh", "-c",
                           "echo $POD_NAME $POD_IP; curl -sS --max-time 5 http://web/")
    first, reply = inside.stdout.split("\n", 1)
    assert first == f"{pods[0]['metadata']['name']} {pods[0]['status']['podIP']}"  # lab exec into an API pod
    assert json.loads(reply)["pod"] in answered, inside
    listed = {p["name"]: p for p in kube_lab.status()["controlplane"]["pods"] if p["namespace"] == "default"}
    assert {n: (p["phase"], p["ip"]) for n, p in listed.items() if n.startswith("web-")} == {
        p["metadata"]["name"]: ("Running", p["status"]["podIP"]) for p in pods}
    assert "POD (API)" in kube_lab.run("status").stdout
    namespace = kube_lab.exec(f"default/{pods[0]['metadata']['name']}", "cat",
                              "/var/run/secrets/kubernetes.io/serviceaccount/namespace").stdout
    assert namespace == "default"  # the pod's own mounted service-account files


def test_scale_and_delete_add_and_remove_pods(kube_lab: Lab):
    kubectl(kube_lab, "apply", "-f", "-", input=WEB)
    before = wait_pods(kube_lab, "default", "app=web", 3)
    kubectl(kube_lab, "scale", "deployment/web", "-n", "default", "--replicas=1")
    after = wait_pods(kube_lab, "default", "app=web", 1)
    removed = [p for p in before if p["metadata"]["uid"] not in {a["metadata"]["uid"] for a in after}]
    assert len(removed) == 2
    deadline = time.monotonic() + 30
    for pod in removed:
        netns, cgroup, _ = what_runs(kube_lab, pod)
        while os.path.exists(netns) or os.path.exists(cgroup):
            assert time.monotonic() < deadline, f"{pod['metadata']['name']}: {netns} or {cgroup} left"
            time.sleep(0.2)
    kubectl(kube_lab, "scale", "deployment/web", "-n", "default", "--replicas=2")
    grown = wait_pods(kube_lab, "default", "app=web", 2)
    kept = [what_runs(kube_lab, p) for p in grown]
    kubectl(kube_lab, "delete", "deployment/web", "-n", "default", "--wait=true", "--timeout=60s")
    wait_pods(kube_lab, "default", "app=web", 0)
    for netns, cgroup, pids in kept:
        assert not os.path.exists(netns) and not os.path.exists(cgroup)
        assert not [pid for pid in pids if alive(pid)]


def test_a_daemonset_runs_one_pod_per_node(kube_lab: Lab):
    kubectl(kube_lab, "apply", "-f", "-", input=DAEMONSET)
    pods = wait_pods(kube_lab, "daemons", "app=everywhere", 2)
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["kn1", "kn2"]
    assert all(p["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet" for p in pods)
    kubectl(kube_lab, "delete", "daemonset/everywhere", "-n", "daemons", "--wait=true", "--timeout=60s")
    wait_pods(kube_lab, "daemons", "app=everywhere", 0)


RBAC = """
apiVersion: v1
kind: Namespace
metadata: {name: rbac}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: reader, namespace: rbac}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader, namespace: rbac}
rules:
- {apiGroups: [""], resources: [pods], verbs: [get, list]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader-reads-pods, namespace: rbac}
subjects: [{kind: ServiceAccount, name: reader, namespace: rbac}]
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pod-reader}
---
apiVersion: v1
kind: Pod
metadata: {name: checker, namespace: rbac}
spec:
  serviceAccountName: reader
  restartPolicy: Never
  containers:
  - name: main
    image: bitnami/kubectl
    env: [{name: HOME, value: HOMEDIR}]
    command:
    - sh
    - -c
    - |
      ls /var/run/secrets/kubernetes.io/serviceaccount
      KUBECTL get pods -n rbac -o name; echo "pods rc=$?"
      KUBECTL get secrets -n rbac; echo "secrets rc=$?"
      KUBECTL get pods -n default; echo "other namespace rc=$?"
"""


def test_a_pod_uses_in_cluster_config_and_rbac_decides(kube_lab: Lab, tmp_path):
    """kubectl inside a pod, with no kubeconfig: client-go's in-cluster config (the
    KUBERNETES_SERVICE_* variables, the token and CA the lab mounted at the standard path
    in the pod's own mount namespace) as ServiceAccount rbac/reader, whose Role grants
    listing pods in its namespace only."""
    binary = subprocess.run([os.path.join(ROOT, "controlplane", "build"), "--print"],
                            capture_output=True, text=True, check=True).stdout.strip()
    kubectl(kube_lab, "apply", "-f", "-",
            input=RBAC.replace("KUBECTL", f"{binary} kubectl").replace("HOMEDIR", str(tmp_path)))
    log = container_log(kube_lab, "rbac", "checker", "main")
    deadline = time.monotonic() + 60
    while not (os.path.exists(log) and "other namespace rc=" in open(log).read()):
        assert time.monotonic() < deadline, open(log).read() if os.path.exists(log) else "no log"
        time.sleep(0.5)
    out = open(log).read()
    assert "ca.crt\nnamespace\ntoken\n" in out
    assert "pod/checker\npods rc=0" in out, out
    assert 'User "system:serviceaccount:rbac:reader" cannot list resource "secrets"' in out, out
    assert "secrets rc=1" in out and "other namespace rc=1" in out, out
    assert not os.path.exists("/var/run/secrets/kubernetes.io/serviceaccount/token")  # only inside the pod
    deadline = time.monotonic() + 30
    while api_pods(kube_lab, "rbac", "")[0]["status"].get("phase") != "Succeeded":
        assert time.monotonic() < deadline
        time.sleep(0.5)


CONFIGURED = """
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: apps}
data: {MODE: fast, LEVEL: "3"}
---
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: apps}
stringData: {password: s3cret}
---
apiVersion: v1
kind: Pod
metadata: {name: configured, namespace: apps, labels: {tier: back}}
spec:
  containers:
  - name: main
    image: none
    command: [sleep, infinity]
    envFrom: [{configMapRef: {name: settings}, prefix: CFG_}]
    env:
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: TIER, valueFrom: {fieldRef: {fieldPath: "metadata.labels['tier']"}}}
    - {name: MY_NODE, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
"""


def test_env_comes_from_configmaps_secrets_and_the_downward_api(kube_lab: Lab):
    kubectl(kube_lab, "apply", "-f", "-", input=CONFIGURED)
    pod = wait_pods(kube_lab, "apps", "tier=back", 1)[0]
    wanted = {"CFG_MODE": "fast", "CFG_LEVEL": "3", "PASSWORD": "s3cret", "TIER": "back",
              "MY_NODE": pod["spec"]["nodeName"]}
    pid = int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("nodeagent-lab://"))
    with open(f"/proc/{pid}/environ", "rb") as f:  # what the container process was given
        env = dict(v.split("=", 1) for v in f.read().decode().split("\0") if "=" in v)
    assert {k: env.get(k) for k in wanted} == wanted
    lines = kube_lab.exec("apps/configured", "env").stdout.splitlines()  # and what lab exec gives
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert {k: env.get(k) for k in wanted} == wanted
    kubectl(kube_lab, "delete", "pod", "configured", "-n", "apps", "--wait=true", "--timeout=60s")


VOLUMES = """
apiVersion: v1
kind: Namespace
metadata: {name: vols}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: app-config, namespace: vols}
data: {greeting: hello, settings.yaml: "a: 1"}
---
apiVersion: v1
kind: Secret
metadata: {name: app-secret, namespace: vols}
data: {password: czNjcmV0, api-key: azEyMw==}
---
apiVersion: v1
kind: Pod
metadata: {name: reader, namespace: vols, labels: {app: reader, tier: back}}
spec:
  nodeName: kn2
  terminationGracePeriodSeconds: 1
  volumes:
  - {name: config, configMap: {name: app-config}}
  - name: secret
    secret:
      secretName: app-secret
      defaultMode: 0440
      items: [{key: password, path: pw/password, mode: 0400}, {key: api-key, path: key}]
  - name: podinfo
    downwardAPI:
      items:
      - {path: name, fieldRef: {fieldPath: metadata.name}}
      - {path: labels, fieldRef: {fieldPath: metadata.labels}}
      - {path: cpu, resourceFieldRef: {containerName: main, resource: limits.cpu, divisor: 1m}, mode: 0600}
  - {name: shared, emptyDir: {}}
  - {name: host, hostPath: {path: HOSTDIR, type: Directory}}
  - {name: made, hostPath: {path: MOUNTS/made/deep, type: DirectoryOrCreate}}
  - name: tokens
    projected:
      sources:
      - serviceAccountToken: {audience: e2e, expirationSeconds: 600, path: e2e-token}
      - configMap: {name: app-config, items: [{key: greeting, path: greeting}]}
  containers:
  - name: main
    image: none
    resources: {limits: {cpu: 500m, memory: 64Mi}}
    env:
    - {name: CPU_LIMIT, valueFrom: {resourceFieldRef: {resource: limits.cpu, divisor: 1m}}}
    - {name: MEM_LIMIT, valueFrom: {resourceFieldRef: {resource: limits.memory, divisor: 1Mi}}}
    - {name: MEM_REQUEST, valueFrom: {resourceFieldRef: {resource: requests.memory}}}
    volumeMounts:
    - {name: config, mountPath: MOUNTS/config}
    - {name: config, mountPath: MOUNTS/greeting, subPath: greeting}
    - {name: secret, mountPath: MOUNTS/secret}
    - {name: podinfo, mountPath: MOUNTS/podinfo}
    - {name: shared, mountPath: MOUNTS/shared}
    - {name: host, mountPath: MOUNTS/host}
    - {name: made, mountPath: MOUNTS/made-here}
    - {name: tokens, mountPath: MOUNTS/tokens}
    command:
    - sh
    - -c
    - |
      cd MOUNTS
      echo "greeting=$(cat config/greeting) settings=$(cat config/settings.yaml) subpath=$(cat greeting)"
      echo "config=$(ls config | tr '\\n' ,) mode=$(stat -L -c %a config/greeting)"
      echo "password=$(cat secret/pw/password) mode=$(stat -L -c %a secret/pw/password)"
      echo "key=$(cat secret/key) mode=$(stat -L -c %a secret/key)"
      echo "name=$(cat podinfo/name) cpu=$(cat podinfo/cpu) mode=$(stat -L -c %a podinfo/cpu)"
      echo "labels=$(tr '\\n' , < podinfo/labels)"
      echo "env cpu=$CPU_LIMIT mem=$MEM_LIMIT request=$MEM_REQUEST"
      echo "host=$(cat host/seed)"; echo from-pod > host/written
      touch config/new 2>/dev/null && echo "config writable" || echo "config read-only"
      echo "sa=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace) token=$(wc -c < tokens/e2e-token)"
      echo main > shared/note
      echo "made=$(ls -A made-here | wc -l)"
      echo done
      last=""
      while true; do
        t=$(cat tokens/e2e-token); [ "$t" = "$last" ] || echo "token ends ${t#"${t%????????????????}"}"
        last=$t; sleep 0.2
      done
  - name: side
    image: none
    volumeMounts: [{name: shared, mountPath: MOUNTS/shared-too}]
    command:
    - sh
    - -c
    - |
      while [ ! -f MOUNTS/shared-too/note ]; do sleep 0.2; done
      echo side sees $(cat MOUNTS/shared-too/note); exec sleep infinity
"""


def log_size(lab: Lab, namespace: str, pod: str, container: str) -> int:
    """Where the next pod of that name will start writing (a pod's log outlives it)."""
    path = container_log(lab, namespace, pod, container)
    return os.path.getsize(path) if os.path.exists(path) else 0


def wait_log(lab: Lab, namespace: str, pod: str, container: str, text: str, timeout: float = 60,
             after: int = 0) -> str:
    """The container's log (from offset `after`) once it holds `text`."""
    path = container_log(lab, namespace, pod, container)

    def read() -> str:
        with open(path) as f:
            f.seek(after)
            return f.read()

    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and text in read()):
        assert time.monotonic() < deadline, read() if os.path.exists(path) else f"no log {path}"
        time.sleep(0.3)
    return read()


def machine_mounts() -> str:
    with open("/proc/1/mountinfo") as f:
        return f.read()


def test_volumes_are_files_at_the_mount_paths_and_leave_nothing(kube_lab: Lab, tmp_path):
    """ConfigMap, Secret (items, modes), downwardAPI (fields, labels, a limit), emptyDir
    shared by two containers, hostPath (checked, created), a projected token and a
    subPath: what the container reads, in its own mount namespace only; after deletion
    no mount, mount point or file of them is left on the machine."""
    mounts = f"/opt/nodeagent-e2e-{kube_lab.name}"
    host = tmp_path / "host"
    host.mkdir()
    (host / "seed").write_text("seeded")
    offset = log_size(kube_lab, "vols", "reader", "main"), log_size(kube_lab, "vols", "reader", "side")
    kubectl(kube_lab, "apply", "-f", "-",
            input=VOLUMES.replace("MOUNTS", mounts).replace("HOSTDIR", str(host)))
    out = wait_log(kube_lab, "vols", "reader", "main", "done\n", after=offset[0])
    lines = out.split("done\n")[0].splitlines()
    assert lines == [
        "greeting=hello settings=a: 1 subpath=hello",
        "config=greeting,settings.yaml, mode=644",
        "password=s3cret mode=400",
        "key=k123 mode=440",
        "name=reader cpu=500 mode=600",
        'labels=app="reader",tier="back"',
        f"env cpu=500 mem=64 request={64 * 2**20}",  # requests default to limits
        "host=seeded",
        "config read-only",
        lines[9],
        "made=0"], out
    assert lines[9].startswith("sa=vols token=") and int(lines[9].split("token=")[1]) > 100
    assert "side sees main" in wait_log(kube_lab, "vols", "reader", "side", "side sees", after=offset[1])
    assert (host / "written").read_text() == "from-pod\n"
    assert mounts not in machine_mounts()  # the machine's mount table is unchanged
    assert os.path.isdir(f"{mounts}/made/deep")  # DirectoryOrCreate, made on the machine
    assert sorted(os.listdir(f"{mounts}/config")) == []  # a mount point: empty on the machine
    assert kube_lab.exec("vols/reader", "cat", f"{mounts}/secret/key").stdout == "k123"  # lab exec sees them too
    pod = api_pods(kube_lab, "vols", "app=reader")[0]
    pod_dir = f"/run/nodeagent/{kube_lab.name}/kube/pods/{pod['metadata']['uid']}"
    assert os.path.isdir(pod_dir)
    kubectl(kube_lab, "delete", "pod", "reader", "-n", "vols", "--wait=true", "--timeout=60s")
    deadline = time.monotonic() + 30
    while os.path.exists(pod_dir) or os.path.exists(mounts):
        assert time.monotonic() < deadline, (os.path.exists(pod_dir), os.listdir(mounts))
        time.sleep(0.2)
    assert sorted(os.listdir(host)) == ["seed", "written"]  # a hostPath the lab did not make stays
    assert mounts not in machine_mounts()


def test_a_projected_token_is_replaced_under_a_running_container(kube_lab: Lab, tmp_path):
    """The renewal's file replacement end to end: a token requested as the node (as the
    kubelet does when 80% of its life has passed) is written with the atomic writer into
    the running pod's volume, and the container sees the new one whole at once."""
    from nodeagent.lab.kube import controlplane, kubelet, volumes
    from nodeagent.lab.layout import Layout

    mounts = f"/opt/nodeagent-e2e-{kube_lab.name}"
    host = tmp_path / "host"
    host.mkdir()
    (host / "seed").write_text("seeded")
    offset = log_size(kube_lab, "vols", "reader", "main")
    kubectl(kube_lab, "apply", "-f", "-",
            input=VOLUMES.replace("MOUNTS", mounts).replace("HOSTDIR", str(host)))
    first = wait_log(kube_lab, "vols", "reader", "main", "token ends ", after=offset)
    pod = api_pods(kube_lab, "vols", "app=reader")[0]
    volume = f"/run/nodeagent/{kube_lab.name}/kube/pods/{pod['metadata']['uid']}/volumes/tokens"
    old = open(f"{volume}/e2e-token").read()
    assert f"token ends {old[-16:]}" in first
    client = controlplane.node_client(Layout(kube_lab.name, cgroup_root=""), "kn2")
    fields = {"metadata.name": "reader", "metadata.namespace": "vols"}
    inputs = volumes.Inputs(pod, fields, kubelet.volume_reader(client, "vols"), kubelet.token_requester(client, pod),
                            dict)
    spec = next(v for v in pod["spec"]["volumes"] if v["name"] == "tokens")
    files = volumes.payload(spec, inputs, {}, kubelet.utc_now())
    assert volumes.write_atomically(volume, files, "tokens")
    new = files["e2e-token"][0].decode()
    assert new != old and new.count(".") == 2  # a JWT
    wait_log(kube_lab, "vols", "reader", "main", f"token ends {new[-16:]}", after=offset)
    kubectl(kube_lab, "delete", "pod", "reader", "-n", "vols", "--wait=true", "--timeout=60s")


BROKEN = """
apiVersion: v1
kind: Pod
metadata: {name: claims, namespace: vols, labels: {case: broken}}
spec:
  nodeName: kn1  # the scheduler would not place a pod whose claim does not exist
  containers: [{name: main, image: none, command: [sleep, infinity], volumeMounts: [{name: data, mountPath: /data}]}]
  volumes: [{name: data, persistentVolumeClaim: {claimName: pvc}}]
---
apiVersion: v1
kind: Pod
metadata: {name: waits, namespace: vols, labels: {case: later}}
spec:
  nodeName: kn1
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: none
    command: [sh, -c, "cat MOUNTS/later/value; echo; exec sleep infinity"]
    volumeMounts: [{name: later, mountPath: MOUNTS/later}]
  volumes: [{name: later, configMap: {name: later}}]
"""


def waiting(lab: Lab, selector: str) -> dict:
    pods = api_pods(lab, "vols", selector)
    statuses = pods[0]["status"].get("containerStatuses") or [{}]
    return {"phase": pods[0]["status"].get("phase"), **statuses[0].get("state", {}).get("waiting", {})}


def test_unimplemented_volumes_are_refused_and_missing_sources_waited_for(kube_lab: Lab):
    mounts = f"/opt/nodeagent-e2e-{kube_lab.name}"
    kubectl(kube_lab, "create", "namespace", "vols", check=False)
    kubectl(kube_lab, "apply", "-f", "-", input=BROKEN.replace("MOUNTS", mounts))
    wanted = {"case=broken": {"phase": "Pending", "reason": "CreateContainerConfigError",
                              "message": "volume data: the lab does not implement persistentVolumeClaim volumes "
                                         "(it implements configMap, secret, downwardAPI, projected, emptyDir, "
                                         "hostPath)"},
              "case=later": {"phase": "Pending", "reason": "ContainerCreating",
                             "message": 'MountVolume.SetUp failed for volume "later" : configmap "later" not found'}}
    deadline = time.monotonic() + 60
    while {s: waiting(kube_lab, s) for s in wanted} != wanted:
        assert time.monotonic() < deadline, {s: waiting(kube_lab, s) for s in wanted}
        time.sleep(0.5)
    assert not os.path.exists(mounts)
    kubectl(kube_lab, "create", "configmap", "later", "-n", "vols", "--from-literal=value=arrived")
    wait_pods(kube_lab, "vols", "case=later", 1)
    assert "arrived\n" in wait_log(kube_lab, "vols", "waits", "main", "arrived")
    assert waiting(kube_lab, "case=broken")["reason"] == "CreateContainerConfigError"
    kubectl(kube_lab, "delete", "pod", "-n", "vols", "-l", "case", "--wait=true", "--timeout=60s")
    assert not os.path.exists(mounts)


SECURED = """
apiVersion: v1
kind: Pod
metadata: {name: secured, namespace: vols, labels: {case: secured}}
spec:
  hostNetwork: true
  terminationGracePeriodSeconds: 1
  securityContext: {runAsUser: 65534, runAsGroup: 65534, seccompProfile: {type: RuntimeDefault}}
  containers:
  - name: main
    image: none
    securityContext: {capabilities: {drop: [ALL], add: [NET_BIND_SERVICE]}, allowPrivilegeEscalation: false}
    command:
    - sh
    - -c
    - |
      echo id=$(id -u):$(id -g); grep -E 'CapBnd|NoNewPrivs' /proc/self/status
      cat MOUNTS/conf/greeting; echo; exec sleep infinity
    volumeMounts: [{name: conf, mountPath: MOUNTS/conf}]
  volumes: [{name: conf, configMap: {name: app-config}}]
"""


def test_security_context_and_a_host_network_pods_volume(kube_lab: Lab):
    mounts = f"/opt/nodeagent-e2e-{kube_lab.name}"
    kubectl(kube_lab, "create", "namespace", "vols", check=False)
    kubectl(kube_lab, "create", "configmap", "app-config", "-n", "vols", "--from-literal=greeting=hi", check=False)
    offset = log_size(kube_lab, "vols", "secured", "main")
    kubectl(kube_lab, "apply", "-f", "-", input=SECURED.replace("MOUNTS", mounts))
    out = wait_log(kube_lab, "vols", "secured", "main", "NoNewPrivs", after=offset)
    assert "id=65534:65534\n" in out
    assert "CapBnd:\t0000000000000400\n" in out  # CAP_NET_BIND_SERVICE (10) only
    assert "NoNewPrivs:\t1\n" in out
    assert mounts not in machine_mounts()
    events = get(kube_lab, "events", "-n", "vols", "--field-selector",
                 "involvedObject.name=secured,reason=LabSecurityContext")
    assert [e["message"] for e in events["items"]] == ["spec.securityContext.seccompProfile is not applied by the lab"]
    kubectl(kube_lab, "delete", "pod", "secured", "-n", "vols", "--wait=true", "--timeout=60s")
    assert not os.path.exists(mounts)


PROBED = """
apiVersion: v1
kind: Service
metadata: {name: probed, namespace: vols}
spec:
  selector: {app: probed}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: by-http, namespace: vols, labels: {app: probed}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: none
    command: [nodeagent, lab, echo, --port, "8080", --quiet]
    ports: [{containerPort: 8080, name: http}]
    readinessProbe: {httpGet: {path: /, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: by-tcp, namespace: vols, labels: {app: probed}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: echo
    image: none
    command: [nodeagent, lab, echo, --port, "8080", --quiet]
    readinessProbe: {tcpSocket: {port: 8080}, initialDelaySeconds: 1, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: by-exec, namespace: vols, labels: {app: probed}}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{name: gate, emptyDir: {}}]
  containers:
  - name: echo
    image: none
    command: [nodeagent, lab, echo, --port, "8080", --quiet]
    volumeMounts: [{name: gate, mountPath: MOUNTS/gate}]
    readinessProbe: {exec: {command: [test, -f, MOUNTS/gate/open]}, periodSeconds: 1, failureThreshold: 2}
"""


def readiness(lab: Lab) -> dict[str, tuple[str, bool, bool]]:
    """Each probed pod's (phase, Ready condition, container ready)."""
    out = {}
    for pod in api_pods(lab, "vols", "app=probed"):
        status = pod["status"]
        container = (status.get("containerStatuses") or [{}])[0].get("ready", False)
        out[pod["metadata"]["name"]] = (status.get("phase"), ready(pod), container)
    return out


def wait_readiness(lab: Lab, wanted: dict[str, bool], timeout: float = 60) -> None:
    """Until each pod's Ready (condition and container) and the Service's ready endpoints are as wanted."""
    expected = {n: ("Running", r, r) for n, r in wanted.items()}
    deadline = time.monotonic() + timeout
    while readiness(lab) != expected or ready_endpoints(lab, "vols", "probed") != {n for n, r in wanted.items() if r}:
        assert time.monotonic() < deadline, (readiness(lab), ready_endpoints(lab, "vols", "probed"))
        time.sleep(0.5)


def test_readiness_probes_drive_ready_and_the_endpoints(kube_lab: Lab):
    mounts = f"/opt/nodeagent-e2e-{kube_lab.name}"
    kubectl(kube_lab, "create", "namespace", "vols", check=False)
    kubectl(kube_lab, "apply", "-f", "-", input=PROBED.replace("MOUNTS", mounts))
    wait_readiness(kube_lab, {"by-http": True, "by-tcp": True, "by-exec": False})
    kube_lab.exec("vols/by-exec", "touch", f"{mounts}/gate/open")
    wait_readiness(kube_lab, {"by-http": True, "by-tcp": True, "by-exec": True})
    kube_lab.exec("vols/by-exec", "rm", f"{mounts}/gate/open")
    wait_readiness(kube_lab, {"by-http": True, "by-tcp": True, "by-exec": False})
    kubectl(kube_lab, "delete", "-f", "-", "--wait=true", "--timeout=60s",
            input=PROBED.replace("MOUNTS", mounts))
    assert not os.path.exists(mounts)
