"""The agent's client of the mesh CA (IstioCertificateService/CreateCertificate over TLS).

The channel trusts only the mesh root (the file the lab or the CA's ConfigMap provides)
and checks the CA's certificate for `server_name` (default nodeagent-ca.istio-system.svc)
whatever address it dials: the target name override makes a CA reached by IP verify by
its DNS SAN. That name is as good as a SPIFFE check, since this CA puts DNS SANs only in
its own certificate and refuses CSRs asking for any. The node's bearer token goes in
`authorization` metadata, asked for at every request when given as a function (a
projected service-account token kubelet rotates: kube.client.TokenFile re-reads it);
the identity is also named as ztunnel does (`ImpersonatedIdentity`). Refusals come back
as CaRefused, everything else that fails (unreachable, timeout, an unreadable token) as
CaUnavailable, so callers retry the right way. The call is grpclib's (grpcwire.py: the
agent carries no grpcio), on the caller's event loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from typing import Callable

import h2.exceptions
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from nodeagent import grpcwire
from nodeagent.errors import NodeagentError
from nodeagent.identity.caproto import (IMPERSONATED_IDENTITY, PATH, DecodeError, IstioCertificateRequest,
                                        IstioCertificateResponse, Struct, default_server_name)
from nodeagent.identity.errors import CaRefused, CaUnavailable
from nodeagent.identity.spiffe import Identity

# Codes meaning "the CA looked at the request and said no"; anything else is transport.
REFUSALS = (Status.UNAUTHENTICATED, Status.PERMISSION_DENIED, Status.INVALID_ARGUMENT, Status.FAILED_PRECONDITION)
# Everything else a call can end with that is the transport's (or the CA's) failure.
UNAVAILABLE = (StreamTerminatedError, ProtocolError, h2.exceptions.H2Error, OSError, asyncio.TimeoutError,
               EOFError)
DEFAULT_TIMEOUT = 10.0


class CaClient:
    def __init__(self, address: str, root_cert_pem: bytes, token: str | Callable[[], str],
                 server_name: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.address = address
        self.root_cert_pem = root_cert_pem
        self.token = token
        self.server_name = server_name or default_server_name()
        self.timeout = timeout
        self._channel: Channel | None = None

    def _open(self) -> Channel:
        # Made on first use: the channel belongs to the event loop it was made in.
        if self._channel is None:
            context = ssl.create_default_context(cadata=self.root_cert_pem.decode("ascii"))
            context.set_alpn_protocols(["h2"])
            host, _, port = self.address.rpartition(":")
            self._channel = Channel(host.strip("[]"), int(port), ssl=context, codec=grpcwire.Raw(),
                                    config=Configuration(ssl_target_name_override=self.server_name))
        return self._channel

    async def create_certificate(self, csr_pem: bytes, identity: Identity,
                                 ttl: dt.timedelta | None = None) -> list[str]:
        """The CA's chain (PEM strings, leaf first) for `csr_pem`."""
        metadata = Struct()
        metadata.update({IMPERSONATED_IDENTITY: identity.uri})
        request = IstioCertificateRequest(
            csr=csr_pem.decode("ascii"), validity_duration=int(ttl.total_seconds()) if ttl else 0, metadata=metadata)
        try:
            token = self.token() if callable(self.token) else self.token
        except NodeagentError as exc:
            raise CaUnavailable(f"cannot read the token for the CA: {exc}") from None
        try:
            data = await asyncio.wait_for(self._call(request.SerializeToString(), token), self.timeout)
            response = IstioCertificateResponse.FromString(data)
        except GRPCError as exc:
            if exc.status in REFUSALS:
                raise CaRefused(exc.status.name, exc.message or "") from None
            raise self._unavailable(f"{exc.status.name}: {exc.message}") from None
        except UNAVAILABLE as exc:
            raise self._unavailable(f"{type(exc).__name__}: {exc}") from None
        except DecodeError as exc:  # an answer that is no IstioCertificateResponse
            raise self._unavailable(f"its answer does not parse: {exc}") from None
        return list(response.cert_chain)

    async def _call(self, request: bytes, token: str) -> bytes:
        async with self._open().request(PATH, Cardinality.UNARY_UNARY, bytes, bytes, timeout=self.timeout,
                                        metadata={"authorization": f"Bearer {token}"}) as stream:
            await stream.send_message(request, end=True)
            await stream.recv_initial_metadata()
            data = await grpcwire.receive(stream)
            await stream.recv_trailing_metadata()  # raises GRPCError for a status other than OK
        if data is None:
            raise GRPCError(Status.UNKNOWN, "the CA answered without a message")
        return data

    def _unavailable(self, why: str) -> CaUnavailable:
        return CaUnavailable(f"CA at {self.address} failed: {why}",
                             "check that the CA runs, that the agent can reach it, and that the "
                             "agent's root certificate is the CA's")

    async def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
