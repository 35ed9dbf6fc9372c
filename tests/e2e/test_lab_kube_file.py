"""`nodeagent lab up --kube -f FILE`: the file's objects through the API.

The file's pods (a Pod and a Deployment's) show as mirror pods of their nodes, Running
and Ready at their lab addresses, with restart counts; the real EndpointSlice controller
gives the file's Service a slice of exactly those pods while the lab keeps serving the
Service itself; the file's ServiceAccount, ConfigMap, Secret and Role are in the API,
applied by the lab's field manager and marked as the lab's; `lab apply` of a changed
file changes them (a dropped key is dropped) and replaces a relabelled pod's mirror; the
controller manager started once, after the API server's RBAC bootstrap, and never
restarted. One module-scoped lab without agents.

Needs the control plane built (`controlplane/build`, run by scripts/setup): without it
the test is skipped on a developer machine and fails under CI."""

from __future__ import annotations

import base64
import json
import time

import pytest

from tests.e2e.conftest import Lab
from tests.e2e.kubelab import get, kubectl, ready

pytestmark = pytest.mark.timeout(300)

MIRROR = "kubernetes.io/config.mirror"
LAB_YAML = """
apiVersion: v1
kind: Node
metadata: {name: fk1}
---
apiVersion: v1
kind: Node
metadata: {name: fk2}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: reviews, namespace: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data: {mode: fast, level: "3"}
---
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: shop}
stringData: {password: s3cret}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader, namespace: shop}
rules: [{apiGroups: [""], resources: [pods], verbs: [get, list]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: reviews
      containers:
      - name: echo
        image: nodeagent-lab/echo
        command: [nodeagent, lab, echo, --port, "8080", --quiet]
        ports: [{containerPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {role: client}}
spec:
  nodeName: fk1
  containers:
  - {name: main, command: [sleep, infinity]}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.svc.cluster.local]
  http: [{timeout: 3s, route: [{destination: {host: web.shop.svc.cluster.local}}]}]
"""

VIRTUAL_SERVICE = LAB_YAML[LAB_YAML.index("apiVersion: networking.istio.io/v1beta1"):]

CHANGED = """
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data: {mode: slow}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: extra, namespace: shop, labels: {added: by-apply}}
data: {k: v}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {role: client, tier: front}}
spec:
  nodeName: fk1
  containers:
  - {name: main, command: [sleep, infinity]}
"""


def mirror_pods(lab: Lab) -> dict[str, dict]:
    items = get(lab, "pods", "-A")["items"]
    return {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p for p in items
            if MIRROR in p["metadata"].get("annotations", {})}


def wait_mirrors(lab: Lab, keys: set[str], timeout: float = 60) -> dict[str, dict]:
    """The mirror pods once exactly `keys` exist, all Running and Ready."""
    deadline = time.monotonic() + timeout
    while True:
        pods = mirror_pods(lab)
        if set(pods) == keys and all(p["status"].get("phase") == "Running" and ready(p) for p in pods.values()):
            return pods
        assert time.monotonic() < deadline, f"mirror pods {keys} not Running/Ready: " + \
            str({k: p["status"].get("phase") for k, p in pods.items()})
        time.sleep(0.5)


def test_the_controller_manager_started_once_after_rbac_bootstrap(kube_lab: Lab):
    components = kube_lab.status()["controlplane"]["components"]
    assert {c: (s["state"], s["restarts"]) for c, s in components.items()} == {
        "etcd": ("running", 0), "kube-apiserver": ("running", 0), "kube-controller-manager": ("running", 0),
        "kube-scheduler": ("running", 0)}


def test_the_files_pods_are_mirror_pods_at_their_lab_addresses(kube_lab: Lab):
    lab_pods = {f"{p['namespace']}/{p['name']}": p for p in kube_lab.status()["pods"]}
    assert set(lab_pods) == {"shop/web-0", "shop/web-1", "default/client"}
    pods = wait_mirrors(kube_lab, set(lab_pods))
    nodes = {n["metadata"]["name"]: n for n in get(kube_lab, "nodes")["items"]}
    for key, pod in pods.items():
        meta, status, node = pod["metadata"], pod["status"], pod["spec"]["nodeName"]
        assert (node, status["podIP"]) == (lab_pods[key]["node"], lab_pods[key]["ip"]), key
        assert status["hostIP"] == {"fk1": "172.30.0.2", "fk2": "172.30.0.3"}[node]
        assert meta["annotations"]["kubernetes.io/config.source"] == "file"
        assert meta["annotations"][MIRROR] == meta["annotations"]["kubernetes.io/config.hash"]
        assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": node, "controller": True,
                                            "uid": nodes[node]["metadata"]["uid"]}]
        containers = {c["name"]: c for c in status["containerStatuses"]}
        name = "main" if key == "default/client" else "echo"
        assert (list(containers), containers[name]["ready"], containers[name]["restartCount"]) == ([name], True, 0)
        assert "running" in containers[name]["state"]
        assert "serviceAccountName" not in pod["spec"]  # a mirror pod may not name one
    assert pods["shop/web-0"]["metadata"]["labels"] == {"app": "web"}
    assert pods["shop/web-0"]["metadata"]["annotations"]["nodeagent.io/service-account"] == "reviews"
    assert pods["shop/web-0"]["spec"]["containers"][0]["image"] == "nodeagent-lab/echo"
    # lab status lists the file's pods once: their mirrors are not listed again as the API's pods
    assert [p["name"] for p in kube_lab.status()["controlplane"]["pods"]] == []


def test_the_files_service_gets_an_endpointslice_of_exactly_the_files_pods(kube_lab: Lab):
    web = {p["ip"] for p in kube_lab.status()["pods"] if p["name"].startswith("web-")}
    deadline, found = time.monotonic() + 60, None
    while time.monotonic() < deadline:
        slices = get(kube_lab, "endpointslices", "-n", "shop", "-l", "kubernetes.io/service-name=web")["items"]
        found = {(a, e["conditions"].get("ready")) for s in slices for e in s.get("endpoints") or []
                 for a in e["addresses"]}
        ports = [(p["name"], p["port"]) for s in slices for p in s.get("ports") or []]
        if found == {(ip, True) for ip in web} and ports == [("http", 8080)]:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"the slice of shop/web holds {found}, not the file's pods {web}")
    # The lab still serves the file's Service itself (kube-proxy's view skips it): by name.
    answered = set()
    for _ in range(12):
        reply = kube_lab.exec("default/client", "curl", "-sS", "--max-time", "5", "http://web.shop/").stdout
        answered.add(json.loads(reply)["pod"])
    assert answered == {"web-0", "web-1"}


def test_the_files_data_and_rbac_objects_are_in_the_api(kube_lab: Lab):
    settings = get(kube_lab, "configmap", "settings", "-n", "shop", "--show-managed-fields")
    assert settings["data"] == {"mode": "fast", "level": "3"}
    assert settings["metadata"]["annotations"]["nodeagent.io/managed-by"] == "nodeagent-lab"
    managers = {(m["manager"], m["operation"]) for m in settings["metadata"]["managedFields"]}
    assert ("nodeagent-lab", "Apply") in managers
    account = get(kube_lab, "serviceaccount", "reviews", "-n", "shop")
    assert account["metadata"]["annotations"]["nodeagent.io/managed-by"] == "nodeagent-lab"
    secret = get(kube_lab, "secret", "creds", "-n", "shop")
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {"password": "s3cret"}
    role = get(kube_lab, "role", "pod-reader", "-n", "shop")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    default = get(kube_lab, "namespace", "default")
    assert "nodeagent.io/managed-by" not in default["metadata"].get("annotations", {})  # the API server's own


def test_the_files_istio_objects_are_in_the_api_until_deleted_from_the_lab(kube_lab: Lab):
    """Given at v1beta1, judged by Istio's schema (the CRDs lab up --kube installs), read
    back at v1; lab delete -f removes it from the API as from the lab."""
    vs = get(kube_lab, "virtualservices.networking.istio.io", "web", "-n", "shop")
    assert vs["apiVersion"] == "networking.istio.io/v1"
    assert vs["spec"] == {"hosts": ["web.shop.svc.cluster.local"],
                          "http": [{"timeout": "3s", "route": [{"destination": {"host": "web.shop.svc.cluster.local"}}]}]}
    assert vs["metadata"]["annotations"]["nodeagent.io/managed-by"] == "nodeagent-lab"
    out = kube_lab.run("delete", "-f", kube_lab.write(VIRTUAL_SERVICE, "vs")).stdout
    assert "deleted from the API: virtualservice shop/web" in out, out
    gone = kubectl(kube_lab, "get", "virtualservices.networking.istio.io", "web", "-n", "shop", check=False)
    assert gone.returncode == 1 and 'virtualservices.networking.istio.io "web" not found' in gone.stderr, gone


def test_lab_apply_of_a_changed_file_changes_the_api(kube_lab: Lab):
    before = wait_mirrors(kube_lab, {"shop/web-0", "shop/web-1", "default/client"})
    out = kube_lab.apply(CHANGED).stdout
    assert "created in the API: configmap shop/extra" in out, out
    settings = get(kube_lab, "configmap", "settings", "-n", "shop")
    assert settings["data"] == {"mode": "slow"}  # the key the file dropped is gone
    extra = get(kube_lab, "configmap", "extra", "-n", "shop")
    assert (extra["data"], extra["metadata"]["labels"]) == ({"k": "v"}, {"added": "by-apply"})
    # The relabelled pod's mirror is replaced (a node may not change a pod's metadata);
    # the process keeps running: same container, no restart.
    deadline = time.monotonic() + 60
    while True:
        after = wait_mirrors(kube_lab, set(before))
        client = after["default/client"]
        if client["metadata"]["uid"] != before["default/client"]["metadata"]["uid"]:
            break
        assert time.monotonic() < deadline, "the mirror of default/client was not replaced"
        time.sleep(0.5)
    assert client["metadata"]["labels"] == {"role": "client", "tier": "front"}
    assert client["status"]["containerStatuses"][0]["containerID"] == \
        before["default/client"]["status"]["containerStatuses"][0]["containerID"]
    assert client["status"]["containerStatuses"][0]["restartCount"] == 0
    assert after["shop/web-0"]["metadata"]["uid"] == before["shop/web-0"]["metadata"]["uid"]


def test_a_mirror_pod_deleted_through_the_api_comes_back_and_the_pod_runs_on(kube_lab: Lab):
    """As kubelet does for a static pod: deleting its mirror does not stop it; the node
    deletes the mirror for good and creates it again."""
    before = wait_mirrors(kube_lab, {"shop/web-0", "shop/web-1", "default/client"})["shop/web-1"]
    kubectl(kube_lab, "delete", "pod", "web-1", "-n", "shop", "--wait=false")
    deadline = time.monotonic() + 60
    while True:
        after = wait_mirrors(kube_lab, {"shop/web-0", "shop/web-1", "default/client"})["shop/web-1"]
        if after["metadata"]["uid"] != before["metadata"]["uid"] and not after["metadata"].get("deletionTimestamp"):
            break
        assert time.monotonic() < deadline, "the mirror of shop/web-1 did not come back"
        time.sleep(0.5)
    old, new = before["status"]["containerStatuses"][0], after["status"]["containerStatuses"][0]
    assert (new["containerID"], new["restartCount"]) == (old["containerID"], 0)  # the same process
    assert after["status"]["podIP"] == before["status"]["podIP"]
