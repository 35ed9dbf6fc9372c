"""model.py: Model.build from KubeObjects and the queries everything downstream relies
on (enrolment, endpoints, lookups by IP), plus the errors for Pods and Services it
cannot read."""

from __future__ import annotations

import dataclasses
import re

import pytest

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import parse_documents
from nodeagent.model import (EXCLUDE_OUTBOUND_PORTS, Model, Pod, check)

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: mesh, uid: u1, labels: {app: web, version: v1}}
spec: {nodeName: n1, serviceAccountName: web-sa}
status: {phase: Running, podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: mesh, labels: {app: web, version: v2}}
spec: {nodeName: n2, serviceAccount: legacy-sa}
status: {phase: Running, podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-pending, namespace: mesh, labels: {app: web}}
spec: {nodeName: n1}
status: {phase: Pending, podIP: 10.244.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: web-noip, namespace: mesh, labels: {app: web}}
spec: {nodeName: n1}
status: {phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web-other-ns, namespace: plain, labels: {app: web}}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.244.0.3}
---
apiVersion: v1
kind: Pod
metadata:
  name: db
  namespace: mesh
  labels: {app: db, istio.io/dataplane-mode: none}
  annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: "5432, 9000,x,,80 "}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.244.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: lonely, namespace: implied, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: n2}
status: {phase: Running, podIP: 10.244.1.3}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {port: 9000}
  - {port: 443, targetPort: https, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: mesh}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: mesh}
spec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: zeta, namespace: mesh}
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: alpha, namespace: mesh}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: plain}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored, namespace: mesh}
"""


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.build(parse_documents(CLUSTER, "cluster.yaml"))


def test_pod_fields(model):
    web1 = model.pods[("mesh", "web-1")]
    assert (web1.uid, web1.node, web1.ip, web1.service_account, web1.phase) == \
        ("u1", "n1", "10.244.0.2", "web-sa", "Running")
    assert dict(web1.labels) == {"app": "web", "version": "v1"}
    assert model.pods[("mesh", "web-2")].service_account == "legacy-sa"
    assert model.pods[("mesh", "web-noip")].ip == ""
    assert model.pods[("implied", "lonely")].service_account == "default"


def test_pod_without_status_is_pending():
    [obj] = parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "f")
    assert Model.build([obj]).pods[("default", "p")].phase == "Pending"


def test_namespaces_are_implied_by_pods(model):
    assert set(model.namespaces) == {"mesh", "plain", "implied"}
    assert dict(model.namespaces["implied"].labels) == {}
    assert dict(model.namespaces["mesh"].labels) == {"istio.io/dataplane-mode": "ambient"}


def test_is_meshed(model):
    meshed = {p.name for p in model.pods.values() if model.is_meshed(p)}
    # db opts out with the pod label; web-other-ns's namespace has no label; lonely carries
    # the ambient label itself, but enrolment is by namespace and `implied` has none.
    assert meshed == {"web-1", "web-2", "web-pending", "web-noip"}


def test_is_meshed_follows_namespace_label_value(model):
    ns = parse_documents("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: mesh\n"
                         "  labels: {istio.io/dataplane-mode: sidecar}\n", "f")
    pod = model.pods[("mesh", "web-1")]
    assert not Model.build(ns).is_meshed(pod)


def test_endpoints_are_running_pods_with_ip_in_the_service_namespace(model):
    web = model.services[("mesh", "web")]
    assert [p.name for p in model.endpoints(web)] == ["web-1", "web-2"]
    assert model.endpoints(model.services[("mesh", "external")]) == []


def test_service_fields(model):
    web = model.services[("mesh", "web")]
    assert web.cluster_ip == "10.96.0.10"
    assert web.hostname == "web.mesh.svc.cluster.local"
    assert [(p.name, p.port, p.target_port, p.protocol) for p in web.ports] == \
        [("http", 80, 8080, "TCP"), ("", 9000, 9000, "TCP"), ("", 443, "https", "TCP")]
    assert dict(web.selector) == {"app": "web"}


def test_lookups_by_ip(model):
    assert model.service_by_ip("10.96.0.11").name == "external"
    assert model.service_by_ip("10.96.0.99") is None
    assert model.pod_by_ip("10.244.1.2").name == "web-2"
    assert model.pod_by_ip("10.244.9.9") is None
    # A pod without an IP and a headless service must not answer for "no address".
    assert model.pod_by_ip("") is None
    assert model.service_by_ip("") is None


REUSED_IPS = """
apiVersion: v1
kind: Pod
metadata: {name: job-done, namespace: mesh}
spec: {nodeName: n1}
status: {phase: Succeeded, podIP: 10.244.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: mesh}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.244.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: crashed, namespace: mesh}
spec: {nodeName: n1}
status: {phase: Failed, podIP: 10.244.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: node-exporter, namespace: mesh}
spec: {nodeName: n1, hostNetwork: true}
status: {phase: Running, podIP: 172.30.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: starting, namespace: mesh}
spec: {nodeName: n1}
status: {phase: Pending, podIP: 10.244.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: mesh}
spec: {nodeName: n1, hostNetwork: false}
status: {phase: Running, podIP: 10.244.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: alone-pending, namespace: mesh}
spec: {nodeName: n1}
status: {phase: Pending, podIP: 10.244.0.8}
---
apiVersion: v1
kind: Pod
metadata: {name: stuck-deleting, namespace: mesh, deletionTimestamp: "2026-12-07T05:00:00Z", finalizers: [x/y]}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.244.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: new-owner, namespace: mesh}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.244.0.9}
"""


def test_an_ip_is_a_live_pod_network_pods_a_running_one_first():
    """A finished pod keeps its status.podIP after kubelet gave the IP to another pod, and a
    hostNetwork pod has the node's IP: neither answers for the address (the meshed pod now
    there would be reached in plaintext). Live pods on one IP: the Running one."""
    model = Model.build(parse_documents(REUSED_IPS, "ips.yaml"))
    assert len(model.pods) == 9  # every pod is in the model; the index is what changes
    assert model.pods[("mesh", "node-exporter")].host_network is True
    assert model.pods[("mesh", "api")].host_network is False
    assert model.pod_by_ip("10.244.0.5").name == "web"  # not the Succeeded Job pod listed before it
    assert model.pod_by_ip("10.244.0.6") is None  # only a Failed pod holds it
    assert model.pod_by_ip("172.30.0.2") is None  # the node's address, not the pod's
    assert model.pod_by_ip("10.244.0.7").name == "api"  # Running before Pending, whatever the order
    assert model.pod_by_ip("10.244.0.8").name == "alone-pending"  # a live pod alone still answers
    # both Running: the one not being deleted (a finalizer kept the other, its IP reused)
    assert model.pod_by_ip("10.244.0.9").name == "new-owner"
    assert model.pods[("mesh", "stuck-deleting")].terminating and not model.pods[("mesh", "new-owner")].terminating


DUAL_STACK = """
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: mesh}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.244.0.5, podIPs: [{ip: 10.244.0.5}, {ip: "fd00:0:0::5"}, {ip: "fd00::5"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: v6, namespace: mesh}
spec: {nodeName: n1}
status: {phase: Running, podIP: "fd00::6", podIPs: [{ip: "fd00::6"}, {ip: 10.244.0.6}]}
---
apiVersion: v1
kind: Pod
metadata: {name: single, namespace: mesh}
spec: {nodeName: n1}
status: {phase: Running, podIP: 10.244.0.6}
"""


def test_a_dual_stack_pods_other_addresses_are_kept_and_answer_after_every_pods_own():
    """status.podIPs but status.podIP (written the same, once) are the pod's other
    addresses; each finds the pod, unless it is another pod's status.podIP."""
    model = Model.build(parse_documents(DUAL_STACK, "dual.yaml"))
    assert [(p.name, p.ip, p.other_ips) for p in model.pods.values()] == [
        ("web", "10.244.0.5", ("fd00::5",)), ("v6", "fd00::6", ("10.244.0.6",)), ("single", "10.244.0.6", ())]
    assert model.pod_by_ip("fd00::5").name == "web" and model.pod_by_ip("fd00::6").name == "v6"
    assert model.pod_by_ip("10.244.0.6").name == "single"  # its own address, listed after v6's other one


def test_probe_ports_are_every_containers_probes_by_number_or_by_its_own_port_name():
    objs = parse_documents("""
apiVersion: v1
kind: Pod
metadata: {name: p, namespace: shop}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9901}]
    readinessProbe: {httpGet: {path: /ready, port: http}}
    livenessProbe: {tcpSocket: {port: 9000}}
    startupProbe: {grpc: {port: 7070}}
  - name: side
    ports: [{name: metrics, containerPort: 9090}]
    readinessProbe: {httpGet: {port: admin}}
    livenessProbe: {exec: {command: ["true"]}}
  initContainers:
  - name: proxy
    restartPolicy: Always
    ports: [{name: health, containerPort: 15021}]
    startupProbe: {httpGet: {port: health}}
    readinessProbe: {tcpSocket: {port: "٨٠"}}
""", "probes.yaml")
    # `admin` is the first container's name, not the side car's: that probe never connects;
    # a native sidecar's probes count; non-ASCII digits are a name, and no port's
    assert Model.build(objs).pods[("shop", "p")].probe_ports == frozenset({8080, 9000, 7070, 15021})


def test_host_network_must_be_a_boolean():
    objs = parse_documents("apiVersion: v1\nkind: Pod\nmetadata: {name: x, namespace: shop}\n"
                           "spec: {hostNetwork: \"yes\"}\n", "bad.yaml")
    with pytest.raises(ConfigError) as info:
        check(objs)
    assert str(info.value) == "bad.yaml#1 (Pod shop/x): spec.hostNetwork must be true or false, not 'yes'"


def test_pods_on_node(model):
    assert [p.name for p in model.pods_on_node("n2")] == ["lonely", "web-2"]
    assert model.pods_on_node("n9") == []


def test_istio_resources_grouped_by_kind_in_stable_order(model):
    assert set(model.resources) == {"VirtualService", "AuthorizationPolicy"}
    assert [o.name for o in model.resources["VirtualService"]] == ["alpha", "zeta"]
    assert [o.namespace for o in model.resources["AuthorizationPolicy"]] == ["plain"]


def test_port_list_annotation(model):
    db = model.pods[("mesh", "db")]
    assert db.port_list(EXCLUDE_OUTBOUND_PORTS) == frozenset({5432, 9000, 80})
    assert model.pods[("mesh", "web-1")].port_list(EXCLUDE_OUTBOUND_PORTS) == frozenset()


def test_model_is_immutable(model):
    with pytest.raises(TypeError):
        model.pods[("mesh", "x")] = None  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.pods[("mesh", "web-1")].ip = "1.2.3.4"  # type: ignore[misc]
    with pytest.raises(TypeError):
        model.pods[("mesh", "web-1")].labels["app"] = "x"  # type: ignore[index]


def test_empty_model():
    empty = Model.empty()
    assert (dict(empty.pods), dict(empty.services), dict(empty.namespaces), dict(empty.resources)) == ({}, {}, {}, {})
    pod = Pod("ns", "p", "", "n", "10.0.0.1", {}, {})
    assert not empty.is_meshed(pod)


@pytest.mark.parametrize("body, message", [
    ("kind: Service\nspec: {ports: [{port: http}]}", "spec.ports[0].port must be a port number 1-65535, not 'http'"),
    ("kind: Service\nspec: {ports: [{port: 70000}]}", "spec.ports[0].port must be a port number 1-65535, not 70000"),
    ("kind: Service\nspec: {ports: [{name: x}]}", "spec.ports[0].port must be a port number 1-65535, not None"),
    ("kind: Service\nspec: {ports: [{port: 80}, {port: 81, targetPort: 0}]}",
     "spec.ports[1].targetPort must be a port number 1-65535, not 0"),
    ("kind: Service\nspec: {ports: [80]}", "spec.ports[0] must be a map with port, targetPort, protocol, name"),
    ("kind: Service\nspec: {ports: {port: 80}}", "spec.ports must be a list"),
    ("kind: Service\nspec: {selector: [app]}", "spec.selector must be a map of strings, not list"),
    ("kind: Service\nspec: {clusterIP: 10.96.0.300}", "spec.clusterIP '10.96.0.300' is not an IP address"),
    ("kind: Pod\nstatus: Running", "status must be a map, not str"),
    ("kind: Pod\nstatus: {podIP: 10}", "status.podIP must be a string, not int"),
    ("kind: Pod\nstatus: {podIP: pod-a}", "status.podIP 'pod-a' is not an IP address"),
    ("kind: Pod\nspec: {containers: [{name: a, readinessProbe: [tcpSocket]}]}",
     "spec.containers[0].readinessProbe must be a map"),
    ("kind: Pod\nspec: {containers: [{name: a, livenessProbe: {httpGet: 8080}}]}",
     "spec.containers[0].livenessProbe.httpGet must be a map"),
    ("kind: Pod\nspec: {containers: [{name: a, startupProbe: {tcpSocket: {port: 70000}}}]}",
     "spec.containers[0].startupProbe.tcpSocket.port must be a port number 1-65535, not 70000"),
    ("kind: Pod\nstatus: {podIP: 10.0.0.1, podIPs: 10.0.0.1}", "status.podIPs must be a list, not str"),
    ("kind: Pod\nstatus: {podIP: 10.0.0.1, podIPs: [10.0.0.1]}", "status.podIPs[0] must be a map with ip"),
    ("kind: Pod\nstatus: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::x'}]}",
     "status.podIPs[1].ip 'fd00::x' is not an IP address"),
])
def test_unreadable_pods_and_services_name_object_and_field(body, message):
    objs = parse_documents(f"apiVersion: v1\nmetadata: {{name: x, namespace: shop}}\n{body}\n", "bad.yaml")
    kind = objs[0].kind
    with pytest.raises(ConfigError) as info:
        check(objs)
    assert str(info.value) == f"bad.yaml#1 ({kind} shop/x): {message}"
    with pytest.raises(ConfigError):
        Model.build(objs)


def test_check_accepts_what_build_reads():
    objs = parse_documents(CLUSTER, "cluster.yaml")
    check(objs)  # must not raise
    assert len(Model.build(objs).pods) == 7


PORTS_AND_OWNERS = """
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: mesh, ownerReferences: [{apiVersion: apps/v1, kind: Deployment, name: web}]}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}, {containerPort: 9090}]
  - name: sidecar
    ports: [{name: metrics, containerPort: 15090}, {name: http, containerPort: 8081}]
status: {phase: Running, podIP: 10.244.0.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: api-7d9f-abcde
  namespace: mesh
  labels: {pod-template-hash: 7d9f}
  ownerReferences:
  - {apiVersion: apps/v1, kind: ReplicaSet, name: api-7d9f, controller: true}
status: {phase: Running, podIP: 10.244.0.3}
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  namespace: mesh
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, controller: true}]
status: {phase: Running, podIP: 10.244.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: lonely, namespace: mesh}
status: {phase: Running, podIP: 10.244.0.5}
"""


def test_named_container_ports_first_container_wins():
    pods = Model.build(parse_documents(PORTS_AND_OWNERS, "p.yaml")).pods
    assert dict(pods[("mesh", "web-0")].ports) == {"http": 8080, "metrics": 15090}
    assert dict(pods[("mesh", "lonely")].ports) == {}


def test_workload_name_is_istios():
    pods = Model.build(parse_documents(PORTS_AND_OWNERS, "p.yaml")).pods
    assert pods[("mesh", "web-0")].workload_name == "web"  # the lab's Deployment pods
    assert pods[("mesh", "api-7d9f-abcde")].workload_name == "api"  # ReplicaSet minus pod-template-hash
    assert pods[("mesh", "db-0")].workload_name == "db"
    assert pods[("mesh", "lonely")].workload_name == "lonely"  # no owner: the pod itself


def _owned(name: str, kind: str, owner: str, labels: str = "{}") -> str:
    return f"""apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: mesh
  labels: {labels}
  ownerReferences: [{{apiVersion: x, kind: {kind}, name: {owner}, controller: true}}]
status: {{phase: Running, podIP: 10.244.0.{len(name)}}}
---
"""


@pytest.mark.parametrize("pod, workload", [
    (_owned("backup-29000000-x1", "Job", "backup-29000000"), "backup"),  # a CronJob's run, as Istio names it
    (_owned("migrate-x1", "Job", "migrate-2"), "migrate-2"),  # a Job of its own
    (_owned("web-6d4f8b9c7-x1", "ReplicaSet", "web-6d4f8b9c7", "{rollouts-pod-template-hash: 6d4f8b9c7}"),
     "web"),  # an Argo Rollout's ReplicaSet
    (_owned("legacy-3-x1", "ReplicationController", "legacy-3", "{deploymentconfig: legacy}"), "legacy"),
    (_owned("rs-x1", "ReplicaSet", "rs", "{pod-template-hash: 7d9f}"), "rs")])  # not its hash: its own
def test_workload_names_of_cronjobs_rollouts_and_deploymentconfigs_are_istios(pod, workload):
    """Each CronJob run or rollout was a workload (and metric series) of its own."""
    (found,) = Model.build(parse_documents(pod, "p.yaml")).pods.values()
    assert found.workload_name == workload


@pytest.mark.parametrize("containers,says", [
    ("[{name: a, ports: [{name: http, containerPort: 0}]}]", "spec.containers[0].ports[0].containerPort"),
    ("[{name: a, ports: [{name: http, containerPort: x}]}]", "spec.containers[0].ports[0].containerPort"),
    ("[{name: a, ports: {http: 80}}]", "spec.containers[0].ports must be a list"),
    ("[{name: a}, {name: b, ports: [http]}]", "spec.containers[1].ports[0] must be a map"),
])
def test_bad_container_ports_are_named(containers, says):
    doc = f"apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: mesh}}\nspec: {{containers: {containers}}}\n"
    with pytest.raises(ConfigError, match=re.escape(says)):
        check(parse_documents(doc, "bad.yaml"))
