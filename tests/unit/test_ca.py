"""The CA's signing core and its keys on disk: what it signs, what it refuses."""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from nodeagent.errors import ConfigError
from nodeagent.identity import pemfiles
from nodeagent.identity.ca import keys as cakeys
from nodeagent.identity.ca.signer import CertificateAuthority
from nodeagent.identity.errors import CsrRejected, SignerExpired

from identity_fixtures import T0, TD, csr_pem, make_ca, utc

LOG = logging.getLogger("test")


def test_signs_a_workload_leaf_as_specified():
    ca = make_ca(clock=lambda: T0)
    key = ec.generate_private_key(ec.SECP256R1())
    chain = ca.sign(ca.read_csr(csr_pem(key)))
    leaf, root = chain
    assert root == ca.material.root and len(chain) == 2
    leaf.verify_directly_issued_by(root)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    assert leaf.subject == x509.Name([]) and leaf.issuer == root.subject
    assert leaf.not_valid_before_utc == utc(T0 - 60)
    assert leaf.not_valid_after_utc == utc(T0 + 24 * 3600)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    ext = leaf.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(f"spiffe://{TD}/ns/default/sa/app")]
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign and not ku.value.content_commitment
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    # The CSR's subject and anything else it asks for are not copied.
    assert not leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)


def test_leaf_verifies_as_a_client_certificate_for_its_spiffe_id():
    ca = make_ca()
    leaf, _ = ca.sign(ca.read_csr(csr_pem()))
    verified = (verification.PolicyBuilder().store(verification.Store([ca.material.root]))
                .build_client_verifier().verify(leaf, []))
    assert verified.subjects == [x509.UniformResourceIdentifier(f"spiffe://{TD}/ns/default/sa/app")]


@pytest.mark.parametrize("asked, lifetime", [
    (None, 24 * 3600),
    (dt.timedelta(0), 24 * 3600),  # the proto's 0 means "CA default"
    (dt.timedelta(hours=1), 3600),
    (dt.timedelta(days=30), 24 * 3600),  # capped at cert_ttl
])
def test_lifetime_is_the_default_or_less_if_asked(asked, lifetime):
    ca = make_ca(clock=lambda: T0)
    leaf, _ = ca.sign(ca.read_csr(csr_pem()), asked)
    assert leaf.not_valid_after_utc == utc(T0 + lifetime)


def test_configured_ttl_and_the_cas_own_expiry_cap_the_lifetime():
    ca = make_ca(clock=lambda: T0, cert_ttl=dt.timedelta(hours=2))
    assert ca.sign(ca.read_csr(csr_pem()))[0].not_valid_after_utc == utc(T0 + 2 * 3600)
    short_root = cakeys.generate_root(TD, utc(T0), validity=dt.timedelta(minutes=30))
    ca = CertificateAuthority(TD, short_root, lambda: T0)
    assert ca.sign(ca.read_csr(csr_pem()))[0].not_valid_after_utc == short_root.root.not_valid_after_utc


def test_an_expired_signer_issues_nothing():
    material = cakeys.generate_root(TD, utc(T0), validity=dt.timedelta(minutes=30))
    ca = CertificateAuthority(TD, material, lambda: T0 + 3600)
    with pytest.raises(SignerExpired, match="expired"):
        ca.sign(ca.read_csr(csr_pem()))


def test_rsa_2048_is_accepted():
    ca = make_ca()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf, _ = ca.sign(ca.read_csr(csr_pem(key)))
    assert leaf.public_key().key_size == 2048


def _csr_with_san(der: bytes) -> bytes:
    """A CSR whose SubjectAlternativeName extension is `der` as it is."""
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, der), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def _tampered_csr() -> bytes:
    """A well-formed CSR whose signature no longer matches its content."""
    der = x509.load_pem_x509_csr(csr_pem()).public_bytes(serialization.Encoding.DER)
    assert der.count(b"workload-csr-subject") == 1
    bad = x509.load_der_x509_csr(der.replace(b"workload-csr-subject", b"workload-csr-subjecT"))
    return bad.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("make, says", [
    (_tampered_csr, "signature does not verify"),
    (lambda: csr_pem(ec.generate_private_key(ec.SECP384R1())), "key is EC secp384r1"),
    (lambda: csr_pem(ed25519.Ed25519PrivateKey.generate()), "key is Ed25519PublicKey"),
    (lambda: csr_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "RSA 1024 bits"),
    (lambda: csr_pem(uris=("spiffe://other.domain/ns/default/sa/app",)), "this CA issues only for cluster.local"),
    (lambda: csr_pem(uris=(f"spiffe://{TD}/ns/a/sa/x", f"spiffe://{TD}/ns/a/sa/y")), "asks for 2 SANs"),
    (lambda: csr_pem(dns=("app.default.svc",)), "asks for 2 SANs"),
    (lambda: csr_pem(uris=(), dns=("app.default.svc",)), "asks for 1 SANs .*DNSName app.default.svc"),
    (lambda: csr_pem(uris=("https://cluster.local/ns/a/sa/b",)), "not a workload SPIFFE ID"),
    (lambda: csr_pem(uris=()), "no SubjectAlternativeName"),
    (lambda: _csr_with_san(bytes([0x30, 4, 0xA3, 2, 0x30, 0])), "extensions cannot be read"),  # an x400Address
    (lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "not a PEM certificate request"),
])
def test_refuses_bad_csrs_saying_why(make, says):
    ca = make_ca()
    with pytest.raises(CsrRejected, match=says):
        ca.read_csr(make())


# --- keys on disk ---------------------------------------------------------------------
def test_first_start_generates_a_root_and_later_starts_load_it(tmp_path):
    state = tmp_path / "ca"
    first = cakeys.load_or_create(state, TD, utc(T0), LOG)
    assert first.self_signed and isinstance(first.key, ec.EllipticCurvePrivateKey)
    assert first.key.curve.name == "secp256r1"
    assert first.root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == TD
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state / "ca-key.pem").st_mode) == 0o600
    assert sorted(p.name for p in state.iterdir()) == ["ca-cert.pem", "ca-key.pem", "root-cert.pem"]
    again = cakeys.load_or_create(state, TD, utc(T0 + 86400), LOG)
    assert again.root == first.root and again.chain == [first.root]


def test_a_partial_state_dir_is_refused_not_overwritten(tmp_path):
    cakeys.load_or_create(tmp_path, TD, utc(T0), LOG)
    key_before = (tmp_path / "ca-key.pem").read_bytes()
    (tmp_path / "ca-cert.pem").unlink()
    with pytest.raises(ConfigError, match="has some CA files but not ca-cert.pem"):
        cakeys.load_or_create(tmp_path, TD, utc(T0), LOG)
    assert (tmp_path / "ca-key.pem").read_bytes() == key_before


def test_a_key_that_is_not_the_certificates_is_refused(tmp_path):
    cakeys.load_or_create(tmp_path, TD, utc(T0), LOG)
    pemfiles.write_private(tmp_path / "ca-key.pem", pemfiles.key_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ConfigError, match="ca-key.pem: is not the key of ca-cert.pem"):
        cakeys.load(tmp_path, utc(T0))


def _intermediate(root: cakeys.SigningMaterial, now: dt.datetime, name: str = "mesh intermediate"):
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(root.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=365))
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.key.public_key()),
                              critical=False))
    return cakeys.ca_extensions(builder, key.public_key()).sign(root.key, hashes.SHA256()), key


def _plug_in(state, cert, key, root, chain=()):
    state.mkdir(exist_ok=True)
    (state / "ca-cert.pem").write_bytes(pemfiles.certs_pem([cert]))
    (state / "root-cert.pem").write_bytes(pemfiles.certs_pem([root]))
    pemfiles.write_private(state / "ca-key.pem", pemfiles.key_pem(key))
    if chain:
        (state / "cert-chain.pem").write_bytes(pemfiles.certs_pem(list(chain)))


def test_intermediate_mode_serves_the_full_chain_to_an_external_root(tmp_path):
    now = utc(T0)
    external = cakeys.generate_root("corp.example", now)
    inter1, key1 = _intermediate(external, now, "corp issuing CA")
    inter2, key2 = _intermediate(cakeys.SigningMaterial(inter1, key1, (), external.root), now)
    # Istio's cert-chain.pem repeats ca-cert and the root; both are dropped.
    _plug_in(tmp_path, inter2, key2, external.root, chain=(inter2, inter1, external.root))
    material = cakeys.load_or_create(tmp_path, TD, now, LOG)
    assert not material.self_signed and material.intermediates == (inter1,)
    ca = CertificateAuthority(TD, material, lambda: T0)
    chain = ca.sign(ca.read_csr(csr_pem()))
    assert chain[1:] == [inter2, inter1, external.root]
    assert ca.root_pem == pemfiles.certs_pem([external.root])
    (verification.PolicyBuilder().store(verification.Store([external.root])).time(now)
     .build_client_verifier().verify(chain[0], chain[1:-1]))


def test_intermediate_mode_refuses_a_chain_that_does_not_link(tmp_path):
    now = utc(T0)
    external, stranger = cakeys.generate_root("corp.example", now), cakeys.generate_root("other", now)
    inter, key = _intermediate(external, now)
    _plug_in(tmp_path, inter, key, stranger.root)
    with pytest.raises(ConfigError, match="is not signed by .*cert-chain.pem must hold"):
        cakeys.load(tmp_path, now)


def test_an_expired_ca_certificate_is_refused_at_start(tmp_path):
    cakeys.save(tmp_path, cakeys.generate_root(TD, utc(T0), validity=dt.timedelta(days=1)))
    with pytest.raises(ConfigError, match="is not valid now .*renew it"):
        cakeys.load(tmp_path, utc(T0 + 2 * 86400))
