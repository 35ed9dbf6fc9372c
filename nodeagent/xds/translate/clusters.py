"""Clusters (CDS) and their endpoints (EDS).

Outbound clusters are EDS, one per (service, port, subset) a route uses, with the
DestinationRule policy in force for that subset and port translated as istiod's cluster
builder does: circuit-breaker thresholds default to "unlimited" (2^32-1) and take
tcp.maxConnections, http1MaxPendingRequests, http2MaxRequests and maxRetries; outlier
detection enforces exactly the consecutive-error kinds given and never success rate;
the default load balancer is LEAST_REQUEST. Every endpoint is an internal address of the
`nodeagent_upstream` listener (so endpoints stay distinct hosts for load balancing and
outlier detection) carrying the pod's "ip:port" as PROXY TLV ENDPOINT; the cluster's
transport socket writes the PROXY v2 header. PASSTHROUGH clusters have one endpoint
without that TLV: the agent then forwards to the original destination.
"""

from __future__ import annotations

from datetime import timedelta

from envoy.config.cluster.v3.circuit_breaker_pb2 import CircuitBreakers
from envoy.config.cluster.v3.cluster_pb2 import Cluster, UpstreamConnectionOptions
from envoy.config.cluster.v3.outlier_detection_pb2 import OutlierDetection
from envoy.config.core.v3.address_pb2 import Address, EnvoyInternalAddress, Pipe, TcpKeepalive
from envoy.config.core.v3.base_pb2 import Metadata
from envoy.config.core.v3.protocol_pb2 import Http1ProtocolOptions, Http2ProtocolOptions
from envoy.config.core.v3.protocol_pb2 import HttpProtocolOptions as Common
from envoy.config.core.v3.proxy_protocol_pb2 import PerHostConfig, TlvEntry
from envoy.config.endpoint.v3.endpoint_components_pb2 import Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions
from envoy.type.v3.percent_pb2 import Percent

from nodeagent.model import Pod
from nodeagent.xds import dataplane
from nodeagent.xds.istio.destinationrule import HttpSettings, Policy, TcpSettings
from nodeagent.xds.istio import destinationrule as dr
from nodeagent.xds.resources import pack
from nodeagent.xds.translate import names
from nodeagent.xds.translate.context import ClusterSpec, Context
from nodeagent.xds.translate.primitives import ADS, proxy_protocol_transport, struct, u32
from nodeagent.xds.translate.services import HTTP2, TCP, protocol

UNLIMITED = 2**32 - 1
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
PROXY_PROTOCOL_HOST = "envoy.transport_sockets.proxy_protocol"
LB = {"ROUND_ROBIN": Cluster.LbPolicy.ROUND_ROBIN, "RANDOM": Cluster.LbPolicy.RANDOM}


def outbound(ctx: Context) -> tuple[list[Cluster], list[ClusterLoadAssignment]]:
    clusters, assignments = [], []
    for name, spec in sorted(ctx.clusters.items()):
        rule = ctx.catalog.rule(spec.service, spec.client_namespace)
        policy = rule.policy_for(spec.subset, spec.port.port) if rule else Policy()
        cluster = _cluster(name, spec, policy, ctx)
        if cluster.type == Cluster.DiscoveryType.EDS:
            assignments.append(_assignment(name, spec, ctx))
        clusters.append(cluster)
    return clusters, assignments


def _cluster(name: str, spec: ClusterSpec, policy: Policy, ctx: Context) -> Cluster:
    pool = policy.connection_pool or dr.ConnectionPool()
    tcp, http = pool.tcp or TcpSettings(), pool.http or HttpSettings()
    proto = protocol(spec.port, ctx.catalog.virtual_service(spec.service))
    cluster = Cluster(
        name=name, connect_timeout=tcp.connect_timeout or ctx.options.connect_timeout,
        circuit_breakers=_circuit_breakers(tcp, http),
        transport_socket=proxy_protocol_transport(internal=True, added=(
            ((dataplane.TLV_ENFORCED, spec.enforced.encode()),) if spec.enforced else ())),
        metadata=Metadata(filter_metadata={"istio": struct({
            "services": [{"host": spec.service.hostname, "name": spec.service.name,
                          "namespace": spec.service.namespace}],
            "subset": spec.subset, "port": spec.port.port})}),
        upstream_connection_options=_connection_options(tcp),
        typed_extension_protocol_options={} if proto == TCP else {
            HTTP_OPTIONS: pack(_http_options(tcp, http, proto))})
    _load_balancer(cluster, policy, spec, name)
    _outlier_detection(cluster, policy.outlier_detection)
    return cluster


def _connection_options(tcp: TcpSettings) -> UpstreamConnectionOptions | None:
    if not tcp.keepalive:
        return None
    probes, time, interval = tcp.keepalive
    return UpstreamConnectionOptions(tcp_keepalive=TcpKeepalive(
        keepalive_probes=u32(probes), keepalive_time=u32(_seconds(time)), keepalive_interval=u32(_seconds(interval))))


def _seconds(value: timedelta | None) -> int | None:
    return None if value is None else max(1, int(value.total_seconds()))


def _circuit_breakers(tcp: TcpSettings, http: HttpSettings) -> CircuitBreakers:
    return CircuitBreakers(thresholds=[CircuitBreakers.Thresholds(
        max_connections=u32(tcp.max_connections or UNLIMITED),
        max_pending_requests=u32(http.http1_max_pending_requests or UNLIMITED),
        max_requests=u32(http.http2_max_requests or UNLIMITED),
        max_retries=u32(UNLIMITED if http.max_retries is None else http.max_retries),
        track_remaining=True)])


def _load_balancer(cluster: Cluster, policy: Policy, spec: ClusterSpec, name: str) -> None:
    lb = policy.load_balancer or dr.LoadBalancer()
    if lb.simple == "PASSTHROUGH":
        cluster.type = Cluster.DiscoveryType.STATIC
        cluster.load_assignment.CopyFrom(ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(
            lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=internal(names.PASSTHROUGH_ENDPOINT)))])]))
        return
    cluster.type = Cluster.DiscoveryType.EDS
    cluster.eds_cluster_config.CopyFrom(Cluster.EdsClusterConfig(eds_config=ADS))
    slow_start = Cluster.SlowStartConfig(slow_start_window=lb.warmup) if lb.warmup else None
    if lb.simple in LB:
        cluster.lb_policy = LB[lb.simple]
        if slow_start and lb.simple == "ROUND_ROBIN":
            cluster.round_robin_lb_config.CopyFrom(Cluster.RoundRobinLbConfig(slow_start_config=slow_start))
        return
    cluster.lb_policy = Cluster.LbPolicy.LEAST_REQUEST  # UNSPECIFIED, LEAST_CONN, LEAST_REQUEST
    if slow_start:
        cluster.least_request_lb_config.CopyFrom(Cluster.LeastRequestLbConfig(slow_start_config=slow_start))


def _outlier_detection(cluster: Cluster, od: dr.OutlierDetection | None) -> None:
    if od is None:
        return
    out = OutlierDetection(enforcing_success_rate=u32(0), interval=od.interval,
                           base_ejection_time=od.base_ejection_time,
                           max_ejection_percent=u32(od.max_ejection_percent or None))
    # A wrapper's `.value = 0` still sets the field: 0 disables that kind of ejection.
    if od.consecutive_5xx is not None:
        out.consecutive_5xx.value = od.consecutive_5xx
        out.enforcing_consecutive_5xx.value = 100 if od.consecutive_5xx else 0
    if od.consecutive_gateway is not None:
        out.consecutive_gateway_failure.value = od.consecutive_gateway
        out.enforcing_consecutive_gateway_failure.value = 100 if od.consecutive_gateway else 0
    if od.split_local_origin:
        out.split_external_local_origin_errors = True
        out.enforcing_local_origin_success_rate.value = 0
        if od.consecutive_local_origin:
            out.consecutive_local_origin_failure.value = od.consecutive_local_origin
            out.enforcing_consecutive_local_origin_failure.value = 100
    cluster.outlier_detection.CopyFrom(out)
    # As istiod: set the panic threshold even at 0, so few-pod services are not sent
    # traffic to ejected hosts (Envoy's default is 50%).
    cluster.common_lb_config.CopyFrom(
        Cluster.CommonLbConfig(healthy_panic_threshold=Percent(value=od.min_health_percent)))


def _http_options(tcp: TcpSettings, http: HttpSettings, proto: str) -> HttpProtocolOptions:
    h2 = proto == HTTP2 or http.h2_upgrade_policy == "UPGRADE"
    h2_options = Http2ProtocolOptions(max_concurrent_streams=u32(http.max_concurrent_streams))
    options = HttpProtocolOptions(common_http_protocol_options=Common(
        idle_timeout=http.idle_timeout or tcp.idle_timeout,
        max_requests_per_connection=u32(http.max_requests_per_connection or None),
        max_connection_duration=tcp.max_connection_duration))
    if http.use_client_protocol:
        options.use_downstream_protocol_config.CopyFrom(HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options=Http1ProtocolOptions(), http2_protocol_options=h2_options))
    elif h2:
        options.explicit_http_config.CopyFrom(
            HttpProtocolOptions.ExplicitHttpConfig(http2_protocol_options=h2_options))
    else:
        options.explicit_http_config.CopyFrom(
            HttpProtocolOptions.ExplicitHttpConfig(http_protocol_options=Http1ProtocolOptions()))
    return options


def internal(endpoint_id: str) -> Address:
    return Address(envoy_internal_address=EnvoyInternalAddress(
        server_listener_name=names.UPSTREAM_LISTENER, endpoint_id=endpoint_id))


def members(ctx: Context, spec: ClusterSpec) -> list[tuple[Pod, int | None]]:
    """The pods the cluster of `spec` balances over (its subset's labels applied) with the
    target port of each (None: the pod names no such port)."""
    rule = ctx.catalog.rule(spec.service, spec.client_namespace)
    labels = rule.subset(spec.subset).labels if rule and spec.subset else {}
    return [(pod, ctx.options.target_port(pod, spec.port)) for pod in ctx.model.endpoints(spec.service)
            if all(pod.labels.get(k) == v for k, v in labels.items())]


def passthrough(ctx: Context, spec: ClusterSpec) -> bool:
    """Whether the cluster of `spec` is a PASSTHROUGH DestinationRule's (no endpoints of its own)."""
    rule = ctx.catalog.rule(spec.service, spec.client_namespace)
    lb = rule.policy_for(spec.subset, spec.port.port).load_balancer if rule else None
    return lb is not None and lb.simple == "PASSTHROUGH"


def _assignment(name: str, spec: ClusterSpec, ctx: Context) -> ClusterLoadAssignment:
    endpoints = []
    for pod, port in members(ctx, spec):
        if port is None:
            ctx.warn(f"Service {spec.service.namespace}/{spec.service.name} port {spec.port.port}",
                     f"pod {pod.namespace}/{pod.name} has no container port named {spec.port.target_port!r}; "
                     "it gets no traffic through the waypoint", "name the port in the pod's containers")
            continue
        target = dataplane.endpoint(pod.ip, port)
        endpoints.append(LbEndpoint(endpoint=Endpoint(address=internal(target)), metadata=Metadata(
            filter_metadata={dataplane.METADATA_NAMESPACE: struct(
                {"pod": f"{pod.namespace}/{pod.name}", "node": pod.node})},
            typed_filter_metadata={PROXY_PROTOCOL_HOST: pack(PerHostConfig(
                added_tlvs=[TlvEntry(type=dataplane.TLV_ENDPOINT, value=target.encode())]))})))
    return ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=endpoints)])


def static(ctx: Context, inbound_ports: list[int]) -> list[Cluster]:
    """The clusters that lead back to the agent, and BlackHoleCluster when used."""
    sockets = ctx.options.sockets
    out = []
    if ctx.clusters:
        out.append(_pipe_cluster(names.AGENT_UPSTREAM, sockets.upstream, ctx))
    for port in sorted(set(inbound_ports)):
        cluster = _pipe_cluster(names.inbound_cluster(port), sockets.deliver, ctx)
        cluster.transport_socket.CopyFrom(proxy_protocol_transport(internal=False))
        # The app speaks what the client spoke (HTTP/1.1 or h2c), as Istio's inbound clusters.
        cluster.typed_extension_protocol_options[HTTP_OPTIONS].CopyFrom(pack(HttpProtocolOptions(
            use_downstream_protocol_config=HttpProtocolOptions.UseDownstreamHttpConfig(
                http_protocol_options=Http1ProtocolOptions(), http2_protocol_options=Http2ProtocolOptions()))))
        out.append(cluster)
    if ctx.blackhole:
        out.append(Cluster(name=names.BLACKHOLE, type=Cluster.DiscoveryType.STATIC,
                           connect_timeout=ctx.options.connect_timeout))
    return out


def _pipe_cluster(name: str, path: str, ctx: Context) -> Cluster:
    return Cluster(name=name, type=Cluster.DiscoveryType.STATIC, connect_timeout=ctx.options.connect_timeout,
                   circuit_breakers=_circuit_breakers(TcpSettings(), HttpSettings()),
                   load_assignment=ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(
                       lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=Address(pipe=Pipe(path=path))))])]))
