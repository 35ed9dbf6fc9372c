"""The ADS envelope (DiscoveryRequest, DiscoveryResponse), built and parsed by upb.

The server reads and writes only these two messages; the resources they carry are
already serialized in the Snapshot. It uses this subset of
envoy/service/discovery/v3/discovery.proto (nodeagent/protosubset.py): fields the server
does not read (the rest of the Node, resource locators, a status's details, …) are
skipped in C when a request is parsed, and never become Python objects.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError  # noqa: F401 (what parse raises)

from nodeagent import protosubset as subset

PACKAGE = "nodeagent.ads"
SCHEMA: subset.Schema = {
    # envoy/service/discovery/v3/discovery.proto
    "DiscoveryRequest": [("version_info", 1, "string", None), ("node", 2, "Node", None),
                         ("resource_names", 3, "repeated string", None), ("type_url", 4, "string", None),
                         ("response_nonce", 5, "string", None), ("error_detail", 6, "Status", None)],
    "DiscoveryResponse": [("version_info", 1, "string", None),
                          ("resources", 2, "repeated google.protobuf.Any", None),
                          ("type_url", 4, "string", None), ("nonce", 5, "string", None),
                          ("control_plane", 6, "ControlPlane", None)],
    # envoy/config/core/v3/base.proto
    "Node": [("id", 1, "string", None)],
    "ControlPlane": [("identifier", 1, "string", None)],
    # google/rpc/status.proto
    "Status": [("code", 1, "int32", None), ("message", 2, "string", None)],
}
_classes = subset.classes("nodeagent/ads_subset.proto", PACKAGE, SCHEMA)
DiscoveryRequest = _classes("DiscoveryRequest")
DiscoveryResponse = _classes("DiscoveryResponse")
Any = _classes("google.protobuf.Any")
Node = _classes("Node")
Status = _classes("Status")
ControlPlane = _classes("ControlPlane")
