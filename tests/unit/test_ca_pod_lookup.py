"""The CA's node authorization on a watch miss (issue 13, item 2): a pod created moments
ago may not be in the CA's pod watch yet, so NodeAuthorizer asks its `lookup` before
refusing, and in a cluster that lookup lists the namespace's pods on the caller's node
with the identity's service account (kubeauth.PodLookup). Its answer is read here from
recorded API objects (plain dicts); an API that cannot answer fails closed with
Unavailable. The real API's answer is the e2e tier's (tests/e2e/test_lab_kube_ca.py)."""

from __future__ import annotations

import ssl

import pytest

from nodeagent.identity.ca.auth import Caller, NodeAuthorizer
from nodeagent.identity.ca.kubeauth import PodLookup, pods_query, runs_identity
from nodeagent.identity.errors import CaUnavailable, PermissionDenied
from nodeagent.identity.spiffe import Identity
from nodeagent.kube.client import ClusterConfig, KubeClient
from nodeagent.model import Model

SHOP = Identity("cluster.local", "shop", "cart")


def pod(node="node1", account="cart", namespace="shop", phase="Pending", field="serviceAccountName") -> dict:
    return {"metadata": {"name": "cart-7f9", "namespace": namespace, "uid": "u1"},
            "spec": {"nodeName": node, field: account, "containers": [{"name": "c"}]},
            "status": {"phase": phase}}


def test_the_query_selects_the_namespaces_pods_on_the_node_with_the_account():
    resource, params = pods_query("node1", SHOP)
    assert resource.path == "/api/v1/namespaces/shop/pods"
    assert params == {"fieldSelector": "spec.nodeName=node1,spec.serviceAccountName=cart"}


@pytest.mark.parametrize("pods, found", [
    ([pod()], True),  # just created: Pending counts, as in the model
    ([pod(phase="Running")], True),
    ([pod(field="serviceAccount")], True),  # the deprecated spelling, as model.py reads it
    ([pod(phase="Succeeded")], False),
    ([pod(phase="Failed"), pod(phase="Running")], True),
    ([pod(node="node2")], False),
    ([pod(account="other")], False),
    ([pod(namespace="other")], False),
    ([], False),
    ([{"metadata": None, "spec": "x"}], False),
])
def test_a_listed_pod_of_the_identity_on_the_node_counts(pods, found):
    assert runs_identity(pods, "node1", SHOP) is found


def test_the_lookup_is_asked_only_on_a_miss_and_refuses_when_it_finds_nothing():
    asked = []

    def lookup(node, identity):
        asked.append((node, identity))
        return node == "node1"

    authorizer = NodeAuthorizer(Model.empty, lookup)
    authorizer.authorize(Caller("node1"), SHOP)
    with pytest.raises(PermissionDenied, match="no pod with service account ns/shop/sa/cart on node node2"):
        authorizer.authorize(Caller("node2"), SHOP)
    assert asked == [("node1", SHOP), ("node2", SHOP)]


def test_without_a_lookup_a_miss_is_refused():
    with pytest.raises(PermissionDenied):
        NodeAuthorizer(Model.empty).authorize(Caller("node1"), SHOP)


def test_an_api_that_cannot_answer_is_unavailable_never_a_grant(caplog):
    client = KubeClient(ClusterConfig("127.0.0.1", 1, ssl.create_default_context(), "t", "test"), timeout=2)
    authorizer = NodeAuthorizer(Model.empty, PodLookup(client))
    with pytest.raises(CaUnavailable, match="the CA cannot check the pods of node node1 now: cannot connect"):
        authorizer.authorize(Caller("node1"), SHOP)
    assert "cannot look up the pods of ns/shop/sa/cart on node node1" in caplog.text
