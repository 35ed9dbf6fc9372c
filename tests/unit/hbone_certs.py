"""Certificates and loopback wiring for the HBONE tests (tests/unit/test_hbone_*.py).

`Pki` is a throwaway mesh made with nodeagent's own CA (P-256, one SPIFFE URI SAN such
as spiffe://cluster.local/ns/default/sa/backend, TLS 1.3 contexts from the identity
subsystem), its key and certificate files under tmp_path because ssl loads files: a
server workload `default/backend`, a client workload `default/frontend`, and for the
refusal tests a foreign CA and expired leaves. `Loopback` runs an HboneServer on
127.0.0.1 and an HbonePool that reaches it, both counting into one CollectorRegistry,
counts the TCP connections the pool makes, and closes everything on exit, also when a
test fails.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from nodeagent.identity.ca import keys as cakeys
from nodeagent.identity.workload import credentials
from nodeagent.identity.ca.signer import CertificateAuthority
from nodeagent.identity.workload.credentials import Credentials
from nodeagent.identity.spiffe import Identity
from nodeagent.tunnel import HboneServer, HbonePool, TunnelMetrics, TunnelSettings
from nodeagent.tunnel import tls

TD = "cluster.local"
verify = tls.verifier(TD)
LOG = logging.getLogger("test.hbone")
AUTHORITY = ("10.244.1.5", 8080)


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


class Pki:
    def __init__(self, directory: Path):
        self.directory = directory
        now = time.time()
        material = cakeys.generate_root(TD, _utc(now - 3 * 86400))  # old enough to have issued expired leaves
        self.ca = CertificateAuthority(TD, material)
        self.past_ca = CertificateAuthority(TD, material, clock=lambda: now - 2 * 86400,
                                            cert_ttl=dt.timedelta(days=1))
        self.foreign = CertificateAuthority(TD, cakeys.generate_root(TD, _utc(now)))
        self._dirs = itertools.count()
        self.server = self.issue("default", "backend")
        self.client = self.issue("default", "frontend")

    def issue(self, ns: str, sa: str, ca: CertificateAuthority | None = None,
              trust_domain: str = TD) -> Credentials:
        """A workload's key + certificate file, signed by `ca` (the mesh CA by default),
        trusting the mesh root."""
        identity = Identity(trust_domain, ns, sa)
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (ca or self.ca).issue(key.public_key(), identity)
        directory = self.directory / str(next(self._dirs))  # one file per identity in a directory
        directory.mkdir()
        return credentials.write(directory, identity, key, [leaf], self.ca.root_pem)

    def expired(self, ns: str, sa: str) -> Credentials:
        return self.issue(ns, sa, self.past_ca)

    def context(self, creds: Credentials | None, server_side: bool) -> ssl.SSLContext:
        if creds is not None:
            return creds.ssl_context(server_side)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # a client with no certificate at all
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=self.ca.root_pem.decode())
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def echo(info, reader, writer) -> None:
    """on_stream: answer 200 and send back every byte until EOF, then EOF."""
    writer.respond(200)
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def round_trip(stream, data: bytes, timeout: float = 10.0) -> None:
    """Send `data` and EOF on a stream to `echo`; it must come back whole, then EOF."""
    stream.write(data)
    stream.write_eof()
    assert await asyncio.wait_for(stream.read(), timeout) == data


@dataclass
class Loopback:
    pki: Pki
    on_stream: object = echo
    server_creds: Credentials | None = None
    settings: TunnelSettings = field(default_factory=TunnelSettings)
    server_kw: dict = field(default_factory=dict)
    pool_kw: dict = field(default_factory=dict)
    host: str = "127.0.0.1"  # "::1" for IPv6
    connects: int = 0  # TCP connections the pool asked for

    async def __aenter__(self) -> "Loopback":
        self.registry = CollectorRegistry()
        self.metrics = TunnelMetrics(self.registry)
        server_creds = self.server_creds or self.pki.server
        self.server = HboneServer(lambda ip: server_creds.ssl_context(True), verify, self.on_stream,
                                  metrics=self.metrics, log=LOG, settings=self.settings, **self.server_kw)
        self.family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.listener = socket.socket(self.family)
        self.listener.bind((self.host, 0))
        self.listener.listen(64)
        self.address = self.listener.getsockname()[:2]
        self.serving = asyncio.create_task(self.server.serve_socket(self.listener))
        self.pool = HbonePool(self._connect, lambda source: self.pki.client.ssl_context(False), verify,
                              metrics=self.metrics, log=LOG, settings=self.settings, **self.pool_kw)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.pool.close()
        await self.server.close(grace=1.0)
        self.serving.cancel()
        await asyncio.gather(self.serving, return_exceptions=True)
        self.listener.close()

    def _connect(self, ip: str, port: int) -> socket.socket:
        self.connects += 1
        return socket.socket(self.family, socket.SOCK_STREAM)

    async def open(self, authority=AUTHORITY, headers=(), dest_identity: str | None = None):
        reader, writer = await self.pool.open_stream(self.pki.client.identity.uri,
                                                     dest_identity or self.pki.server.identity.uri,
                                                     self.address, authority, headers)
        return reader

    def value(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def raw_tls(self, creds: Credentials | None = None):
        """A plain TLS connection to the server (for speaking broken HTTP/2 to it)."""
        ctx = self.pki.context(creds or self.pki.client, server_side=False)
        return await asyncio.open_connection(*self.address, ssl=ctx, server_hostname=self.host)


def run(coro, timeout: float = 60.0):
    """Run a test coroutine with a hard time limit."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
