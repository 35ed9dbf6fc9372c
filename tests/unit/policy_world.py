"""A small cluster for the policy engine tests: namespaces, pods and helpers to build a
PolicySet from Istio YAML and to describe a connection. Names follow Istio's docs
(foo/httpbin, foo/tcp-echo, bar/httpbin, default/sleep)."""

from __future__ import annotations

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import dump_documents, parse_documents
from nodeagent.model import Model, Pod
from nodeagent.policy import Connection, PolicySet

TRUST_DOMAIN = "cluster.local"

NAMESPACES = {"istio-system": {}, "foo": {"istio.io/dataplane-mode": "ambient"},
              "bar": {"istio.io/dataplane-mode": "ambient"}}
# (namespace, name, labels, service account, node, IP)
PODS = [
    ("foo", "httpbin", {"app": "httpbin", "version": "v1"}, "httpbin", "node1", "10.244.1.10"),
    ("foo", "tcp-echo", {"app": "tcp-echo", "version": "v1"}, "tcp-echo", "node1", "10.244.1.11"),
    ("bar", "httpbin", {"app": "httpbin", "version": "v2"}, "httpbin", "node2", "10.244.2.10"),
    ("bar", "finance", {"app": "finance"}, "finance", "node2", "10.244.2.11"),
    ("default", "sleep", {"app": "sleep"}, "sleep", "node1", "10.244.1.20"),
    ("istio-system", "istiod", {"app": "istiod"}, "istiod", "node1", "10.244.1.2"),
]


def _world() -> str:
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": labels}}
            for n, labels in NAMESPACES.items()]
    docs += [{"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": name, "namespace": ns, "labels": labels},
              "spec": {"serviceAccountName": sa, "nodeName": node},
              "status": {"podIP": ip, "phase": "Running"}}
             for ns, name, labels, sa, node, ip in PODS]
    return dump_documents(docs)


def document(kind: str, namespace: str, name: str, spec: str,
             api_version: str = "security.istio.io/v1", metadata: str = "") -> str:
    """A security.istio.io document; `spec` is YAML (indented here), `metadata` more
    flow-map entries such as `, annotations: {...}`."""
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return (f"apiVersion: {api_version}\nkind: {kind}\n"
            f"metadata: {{name: {name}, namespace: {namespace}{metadata}}}\nspec:\n{body}\n---\n")


def model(policies_yaml: str = "") -> Model:
    return Model.build(parse_documents(_world() + "---\n" + policies_yaml, "policies.yaml"))


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
