"""destinations.resolve: where the source agent sends a captured connection (Service
load-balancing with numeric and named target ports, pods, outside addresses, meshed or
not) and service_of, the destination's guess of the Service used."""

from __future__ import annotations

from collections import Counter

import pytest

from nodeagent.agent.proxy.destinations import NoEndpoint, RoundRobin, resolve
from nodeagent.kube.objects import parse_documents
from nodeagent.model import Model

WORLD = """
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: mesh, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.244.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: mesh, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8081}]}]}
status: {phase: Running, podIP: 10.244.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: mesh, labels: {app: web, istio.io/dataplane-mode: none}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8082}]}]}
status: {phase: Running, podIP: 10.244.2.3}
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: mesh, labels: {app: web}}
spec: {containers: [{name: c}]}
status: {phase: Running, podIP: 10.244.2.4}
---
apiVersion: v1
kind: Pod
metadata: {name: web-4, namespace: mesh, labels: {app: web}}
status: {phase: Pending, podIP: 10.244.2.5}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: legacy, labels: {app: db}}
status: {phase: Running, podIP: 10.244.1.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: metrics, port: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: legacy}
spec:
  clusterIP: 10.96.0.11
  selector: {app: db}
  ports: [{port: 5432, targetPort: 15432}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody, namespace: mesh}
spec:
  clusterIP: 10.96.0.12
  selector: {app: gone}
  ports: [{port: 80}]
"""


@pytest.fixture
def model() -> Model:
    return Model.build(parse_documents(WORLD, "world.yaml"))


def test_named_target_port_round_robin_over_endpoints_that_have_it(model):
    rr = RoundRobin()
    picks = [resolve(model, ("10.96.0.10", 80), rr) for _ in range(9)]
    # web-3 has no port named http and web-4 is Pending: neither is an endpoint.
    assert Counter(t.address for t in picks) == {("10.244.1.2", 8080): 3, ("10.244.2.2", 8081): 3,
                                                 ("10.244.2.3", 8082): 3}
    assert [t.pod.name for t in picks[:3]] == ["web-0", "web-1", "web-2"]
    assert {t.meshed for t in picks if t.pod.name != "web-2"} == {True}
    assert [t.meshed for t in picks if t.pod.name == "web-2"] == [False] * 3  # opted out: passthrough
    assert {t.service.name for t in picks} == {"web"}


def test_numeric_target_port_and_default_target(model):
    rr = RoundRobin()
    db = resolve(model, ("10.96.0.11", 5432), rr)
    assert db.address == ("10.244.1.9", 15432) and db.pod.name == "db-0" and not db.meshed
    metrics = {resolve(model, ("10.96.0.10", 9090), rr).address for _ in range(4)}
    assert metrics == {("10.244.1.2", 9090), ("10.244.2.2", 9090), ("10.244.2.3", 9090), ("10.244.2.4", 9090)}


def test_each_service_port_has_its_own_turn(model):
    rr = RoundRobin()
    assert resolve(model, ("10.96.0.10", 80), rr).pod.name == "web-0"
    assert resolve(model, ("10.96.0.10", 9090), rr).pod.name == "web-0"
    assert resolve(model, ("10.96.0.10", 80), rr).pod.name == "web-1"


def test_a_service_without_endpoints_is_refused(model):
    with pytest.raises(NoEndpoint, match="service mesh/nobody port 80 has no ready endpoint"):
        resolve(model, ("10.96.0.12", 80), RoundRobin())


def test_pods_and_unknown_addresses(model):
    rr = RoundRobin()
    pod = resolve(model, ("10.244.2.2", 7000), rr)
    assert pod.address == ("10.244.2.2", 7000) and pod.meshed and pod.service is None
    legacy = resolve(model, ("10.244.1.9", 5432), rr)
    assert legacy.pod.name == "db-0" and not legacy.meshed
    outside = resolve(model, ("203.0.113.7", 443), rr)
    assert outside.address == ("203.0.113.7", 443) and outside.pod is None and not outside.meshed
    other_port = resolve(model, ("10.96.0.10", 81), rr)  # not a port of the service: left alone
    assert other_port.address == ("10.96.0.10", 81) and other_port.pod is None and other_port.service.name == "web"


def test_service_of_a_pod_port(model):
    web1 = model.pods[("mesh", "web-1")]
    assert model.service_of(web1, 8081).name == "web"  # named target port of this pod
    assert model.service_of(web1, 9090).name == "web"
    assert model.service_of(web1, 8080) is None  # web-0's http port, not web-1's
    assert model.service_of(model.pods[("legacy", "db-0")], 15432).name == "db"
