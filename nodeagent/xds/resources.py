"""xDS resource types: their type URLs, the order they are pushed in, their names.

ADS carries several resource types on one stream; Envoy needs clusters before the
endpoints and listeners that use them and listeners before their routes, so PUSH_ORDER
is CDS, EDS, LDS, RDS. Messages are xds-protos' classes (protobuf, upb); `pack` wraps one
in a google.protobuf.Any for a DiscoveryResponse or a typed_config, `unpack` finds the
class of an Any's type among the Envoy modules imported so far.
"""

from __future__ import annotations

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message

PREFIX = "type.googleapis.com/"
CLUSTER = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = PREFIX + "envoy.config.route.v3.RouteConfiguration"

PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
# Short names for metrics labels, logs and the CLI.
SHORT = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}
BY_SHORT = {v: k for k, v in SHORT.items()}
MESSAGE = {CLUSTER: Cluster, ENDPOINT: ClusterLoadAssignment, LISTENER: Listener,
           ROUTE: RouteConfiguration}
# Types Envoy subscribes to by name (the others are wildcard subscriptions).
NAMED = (ENDPOINT, ROUTE)


def name_of(message: Message) -> str:
    """The xDS resource name of a message (its `name`, or `cluster_name` for endpoints)."""
    if isinstance(message, ClusterLoadAssignment):
        return message.cluster_name
    return message.name


def type_of(message: Message) -> str:
    for type_url, cls in MESSAGE.items():
        if isinstance(message, cls):
            return type_url
    raise TypeError(f"{type(message).__name__} is not an xDS resource type this server serves")


def pack(message: Message) -> Any:
    packed = Any()
    packed.Pack(message)
    return packed


def unpack(any_: Any) -> Message:
    """The message in `any_` (KeyError for a type no imported module defines)."""
    name = any_.type_url.rpartition("/")[2]
    message = message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(name))()
    any_.Unpack(message)
    return message


def serialize(message: Message) -> bytes:
    """The bytes of `message`, the same for equal messages (map entries sorted): what
    versions and hashes are computed from."""
    return message.SerializeToString(deterministic=True)
