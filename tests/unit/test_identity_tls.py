"""Mutual TLS 1.3 with issued credentials, on loopback: both sides read each other's
SPIFFE identity; a certificate from another CA, an expired one and no certificate at
all are refused by the handshake itself."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time

import pytest

from nodeagent.identity import pemfiles, tls
from nodeagent.identity.workload import credentials
from nodeagent.identity.workload.credentials import Credentials
from nodeagent.identity.tls import peer_identity

from identity_fixtures import identity, make_ca

CLIENT, SERVER = identity("shop", "frontend"), identity("shop", "cart")
TIMEOUT = 5.0


def issue(ca, ident, directory, now: float | None = None, ttl=dt.timedelta(hours=1)) -> Credentials:
    """Credentials as the manager makes them: own key, CSR, CA-signed chain, 0600 file."""
    key, csr = credentials.new_request(ident)
    chain = ca.sign(ca.read_csr(csr), ttl)
    chain_pem = [pemfiles.certs_pem([c]).decode() for c in chain]
    presented = credentials.accept(ident, key, chain_pem, [ca.material.root], now or time.time())
    directory.mkdir(exist_ok=True)
    return credentials.write(directory, ident, key, presented, ca.root_pem)


class Handshake:
    """One server-side TLS accept on 127.0.0.1 in a thread; records what it saw."""

    def __init__(self, ctx: ssl.SSLContext):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.peer = self.error = self.version = None
        self.thread = threading.Thread(target=self._serve, args=(ctx,), daemon=True)
        self.thread.start()

    def _serve(self, ctx):
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(TIMEOUT)
            with ctx.wrap_socket(conn, server_side=True) as tls:
                self.peer, self.version = peer_identity(tls), tls.version()
                tls.sendall(tls.recv(5).upper())
        except (ssl.SSLError, OSError) as exc:
            self.error = exc
        finally:
            self.listener.close()

    def join(self):
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive()


def connect(ctx: ssl.SSLContext, port: int) -> tuple[object, bytes]:
    """(server identity, echoed reply) as the client saw them."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw) as tls:
            seen = peer_identity(tls)
            tls.sendall(b"hello")
            return seen, tls.recv(5)


@pytest.fixture
def ca():
    return make_ca()


def test_mutual_tls13_handshake_and_each_side_reads_the_others_identity(ca, tmp_path):
    server_creds, client_creds = issue(ca, SERVER, tmp_path), issue(ca, CLIENT, tmp_path)
    hs = Handshake(server_creds.ssl_context(server_side=True))
    seen, reply = connect(client_creds.ssl_context(server_side=False), hs.port)
    hs.join()
    assert hs.error is None and hs.version == "TLSv1.3"
    assert (seen, hs.peer, reply) == (SERVER, CLIENT, b"HELLO")


def test_contexts_offer_nothing_but_tls13(ca, tmp_path):
    creds = issue(ca, CLIENT, tmp_path)
    for server_side in (True, False):
        ctx = creds.ssl_context(server_side)
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED and not ctx.check_hostname


def _refused(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> Handshake:
    """Run a handshake that must fail; the client must not get its bytes echoed."""
    hs = Handshake(server_ctx)
    with pytest.raises((ssl.SSLError, OSError)):
        seen, reply = connect(client_ctx, hs.port)
        if not reply:  # TLS 1.3: the client may finish first and learn of the refusal as EOF
            raise ConnectionResetError("server closed the connection")
    hs.join()
    return hs


def test_a_client_certificate_from_another_ca_is_refused(ca, tmp_path):
    server_creds = issue(ca, SERVER, tmp_path / "a")
    intruder = issue(make_ca(), CLIENT, tmp_path / "b")
    # The intruder trusts our root, so only the server's verification can stop it.
    client_ctx = tls.context(intruder.path, ca.root_pem, server_side=False)
    hs = _refused(server_creds.ssl_context(server_side=True), client_ctx)
    assert isinstance(hs.error, ssl.SSLError) and "certificate verify failed" in str(hs.error)
    assert hs.peer is None


def test_a_server_certificate_from_another_ca_is_refused(ca, tmp_path):
    impostor = issue(make_ca(), SERVER, tmp_path / "a")
    client_creds = issue(ca, CLIENT, tmp_path / "b")
    server_ctx = tls.context(impostor.path, ca.root_pem, server_side=True)
    hs = Handshake(server_ctx)
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
        connect(client_creds.ssl_context(server_side=False), hs.port)
    hs.join()
    assert hs.peer is None


class PastClock:
    """The CA's clock: three days ago until `catch_up()` (the root is made in the past
    and stays valid for years; a leaf issued then lived an hour)."""

    def __init__(self):
        self.offset = 3 * 86400.0

    def __call__(self) -> float:
        return time.time() - self.offset

    def catch_up(self) -> None:
        self.offset = 0.0


def test_an_expired_client_certificate_is_refused(tmp_path):
    clock = PastClock()
    ca = make_ca(clock=clock)
    expired = issue(ca, CLIENT, tmp_path / "b", now=clock())
    clock.catch_up()
    server_creds = issue(ca, SERVER, tmp_path / "a")
    assert expired.not_after < time.time() - 2 * 86400
    hs = _refused(server_creds.ssl_context(server_side=True), expired.ssl_context(server_side=False))
    assert isinstance(hs.error, ssl.SSLError) and "certificate has expired" in str(hs.error)


def test_an_expired_server_certificate_is_refused(tmp_path):
    clock = PastClock()
    ca = make_ca(clock=clock)
    expired = issue(ca, SERVER, tmp_path / "a", now=clock())
    clock.catch_up()
    hs = Handshake(expired.ssl_context(server_side=True))
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
        connect(issue(ca, CLIENT, tmp_path / "b").ssl_context(server_side=False), hs.port)
    hs.join()


def test_a_client_without_a_certificate_is_refused(ca, tmp_path):
    server_creds = issue(ca, SERVER, tmp_path)
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.minimum_version = ssl.TLSVersion.TLSv1_3
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=ca.root_pem.decode())
    hs = _refused(server_creds.ssl_context(server_side=True), anonymous)
    assert isinstance(hs.error, ssl.SSLError) and "peer did not return a certificate" in str(hs.error)
