"""Istio's CA API on the wire: `istio.v1.auth.IstioCertificateService/CreateCertificate`.

The two messages of istio/api security/v1alpha1/ca.proto, as betterproto2 dataclasses
with the same field numbers and types, so Istio's own clients (istio-agent, ztunnel) and
ours speak the same bytes. `metadata` is a google.protobuf.Struct; ztunnel puts the
identity it asks for on behalf of a workload in it as `ImpersonatedIdentity`. Both
sides also agree here on the CA's name: its service account and the DNS name agents
check in its certificate.
"""

from __future__ import annotations

from dataclasses import dataclass

import betterproto2
from envoy_data_plane.google.protobuf import Struct

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = "CreateCertificate"
PATH = f"/{SERVICE}/{METHOD}"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"  # metadata key ztunnel uses
SERVER_ACCOUNT = "nodeagent-ca"  # the CA's service account: its server identity


def default_server_name(ca_namespace: str = "istio-system") -> str:
    """The DNS name agents expect in the CA's certificate (the CA Service's name)."""
    return f"{SERVER_ACCOUNT}.{ca_namespace}.svc"


@dataclass(eq=False, repr=False)
class IstioCertificateRequest(betterproto2.Message):
    csr: str = betterproto2.field(1, betterproto2.TYPE_STRING)  # PEM PKCS#10
    # field 2 (subject_id) was removed from the proto; its number stays unused
    validity_duration: int = betterproto2.field(3, betterproto2.TYPE_INT64)  # seconds, 0 = CA default
    metadata: "Struct | None" = betterproto2.field(4, betterproto2.TYPE_MESSAGE, optional=True)

    def metadata_string(self, key: str) -> str | None:
        if self.metadata is None or key not in self.metadata.fields:
            return None
        value = self.metadata.fields[key]
        return value.string_value if betterproto2.which_one_of(value, "kind")[0] == "string_value" else None


@dataclass(eq=False, repr=False)
class IstioCertificateResponse(betterproto2.Message):
    cert_chain: "list[str]" = betterproto2.field(1, betterproto2.TYPE_STRING, repeated=True)  # leaf first

