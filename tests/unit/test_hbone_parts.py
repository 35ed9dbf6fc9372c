"""HBONE pieces without a network: authority parsing, settings checks, peer identities."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from hbone_certs import pki, verify  # noqa: F401 (pki is a fixture)
from nodeagent.errors import ConfigError
from nodeagent.tunnel import PeerRefused, TunnelSettings
from nodeagent.tunnel.authority import format_authority, parse_authority


@pytest.mark.parametrize("raw, want", [
    (b"10.244.1.5:8080", ("10.244.1.5", 8080)), ("[fd00::5]:80", ("fd00::5", 80)),
    ("[FD00:0::5]:443", ("fd00::5", 443)), ("10.0.0.1:65535", ("10.0.0.1", 65535)),
    ("10.0.0.1:0", None), ("10.0.0.1:65536", None), ("10.0.0.1", None), ("fd00::5:80", None),
    ("[10.0.0.1]:80", None), ("backend.default.svc:80", None), ("10.0.0.1:+80", None), ("", None), (None, None),
    (b"\xff\xfe:80", None), ("10.0.0.1:8\xb2", None), ("10.0.0.1:\u0668\u0660", None),  # Latin-1 '²', Arabic digits
    ("[fe80::1%eth0]:80", None), ("[fe80::1%\x1b[2J\nforged]:80", None)])  # a zone: anybody's text, logged
def test_parse_authority(raw, want):
    assert parse_authority(raw) == want


def test_format_authority_round_trips():
    for addr in (("10.0.0.1", 80), ("fd00::5", 15008)):
        assert parse_authority(format_authority(addr)) == addr
    assert format_authority(("fd00::5", 80)) == "[fd00::5]:80"


@pytest.mark.parametrize("kwargs, field", [
    ({"stream_window": 0}, "tunnel.stream_window"), ({"keepalive_timeout": -1}, "tunnel.keepalive_timeout"),
    ({"stream_window": 2**31}, "tunnel.stream_window/connection_window"),
    ({"stream_window": 1 << 20, "connection_window": 1 << 19}, "tunnel.connection_window"),
    ({"max_frame_size": 1000}, "tunnel.max_frame_size"),
    ({"max_concurrent_streams": 0}, "tunnel.max_concurrent_streams"),
    ({"max_stream_resets": 0}, "tunnel.max_stream_resets"), ({"stream_reset_window": 0}, "tunnel.stream_reset_window")])
def test_settings_name_the_bad_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        TunnelSettings(**kwargs)
    assert err.value.where == field


def _cert_with_uris(uris: list[str]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
               .public_key(key.public_key()).serial_number(1)
               .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1)))
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER)


def test_verifier_needs_exactly_one_uri_san():
    assert verify(_cert_with_uris(["spiffe://cluster.local/ns/a/sa/b"])) == "spiffe://cluster.local/ns/a/sa/b"
    for uris in ([], ["https://x"], ["https://x", "spiffe://cluster.local/ns/a/sa/b"],
                 ["spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/c"]):
        with pytest.raises(PeerRefused):
            verify(_cert_with_uris(uris))
    with pytest.raises(PeerRefused):
        verify(b"not a certificate")


@pytest.mark.parametrize("uri, ok", [
    ("spiffe://cluster.local/ns/default/sa/backend", True), ("spiffe://cluster.local/ns/default/sa/", False),
    ("spiffe://other.local/ns/default/sa/backend", False), ("spiffe://cluster.local/ns/default/backend", False),
    ("spiffe://cluster.local/ns/default/sa/backend/extra", False)])
def test_verifier_accepts_only_workload_ids_of_the_trust_domain(uri, ok):
    der = _cert_with_uris([uri])
    if ok:
        assert verify(der) == uri
    else:
        with pytest.raises(PeerRefused):
            verify(der)


def test_pki_leaf_carries_the_spiffe_id(pki):
    cert = x509.load_pem_x509_certificate(pki.server.chain_pem)
    assert verify(cert.public_bytes(Encoding.DER)) == "spiffe://cluster.local/ns/default/sa/backend"
