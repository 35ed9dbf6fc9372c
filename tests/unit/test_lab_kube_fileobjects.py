"""The lab file in the API without running one: which objects the lab applies and how
(kube/fileobjects.py: server-side apply bodies, the lab's mark, what is deleted and in
which order), the mirror pods of the file's pods (kube/mirror.py: what NodeRestriction
lets a node create, when one is replaced, the status from the supervisor's units), and
the supervisor starting the API server's clients only once it is ready. Talking to the API
is checked on the real one (tests/e2e/test_lab_kube_file.py), never a stand-in."""

from __future__ import annotations

import base64
import urllib.parse

import pytest

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import parse_documents
from nodeagent.lab import spec
from nodeagent.lab.ipam import allocate
from nodeagent.lab.kube import fileobjects, mirror
from nodeagent.lab.supervisor import Supervisor, Unit

FILE = """
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: reviews, namespace: shop}
automountServiceAccountToken: false
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop, labels: {app: web}}
data: {mode: fast}
---
apiVersion: v1
kind: Secret
metadata: {name: creds, namespace: shop}
type: Opaque
data: {user: YWRtaW4=}
stringData: {password: s3cret}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reader, namespace: shop}
rules: [{apiGroups: [""], resources: [pods], verbs: [get]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: readers}
subjects: [{kind: ServiceAccount, name: reviews, namespace: shop}]
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
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
metadata: {name: web, namespace: shop, labels: {app: web}, annotations: {note: x}}
spec:
  nodeName: n2
  serviceAccountName: reviews
  terminationGracePeriodSeconds: 3
  containers:
  - name: main
    command: [sleep, infinity]
    env: [{name: IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
    ports: [{containerPort: 8080, name: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: other}
spec:
  replicas: 2
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers: [{name: c, image: example/api, command: [sleep, infinity]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec: {hosts: [web]}
---
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
"""


def desired_of(text: str = FILE) -> tuple[spec.DesiredState, object]:
    desired = spec.load(parse_documents(text, "lab.yaml"))
    return desired, allocate(desired)


def test_the_lab_applies_the_kinds_the_api_serves_in_dependency_order():
    desired, alloc = desired_of()
    items = fileobjects.wanted(desired, alloc)
    assert [str(i) for i in items] == [
        "namespace default", "namespace other", "namespace shop", "serviceaccount shop/reviews", "secret shop/creds",
        "configmap shop/settings", "clusterrolebinding readers", "role shop/reader", "service shop/web",
        "virtualservice shop/web"]
    by_name = {str(i): i.body for i in items}
    mark = {fileobjects.MANAGED_BY: "nodeagent-lab"}
    # `default` is the API server's: labelled, never marked (so never deleted)
    assert by_name["namespace default"]["metadata"] == {"name": "default", "labels": {"team": "a"}}
    assert by_name["namespace other"]["metadata"] == {"name": "other", "annotations": mark}  # implied
    assert by_name["namespace shop"]["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    assert by_name["serviceaccount shop/reviews"] == {
        "apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
        "metadata": {"name": "reviews", "namespace": "shop", "annotations": mark}}
    secret = by_name["secret shop/creds"]
    assert secret["data"] == {"user": "YWRtaW4=", "password": base64.b64encode(b"s3cret").decode()}
    assert "stringData" not in secret and secret["type"] == "Opaque"
    assert by_name["configmap shop/settings"]["metadata"]["labels"] == {"app": "web"}  # the file's labels only
    assert by_name["clusterrolebinding readers"]["apiVersion"] == "rbac.authorization.k8s.io/v1"
    assert "namespace" not in by_name["clusterrolebinding readers"]["metadata"]
    service = by_name["service shop/web"]["spec"]
    ip = alloc.services["shop/web"]
    assert service == {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
                       "clusterIP": ip, "clusterIPs": [ip]}


def test_apply_paths_are_server_side_apply_as_the_labs_field_manager():
    desired, alloc = desired_of()
    paths = {str(i): fileobjects.apply_path(i) for i in fileobjects.wanted(desired, alloc)}
    path, _, query = paths["role shop/reader"].partition("?")
    assert path == "/apis/rbac.authorization.k8s.io/v1/namespaces/shop/roles/reader"
    assert urllib.parse.parse_qs(query) == {"fieldManager": ["nodeagent-lab"], "force": ["true"]}
    assert paths["namespace shop"].startswith("/api/v1/namespaces/shop?")
    assert paths["clusterrolebinding readers"].startswith(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/readers?")


def test_an_rbac_version_the_api_does_not_serve_is_refused_by_name():
    desired, alloc = desired_of(FILE.replace("rbac.authorization.k8s.io/v1\nkind: Role\n",
                                             "rbac.authorization.k8s.io/v1beta1\nkind: Role\n"))
    with pytest.raises(ConfigError, match=r"lab.yaml#6 \(Role shop/reader\) apiVersion: Role must be "
                                          r"rbac.authorization.k8s.io/v1 in a --kube lab"):
        fileobjects.wanted(desired, alloc)


def test_istio_kinds_go_at_the_files_version_when_their_crd_serves_it():
    desired, alloc = desired_of(FILE.replace("networking.istio.io/v1\nkind: VirtualService",
                                             "networking.istio.io/v1beta1\nkind: VirtualService"))
    [vs] = [i for i in fileobjects.wanted(desired, alloc) if i.kind.kind == "VirtualService"]
    assert vs.body == {"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService", "spec": {"hosts": ["web"]},
                       "metadata": {"name": "web", "namespace": "shop",
                                    "annotations": {fileobjects.MANAGED_BY: "nodeagent-lab"}}}
    assert fileobjects.apply_path(vs).startswith("/apis/networking.istio.io/v1beta1/namespaces/shop/virtualservices/web?")
    # Listed (for stale ones) at the CRD's storage version; every CRD of daemonset/crds is a kind here.
    kinds = {k.kind: k for k in fileobjects.istio_kinds()}
    assert len(kinds) == 14 and kinds["VirtualService"].collection() == "/apis/networking.istio.io/v1/virtualservices"
    assert kinds["AuthorizationPolicy"].served == ("v1", "v1beta1")
    desired, alloc = desired_of(FILE.replace("networking.istio.io/v1\nkind: VirtualService",
                                             "networking.istio.io/v2\nkind: VirtualService"))
    with pytest.raises(ConfigError, match=r"\(VirtualService shop/web\) apiVersion: VirtualService is served as "
                                          r"networking.istio.io/v1, networking.istio.io/v1alpha3, "
                                          r"networking.istio.io/v1beta1, not networking.istio.io/v2"):
        fileobjects.wanted(desired, alloc)


VS = next(k for k in fileobjects.istio_kinds() if k.kind == "VirtualService")


def _item(name: str, namespace: str = "", marked: bool = True) -> dict:
    meta = {"name": name, **({"namespace": namespace} if namespace else {})}
    if marked:
        meta["annotations"] = {fileobjects.MANAGED_BY: "nodeagent-lab"}
    return {"metadata": meta}


def test_only_the_labs_own_objects_that_left_it_are_deleted_namespaces_last():
    desired, alloc = desired_of()
    keep = fileobjects.wanted(desired, alloc)
    kinds = {k.kind: k for k in fileobjects.KINDS}
    live = {kinds["Namespace"]: [_item("shop"), _item("gone"), _item("default"), _item("users", marked=False)],
            kinds["ConfigMap"]: [_item("settings", "shop"), _item("old", "gone"), _item("theirs", "shop", False),
                                 _item("kube-root-ca.crt", "shop", False)],
            kinds["Service"]: [_item("web", "shop"), _item("web", "gone")],
            kinds["ClusterRole"]: [_item("old-role")],
            VS: [_item("web", "shop"), _item("old", "shop")]}
    assert [(k.kind, ns, name) for k, ns, name in fileobjects.stale(keep, live)] == [
        ("VirtualService", "shop", "old"), ("Service", "gone", "web"), ("ClusterRole", "", "old-role"),
        ("ConfigMap", "gone", "old"), ("Namespace", "", "gone")]


# --- mirror pods ------------------------------------------------------------------


def test_a_mirror_pod_is_what_node_restriction_lets_a_node_create():
    desired, _ = desired_of()
    body = mirror.mirror_pod(desired.pods["shop/web"], "n2", "uid-n2")
    meta, pod_spec = body["metadata"], body["spec"]
    digest = mirror.pod_hash(desired.pods["shop/web"])
    assert meta["annotations"] == {"note": "x", mirror.SERVICE_ACCOUNT: "reviews", mirror.HASH: digest,
                                   mirror.MIRROR: digest, mirror.SOURCE: "file"}
    assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Node", "name": "n2", "uid": "uid-n2",
                                        "controller": True}]
    assert (meta["name"], meta["namespace"], meta["labels"]) == ("web", "shop", {"app": "web"})
    assert "serviceAccountName" not in pod_spec and "volumes" not in pod_spec
    assert pod_spec == {"nodeName": "n2", "restartPolicy": "Always", "terminationGracePeriodSeconds": 3,
                        "containers": [{"name": "main", "image": mirror.NO_IMAGE, "command": ["sleep", "infinity"],
                                        "env": [{"name": "IP",
                                                 "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                                        "ports": [{"containerPort": 8080, "name": "http"}]}]}
    deployment_pod = mirror.mirror_pod(desired.pods["other/api-1"], "n2", "u")
    assert deployment_pod["spec"]["containers"][0]["image"] == "example/api"
    assert mirror.SERVICE_ACCOUNT not in deployment_pod["metadata"]["annotations"]


def test_a_mirror_pod_is_replaced_when_the_files_pod_changes_or_the_api_deletes_it():
    desired, _ = desired_of()
    pod = desired.pods["shop/web"]
    item = mirror.mirror_pod(pod, "n2", "u")
    assert mirror.why_replace(item, pod) is None
    relabelled, _ = desired_of(FILE.replace("labels: {app: web}, annotations", "labels: {app: web2}, annotations"))
    assert mirror.why_replace(item, relabelled.pods["shop/web"]) == "the file's pod changed"
    assert mirror.why_replace(item, None) == "its pod left the lab"
    item["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert mirror.why_replace(item, pod) == "deleted through the API"


def test_the_api_servers_clients_start_only_once_it_is_ready():
    ready = []
    unit = Unit(["kube-controller-manager"], {}, "/cg", "/log", after=lambda: bool(ready))
    supervisor = Supervisor(state=None, clock=lambda: 10.0)
    started = []
    supervisor._start = lambda key, u, now: (started.append(key), setattr(u, "starts", u.starts + 1))
    supervisor._step_unit("cp:kube-controller-manager", unit, 10.0)
    assert started == [] and unit.next_start == pytest.approx(10.2)
    ready.append(True)
    supervisor._step_unit("cp:kube-controller-manager", unit, 10.2)
    assert started == ["cp:kube-controller-manager"]
    ready.clear()  # a restart after its first start does not wait again
    unit.proc = None
    supervisor._step_unit("cp:kube-controller-manager", unit, 11.0)
    assert started == ["cp:kube-controller-manager"] * 2
