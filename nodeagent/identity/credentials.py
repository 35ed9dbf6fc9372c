"""One workload identity's key and certificate, as the agent holds them.

`new_request` makes the key pair (ECDSA P-256, on this node; only the CSR leaves it) and
the CSR naming the SPIFFE ID. `accept` checks what the CA sent back before anything uses
it: the leaf names the identity asked for, carries our public key, and chains to the
trust bundle now (cryptography's verifier, client profile, so clientAuth must be there).
`Credentials` holds the result and its file: key + chain in one 0600 PEM file per
identity, replaced atomically on rotation, because Python's ssl loads keys only from
files.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification

from nodeagent.errors import ConfigError
from nodeagent.identity import pemfiles, tls
from nodeagent.identity.errors import CertificateIdentityError, IssuedCertificateInvalid
from nodeagent.identity.spiffe import Identity, identity_of_certificate


@dataclass(frozen=True)
class Credentials:
    identity: Identity
    chain_pem: bytes  # leaf first, then intermediates (the root is in the trust bundle)
    key_pem: bytes
    trust_bundle_pem: bytes
    not_before: float  # unix seconds
    not_after: float
    path: Path  # key + chain, 0600, what ssl loads

    @property
    def refresh_at(self) -> float:
        """Half-life: rotate here, leaving half the lifetime to ride out a CA outage."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def ssl_context(self, server_side: bool) -> ssl.SSLContext:
        """TLS 1.3 mTLS context with this identity's certificate (see tls.context). It
        reads the identity's file now, so after a rotation it holds the newest certificate:
        build contexts per connection or again after `IdentityManager.get`."""
        return tls.context(self.path, self.trust_bundle_pem, server_side)


def new_request(identity: Identity) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh key pair and the PEM CSR asking for `identity` (its only SAN)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                          critical=True)
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM)


def accept(identity: Identity, key: ec.EllipticCurvePrivateKey, chain_pem: list[str],
           roots: list[x509.Certificate], now: float) -> list[x509.Certificate]:
    """The chain to present (leaf, intermediates), once it is checked to be ours and valid."""
    try:
        chain = pemfiles.load_certs("".join(chain_pem).encode(), "the CA's response")
    except ConfigError as exc:
        raise IssuedCertificateInvalid(str(exc)) from None
    if not chain:
        raise IssuedCertificateInvalid("the CA returned no certificate")
    leaf = chain[0]
    try:
        named = identity_of_certificate(leaf)
    except CertificateIdentityError as exc:
        raise IssuedCertificateInvalid(f"the CA's certificate for {identity}: {exc}") from None
    if named != identity:
        raise IssuedCertificateInvalid(f"asked the CA for {identity}, got a certificate for {named}")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise IssuedCertificateInvalid(f"the CA's certificate for {identity} is not for the key we sent")
    verifier = (verification.PolicyBuilder().store(verification.Store(roots))
                .time(dt.datetime.fromtimestamp(now, dt.timezone.utc)).build_client_verifier())
    try:
        verifier.verify(leaf, chain[1:])
    except verification.VerificationError as exc:
        raise IssuedCertificateInvalid(f"the CA's certificate for {identity} does not verify against "
                                       f"the trust bundle: {exc}", "is the agent's root certificate the CA's?") from None
    return [c for c in chain if c not in roots]


def write(directory: Path, identity: Identity, key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate],
          trust_bundle_pem: bytes) -> Credentials:
    """Write key + chain to the identity's file (atomically, 0600) and describe it."""
    path = directory / file_name(identity)
    key_pem, chain_pem = pemfiles.key_pem(key), pemfiles.certs_pem(chain)
    pemfiles.write_private(path, key_pem + chain_pem)
    leaf = chain[0]
    return Credentials(identity, chain_pem, key_pem, trust_bundle_pem, leaf.not_valid_before_utc.timestamp(),
                       leaf.not_valid_after_utc.timestamp(), path)


def file_name(identity: Identity) -> str:
    # '_' occurs in neither a namespace nor a service account name, so this is unambiguous.
    return f"{identity.namespace}_{identity.service_account}_{identity.trust_domain}.pem"
