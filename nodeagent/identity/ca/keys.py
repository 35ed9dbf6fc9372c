"""The CA's signing material: generated on first start, or brought by the operator.

A state directory holds Istio's `cacerts` layout: `ca-cert.pem` (the certificate that
signs workloads), `ca-key.pem` (its key, 0600), `root-cert.pem` (the trust anchor agents
are given) and optionally `cert-chain.pem` (certificates between ca-cert and the root).
With none of them present a self-signed ECDSA P-256 root is generated and written there
(ca-cert = root-cert). An operator who wants the mesh under an external root puts an
intermediate CA's cert, key and that root there instead (intermediate mode); the CA then
serves the full chain. A partial or inconsistent set is refused at start, never
overwritten: regenerating would silently orphan every issued certificate.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID

from nodeagent.errors import ConfigError
from nodeagent.identity import pemfiles

CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN = "ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"
ROOT_VALIDITY = dt.timedelta(days=3650)
ROOT_BACKDATE = dt.timedelta(hours=1)  # clock skew between the CA and its first agents


@dataclass(frozen=True)
class SigningMaterial:
    cert: x509.Certificate  # signs workload certificates (the root itself in self-signed mode)
    key: PrivateKeyTypes
    intermediates: tuple[x509.Certificate, ...]  # between cert and root, nearest first
    root: x509.Certificate

    @property
    def self_signed(self) -> bool:
        return self.cert == self.root

    @property
    def chain(self) -> list[x509.Certificate]:
        """cert, intermediates, root: what follows a leaf in an issued chain."""
        return [self.cert] if self.self_signed else [self.cert, *self.intermediates, self.root]

    @property
    def not_after(self) -> dt.datetime:
        """Nothing this material signs can outlive the shortest-lived certificate above it."""
        return min(c.not_valid_after_utc for c in self.chain)


def ca_extensions(builder: x509.CertificateBuilder, public_key) -> x509.CertificateBuilder:
    """Extensions of a CA certificate (also used by tests to make intermediates)."""
    return (builder
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def generate_root(trust_domain: str, now: dt.datetime, validity: dt.timedelta = ROOT_VALIDITY) -> SigningMaterial:
    """A new self-signed ECDSA P-256 mesh root (subject O=<trust domain>, as Istio names it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                      x509.NameAttribute(NameOID.COMMON_NAME, "nodeagent mesh root CA")])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - ROOT_BACKDATE).not_valid_after(now + validity))
    cert = ca_extensions(builder, key.public_key()).sign(key, hashes.SHA256())
    return SigningMaterial(cert, key, (), cert)


def load_or_create(state_dir: Path, trust_domain: str, now: dt.datetime, log: logging.Logger) -> SigningMaterial:
    """The material in `state_dir`, generating a self-signed root there if it is empty."""
    present = [n for n in (CA_CERT, CA_KEY, ROOT_CERT) if (state_dir / n).exists()]
    if not present:
        material = generate_root(trust_domain, now)
        save(state_dir, material)
        log.info("generated a self-signed mesh root for %s in %s (expires %s)", trust_domain, state_dir,
                 material.root.not_valid_after_utc.isoformat())
        return material
    material = load(state_dir, now)
    log.info("loaded CA from %s (%s, signer expires %s)", state_dir,
             "self-signed root" if material.self_signed else "intermediate under an external root",
             material.not_after.isoformat())
    return material


def save(state_dir: Path, material: SigningMaterial) -> None:
    pemfiles.private_dir(state_dir)
    # Certificates are public (agents read root-cert.pem); the key is 0600 and written last,
    # so a crash in between leaves a set that `load` refuses instead of a key without its cert.
    pemfiles.write_private(state_dir / ROOT_CERT, pemfiles.certs_pem([material.root]), 0o644)
    pemfiles.write_private(state_dir / CA_CERT, pemfiles.certs_pem([material.cert]), 0o644)
    pemfiles.write_private(state_dir / CA_KEY, pemfiles.key_pem(material.key))


def load(state_dir: Path, now: dt.datetime) -> SigningMaterial:
    """Read and check ca-cert/ca-key/root-cert(/cert-chain); ConfigError naming the file."""
    missing = [n for n in (CA_CERT, CA_KEY, ROOT_CERT) if not (state_dir / n).exists()]
    if missing:
        raise ConfigError(str(state_dir), f"has some CA files but not {', '.join(missing)}",
                          "restore them, or empty the directory to generate a new root "
                          "(every issued certificate then stops being trusted)")
    files = {}
    for name in (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN):
        try:
            files[name] = (state_dir / name).read_bytes()
        except FileNotFoundError:
            continue  # only cert-chain.pem may be missing (checked above)
        except OSError as exc:
            raise ConfigError(str(state_dir / name), f"cannot read: {exc.strerror}") from None
    return from_files(files, str(state_dir), now)


def from_files(files: Mapping[str, bytes], where: str, now: dt.datetime) -> SigningMaterial:
    """The material in `files` (name -> PEM, the state directory's layout; also the keys
    of the CA's Secret in a cluster), checked; ConfigError naming `where`/name."""
    missing = [n for n in (CA_CERT, CA_KEY, ROOT_CERT) if not files.get(n)]
    if missing:
        raise ConfigError(where, f"lacks {', '.join(missing)}", "restore it, or delete it to generate a new "
                          "root (every issued certificate then stops being trusted)")
    cert = _one_cert(files[CA_CERT], f"{where}/{CA_CERT}")
    root = _one_cert(files[ROOT_CERT], f"{where}/{ROOT_CERT}")
    try:
        key = serialization.load_pem_private_key(files[CA_KEY], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The exception's text is not shown: nothing of a private key goes to a log.
        raise ConfigError(f"{where}/{CA_KEY}", "not an unencrypted PEM private key") from None
    extra = pemfiles.load_certs(files[CERT_CHAIN], f"{where}/{CERT_CHAIN}") if files.get(CERT_CHAIN) else []
    # Istio's cert-chain.pem may repeat ca-cert and the root; keep only what lies between.
    material = SigningMaterial(cert, key, tuple(c for c in extra if c not in (cert, root)), root)
    check(material, where, now)
    return material


def to_files(material: SigningMaterial) -> dict[str, bytes]:
    """`material` in the state directory's layout (what `from_files` reads back)."""
    files = {CA_CERT: pemfiles.certs_pem([material.cert]), CA_KEY: pemfiles.key_pem(material.key),
             ROOT_CERT: pemfiles.certs_pem([material.root])}
    if material.intermediates:
        files[CERT_CHAIN] = pemfiles.certs_pem(list(material.intermediates))
    return files


def _one_cert(data: bytes, where: str) -> x509.Certificate:
    certs = pemfiles.load_certs(data, where)
    if len(certs) != 1:
        raise ConfigError(where, f"holds {len(certs)} certificates, expected exactly one")
    return certs[0]


def check(material: SigningMaterial, where: str, now: dt.datetime) -> None:
    """Refuse material that could not issue certificates agents would accept."""
    if not isinstance(material.key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ConfigError(f"{where}/{CA_KEY}", f"{type(material.key).__name__} keys cannot sign; use EC or RSA")
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if material.key.public_key().public_bytes(*public) != material.cert.public_key().public_bytes(*public):
        raise ConfigError(f"{where}/{CA_KEY}", f"is not the key of {CA_CERT}", "put the matching pair in place")
    for cert in material.chain:
        _check_ca_cert(cert, where, now)
    _check_links(material, where)


def _check_ca_cert(cert: x509.Certificate, where: str, now: dt.datetime) -> None:
    subject = cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise ConfigError(where, f"certificate {subject} is not a CA certificate (basicConstraints CA:TRUE)")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ConfigError(where, f"certificate {subject} is not valid now (valid "
                                 f"{cert.not_valid_before_utc.isoformat()} to {cert.not_valid_after_utc.isoformat()})",
                          "renew it, or check this machine's clock")


def _check_links(material: SigningMaterial, where: str) -> None:
    """Each certificate of the chain must be signed by the next; the root by itself."""
    chain = [material.cert, *material.intermediates, material.root]
    if material.self_signed:
        chain = [material.root]
    pairs = list(zip(chain, chain[1:])) + [(material.root, material.root)]
    for cert, issuer in pairs:
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise ConfigError(where, f"certificate {cert.subject.rfc4514_string()} is not signed by "
                                     f"{issuer.subject.rfc4514_string()}",
                              f"{CERT_CHAIN} must hold the certificates between {CA_CERT} and "
                              f"{ROOT_CERT}, nearest first") from None
