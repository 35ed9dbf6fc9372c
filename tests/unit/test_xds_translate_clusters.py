"""Clusters and endpoints: each DestinationRule field → the exact Envoy cluster field
(istiod's mapping), subsets as label-filtered EDS endpoints, and the endpoint addresses
and PROXY TLVs that lead Envoy's upstream connections back to the agent."""

from __future__ import annotations

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.proxy_protocol_pb2 import ProxyProtocolConfig
from google.protobuf.duration_pb2 import Duration

from nodeagent.model import ServicePort
from nodeagent.xds import dataplane
from nodeagent.xds.dataplane import Sockets
from nodeagent.xds.resources import unpack
from nodeagent.xds.translate.clusters import HTTP_OPTIONS, PROXY_PROTOCOL_HOST, UNLIMITED
from nodeagent.xds.translate.options import WaypointOptions
from xds_world import DB, RATINGS, REVIEWS, RUN, WEB, clusters, doc, endpoints, translation

SUBSETS = "host: reviews\nsubsets:\n- {name: v1, labels: {version: v1}}\n- {name: v2, labels: {version: v2}}\n"
HALF_AND_HALF = doc("VirtualService", "r", """
hosts: [reviews]
http:
- route:
  - {destination: {host: reviews, subset: v1}, weight: 50}
  - {destination: {host: reviews, subset: v2}, weight: 50}
""")


def dr(spec: str) -> str:
    return doc("DestinationRule", "reviews", spec)


def reviews_cluster(spec: str, subset: str = ""):
    return clusters(translation(dr(spec)))[f"outbound|9080|{subset}|{REVIEWS}"]


def thresholds(cluster):
    (only,) = cluster.circuit_breakers.thresholds
    return only


def http_options(cluster):
    return unpack(cluster.typed_extension_protocol_options[HTTP_OPTIONS])


def test_connection_pool_maps_to_circuit_breakers_and_protocol_options():
    cluster = reviews_cluster("""
host: reviews
trafficPolicy:
  connectionPool:
    tcp: {maxConnections: 100, connectTimeout: 3s, tcpKeepalive: {probes: 4, time: 60s, interval: 10s}}
    http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 7, maxRetries: 5,
           idleTimeout: 30s}
""")
    t = thresholds(cluster)
    assert (t.max_connections.value, t.max_pending_requests.value, t.max_requests.value, t.max_retries.value,
            t.track_remaining) == (100, 10, 1000, 5, True)
    assert cluster.connect_timeout == Duration(seconds=3)
    keepalive = cluster.upstream_connection_options.tcp_keepalive
    assert (keepalive.keepalive_probes.value, keepalive.keepalive_time.value,
            keepalive.keepalive_interval.value) == (4, 60, 10)
    options = http_options(cluster)
    common = options.common_http_protocol_options
    assert (common.max_requests_per_connection.value, common.idle_timeout) == (7, Duration(seconds=30))
    assert options.explicit_http_config.HasField("http_protocol_options")


def test_without_a_rule_clusters_get_istios_unlimited_thresholds_and_least_request():
    result = translation(doc("VirtualService", "r", "hosts: [reviews]\nhttp:\n"
                                                   "- route: [{destination: {host: reviews}}]"))
    cluster = clusters(result)[f"outbound|9080||{REVIEWS}"]
    t = thresholds(cluster)
    assert (t.max_connections.value, t.max_pending_requests.value, t.max_requests.value,
            t.max_retries.value) == (UNLIMITED,) * 4
    assert cluster.lb_policy == Cluster.LbPolicy.LEAST_REQUEST
    assert cluster.connect_timeout == Duration(seconds=10)
    assert not cluster.HasField("outlier_detection")


def test_outlier_detection_enforces_exactly_the_given_error_kinds():
    cluster = reviews_cluster("""
host: reviews
trafficPolicy:
  outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 10s, baseEjectionTime: 30s,
                     maxEjectionPercent: 50, minHealthPercent: 20}
""")
    od = cluster.outlier_detection
    assert (od.consecutive_5xx.value, od.enforcing_consecutive_5xx.value) == (3, 100)
    assert (od.consecutive_gateway_failure.value, od.enforcing_consecutive_gateway_failure.value) == (2, 100)
    assert (od.interval, od.base_ejection_time, od.max_ejection_percent.value) == (
        Duration(seconds=10), Duration(seconds=30), 50)
    assert od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value == 0
    assert cluster.common_lb_config.healthy_panic_threshold.value == 20


def test_outlier_detection_with_zero_errors_disables_that_kind_and_the_panic_threshold():
    cluster = reviews_cluster("host: reviews\ntrafficPolicy: {outlierDetection: {consecutive5xxErrors: 0}}")
    od = cluster.outlier_detection
    assert od.HasField("consecutive_5xx") and od.HasField("enforcing_consecutive_5xx")
    assert (od.consecutive_5xx.value, od.enforcing_consecutive_5xx.value) == (0, 0)
    assert not od.HasField("consecutive_gateway_failure")
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0


def test_load_balancer_policies():
    def policy(simple: str):
        return reviews_cluster(f"host: reviews\ntrafficPolicy: {{loadBalancer: {{simple: {simple}}}}}").lb_policy
    assert policy("ROUND_ROBIN") == Cluster.LbPolicy.ROUND_ROBIN
    assert policy("RANDOM") == Cluster.LbPolicy.RANDOM
    assert policy("LEAST_REQUEST") == Cluster.LbPolicy.LEAST_REQUEST
    assert policy("LEAST_CONN") == Cluster.LbPolicy.LEAST_REQUEST
    assert policy("UNSPECIFIED") == Cluster.LbPolicy.LEAST_REQUEST


def test_warmup_becomes_slow_start():
    cluster = reviews_cluster("host: reviews\ntrafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, "
                              "warmupDurationSecs: 45s}}")
    assert cluster.round_robin_lb_config.slow_start_config.slow_start_window == Duration(seconds=45)


def test_passthrough_is_one_endpoint_without_an_endpoint_tlv():
    cluster = reviews_cluster("host: reviews\ntrafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}")
    assert cluster.type == Cluster.DiscoveryType.STATIC
    (lb,) = cluster.load_assignment.endpoints[0].lb_endpoints
    assert lb.endpoint.address.envoy_internal_address.endpoint_id == "passthrough"
    assert not lb.HasField("metadata")


def test_subsets_are_clusters_with_label_filtered_endpoints():
    result = translation(dr(SUBSETS) + HALF_AND_HALF)
    eds = endpoints(result)
    assert sorted(eds) == [f"outbound|9080|v1|{REVIEWS}", f"outbound|9080|v2|{REVIEWS}"]
    ids = {name: [lb.endpoint.address.envoy_internal_address.endpoint_id
                  for lb in a.endpoints[0].lb_endpoints] for name, a in eds.items()}
    assert ids == {f"outbound|9080|v1|{REVIEWS}": ["10.244.1.6:9080"],
                   f"outbound|9080|v2|{REVIEWS}": ["10.244.2.6:9080"]}
    assert clusters(result)[f"outbound|9080|v1|{REVIEWS}"].type == Cluster.DiscoveryType.EDS


def test_every_endpoint_is_an_internal_address_carrying_its_pod_as_a_proxy_tlv():
    result = translation(dr("host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}"))
    lbs = endpoints(result)[f"outbound|9080||{REVIEWS}"].endpoints[0].lb_endpoints
    assert [lb.endpoint.address.envoy_internal_address.server_listener_name for lb in lbs] == ["nodeagent_upstream"] * 3
    tlvs = [unpack(lb.metadata.typed_filter_metadata[PROXY_PROTOCOL_HOST]).added_tlvs for lb in lbs]
    assert [(t.type, t.value) for (t,) in tlvs] == [(dataplane.TLV_ENDPOINT, b"10.244.1.6:9080"),
                                                    (dataplane.TLV_ENDPOINT, b"10.244.2.6:9080"),
                                                    (dataplane.TLV_ENDPOINT, b"10.244.2.7:9080")]
    assert [lb.metadata.filter_metadata["nodeagent"]["pod"] for lb in lbs] == [
        "shop/reviews-v1", "shop/reviews-v2", "shop/reviews-v3"]


def test_clusters_write_proxy_v2_passing_the_agents_tlvs_over_the_internal_listener():
    socket = reviews_cluster("host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}").transport_socket
    assert socket.name == "envoy.transport_sockets.upstream_proxy_protocol"
    config = unpack(socket.typed_config)
    assert config.config.version == ProxyProtocolConfig.Version.V2
    assert config.config.pass_through_tlvs.tlv_type == [dataplane.TLV_PRINCIPAL, dataplane.TLV_SOURCE_WORKLOAD]
    assert config.transport_socket.name == "envoy.transport_sockets.internal_upstream"


def test_subset_policy_overrides_components_and_port_level_replaces_all():
    spec = """
host: reviews
trafficPolicy:
  loadBalancer: {simple: RANDOM}
  connectionPool: {tcp: {maxConnections: 10}}
  portLevelSettings:
  - port: {number: 9080}
    outlierDetection: {consecutive5xxErrors: 9}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
- name: v2
  labels: {version: v2}
"""
    result = translation(dr(spec) + HALF_AND_HALF)
    v1, v2 = (clusters(result)[f"outbound|9080|{s}|{REVIEWS}"] for s in ("v1", "v2"))
    # Port-level settings replace every rule-level component for port 9080 (istiod)...
    assert (v2.lb_policy, thresholds(v2).max_connections.value, v2.outlier_detection.consecutive_5xx.value) == (
        Cluster.LbPolicy.LEAST_REQUEST, UNLIMITED, 9)
    # ...and a subset's own components override on top.
    assert (v1.lb_policy, v1.outlier_detection.consecutive_5xx.value) == (Cluster.LbPolicy.ROUND_ROBIN, 9)


def test_http2_upstream_for_grpc_ports_and_h2_upgrade_and_downstream_for_use_client_protocol():
    result = translation(doc("DestinationRule", "ratings", "host: ratings\ntrafficPolicy: "
                             "{connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}") +
                         doc("DestinationRule", "reviews", "host: reviews\ntrafficPolicy: "
                             "{connectionPool: {http: {useClientProtocol: true}}}"))
    found = clusters(result)
    upgraded = http_options(found[f"outbound|8080||{RATINGS}"])
    assert upgraded.explicit_http_config.HasField("http2_protocol_options")
    grpc = http_options(found[f"outbound|9090||{RATINGS}"])
    assert grpc.explicit_http_config.HasField("http2_protocol_options")
    client = http_options(found[f"outbound|9080||{REVIEWS}"])
    assert client.use_downstream_protocol_config.HasField("http2_protocol_options")


def test_tcp_ports_get_no_http_options():
    result = translation(doc("DestinationRule", "db", "host: db\n"
                                                     "trafficPolicy: {connectionPool: {tcp: {maxConnections: 5}}}"))
    cluster = clusters(result)[f"outbound|5432||{DB}"]
    assert len(cluster.typed_extension_protocol_options) == 0
    assert thresholds(cluster).max_connections.value == 5


def test_clusters_back_to_the_agent():
    result = translation(dr("host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}"))
    agent = clusters(result)["nodeagent|upstream"]
    assert agent.type == Cluster.DiscoveryType.STATIC
    assert agent.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path == f"{RUN}/upstream.sock"


def test_an_unresolvable_target_port_warns_and_gets_no_endpoints():
    def unresolved(pod, port: ServicePort):
        return None
    options = WaypointOptions(Sockets(RUN), target_port=unresolved)
    result = translation(dr("host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}"), options=options)
    assert endpoints(result)[f"outbound|9080||{REVIEWS}"].endpoints[0].lb_endpoints == []
    assert sum("has no container port named 9080" in str(w) for w in result.warnings) == 3


def test_a_named_target_port_resolves_to_each_pods_container_port():
    result = translation(WEB + doc("DestinationRule", "web", "host: web\n"
                                                          "trafficPolicy: {loadBalancer: {simple: RANDOM}}"))
    lbs = endpoints(result)["outbound|80||web.shop.svc.cluster.local"].endpoints[0].lb_endpoints
    assert [lb.endpoint.address.envoy_internal_address.endpoint_id for lb in lbs] == [
        "10.244.1.21:8081", "10.244.1.22:8082"]
    (warning,) = result.warnings
    assert "pod shop/web-3 has no container port named 'http-web'" in str(warning)
