"""The waypoint Envoy's bootstrap: who it is, where its admin listens, where ADS is.

Admin listens on a unix socket in the waypoint directory, never on a port: the waypoint
runs in the node's network namespace, where any hostNetwork pod or local user could
/quitquitquit it or raise its log level. Everything
else comes over one ADS stream (state of the world, gRPC over HTTP/2) from the agent's
unix socket, through the static cluster `xds_cluster`. The internal-listener extension
is enabled because outbound endpoints are internal addresses (see translate/clusters.py).
Stats: Istio's regex for the cluster-name tag (`outbound|port|subset|fqdn` keeps its
dots), so `/stats/prometheus` labels per-cluster request counts and times with the full
cluster name the agent maps to destination_service/subset/port; it replaces Envoy's own
extractor of that tag, which Envoy allows only with `allow_default_tag_overrides`, a field
newer than xds-protos' schema: it is set as a field upb does not know, kept in the bytes,
and `bootstrap_json` adds it to the JSON (which carries only known fields).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta

from envoy.config.bootstrap.v3.bootstrap_pb2 import Admin, Bootstrap
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.address_pb2 import Address, Pipe
from envoy.config.core.v3.base_pb2 import Node
from envoy.config.core.v3.config_source_pb2 import ApiConfigSource, ApiVersion
from envoy.config.core.v3.extension_pb2 import TypedExtensionConfig
from envoy.config.core.v3.grpc_service_pb2 import GrpcService
from envoy.config.core.v3.protocol_pb2 import Http2ProtocolOptions
from envoy.config.endpoint.v3.endpoint_components_pb2 import Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.metrics.v3.stats_pb2 import StatsConfig, TagSpecifier
from envoy.config.overload.v3.overload_pb2 import OverloadManager, ResourceMonitor
from envoy.extensions.bootstrap.internal_listener.v3.internal_listener_pb2 import InternalListener
from envoy.extensions.resource_monitors.downstream_connections.v3.downstream_connections_pb2 import (
    DownstreamConnectionsConfig)
from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions
from google.protobuf import json_format

from nodeagent.errors import ConfigError
from nodeagent.xds.resources import pack
from nodeagent.xds.translate.clusters import HTTP_OPTIONS
from nodeagent.xds.translate.primitives import ADS, boolean, struct

XDS_CLUSTER = "xds_cluster"
# StatsConfig.allow_default_tag_overrides = true on the wire: field 5, a BoolValue {value: true}.
ALLOW_DEFAULT_TAG_OVERRIDES = bytes([5 << 3 | 2, 2, 1 << 3 | 0, 1])
# istiod's regex for cluster names, whose FQDN has dots (outbound|80||svc.ns.svc.cluster.local),
# replacing Envoy's default extractor of the tag (which stops at the first dot).
CLUSTER_NAME_TAG = TagSpecifier(tag_name="envoy.cluster_name",
                                regex=r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)")


@dataclass(frozen=True)
class BootstrapSettings:
    node: str  # the node id the xDS server serves (the Kubernetes node name)
    xds_socket: str
    admin_socket: str
    cluster: str = "nodeagent-waypoint"
    max_connections: int = 50_000

    def __post_init__(self) -> None:
        if not self.node:
            raise ConfigError("waypoint node id", "must not be empty")


def bootstrap(settings: BootstrapSettings) -> Bootstrap:
    xds = Cluster(
        name=XDS_CLUSTER, type=Cluster.DiscoveryType.STATIC, connect_timeout=timedelta(seconds=1),
        typed_extension_protocol_options={HTTP_OPTIONS: pack(HttpProtocolOptions(explicit_http_config=(
            HttpProtocolOptions.ExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions()))))},
        load_assignment=ClusterLoadAssignment(cluster_name=XDS_CLUSTER, endpoints=[LocalityLbEndpoints(
            lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=Address(pipe=Pipe(path=settings.xds_socket))))])]))
    return Bootstrap(
        node=Node(id=settings.node, cluster=settings.cluster,
                  metadata=struct({"NODEAGENT_ROLE": "waypoint"})),
        # 0666: the directory (01770, the agent's and Envoy's group) is what keeps others
        # out, so the agent reaches it as root without CAP_DAC_OVERRIDE (the DaemonSet's)
        admin=Admin(address=Address(pipe=Pipe(path=settings.admin_socket, mode=0o666))),
        static_resources=Bootstrap.StaticResources(clusters=[xds]),
        dynamic_resources=Bootstrap.DynamicResources(
            ads_config=ApiConfigSource(api_type=ApiConfigSource.ApiType.GRPC, transport_api_version=ApiVersion.V3,
                                       grpc_services=[GrpcService(envoy_grpc=GrpcService.EnvoyGrpc(
                                           cluster_name=XDS_CLUSTER))]),
            cds_config=ADS, lds_config=ADS),
        bootstrap_extensions=[TypedExtensionConfig(name="envoy.bootstrap.internal_listener",
                                                   typed_config=pack(InternalListener()))],
        stats_config=stats_config(),
        overload_manager=OverloadManager(resource_monitors=[ResourceMonitor(
            name="envoy.resource_monitors.global_downstream_max_connections",
            typed_config=pack(DownstreamConnectionsConfig(
                max_active_downstream_connections=settings.max_connections)))]))


def stats_config() -> StatsConfig:
    config = StatsConfig(stats_tags=[CLUSTER_NAME_TAG], use_all_default_tags=boolean(True))
    config.MergeFromString(ALLOW_DEFAULT_TAG_OVERRIDES)
    return config


def bootstrap_json(settings: BootstrapSettings) -> str:
    """The bootstrap as the JSON Envoy reads with `-c`."""
    config = json_format.MessageToDict(bootstrap(settings))
    config["statsConfig"]["allowDefaultTagOverrides"] = True
    return json.dumps(config, indent=2, sort_keys=True)
