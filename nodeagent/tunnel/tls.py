"""TLS for HBONE: the peer's SPIFFE identity, ALPN, and why a handshake failed.

The contexts come from the caller (nodeagent.identity builds them: TLS 1.3, peer
certificate required and verified against the mesh roots, no host name check, because
workloads are named by the SPIFFE URI SAN); the tunnel adds ALPN `h2` and checks the
peer's identity with `verify_peer` once the handshake is done.

A server's pending handshake is kept cheap (issue 9.4): `client_speaks` waits for the
peer's first bytes with nothing but a reader on the socket (~4 KB a connection), and
`serve_tls` runs asyncio's own TLS protocol with a 4 KiB read buffer until the handshake
is done, then asyncio's 256 KiB, and builds the HTTP/2 session only then. asyncio
allocates that 256 KiB per connection at once (`SSLProtocol.max_size`): it was 80% of
the ~330 KB each silent connection to :15008 held. What is left of a pending handshake
is mostly OpenSSL's (~45 KB: its record and handshake buffers).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from asyncio import sslproto
from typing import Callable

from cryptography import x509

from nodeagent.identity.errors import CertificateIdentityError
from nodeagent.identity.spiffe import identity_of_certificate
from nodeagent.tunnel.errors import PeerRefused

ALPN = "h2"
HANDSHAKE_READ_SIZE = 4096  # bytes read at once until TLS is up (a ClientHello: ~0.5 KiB, 1.8 with ML-KEM)

# OpenSSL X509_V_ERR_* codes (x509_vfy.h) -> our reasons.
VERIFY_REASONS = {
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
        return VERIFY_REASONS.get(exc.verify_code, "bad_certificate")
    if isinstance(exc, ssl.SSLError):
        return _SSL_REASONS.get(exc.reason or "", "tls_error")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionAbortedError)):
        return "timeout"  # asyncio aborts a handshake that outlives ssl_handshake_timeout
    if isinstance(exc, (ConnectionError, EOFError)):
        return "closed"
    return "tls_error"


async def client_speaks(sock: socket.socket) -> bool:
    """Wait until an accepted non-blocking socket is readable: True when bytes wait (a
    ClientHello, we hope), False when the peer closed; ConnectionError when it reset.
    Costs a reader and a future, so a silent peer holds no TLS state."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _set_once, readable)
    try:
        await readable
    finally:
        loop.remove_reader(fd)
    return bool(sock.recv(1, socket.MSG_PEEK))


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _LeanTLS(sslproto.SSLProtocol):
    """asyncio's TLS protocol, reading HANDSHAKE_READ_SIZE at a time until the handshake
    is done, then asyncio's own size (256 KiB, for throughput). `_on_handshake_complete`
    is asyncio's (3.11+); tests/unit/test_hbone_handshakes.py checks the buffer grows."""
    max_size = HANDSHAKE_READ_SIZE  # SSLProtocol.__init__ allocates this much

    def _on_handshake_complete(self, handshake_exc):
        if handshake_exc is None:
            self.max_size = sslproto.SSLProtocol.max_size  # the next read grows the buffer
        super()._on_handshake_complete(handshake_exc)


class _Deferred(asyncio.Protocol):
    """Stands in for the protocol until TLS is up, so a pending handshake holds none of
    its state (an h2 connection is ~20 KB): then builds it and hands it the transport,
    before asyncio passes on the first decrypted bytes."""

    def __init__(self, factory: Callable[[], asyncio.Protocol]):
        self.factory = factory
        self.protocol: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.protocol = self.factory()
        transport.set_protocol(self.protocol)
        self.protocol.connection_made(transport)


async def serve_tls(sock: socket.socket, protocol_factory: Callable[[], asyncio.Protocol],
                    context: ssl.SSLContext, timeout: float) -> asyncio.Protocol:
    """The server side of a TLS handshake on an accepted socket, as
    `loop.connect_accepted_socket(protocol_factory, sock, ssl=context)` does it but lean:
    `_LeanTLS`, and the protocol made only once the handshake is done; returns it,
    connected. Raises as asyncio does (ssl.SSLError, ConnectionError,
    ConnectionAbortedError after `timeout` seconds); the socket is closed then."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    deferred = _Deferred(protocol_factory)
    tls = _LeanTLS(loop, deferred, context, done, server_side=True, ssl_handshake_timeout=timeout)
    transport, _ = await loop.connect_accepted_socket(lambda: tls, sock)
    try:
        await done
    except BaseException:
        transport.abort()  # also when cancelled: the socket goes with it
        raise
    return deferred.protocol
