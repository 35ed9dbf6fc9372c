"""ssl contexts for mesh mTLS, and reading the peer's SPIFFE identity.

Both sides: TLS 1.3 only, a certificate required from the peer and verified against the
mesh trust bundle. Hostname checking is off because workload certificates name SPIFFE
IDs, not hosts: after the handshake the caller reads the peer's identity with
`peer_identity` and authorizes it (the tunnel's policy, not this module's).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509

from nodeagent.identity.errors import CertificateIdentityError
from nodeagent.identity.spiffe import Identity, identity_of_certificate


def context(cert_file: Path, trust_bundle_pem: bytes, server_side: bool) -> ssl.SSLContext:
    """A context presenting the key and chain in `cert_file` (one PEM file, key first)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=trust_bundle_pem.decode("ascii"))
    ctx.load_cert_chain(str(cert_file))
    return ctx


def peer_identity(conn: ssl.SSLSocket | ssl.SSLObject) -> Identity:
    """The SPIFFE identity of the verified peer of a completed handshake."""
    der = conn.getpeercert(binary_form=True)
    if not der:
        raise CertificateIdentityError("the peer presented no certificate")
    return identity_of_certificate(x509.load_der_x509_certificate(der))
