"""Istio's CA API on the wire: `istio.v1.auth.IstioCertificateService/CreateCertificate`.

The two messages of istio/api security/v1alpha1/ca.proto, as protobuf (upb) classes
built by nodeagent.protosubset with the same field numbers and types, so Istio's own
clients (istio-agent, ztunnel) and ours speak the same bytes. `metadata` is a
google.protobuf.Struct (`Struct` here, of the same descriptor pool); ztunnel puts the
identity it asks for on behalf of a workload in it as `ImpersonatedIdentity`. Both
sides also agree here on the CA's name: its service account and the DNS name agents
check in its certificate.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError  # noqa: F401 (what FromString raises)

from nodeagent import protosubset as subset

SERVICE = "istio.v1.auth.IstioCertificateService"
METHOD = "CreateCertificate"
PATH = f"/{SERVICE}/{METHOD}"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"  # metadata key ztunnel uses
SERVER_ACCOUNT = "nodeagent-ca"  # the CA's service account: its server identity

PACKAGE = "istio.v1.auth"
SCHEMA: subset.Schema = {
    # field 2 (subject_id) was removed from the proto; its number stays unused
    "IstioCertificateRequest": [("csr", 1, "string", None),  # PEM PKCS#10
                                ("validity_duration", 3, "int64", None),  # seconds, 0 = CA default
                                ("metadata", 4, "google.protobuf.Struct", None)],
    "IstioCertificateResponse": [("cert_chain", 1, "repeated string", None)],  # leaf first
}
_classes = subset.classes("istio/security/v1alpha1/ca.proto", PACKAGE, SCHEMA)
IstioCertificateRequest = _classes("IstioCertificateRequest")
IstioCertificateResponse = _classes("IstioCertificateResponse")
Struct = _classes("google.protobuf.Struct")


def default_server_name(ca_namespace: str = "istio-system") -> str:
    """The DNS name agents expect in the CA's certificate (the CA Service's name)."""
    return f"{SERVER_ACCOUNT}.{ca_namespace}.svc"


def metadata_string(request: IstioCertificateRequest, key: str) -> str | None:
    """The string `request.metadata[key]`, or None when it is absent or not a string."""
    if not request.HasField("metadata") or key not in request.metadata.fields:
        return None
    value = request.metadata.fields[key]
    return value.string_value if value.WhichOneof("kind") == "string_value" else None
