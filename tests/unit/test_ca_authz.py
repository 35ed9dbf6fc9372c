"""Who gets which identity: node tokens, the pods-on-this-node rule, and what a
refusal looks like (typed, logged, counted)."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.errors import ConfigError
from nodeagent.identity.ca.auth import (Caller, ModelView, NodeAuthorizer, TokenFileAuthenticator,
                                       bearer_token)
from nodeagent.identity.caproto import IstioCertificateRequest
from nodeagent.identity.errors import CsrRejected, PermissionDenied, Unauthenticated
from nodeagent.identity.ca.server import CaMetrics, CertificateService
from nodeagent.identity.spiffe import NODE_NAMESPACE, node_identity
from nodeagent.sources.files import FilesSource

from identity_fixtures import csr_pem, identity, make_ca, pod_yaml, write_pods, write_tokens

LOG = logging.getLogger("test.caauth")
TOKENS = {"node1": "n1-" + "a" * 29, "node2": "n2-" + "b" * 29}


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.yaml"
    write_tokens(path, TOKENS)
    return path


def test_a_node_token_authenticates_that_node(tokens):
    auth = TokenFileAuthenticator(tokens, LOG)
    assert auth.authenticate(TOKENS["node1"]) == Caller("node1")
    assert auth.authenticate(TOKENS["node2"]) == Caller("node2")
    assert auth.nodes == ["node1", "node2"]


@pytest.mark.parametrize("token", ["", "n1-" + "a" * 28, "n1-" + "a" * 30, TOKENS["node1"].upper()])
def test_an_unknown_token_is_unauthenticated(tokens, token):
    with pytest.raises(Unauthenticated, match="unknown bearer token"):
        TokenFileAuthenticator(tokens, LOG).authenticate(token)


def test_json_token_files_work_too(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text('{"node1": "%s"}' % TOKENS["node1"])
    assert TokenFileAuthenticator(path, LOG).authenticate(TOKENS["node1"]) == Caller("node1")


def test_a_changed_token_file_is_reread(tokens):
    auth = TokenFileAuthenticator(tokens, LOG)
    assert auth.authenticate(TOKENS["node1"]).node == "node1"
    # Same size, same second: only the content tells the change apart.
    rotated = {"node1": "n1-" + "c" * 29, "node2": TOKENS["node2"]}
    write_tokens(tokens, rotated)
    with pytest.raises(Unauthenticated):
        auth.authenticate(TOKENS["node1"])
    assert auth.authenticate(rotated["node1"]) == Caller("node1")


def test_a_broken_edit_keeps_the_last_good_tokens(tokens, caplog):
    auth = TokenFileAuthenticator(tokens, LOG)
    tokens.write_text("node1: short\n")
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        assert auth.authenticate(TOKENS["node1"]) == Caller("node1")
    assert "keeping the last good node tokens" in caplog.text and "at least 16 characters" in caplog.text
    tokens.unlink()
    assert auth.authenticate(TOKENS["node2"]) == Caller("node2")


@pytest.mark.parametrize("content, says", [
    ("", "non-empty map"),
    ("[a, b]", "non-empty map"),
    ("node1: [", "not YAML/JSON"),
    ("Node_1: %s\n" % ("x" * 32), "'Node_1' is not a Kubernetes node name"),
    ("node1: 12345\n", "node node1: the token must be a string"),
    ("node1: %s\nnode2: %s\n" % ("x" * 32, "x" * 32), "node node2 has the same token as node node1"),
])
def test_a_bad_token_file_at_start_is_a_config_error(tmp_path, content, says):
    path = tmp_path / "tokens.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=says):
        TokenFileAuthenticator(path, LOG)


def test_a_missing_token_file_at_start_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the token file"):
        TokenFileAuthenticator(tmp_path / "nope.yaml", LOG)


@pytest.mark.parametrize("metadata, says", [
    ([], "no authorization metadata"),
    ([("authorization", "Basic abc")], "is not 'Bearer <token>'"),
    ([("authorization", "Bearer ")], "is not 'Bearer <token>'"),
])
def test_bearer_token_metadata_is_required(metadata, says):
    with pytest.raises(Unauthenticated, match=says):
        bearer_token(metadata)


def test_bearer_token_reads_the_token():
    assert bearer_token([("x-other", "1"), ("authorization", "bearer tok123")]) == "tok123"
    assert bearer_token({"authorization": "Bearer  tok456 "}) == "tok456"


# --- authorization against the cluster model --------------------------------------------
@pytest.fixture
def cluster(tmp_path):
    directory = tmp_path / "cluster"
    write_pods(directory, pod_yaml("web-0", "node1", "web"), pod_yaml("db-0", "node2", "db", ns="data"),
               pod_yaml("job-0", "node2", "batch", phase="Succeeded"))
    return directory


def test_an_identity_is_allowed_only_to_the_node_running_such_a_pod(cluster):
    authz = NodeAuthorizer(ModelView(FilesSource(cluster)))
    authz.authorize(Caller("node1"), identity("default", "web"))
    authz.authorize(Caller("node2"), identity("data", "db"))
    with pytest.raises(PermissionDenied, match="^no pod with service account ns/default/sa/web on node node2"):
        authz.authorize(Caller("node2"), identity("default", "web"))
    with pytest.raises(PermissionDenied, match="ns/default/sa/db on node node2"):  # right SA, wrong namespace
        authz.authorize(Caller("node2"), identity("default", "db"))
    with pytest.raises(PermissionDenied, match="ns/default/sa/batch on node node2"):  # pod has finished
        authz.authorize(Caller("node2"), identity("default", "batch"))


def test_a_node_has_its_own_identity_and_no_pod_ever_has_one(cluster):
    """spiffe.NODE_NAMESPACE: what a node's agent presents when it vouches for its pod's
    request (one waypoint per request). Only that node gets it; a pod in that namespace
    (any pod with a service account named after a node) gets nothing."""
    write_pods(cluster, pod_yaml("impostor", "node2", "node1", ns=NODE_NAMESPACE), name="impostor.yaml")
    authz = NodeAuthorizer(ModelView(FilesSource(cluster)))
    authz.authorize(Caller("node1"), node_identity("cluster.local", "node1"))
    with pytest.raises(PermissionDenied, match="^nodeagent/node/node1 is node node1's own identity, not node2's"):
        authz.authorize(Caller("node2"), node_identity("cluster.local", "node1"))
    assert node_identity("cluster.local", "node1") == identity(NODE_NAMESPACE, "node1")
    assert (node_identity("cluster.local", "node1").node, identity("default", "web").node) == ("node1", None)


def test_a_pod_scheduled_later_is_seen_at_once(cluster):
    authz = NodeAuthorizer(ModelView(FilesSource(cluster)))
    with pytest.raises(PermissionDenied):
        authz.authorize(Caller("node2"), identity("default", "web"))
    write_pods(cluster, pod_yaml("web-1", "node2", "web", phase="Pending"), name="more.yaml")
    authz.authorize(Caller("node2"), identity("default", "web"))
    (cluster / "more.yaml").unlink()
    with pytest.raises(PermissionDenied):
        authz.authorize(Caller("node2"), identity("default", "web"))


def test_refusals_through_the_service_are_typed_logged_and_counted(cluster, tokens, caplog):
    registry = CollectorRegistry()
    service = CertificateService(make_ca(), TokenFileAuthenticator(tokens, LOG),
                                 NodeAuthorizer(ModelView(FilesSource(cluster))), CaMetrics(registry), LOG)
    bearer = lambda node: [("authorization", f"Bearer {TOKENS[node]}")]  # noqa: E731
    web = IstioCertificateRequest(csr=csr_pem(uris=("spiffe://cluster.local/ns/default/sa/web",)).decode())
    with caplog.at_level(logging.INFO, logger=LOG.name):
        for _ in range(3):
            assert len(service.create_certificate(web, bearer("node1"), "ipv4:10.0.0.1:5555").cert_chain) == 2
        with pytest.raises(PermissionDenied):
            service.create_certificate(web, bearer("node2"), "ipv4:10.0.0.2:5555")
        with pytest.raises(Unauthenticated):
            service.create_certificate(web, [("authorization", "Bearer stolen-or-guessed-token")])
        with pytest.raises(CsrRejected):
            service.create_certificate(IstioCertificateRequest(csr="junk"), bearer("node1"))
    assert registry.get_sample_value("nodeagent_ca_certificates_issued_total") == 3
    for reason, count in (("permission_denied", 1), ("unauthenticated", 1), ("invalid_csr", 1)):
        assert registry.get_sample_value("nodeagent_ca_denials_total", {"reason": reason}) == count
    assert ("refused a certificate for node node2 from ipv4:10.0.0.2:5555: no pod with service account "
            "ns/default/sa/web on node node2") in caplog.text
    assert "stolen-or-guessed-token" not in caplog.text  # tokens are never logged
    assert caplog.text.count("issued spiffe://cluster.local/ns/default/sa/web to node node1") == 3
