"""The lab's control plane without running it: the certificates and kubeconfigs the lab
makes (who each user is, what the API server's certificate covers, file modes), each
component's command line, the lab record carrying the binary, the node heartbeats
against a recording API (register once, then a lease per beat, status every 5 minutes;
errors retried), the API's Services as service rules, and pod status as the lab's
kubelet reports it."""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import stat

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import object_from_dict
from nodeagent.lab import dns, services, spec
from nodeagent.lab.ipam import Allocations, NodeAlloc, node_addresses
from nodeagent.lab.kube import controlplane, kubelet, nodes, pki, proxy
from nodeagent.lab.kube.api import ApiError
from nodeagent.lab.layout import Layout
from nodeagent.lab.state import LabRecord


def _cert(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def _subject(cert: x509.Certificate) -> tuple[str, list[str]]:
    return (cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
            [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)])


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> pki.Pki:
    keys = pki.Pki(str(tmp_path_factory.mktemp("kube") / "pki"))
    pki.provision(keys, controlplane.server(), [controlplane.ADDRESS, controlplane.KUBERNETES_SERVICE_IP, "127.0.0.1"],
                  controlplane.users(["n1", "n2"]))
    return keys


def test_api_server_certificate_covers_every_name_pods_and_nodes_use(keys):
    cert = _cert(keys.cert("apiserver"))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {
        "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
        "localhost"}
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address(a) for a in ("172.30.0.1", "10.96.0.1", "127.0.0.1")}
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ca = _cert(keys.ca_cert)
    cert.verify_directly_issued_by(ca)


@pytest.mark.parametrize("stem,common,orgs", [
    ("admin", "kubernetes-admin", ["system:masters"]),
    ("controller-manager", "system:kube-controller-manager", []),
    ("scheduler", "system:kube-scheduler", []),
    ("node-n2", "system:node:n2", ["system:nodes"]),
])
def test_each_user_gets_its_identity_and_a_kubeconfig(keys, stem, common, orgs):
    cert = _cert(keys.cert(stem))
    assert _subject(cert) == (common, orgs)
    cert.verify_directly_issued_by(_cert(keys.ca_cert))
    config = yaml.safe_load(open(keys.kubeconfig(stem)))
    assert config["clusters"][0]["cluster"]["server"] == "https://172.30.0.1:6443"
    ca_data = config["clusters"][0]["cluster"]["certificate-authority-data"]
    assert base64.b64decode(ca_data) == open(keys.ca_cert, "rb").read()
    assert base64.b64decode(config["users"][0]["user"]["client-certificate-data"]) == open(keys.cert(stem), "rb").read()
    assert config["users"][0]["name"] == common
    assert stat.S_IMODE(os.stat(keys.kubeconfig(stem)).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys.key(stem)).st_mode) == 0o600


def test_private_keys_are_private_and_the_directory_closed(keys):
    for path in (keys.ca_key, keys.sa_key, keys.key("apiserver")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(keys.directory).st_mode) == 0o700
    assert open(keys.sa_pub).read().startswith("-----BEGIN PUBLIC KEY-----")


def test_components_run_in_the_control_plane_netns_with_the_labs_material():
    layout = Layout("t1", "/sys/fs/cgroup")
    argvs = {c: controlplane.argv(layout, "/cache/controlplane", c) for c in controlplane.COMPONENTS}
    for component, argv in argvs.items():
        assert argv[:5] == ["nsenter", "--net=/run/netns/t1-cp", "--", "/cache/controlplane", component]
    apiserver = argvs["kube-apiserver"]
    assert "--etcd-servers=http://127.0.0.1:2379" in apiserver
    assert "--advertise-address=172.30.0.1" in apiserver
    assert "--service-cluster-ip-range=10.96.0.0/16" in apiserver
    assert "--authorization-mode=Node,RBAC" in apiserver
    assert f"--service-account-signing-key-file={layout.kube_pki_dir}/sa.key" in apiserver
    assert f"--data-dir={layout.etcd_dir}" in argvs["etcd"]
    assert f"--kubeconfig={layout.kube_pki_dir}/scheduler.kubeconfig" in argvs["kube-scheduler"]
    assert "--use-service-account-credentials=true" in argvs["kube-controller-manager"]
    assert controlplane.kubectl_argv(layout, "/b", ["get", "nodes"])[-4:] == [
        "kubectl", f"--kubeconfig={layout.admin_kubeconfig}", "get", "nodes"]


def test_lab_record_keeps_the_control_plane_binary():
    record = LabRecord("t1", "/sys/fs/cgroup", False, [], Allocations(), 7, "/cache/cp")
    again = LabRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert (again.controlplane, again.kube) == ("/cache/cp", True)
    data = record.to_json()
    del data["controlplane"]  # a lab.json written before --kube existed
    assert LabRecord.from_json(data).kube is False


class RecordingApi:
    """Answers like an API server for one node; `fail` makes the next calls unreachable."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.bodies: list[dict | None] = []
        self.fail = 0
        self.leases: set[str] = set()

    def request(self, method, path, body=None, content_type="application/json"):
        if self.fail:
            self.fail -= 1
            raise ApiError(f"{method} {path}: connection refused")
        self.calls.append((method, path))
        self.bodies.append(body)
        if method == "PATCH" and "/leases/" in path and path.rsplit("/", 1)[1] not in self.leases:
            return 404, {"message": "not found"}
        if method == "POST" and path.endswith("/leases"):
            self.leases.add(body["metadata"]["name"])
            return 201, body
        if method == "GET":
            return 200, {"metadata": {"name": path.rsplit("/", 1)[1], "uid": "uid-1"}}
        return 201 if method == "POST" else 200, body or {}

    def call(self, method, path, body=None, content_type="application/json", ok=(200, 201)):
        status, answer = self.request(method, path, body, content_type)
        if status not in ok:
            raise ApiError(f"{method} {path}: {status}", status)
        return answer


def test_node_registers_once_then_renews_its_lease(monkeypatch):
    api, admin = RecordingApi(), RecordingApi()
    clock = [1000.0]
    monkeypatch.setattr(nodes.time, "monotonic", lambda: clock[0])
    beat = nodes.NodeHeartbeat("n1", node_addresses(1), api, admin, {"labels": {"role": "edge"}})
    beat.beat()
    assert api.calls == [("POST", "/api/v1/nodes"), ("GET", "/api/v1/nodes/n1"),
                         ("PATCH", "/api/v1/nodes/n1/status"),
                         ("PATCH", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1"),
                         ("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases")]
    node = api.bodies[0]
    assert node["spec"] == {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"]}
    assert "role" not in node["metadata"]["labels"]  # NodeRestriction: the admin sets the file's labels
    assert admin.calls == [("PATCH", "/api/v1/nodes/n1")]
    assert admin.bodies == [{"metadata": {"labels": {"role": "edge"}}}]
    status = api.bodies[2]["status"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "MemoryPressure": "False", "DiskPressure": "False", "PIDPressure": "False", "Ready": "True"}
    assert {"type": "InternalIP", "address": "172.30.0.2"} in status["addresses"]
    assert api.bodies[-2] == {"spec": api.bodies[-1]["spec"]}
    lease = api.bodies[-1]
    assert lease["spec"]["holderIdentity"] == "n1" and lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["metadata"]["ownerReferences"][0]["uid"] == "uid-1"

    api.calls.clear()
    clock[0] += nodes.LEASE_RENEW
    beat.beat()
    assert api.calls == [("PATCH", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1")]
    api.calls.clear()
    clock[0] += nodes.STATUS_REPORT
    beat.beat()
    assert api.calls[1] == ("PATCH", "/api/v1/nodes/n1/status")


def test_heartbeats_retry_an_unreachable_api_server_and_log_once(monkeypatch):
    monkeypatch.setattr(nodes, "RETRY", nodes.Backoff(first=0.01, maximum=0.01))
    api = RecordingApi()
    api.fail = 3
    log = logging.getLogger("test.heartbeats")
    beat = nodes.NodeHeartbeat("n1", NodeAlloc(1, "172.30.0.2", "10.244.1.0/24"), api, RecordingApi(), {})
    beats = nodes.Heartbeats([beat], log)
    messages = []
    log.warning = lambda fmt, *args: messages.append(fmt % args)  # type: ignore[method-assign]
    beats.start()
    try:
        for _ in range(200):
            lease = ("PATCH", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1")
            if beat.registered and lease in api.calls:
                break
            beats.stop.wait(0.05)
    finally:
        beats.close()
    assert beat.registered
    assert len(messages) == 1 and "connection refused" in messages[0]


def _svc(ns, name, ip, ports, kind="ClusterIP"):
    return {"metadata": {"namespace": ns, "name": name}, "spec": {"clusterIP": ip, "type": kind, "ports": ports}}


def _slice(ns, service, ports, endpoints):
    return {"metadata": {"namespace": ns, "name": f"{service}-x", "labels": {proxy.SERVICE_LABEL: service}},
            "addressType": "IPv4", "ports": ports,
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip, ready in endpoints]}


def test_api_services_become_rules_with_the_ready_endpoints_at_the_slice_port():
    svcs = [_svc("default", "kubernetes", "10.96.0.1", [{"name": "https", "port": 443}]),
            _svc("shop", "web", "10.96.7.7", [{"name": "http", "port": 80, "protocol": "TCP"},
                                              {"name": "metrics", "port": 9090}]),
            _svc("shop", "headless", "None", [{"port": 80}]),
            _svc("shop", "ext", "", [], kind="ExternalName")]
    slices = [_slice("shop", "web", [{"name": "http", "port": 8080, "protocol": "TCP"},
                                     {"name": "metrics", "port": 9100}],
                     [("10.244.2.3", True), ("10.244.1.2", True), ("10.244.1.9", False)]),
              _slice("other", "web", [{"name": "http", "port": 1}], [("10.244.9.9", True)])]
    assert proxy.rules(svcs, slices) == (
        services.Rule("shop/web", "10.96.7.7", 80, "TCP", (services.Endpoint("10.244.1.2", 8080),
                                                           services.Endpoint("10.244.2.3", 8080))),
        services.Rule("shop/web", "10.96.7.7", 9090, "TCP", (services.Endpoint("10.244.1.2", 9100),
                                                             services.Endpoint("10.244.2.3", 9100))))
    assert proxy.names(svcs) == (dns.Name("shop", "web", "10.96.7.7"),)
    assert proxy.rules(svcs, slices, {"shop/web"}) == () and proxy.names(svcs, {"shop/web"}) == ()  # the file's
    assert proxy.rules(svcs, []) == (services.Rule("shop/web", "10.96.7.7", 80, "TCP", ()),
                                     services.Rule("shop/web", "10.96.7.7", 9090, "TCP", ()))


class FakeProc:
    def __init__(self, pid):
        self.pid = pid


def test_pod_status_reports_phase_ip_and_container_states_and_is_stable():
    from nodeagent.lab.supervisor import Unit, pod_phase
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "n"},
            "spec": {"containers": [{"name": n, "command": ["sleep", "1"]} for n in ("a", "b")]}}
    pod_spec = spec.pod_of(object_from_dict(body, "t"), ["n1"])
    a, b = Unit(["sleep"], {}, "/cg", "/log"), Unit(["sleep"], {}, "/cg", "/log")
    pod = kubelet.KubePod("uid-1", pod_spec, "n1", "10.244.1.2", "172.30.0.2", False, {"a": a, "b": b},
                          {"a": "img-a", "b": "img-b"})
    status = kubelet.pod_status(pod, pod_phase([a, b]))
    assert status["phase"] == "Pending"
    assert [c["state"] for c in status["containerStatuses"]] == [{"waiting": {"reason": "ContainerCreating"}}] * 2
    a.proc, a.starts, b.proc, b.starts = FakeProc(11), 1, FakeProc(12), 1
    pod.started = {"a": (11, "2026-01-01T00:00:00Z"), "b": (12, "2026-01-01T00:00:01Z")}
    status = kubelet.pod_status(pod, pod_phase([a, b]))
    assert (status["phase"], status["podIP"], status["hostIP"]) == ("Running", "10.244.1.2", "172.30.0.2")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert [(c["name"], c["image"], c["ready"], c["containerID"]) for c in status["containerStatuses"]] == [
        ("a", "img-a", True, "nodeagent-lab://11"), ("b", "img-b", True, "nodeagent-lab://12")]
    assert kubelet.pod_status(pod, pod_phase([a, b])) == status  # nothing changed: nothing to patch
    b.proc, b.exit_code, b.restarts = None, 3, 2  # b crashed and waits for its restart
    status = kubelet.pod_status(pod, pod_phase([a, b]))
    assert status["phase"] == "Pending"
    crashed = status["containerStatuses"][1]
    assert (crashed["restartCount"], crashed["state"]["waiting"]["reason"]) == (2, "CrashLoopBackOff")
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "False"


def test_env_from_configmaps_secrets_and_labels_is_resolved_as_kubelet_does():
    class Api:
        objects = {"/api/v1/namespaces/n/configmaps/cfg": {"data": {"MODE": "fast", "LEVEL": "3"}},
                   "/api/v1/namespaces/n/secrets/sec": {"data": {"password": base64.b64encode(b"s3cret").decode()}}}

        def request(self, method, path, body=None, content_type="application/json"):
            return (200, self.objects[path]) if path in self.objects else (404, {"message": "not found"})

    item = {"metadata": {"name": "p", "namespace": "n", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "command": ["true"],
                                     "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"},
                                                 {"secretRef": {"name": "absent", "optional": True}}],
                                     "env": [
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "password"}}},
        {"name": "NOPE", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "x", "optional": True}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "PLAIN", "value": "v"}]}]}}
    resolved = kubelet.resolve_env(Api(), item)["spec"]["containers"][0]["env"]
    assert resolved == [{"name": "CFG_LEVEL", "value": "3"}, {"name": "CFG_MODE", "value": "fast"},
                        {"name": "PASSWORD", "value": "s3cret"}, {"name": "APP", "value": "web"},
                        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "PLAIN", "value": "v"}]
    missing = {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "x"}}}
    item["spec"]["containers"][0]["env"] = [missing]
    with pytest.raises(ConfigError, match="has no key 'x'"):
        kubelet.resolve_env(Api(), item)
