"""The mesh CA's signing core: check a CSR, sign a workload certificate. No transport.

`read_csr` refuses what the CA will never sign, whoever asks: a CSR whose signature does
not verify, a key other than EC P-256 or RSA of at least 2048 bits (ztunnel sends P-256,
istio-agent RSA 2048 by default), or SANs other than exactly one SPIFFE URI of this trust
domain. Whether the *caller* may have that identity is auth.py's business. `sign` issues
an ECDSA/RSA-signed leaf for the CSR's key whatever else the CSR asks for (as Istio's CA
does): empty subject, the SPIFFE URI as the only (critical) SAN, keyUsage
digitalSignature+keyEncipherment, extendedKeyUsage serverAuth+clientAuth, notBefore a
minute in the past for clock skew, lifetime `cert_ttl` (24 h) or less if asked, never
beyond the CA's own certificates. The clock is passed in.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import time
from dataclasses import dataclass
from typing import Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodeagent.errors import ConfigError
from nodeagent.identity import pemfiles
from nodeagent.identity.ca.keys import SigningMaterial
from nodeagent.identity.errors import CsrRejected, SignerExpired
from nodeagent.identity.spiffe import Identity, uri_sans

DEFAULT_TTL = dt.timedelta(hours=24)
BACKDATE = dt.timedelta(minutes=1)
MIN_RSA_BITS = 2048
LEAF_KEY_USAGE = x509.KeyUsage(digital_signature=True, key_encipherment=True, content_commitment=False,
                               data_encipherment=False, key_agreement=False, key_cert_sign=False,
                               crl_sign=False, encipher_only=False, decipher_only=False)
LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


@dataclass(frozen=True)
class SigningRequest:
    """A CSR the CA would sign, and the identity it asks for."""

    csr: x509.CertificateSigningRequest
    identity: Identity


class CertificateAuthority:
    def __init__(self, trust_domain: str, material: SigningMaterial, clock: Callable[[], float] = time.time,
                 cert_ttl: dt.timedelta = DEFAULT_TTL):
        self.trust_domain = trust_domain
        self.material = material
        self.clock = clock
        self.cert_ttl = cert_ttl

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.timezone.utc)

    @property
    def root_pem(self) -> bytes:
        """The trust bundle agents verify peers (and this CA's server) against."""
        return pemfiles.certs_pem([self.material.root])

    # --- checking a CSR ---------------------------------------------------------------
    def read_csr(self, pem: str | bytes) -> SigningRequest:
        """The request in `pem`, or CsrRejected saying what is wrong with it."""
        try:
            csr = x509.load_pem_x509_csr(pem.encode() if isinstance(pem, str) else pem)
        except ValueError as exc:
            raise CsrRejected(f"the CSR is not a PEM certificate request: {exc}") from None
        try:
            valid, key = csr.is_signature_valid, csr.public_key()
        except (ValueError, UnsupportedAlgorithm) as exc:  # a key or signature of a kind not known here
            raise CsrRejected(f"the CSR's key or signature cannot be read: {exc}") from None
        if not valid:
            raise CsrRejected("the CSR's signature does not verify with its own public key",
                              "the request was altered or built wrongly; make a new CSR")
        _check_key(key)
        return SigningRequest(csr, self._requested_identity(csr))

    def _requested_identity(self, csr: x509.CertificateSigningRequest) -> Identity:
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CsrRejected("the CSR has no SubjectAlternativeName; put the SPIFFE ID in a URI SAN") from None
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
            # a malformed extension, one twice, a SAN of a kind cryptography cannot read (x400Address)
            raise CsrRejected(f"the CSR's extensions cannot be read: {exc}") from None
        names = list(san)
        uris = uri_sans(san)
        if len(names) != 1 or len(uris) != 1:
            raise CsrRejected(f"the CSR asks for {len(names)} SANs ({_describe(names)}); "
                              "a workload certificate carries exactly one, its SPIFFE URI")
        try:
            identity = Identity.parse(uris[0])
        except ConfigError as exc:
            raise CsrRejected(f"the CSR's URI SAN is not a workload SPIFFE ID: {exc}") from None
        if identity.trust_domain != self.trust_domain:
            raise CsrRejected(f"the CSR asks for {identity}, of trust domain {identity.trust_domain}; "
                              f"this CA issues only for {self.trust_domain}")
        return identity

    # --- signing ----------------------------------------------------------------------
    def validity(self, ttl: dt.timedelta | None = None) -> tuple[dt.datetime, dt.datetime]:
        """(notBefore, notAfter) of a leaf issued now: at most cert_ttl, within the CA's life."""
        now = self.now()
        ttl = self.cert_ttl if ttl is None or ttl <= dt.timedelta(0) else min(ttl, self.cert_ttl)
        not_before = max(now - BACKDATE, self.material.cert.not_valid_before_utc)
        return not_before, min(now + ttl, self.material.not_after)

    def sign(self, request: SigningRequest, ttl: dt.timedelta | None = None) -> list[x509.Certificate]:
        """The chain for `request`: leaf first, root last (Istio's cert_chain order)."""
        leaf = self.issue(request.csr.public_key(), request.identity, ttl)
        return [leaf, *self.material.chain]

    def issue(self, public_key, identity: Identity, ttl: dt.timedelta | None = None,
              dns_names: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> x509.Certificate:
        """A leaf for `public_key`. Only the CA's own server certificate has DNS/IP SANs."""
        not_before, not_after = self.validity(ttl)
        if not_after <= self.now():
            raise SignerExpired(f"the CA's certificate chain expired at {not_after.isoformat()}; it cannot issue",
                                "renew the CA certificates in the state directory")
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        names += [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
        signer = self.material.cert
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([])).issuer_name(signer.subject).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(LEAF_KEY_USAGE, critical=True)
                   .add_extension(LEAF_EKU, critical=False)
                   # The subject is empty, so the SAN must be critical (RFC 5280 4.2.1.6).
                   .add_extension(x509.SubjectAlternativeName(names), critical=True)
                   .add_extension(_authority_key_id(signer), critical=False))
        return builder.sign(self.material.key, hashes.SHA256())


def _authority_key_id(signer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """Must equal the signer's own SubjectKeyIdentifier when it has one (an external CA may
    compute it differently from the SHA-1 of the key)."""
    try:
        ski = signer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _check_key(key) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return
        raise CsrRejected(f"the CSR's key is EC {key.curve.name}; this CA signs EC P-256 (secp256r1) "
                          f"or RSA >= {MIN_RSA_BITS} keys")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size >= MIN_RSA_BITS:
            return
        raise CsrRejected(f"the CSR's key is RSA {key.key_size} bits; RSA keys need at least {MIN_RSA_BITS}")
    raise CsrRejected(f"the CSR's key is {type(key).__name__.removeprefix('_')}; this CA signs EC P-256 "
                      f"or RSA >= {MIN_RSA_BITS} keys")


def _describe(names: list[x509.GeneralName]) -> str:
    return ", ".join(f"{type(n).__name__} {n.value}" for n in names) or "none"
