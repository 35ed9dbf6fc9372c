"""A small cluster for the policy engine tests: namespaces, pods and helpers to build a
PolicySet from Istio YAML and to describe a connection. Names follow Istio's docs
(foo/httpbin, foo/tcp-echo, bar/httpbin, default/sleep)."""

from __future__ import annotations

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import parse_documents
from nodeagent.model import Model, Pod
from nodeagent.policy import Connection, PolicySet

TRUST_DOMAIN = "cluster.local"

WORLD = """
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
---
apiVersion: v1
kind: Namespace
metadata: {name: foo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: bar, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: foo, labels: {app: httpbin, version: v1}}
spec: {serviceAccountName: httpbin, nodeName: node1}
status: {podIP: 10.244.1.10, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: tcp-echo, namespace: foo, labels: {app: tcp-echo, version: v1}}
spec: {serviceAccountName: tcp-echo, nodeName: node1}
status: {podIP: 10.244.1.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: httpbin, namespace: bar, labels: {app: httpbin, version: v2}}
spec: {serviceAccountName: httpbin, nodeName: node2}
status: {podIP: 10.244.2.10, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: finance, namespace: bar, labels: {app: finance}}
spec: {serviceAccountName: finance, nodeName: node2}
status: {podIP: 10.244.2.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: sleep, namespace: default, labels: {app: sleep}}
spec: {serviceAccountName: sleep, nodeName: node1}
status: {podIP: 10.244.1.20, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: istiod, namespace: istio-system, labels: {app: istiod}}
spec: {serviceAccountName: istiod, nodeName: node1}
status: {podIP: 10.244.1.2, phase: Running}
"""


def model(policies_yaml: str = "") -> Model:
    return Model.build(parse_documents(WORLD + "\n---\n" + policies_yaml, "policies.yaml"))


def build(policies_yaml: str, previous: PolicySet | None = None,
          root_namespace: str = "istio-system") -> tuple[PolicySet, list[ConfigError]]:
    return PolicySet.build(model(policies_yaml), previous, root_namespace)


def valid(policies_yaml: str, root_namespace: str = "istio-system") -> PolicySet:
    """The PolicySet of YAML that must be valid (fails the test with the errors if not)."""
    policies, errors = build(policies_yaml, root_namespace=root_namespace)
    assert errors == [], [str(e) for e in errors]
    return policies


def pod(key: str) -> Pod:
    namespace, name = key.split("/")
    return model().pods[(namespace, name)]


def spiffe(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def connection(destination: str, port: int, source: str | None = "default/sleep",
               source_ip: str = "10.244.1.20") -> Connection:
    """A connection from service account `source` ("ns/sa"; None: plaintext) to the pod
    `destination` ("ns/name") on `port`."""
    dest = pod(destination)
    principal = spiffe(*source.split("/")) if source else None
    namespace = source.split("/")[0] if source else None
    return Connection(source_ip, principal, namespace, dest, dest.ip, port)
