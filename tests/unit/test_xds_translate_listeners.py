"""Listeners: the unix sockets, PROXY v2 and its TLVs, filter chains chosen by the
original destination, tcp routes as weighted tcp_proxy, the internal upstream listener,
the access log every HTTP connection manager writes into the agent's FIFO, and the DataPlane
map telling the agent which connections go through Envoy."""

from __future__ import annotations

from envoy.extensions.access_loggers.file.v3.file_pb2 import FileAccessLog
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager)
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from google.protobuf.json_format import MessageToDict

from nodeagent.xds import dataplane, logline
from nodeagent.xds.resources import unpack
from xds_world import DB, RATINGS, REVIEWS, RUN, chain, doc, listeners, network, translation

SUBSETS = doc("DestinationRule", "db", "host: db\nsubsets:\n- {name: a, labels: {app: db}}\n"
                                      "- {name: b, labels: {app: db}}\n")
SOME_L7 = (doc("VirtualService", "reviews", "hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews}}]") +
           doc("DestinationRule", "ratings", "host: ratings\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}"))


def test_outbound_listener_is_a_unix_socket_reading_proxy_v2_and_the_agents_tlvs():
    outbound = listeners(translation(SOME_L7))["outbound"]
    assert (outbound.address.pipe.path, outbound.address.pipe.mode) == (f"{RUN}/envoy/outbound.sock", 0o666)
    (pp,) = outbound.listener_filters
    config = unpack(pp.typed_config)
    assert pp.name == "envoy.filters.listener.proxy_protocol"
    assert [(r.tlv_type, r.on_tlv_present.metadata_namespace, r.on_tlv_present.key) for r in config.rules] == [
        (0xE0, "nodeagent", "source_principal"), (0xE1, "nodeagent", "source_labels"),
        (0xE3, "nodeagent", "source_workload")]
    assert config.pass_through_tlvs.tlv_type == [0xE0, 0xE3]


def test_one_chain_per_service_port_that_needs_l7_matched_by_vip_and_port():
    outbound = listeners(translation(SOME_L7))["outbound"]
    assert [c.name for c in outbound.filter_chains] == [
        f"outbound|8080||{RATINGS}", f"outbound|9090||{RATINGS}", f"outbound|9080||{REVIEWS}"]
    match = chain(outbound, f"outbound|9080||{REVIEWS}").filter_chain_match
    (prefix,) = match.prefix_ranges
    assert (prefix.address_prefix, prefix.prefix_len.value, match.destination_port.value) == ("10.96.1.10", 32, 9080)


def test_a_chain_copies_the_tlvs_to_filter_state_then_runs_http_with_rds():
    found = chain(listeners(translation(SOME_L7))["outbound"], f"outbound|9080||{REVIEWS}")
    state = unpack(found.filters[0].typed_config)
    assert [(v.object_key, v.factory_key, v.format_string.text_format_source.inline_string, v.skip_if_empty,
             v.format_string.omit_empty_values) for v in state.on_new_connection] == [
        ("nodeagent.source_principal", "envoy.string", "%DYNAMIC_METADATA(nodeagent:source_principal)%", True, True),
        ("nodeagent.source_labels", "envoy.string", "%DYNAMIC_METADATA(nodeagent:source_labels)%", True, True),
        ("nodeagent.source_workload", "envoy.string", "%DYNAMIC_METADATA(nodeagent:source_workload)%", True, True)]
    hcm = network(found)
    assert isinstance(hcm, HttpConnectionManager)
    assert hcm.rds.route_config_name == f"{REVIEWS}:9080" and hcm.rds.config_source.HasField("ads")
    # RBAC twice, without rules: the routes that enforce their endpoints' policy give them theirs
    assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.fault", "nodeagent.rbac.deny",
                                                  "nodeagent.rbac.allow", "envoy.filters.http.router"]
    assert [unpack(f.typed_config).HasField("rules") for f in hcm.http_filters[1:3]] == [False, False]
    # paths normalized before any route or RBAC reads them; the client's address is the PROXY source
    assert (hcm.normalize_path.value, hcm.use_remote_address.value, hcm.skip_xff_append) == (True, True, True)


def access_log(hcm: HttpConnectionManager) -> FileAccessLog:
    (log,) = hcm.access_log
    assert log.name == "envoy.access_loggers.file"
    return unpack(log.typed_config)


def test_both_sides_log_each_request_into_the_agents_fifo_named_by_listener():
    result = translation(SOME_L7 + doc("AuthorizationPolicy", "get", "selector: {matchLabels: {app: reviews}}\n"
                                       "rules: [{to: [{operation: {methods: [GET]}}]}]", "security.istio.io/v1"))
    client = access_log(network(chain(listeners(result)["outbound"], f"outbound|9080||{REVIEWS}")))
    server = access_log(network(chain(listeners(result)["inbound"], "inbound|shop/reviews-v1|9080")))
    for config, name in ((client, "outbound"), (server, "inbound")):
        assert config.path == f"{RUN}/access-log.fifo"
        assert MessageToDict(config.log_format.json_format) == logline.json_format(name)
        assert not config.log_format.omit_empty_values


def test_tcp_routes_become_weighted_tcp_proxies():
    result = translation(SUBSETS + doc("VirtualService", "db", """
hosts: [db]
tcp:
- match: [{port: 5432}]
  route:
  - {destination: {host: db, subset: a}, weight: 80}
  - {destination: {host: db, subset: b}, weight: 20}
"""))
    proxy = network(chain(listeners(result)["outbound"], f"outbound|5432||{DB}"))
    assert isinstance(proxy, TcpProxy)
    assert [(c.name, c.weight) for c in proxy.weighted_clusters.clusters] == [
        (f"outbound|5432|a|{DB}", 80), (f"outbound|5432|b|{DB}", 20)]


def test_a_tcp_port_without_tcp_routes_proxies_to_the_service():
    result = translation(doc("DestinationRule", "db", "host: db\n"
                                                     "trafficPolicy: {connectionPool: {tcp: {maxConnections: 3}}}"))
    proxy = network(chain(listeners(result)["outbound"], f"outbound|5432||{DB}"))
    assert proxy.cluster == f"outbound|5432||{DB}"
    assert proxy.stat_prefix == "outbound|5432||db_shop_svc_cluster_local"  # no dots: one stat segment


def test_the_internal_upstream_listener_pipes_to_the_agent():
    upstream = listeners(translation(SOME_L7))["nodeagent_upstream"]
    assert upstream.HasField("internal_listener") and not upstream.HasField("address")
    assert network(upstream.filter_chains[0]).cluster == "nodeagent|upstream"


def test_the_dataplane_map_lists_what_goes_through_envoy():
    result = translation(SOME_L7)
    assert result.dataplane.outbound == {("10.96.1.10", 9080), ("10.96.1.11", 8080), ("10.96.1.11", 9090)}
    assert result.dataplane.inbound == {}
    assert result.dataplane.sockets.upstream == f"{RUN}/upstream.sock"


def test_nothing_l7_means_no_listeners_at_all():
    result = translation(doc("DestinationRule", "d", "host: reviews\nsubsets: [{name: v1, labels: {version: v1}}]"))
    assert listeners(result) == {} and result.dataplane.outbound == frozenset()


def test_proxy_header_round_trip_and_label_encoding():
    header = dataplane.ProxyHeader(("10.0.0.1", 40000), ("10.96.0.1", 80),
                                   ((dataplane.TLV_PRINCIPAL, b"spiffe://td/ns/a/sa/b"),))
    data = header.encode()
    assert data.startswith(dataplane.SIGNATURE + b"\x21\x11")
    chunks = [data]
    assert dataplane.decode(lambda n: _take(chunks, n)) == header
    six = dataplane.ProxyHeader(("fd00::1", 1), ("fd00::2", 2), ((dataplane.TLV_ENDPOINT, b"[fd00::3]:80"),))
    chunks = [six.encode()]
    assert dataplane.decode(lambda n: _take(chunks, n)).tlv(dataplane.TLV_ENDPOINT) == b"[fd00::3]:80"
    assert dataplane.encode_labels({"b": "2", "a.io/x": ""}) == b",a.io/x=,b=2,"
    assert dataplane.endpoint("fd00::3", 80) == "[fd00::3]:80"


def _take(chunks: list[bytes], n: int) -> bytes:
    head, chunks[0] = chunks[0][:n], chunks[0][n:]
    return head
