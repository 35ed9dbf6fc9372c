"""The lab's control plane without running it: the certificates and kubeconfigs the lab
makes (who each user is, what the API server's certificate covers, file modes), each
component's command line, the lab record carrying the binary, the API's Services as
service rules, and pod status as the lab's kubelet reports it. What the lab says to the
API (node registration and leases, env from ConfigMaps and Secrets) is checked on the
real API server (tests/e2e/test_lab_kube.py), never a stand-in."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import stat

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.kube.objects import object_from_dict
from nodeagent.lab import dns, services, spec
from nodeagent.lab.ipam import Allocations
from nodeagent.lab.kube import controlplane, kubelet, pki, proxy
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
