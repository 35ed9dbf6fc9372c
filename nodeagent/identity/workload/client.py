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
CaUnavailable, so callers retry the right way.
"""

from __future__ import annotations

import datetime as dt
from typing import Callable

import grpc
import grpc.aio
from envoy_data_plane.google.protobuf import Struct

from nodeagent.errors import NodeagentError
from nodeagent.identity.caproto import (IMPERSONATED_IDENTITY, PATH, IstioCertificateRequest,
                                        IstioCertificateResponse, default_server_name)
from nodeagent.identity.errors import CaRefused, CaUnavailable
from nodeagent.identity.spiffe import Identity

# Codes meaning "the CA looked at the request and said no"; anything else is transport.
REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
DEFAULT_TIMEOUT = 10.0


class CaClient:
    def __init__(self, address: str, root_cert_pem: bytes, token: str | Callable[[], str],
                 server_name: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.address = address
        self.root_cert_pem = root_cert_pem
        self.token = token
        self.server_name = server_name or default_server_name()
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None

    def _call(self):
        # Made on first use: a grpc.aio channel belongs to the event loop it was made in.
        if self._channel is None:
            creds = grpc.ssl_channel_credentials(root_certificates=self.root_cert_pem)
            self._channel = grpc.aio.secure_channel(self.address, creds, options=[
                ("grpc.ssl_target_name_override", self.server_name),
                ("grpc.default_authority", self.server_name)])
        return self._channel.unary_unary(PATH, request_serializer=bytes,
                                         response_deserializer=IstioCertificateResponse.parse)

    async def create_certificate(self, csr_pem: bytes, identity: Identity,
                                 ttl: dt.timedelta | None = None) -> list[str]:
        """The CA's chain (PEM strings, leaf first) for `csr_pem`."""
        request = IstioCertificateRequest(
            csr=csr_pem.decode("ascii"), validity_duration=int(ttl.total_seconds()) if ttl else 0,
            metadata=Struct.from_dict({IMPERSONATED_IDENTITY: identity.uri}))
        try:
            token = self.token() if callable(self.token) else self.token
        except NodeagentError as exc:
            raise CaUnavailable(f"cannot read the token for the CA: {exc}") from None
        try:
            response = await self._call()(request, timeout=self.timeout,
                                          metadata=(("authorization", f"Bearer {token}"),))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in REFUSALS:
                raise CaRefused(exc.code().name, exc.details() or "") from None
            raise CaUnavailable(f"CA at {self.address} failed: {exc.code().name}: {exc.details()}",
                                "check that the CA runs, that the agent can reach it, and that the "
                                "agent's root certificate is the CA's") from None
        return list(response.cert_chain)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
