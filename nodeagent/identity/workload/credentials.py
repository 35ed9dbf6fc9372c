"""One workload identity's key and certificate, as the agent holds them.

`new_request` makes the key pair (ECDSA P-256, on this node; only the CSR leaves it) and
the CSR naming the SPIFFE ID. `accept` checks what the CA sent back before anything uses
it: the leaf names the identity asked for, carries our public key, and chains to the
trust bundle now (cryptography's verifier, client profile, so clientAuth must be there).
`Credentials` holds the result and its file: key + chain in one 0600 PEM file per
identity, replaced atomically on rotation, because Python's ssl loads keys only from
files. `load` reads such a file back after an agent restart and trusts it no more than
a fresh answer of the CA: the same checks as `accept`, the file still private, and
enough validity left to be worth serving.
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
from nodeagent.identity.errors import CertificateIdentityError, IdentityError, IssuedCertificateInvalid
from nodeagent.identity.spiffe import Identity, identity_of_certificate


class StoredCredentialsInvalid(IdentityError):
    """A key file left in the runtime directory cannot be served (it is deleted)."""


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

    @property
    def serial(self) -> str:
        """The leaf certificate's serial number, in hex (as istioctl proxy-config secret shows it)."""
        return f"{x509.load_pem_x509_certificate(self.chain_pem).serial_number:x}"

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
    if not _same_key(leaf, key):
        raise IssuedCertificateInvalid(f"the CA's certificate for {identity} is not for the key we sent")
    problem = _chain_problem(chain, roots, now)
    if problem:
        raise IssuedCertificateInvalid(f"the CA's certificate for {identity} {problem}",
                                       "is the agent's root certificate the CA's?")
    return [c for c in chain if c not in roots]


def load(path: Path, roots: list[x509.Certificate], trust_bundle_pem: bytes, now: float,
         margin: float) -> Credentials:
    """The credentials an earlier agent wrote to `path`, if they may be served now: a
    private file (pemfiles.read_private) named for the identity its leaf carries, the
    key matching the leaf, the chain verifying against `roots` now, and more than
    `margin` seconds left before the leaf expires. StoredCredentialsInvalid says why not."""
    try:
        data = pemfiles.read_private(path)
        key = serialization.load_pem_private_key(data, password=None)
        chain = pemfiles.load_certs(data, str(path))
    except ConfigError as exc:
        raise StoredCredentialsInvalid(str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise StoredCredentialsInvalid(f"{path}: no usable private key: {exc}") from None
    if not chain:
        raise StoredCredentialsInvalid(f"{path}: no certificate")
    leaf = chain[0]
    try:
        identity = identity_of_certificate(leaf)
    except CertificateIdentityError as exc:
        raise StoredCredentialsInvalid(f"{path}: {exc}") from None
    if path.name != file_name(identity):
        raise StoredCredentialsInvalid(f"{path}: holds a certificate for {identity}, "
                                       f"whose file is {file_name(identity)}")
    if not _same_key(leaf, key):
        raise StoredCredentialsInvalid(f"{path}: the private key is not the certificate's")
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise StoredCredentialsInvalid(f"{path}: the certificate for {identity} expired at {iso(not_after)}")
    if not_after - now <= margin:
        raise StoredCredentialsInvalid(f"{path}: the certificate for {identity} expires at {iso(not_after)}, "
                                       f"within {margin:.0f}s")
    problem = _chain_problem(chain, roots, now)
    if problem:
        raise StoredCredentialsInvalid(f"{path}: the certificate for {identity} {problem}",
                                       "was the mesh root replaced since it was issued?")
    return Credentials(identity, pemfiles.certs_pem(chain), pemfiles.key_pem(key), trust_bundle_pem,
                       leaf.not_valid_before_utc.timestamp(), not_after, path)


def _same_key(cert: x509.Certificate, key) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)


def _chain_problem(chain: list[x509.Certificate], roots: list[x509.Certificate], now: float) -> str | None:
    """Why `chain` (leaf first) does not verify to `roots` at `now` for a client, or None."""
    verifier = (verification.PolicyBuilder().store(verification.Store(roots))
                .time(dt.datetime.fromtimestamp(now, dt.timezone.utc)).build_client_verifier())
    try:
        verifier.verify(chain[0], chain[1:])
    except verification.VerificationError as exc:
        return f"does not verify against the trust bundle: {exc}"
    return None


def iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")


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
