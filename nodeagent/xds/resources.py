"""xDS resource types: their type URLs, the order they are pushed in, their names.

ADS carries several resource types on one stream; Envoy needs clusters before the
endpoints and listeners that use them and listeners before their routes, so PUSH_ORDER
is CDS, EDS, LDS, RDS. Messages are envoy-data-plane (betterproto2) dataclasses;
`pack` wraps one in a google.protobuf.Any for a DiscoveryResponse or a typed_config.
"""

from __future__ import annotations

import betterproto2
from envoy_data_plane.envoy.config.cluster.v3 import Cluster
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment
from envoy_data_plane.envoy.config.listener.v3 import Listener
from envoy_data_plane.envoy.config.route.v3 import RouteConfiguration
from envoy_data_plane.google.protobuf import Any

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


def name_of(message: betterproto2.Message) -> str:
    """The xDS resource name of a message (its `name`, or `cluster_name` for endpoints)."""
    if isinstance(message, ClusterLoadAssignment):
        return message.cluster_name
    return message.name


def type_of(message: betterproto2.Message) -> str:
    for type_url, cls in MESSAGE.items():
        if isinstance(message, cls):
            return type_url
    raise TypeError(f"{type(message).__name__} is not an xDS resource type this server serves")


def pack(message: betterproto2.Message) -> Any:
    return Any.pack(message)


def unpack(any_: Any) -> betterproto2.Message:
    return any_.unpack()
