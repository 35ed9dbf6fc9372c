"""SPIFFE IDs: building, parsing, and reading them out of certificates."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.errors import ConfigError
from nodeagent.identity.errors import CertificateIdentityError
from nodeagent.identity.spiffe import NODE_NAMESPACE, Identity, identity_of_certificate, node_identity

from identity_fixtures import identity, make_ca


def test_uri_and_parse_round_trip():
    ident = Identity("cluster.local", "shop", "checkout-v2.api")
    assert ident.uri == "spiffe://cluster.local/ns/shop/sa/checkout-v2.api"
    assert str(ident) == ident.uri
    assert ident.short == "ns/shop/sa/checkout-v2.api"
    assert Identity.parse(ident.uri) == ident
    assert Identity.parse("spiffe://my_td.example-1/ns/a/sa/b").trust_domain == "my_td.example-1"


def test_a_nodes_own_identity_is_no_workloads_form():
    """spiffe://<td>/nodeagent/node/<node>: an agent of an earlier version (ns/sa only)
    refuses it rather than read a node as a workload; its ns/sa spelling is refused."""
    node = node_identity("cluster.local", "worker-1.example")
    assert (node.uri, node.short, node.node) == (
        "spiffe://cluster.local/nodeagent/node/worker-1.example", "nodeagent/node/worker-1.example", "worker-1.example")
    assert Identity.parse(node.uri) == node == Identity("cluster.local", NODE_NAMESPACE, "worker-1.example")
    with pytest.raises(ConfigError, match="namespace nodeagent-node is the node agents'"):
        Identity.parse("spiffe://cluster.local/ns/nodeagent-node/sa/worker-1.example")
    with pytest.raises(ConfigError, match="service account 'Worker'"):
        Identity.parse("spiffe://cluster.local/nodeagent/node/Worker")


@pytest.mark.parametrize("uri, says", [
    ("https://cluster.local/ns/a/sa/b", "must start with spiffe://"),
    ("spiffe://cluster.local/nodeagent/other/b", "is not of the form"),
    ("spiffe://cluster.local/ns/a/sa/b/extra", "is not of the form"),
    ("spiffe://cluster.local/ns/a/sb/b", "is not of the form"),
    ("spiffe://cluster.local/a/ns/sa/b", "is not of the form"),
    ("spiffe://cluster.local/ns/a/sa", "is not of the form"),
    ("spiffe:///ns/a/sa/b", "trust domain ''"),
    ("spiffe://Cluster.Local/ns/a/sa/b", "trust domain 'Cluster.Local'"),
    ("spiffe://cluster.local:8080/ns/a/sa/b", "trust domain 'cluster.local:8080'"),
    ("spiffe://cluster.local/ns/Shop/sa/b", "namespace 'Shop'"),
    ("spiffe://cluster.local/ns/a.b/sa/b", "namespace 'a.b'"),
    ("spiffe://cluster.local/ns/a/sa/", "service account ''"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "service account 'b?x=1'"),
    # a final newline: `$` matches before one, and these IDs were taken (the CA review, 2026-12-06)
    ("spiffe://cluster.local/ns/a/sa/b\n", "service account 'b\\n'"),
    ("spiffe://cluster.local/ns/a\n/sa/b", "namespace 'a\\n'"),
    ("spiffe://cluster.local\n/ns/a/sa/b", "trust domain 'cluster.local\\n'"),
])
def test_parse_refuses_malformed_ids_saying_why(uri, says):
    with pytest.raises(ConfigError) as err:
        Identity.parse(uri)
    assert says in str(err.value)
    assert repr(uri) in str(err.value)  # names the ID at fault


def test_parse_names_where_the_id_came_from():
    with pytest.raises(ConfigError, match=r"^policy p1 principals\[0\]: must start with spiffe://"):
        Identity.parse("cluster.local/ns/a/sa/b", where="policy p1 principals[0]")


def test_constructor_checks_parts_too():
    with pytest.raises(ConfigError, match="namespace 'UPPER'"):
        Identity("cluster.local", "UPPER", "sa")


def _cert_with_sans(names: list[x509.GeneralName] | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + dt.timedelta(hours=1)))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256())


def test_identity_of_an_issued_certificate():
    ca = make_ca()
    leaf = ca.issue(ec.generate_private_key(ec.SECP256R1()).public_key(), identity("shop", "cart"))
    assert identity_of_certificate(leaf) == Identity("cluster.local", "shop", "cart")


def test_dns_names_beside_the_uri_are_allowed():
    cert = _cert_with_sans([x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b"), x509.DNSName("ca.svc")])
    assert identity_of_certificate(cert) == Identity("td", "a", "b")


@pytest.mark.parametrize("names, says", [
    (None, "has no SubjectAlternativeName"),
    ([x509.DNSName("a.example")], "has 0 URI SANs"),
    ([x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b"),
      x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/c")], "has 2 URI SANs"),
    ([x509.UniformResourceIdentifier("https://td/ns/a/sa/b")], "must start with spiffe://"),
    ([x509.UniformResourceIdentifier("spiffe://td/workload/7")], "is not of the form"),
])
def test_certificates_without_exactly_one_spiffe_uri_are_refused(names, says):
    with pytest.raises(CertificateIdentityError, match=says):
        identity_of_certificate(_cert_with_sans(names))
