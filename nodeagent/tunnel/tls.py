"""TLS for HBONE: the peer's SPIFFE identity, ALPN, and why a handshake failed.

The contexts come from the caller (nodeagent.identity builds them: TLS 1.3, peer
certificate required and verified against the mesh roots, no host name check, because
workloads are named by the SPIFFE URI SAN); the tunnel adds ALPN `h2` and checks the
peer's identity with `verify_peer` once the handshake is done.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Callable

from cryptography import x509

from nodeagent.identity.errors import CertificateIdentityError
from nodeagent.identity.spiffe import identity_of_certificate
from nodeagent.tunnel.errors import PeerRefused

ALPN = "h2"

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) -> our reasons.
_VERIFY_REASONS = {
    9: "cert_not_yet_valid", 10: "cert_expired",
    2: "unknown_ca", 18: "unknown_ca", 19: "unknown_ca", 20: "unknown_ca", 21: "unknown_ca",
}
# OpenSSL reason strings (ssl.SSLError.reason) -> our reasons.
_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_cert",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "peer_requires_cert",
    "TLSV1_ALERT_UNKNOWN_CA": "peer_refused_cert",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "peer_refused_cert",
    "SSLV3_ALERT_BAD_CERTIFICATE": "peer_refused_cert",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "peer_refused_cert",
    "TLSV1_ALERT_DECRYPT_ERROR": "peer_refused_cert",
    "WRONG_VERSION_NUMBER": "not_tls", "HTTP_REQUEST": "not_tls", "UNKNOWN_PROTOCOL": "not_tls",
    "UNSUPPORTED_PROTOCOL": "tls_version", "TLSV1_ALERT_PROTOCOL_VERSION": "tls_version",
}


def verifier(trust_domain: str) -> Callable[[bytes], str]:
    """A `verify_peer`: the SPIFFE URI of a workload certificate of `trust_domain`
    (nodeagent.identity's reading of the certificate), else PeerRefused."""
    def verify(cert_der: bytes) -> str:
        try:
            identity = identity_of_certificate(x509.load_der_x509_certificate(cert_der))
        except (CertificateIdentityError, ValueError) as exc:
            raise PeerRefused(f"peer certificate: {exc}", "workload certificates carry one spiffe:// URI SAN "
                              "of the form spiffe://<trust-domain>/ns/<ns>/sa/<sa>") from None
        if identity.trust_domain != trust_domain:
            raise PeerRefused(f"peer identity {identity} is of trust domain {identity.trust_domain}; "
                              f"this mesh is {trust_domain}", "is the peer in another mesh?")
        return identity.uri
    return verify


def with_alpn(context: ssl.SSLContext) -> ssl.SSLContext:
    """Offer/accept ALPN `h2` as ztunnel does (identity's contexts leave ALPN unset)."""
    context.set_alpn_protocols([ALPN])
    return context


def peer_certificate(transport: asyncio.BaseTransport) -> bytes:
    """The DER certificate the peer presented on a TLS transport (PeerRefused if none)."""
    obj = transport.get_extra_info("ssl_object")
    der = obj.getpeercert(binary_form=True) if obj is not None else None
    if not der:
        raise PeerRefused("the peer presented no certificate")
    return der


def failure_reason(exc: BaseException) -> str:
    """A short metrics label for why a handshake failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "bad_certificate")
    if isinstance(exc, ssl.SSLError):
        return _SSL_REASONS.get(exc.reason or "", "tls_error")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionAbortedError)):
        return "timeout"  # asyncio aborts a handshake that outlives ssl_handshake_timeout
    if isinstance(exc, (ConnectionError, EOFError)):
        return "closed"
    return "tls_error"
