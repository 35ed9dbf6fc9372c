"""The waypoint Envoy's bootstrap: who it is, where its admin listens, where ADS is.

Admin listens on 127.0.0.1 only (a port of the node's network namespace). Everything
else comes over one ADS stream (state of the world, gRPC over HTTP/2) from the agent's
unix socket, through the static cluster `xds_cluster`. The internal-listener extension
is enabled because outbound endpoints are internal addresses (see translate/clusters.py).
Stats: Istio's regex for the cluster-name tag (`outbound|port|subset|fqdn` keeps its
dots), so `/stats/prometheus` labels per-cluster request counts and times with the full
cluster name the agent maps to destination_service/subset/port.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

from envoy_data_plane.envoy.config.bootstrap.v3 import (Admin, Bootstrap, BootstrapDynamicResources,
                                                       BootstrapStaticResources)
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import (
    Address, ApiConfigSource, ApiConfigSourceApiType, ApiVersion, GrpcService, GrpcServiceEnvoyGrpc,
    Http2ProtocolOptions, Node, Pipe, SocketAddress, TypedExtensionConfig)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.metrics.v3 import StatsConfig, TagSpecifier
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.extensions.bootstrap.internal_listener.v3 import InternalListener
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (HttpProtocolOptions,
                                                                HttpProtocolOptionsExplicitHttpConfig)
from envoy_data_plane.google.protobuf import Struct

from nodeagent.errors import ConfigError
from nodeagent.xds.resources import pack
from nodeagent.xds.translate.clusters import HTTP_OPTIONS
from nodeagent.xds.translate.primitives import ADS

XDS_CLUSTER = "xds_cluster"
# istiod's regex for cluster names, whose FQDN has dots (outbound|80||svc.ns.svc.cluster.local),
# replacing Envoy's default extractor of the tag (which stops at the first dot).
CLUSTER_NAME_TAG = TagSpecifier(tag_name="envoy.cluster_name",
                                regex=r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)")


@dataclass(frozen=True)
class BootstrapSettings:
    node: str  # the node id the xDS server serves (the Kubernetes node name)
    xds_socket: str
    admin_port: int = 15000
    cluster: str = "nodeagent-waypoint"
    max_connections: int = 50_000

    def __post_init__(self) -> None:
        if not 0 <= self.admin_port < 65536:
            raise ConfigError("waypoint admin port", f"{self.admin_port} is not a port number 1-65535 (0: a free one)")
        if not self.node:
            raise ConfigError("waypoint node id", "must not be empty")


def bootstrap(settings: BootstrapSettings) -> Bootstrap:
    xds = Cluster(
        name=XDS_CLUSTER, type=ClusterDiscoveryType.STATIC, connect_timeout=timedelta(seconds=1),
        typed_extension_protocol_options={HTTP_OPTIONS: pack(HttpProtocolOptions(explicit_http_config=(
            HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions()))))},
        load_assignment=ClusterLoadAssignment(cluster_name=XDS_CLUSTER, endpoints=[LocalityLbEndpoints(
            lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=Address(pipe=Pipe(path=settings.xds_socket))))])]))
    return Bootstrap(
        node=Node(id=settings.node, cluster=settings.cluster,
                  metadata=Struct.from_dict({"NODEAGENT_ROLE": "waypoint"})),
        admin=Admin(address=Address(socket_address=SocketAddress(address="127.0.0.1",
                                                                 port_value=settings.admin_port))),
        static_resources=BootstrapStaticResources(clusters=[xds]),
        dynamic_resources=BootstrapDynamicResources(
            ads_config=ApiConfigSource(api_type=ApiConfigSourceApiType.GRPC, transport_api_version=ApiVersion.V3,
                                       grpc_services=[GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(
                                           cluster_name=XDS_CLUSTER))]),
            cds_config=ADS, lds_config=ADS),
        bootstrap_extensions=[TypedExtensionConfig(name="envoy.bootstrap.internal_listener",
                                                   typed_config=pack(InternalListener()))],
        stats_config=StatsConfig(stats_tags=[CLUSTER_NAME_TAG], use_all_default_tags=True,
                                 allow_default_tag_overrides=True),
        overload_manager=OverloadManager(resource_monitors=[ResourceMonitor(
            name="envoy.resource_monitors.global_downstream_max_connections",
            typed_config=pack(DownstreamConnectionsConfig(
                max_active_downstream_connections=settings.max_connections)))]))


def bootstrap_json(settings: BootstrapSettings) -> str:
    """The bootstrap as the JSON Envoy reads with `-c`."""
    return json.dumps(bootstrap(settings).to_dict(), indent=2, sort_keys=True)
