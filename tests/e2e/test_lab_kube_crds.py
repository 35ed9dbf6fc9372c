"""Istio's CRDs in a `lab up --kube` lab (nodeagent/lab/kube/crds.py): every CRD of
`daemonset/crds/customresourcedefinitions.gen.yaml` (Istio's published file, pinned by
that folder's go.mod) is Established when `lab up` returns; the API server accepts a
valid VirtualService in each of its three spellings (v1, v1beta1, v1alpha3) and refuses
one with a wrong-typed field with the schema's message, which kubectl prints. And the
kustomize base `daemonset/` on that real API server: every object passes a server-side
dry run of `kubectl apply -k daemonset/`, and with its RBAC applied the agent's and the
CA's ServiceAccounts may do what their roles grant and are refused the rest.

Needs the control plane built (`controlplane/build`, run by scripts/setup): without it
the test is skipped on a developer machine and fails under CI."""

from __future__ import annotations

import pytest

from nodeagent.lab.kube import crds
from tests.e2e.conftest import Lab
from tests.e2e.kubelab import AGENT_ACCOUNT, DAEMONSET, MESH_RBAC, SYSTEM, can_i, get, kubectl

pytestmark = pytest.mark.timeout(300)

LAB_YAML = """
apiVersion: v1
kind: Node
metadata: {name: cn1}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
"""
VIRTUAL_SERVICE = """
apiVersion: networking.istio.io/{version}
kind: VirtualService
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: {hosts}
  http:
  - timeout: 2s
    route:
    - destination: {{host: reviews, subset: v1}}
      weight: 90
    - destination: {{host: reviews, subset: v2}}
      weight: 10
"""


def test_every_istio_crd_is_established_when_up_returns(kube_lab: Lab):
    expected = sorted(c["metadata"]["name"] for c in crds.load())
    assert len(expected) == 14 and "virtualservices.networking.istio.io" in expected
    assert f"{len(expected)} Istio CRDs Established" in kube_lab.output
    items = get(kube_lab, "crd")["items"]
    istio = {c["metadata"]["name"]: c for c in items if c["spec"]["group"].endswith(".istio.io")}
    assert sorted(istio) == expected
    for name, crd in istio.items():
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", (name, conditions)
    vs = get(kube_lab, "crd", "virtualservices.networking.istio.io")
    served = {v["name"]: (v["served"], v["storage"]) for v in vs["spec"]["versions"]}
    assert served == {"v1": (True, True), "v1beta1": (True, False), "v1alpha3": (True, False)}
    assert vs["metadata"]["labels"]["app"] == "istio-pilot"  # Istio's own file, not a rewrite


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_a_valid_virtual_service_is_accepted(kube_lab: Lab, version: str):
    name = f"reviews-{version}"
    kubectl(kube_lab, "apply", "-f", "-", input=VIRTUAL_SERVICE.format(version=version, name=name, hosts="[reviews]"))
    try:
        got = get(kube_lab, f"virtualservices.{version}.networking.istio.io", name, "-n", "shop")
        assert got["spec"]["hosts"] == ["reviews"]
        assert [d["weight"] for d in got["spec"]["http"][0]["route"]] == [90, 10]
        assert got["spec"]["http"][0]["timeout"] == "2s"
    finally:
        kubectl(kube_lab, "delete", "virtualservice", name, "-n", "shop", "--ignore-not-found")


def test_a_wrong_typed_field_is_refused_by_the_schema(kube_lab: Lab):
    # `hosts` is a list of strings in Istio's schema; a string is refused by the API server.
    bad = VIRTUAL_SERVICE.format(version="v1", name="bad", hosts="reviews")
    refused = kubectl(kube_lab, "apply", "-f", "-", input=bad, check=False)
    assert refused.returncode != 0
    assert 'The VirtualService "bad" is invalid' in refused.stderr, refused.stderr
    assert 'spec.hosts: Invalid value: "string": spec.hosts in body must be of type array: "string"' \
        in refused.stderr, refused.stderr
    # A weight of the wrong type too, in the v1alpha3 spelling.
    weight = VIRTUAL_SERVICE.format(version="v1alpha3", name="bad", hosts="[reviews]").replace("weight: 90",
                                                                                               "weight: ninety")
    refused = kubectl(kube_lab, "apply", "-f", "-", input=weight, check=False)
    assert refused.returncode != 0
    assert "spec.http[0].route[0].weight" in refused.stderr and "must be of type integer" in refused.stderr, \
        refused.stderr
    missing = kubectl(kube_lab, "get", "virtualservice", "bad", "-n", "shop", check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr, missing.stderr



def test_the_daemonset_base_passes_the_api_servers_validation(kube_lab: Lab):
    """Every object of `kubectl apply -k daemonset/` is accepted by the real API server
    (schemas, CRDs, admission), server-side dry run: nothing of it runs here."""
    kubectl(kube_lab, "create", "namespace", SYSTEM)  # a dry run of it creates nothing for the rest
    try:
        proc = kubectl(kube_lab, "apply", "--dry-run=server", "-k", DAEMONSET, check=False)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        for expected in ("daemonset.apps/nodeagent created (server dry run)",
                         "deployment.apps/nodeagent-ca created (server dry run)",
                         "service/nodeagent-ca created (server dry run)",
                         "clusterrole.rbac.authorization.k8s.io/nodeagent created (server dry run)",
                         "role.rbac.authorization.k8s.io/nodeagent-ca created (server dry run)",
                         "role.rbac.authorization.k8s.io/nodeagent created (server dry run)",
                         "rolebinding.rbac.authorization.k8s.io/nodeagent created (server dry run)"):
            assert expected in lines, proc.stdout
        assert len(lines) == 14 + 14, proc.stdout  # our 14 objects and Istio's 14 CRDs
    finally:
        kubectl(kube_lab, "delete", "namespace", SYSTEM, "--wait=true", "--timeout=60s")


CA = f"system:serviceaccount:{SYSTEM}:nodeagent-ca"


def test_the_service_accounts_may_do_what_their_roles_grant_and_nothing_else(kube_lab: Lab):
    kubectl(kube_lab, "apply", *MESH_RBAC)
    try:
        def can(who: str, *what: str) -> bool:
            return can_i(kube_lab, who, *what)

        for resource in ("pods", "namespaces", "services", "virtualservices.networking.istio.io",
                         "authorizationpolicies.security.istio.io"):
            assert can(AGENT_ACCOUNT, "watch", resource, "-A"), resource
        assert can(AGENT_ACCOUNT, "create", "events", "-n", "shop")
        # The kube source lists and watches; it never GETs one object nor reads EndpointSlices.
        for refused in (("get", "pods", "-n", "shop"), ("watch", "endpointslices.discovery.k8s.io", "-A"),
                        ("get", "secrets", "-n", "nodeagent-system"), ("delete", "pods", "-n", "shop"),
                        ("create", "virtualservices.networking.istio.io", "-n", "shop"),
                        ("create", "tokenreviews.authentication.k8s.io"), ("list", "nodes")):
            assert not can(AGENT_ACCOUNT, *refused), refused
        assert can(CA, "create", "tokenreviews.authentication.k8s.io")
        assert can(CA, "list", "pods", "-A") and can(CA, "watch", "pods", "-A")  # its Pod-only KubeSource
        assert can(CA, "get", "secrets/nodeagent-ca-keys", "-n", "nodeagent-system")
        assert can(CA, "update", "configmaps/nodeagent-ca-root-cert", "-n", "nodeagent-system")
        for refused in (("get", "secrets/other", "-n", "nodeagent-system"), ("get", "secrets", "-n", "shop"),
                        ("delete", "pods", "-A"), ("update", "configmaps/other", "-n", "nodeagent-system")):
            assert not can(CA, *refused), refused
    finally:
        kubectl(kube_lab, "delete", "--wait=true", "--timeout=60s", *MESH_RBAC)
