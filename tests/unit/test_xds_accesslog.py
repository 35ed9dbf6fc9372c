"""Istio's request metrics from constructed ALS messages: the exact label set of a
client-side (reporter "waypoint") and a server-side (reporter "destination") request,
each source and destination fact from where the waypoint has it, Envoy's short response
flags, gRPC, exact counts and histogram sums, and malformed input counted (logged once)
without ending the stream."""

from __future__ import annotations

import logging
import random
from datetime import timedelta

import pytest
from envoy.config.core.v3.address_pb2 import Address, EnvoyInternalAddress, Pipe, SocketAddress
from envoy.config.core.v3.base_pb2 import Node
from envoy.data.accesslog.v3.accesslog_pb2 import (
    AccessLogCommon, HTTPAccessLogEntry, HTTPRequestProperties, HTTPResponseProperties, ResponseFlags)
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from google.protobuf.any_pb2 import Any
from google.protobuf.wrappers_pb2 import StringValue, UInt32Value
from prometheus_client import CollectorRegistry

from nodeagent.model import Pod
from nodeagent.xds.accesslog import LABELS, RequestMetrics
from xds_world import REVIEWS, model

PRODUCTPAGE = "spiffe://cluster.local/ns/shop/sa/productpage"
# A Deployment's pod: Istio's workload name is the Deployment's (owner ReplicaSet minus the hash).
DEPLOYED = """
apiVersion: v1
kind: Pod
metadata:
  name: productpage-v1-5d8f9-x2x7q
  namespace: shop
  labels: {app: productpage, version: v1, pod-template-hash: 5d8f9}
  ownerReferences: [{kind: ReplicaSet, name: productpage-v1-5d8f9, controller: true}]
spec: {nodeName: node1, serviceAccountName: productpage}
status: {phase: Running, podIP: 10.244.1.50}
---
"""
WORLD = model(DEPLOYED)


def principal_of(pod: Pod) -> str:
    return f"spiffe://cluster.local/ns/{pod.namespace}/sa/{pod.service_account}"


def state(value: str) -> Any:
    return Any(type_url="type.googleapis.com/google.protobuf.StringValue",
               value=StringValue(value=value).SerializeToString())


def ip(address: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=address, port_value=port))


def entry(*, workload: str | None = None, principal: str | None = PRODUCTPAGE, remote=("10.244.1.50", 40000),
          local=("10.96.1.10", 9080), endpoint: str | None = None, cluster: str = "", code: int | None = 200,
          flags: ResponseFlags | None = None, request_headers=None, response_headers=None, trailers=None,
          duration_ms: float | None = 12, sizes=(100, 20, 150, 300), intermediate=False) -> HTTPAccessLogEntry:
    objects = {}
    if principal is not None:
        objects["nodeagent.source_principal"] = state(principal)
    if workload is not None:
        objects["nodeagent.source_workload"] = state(workload)
    upstream = None
    if endpoint is not None:
        upstream = Address(envoy_internal_address=EnvoyInternalAddress(server_listener_name="nodeagent_upstream",
                                                                        endpoint_id=endpoint))
    elif cluster.startswith("inbound|"):
        upstream = Address(pipe=Pipe(path="/run/na/deliver.sock"))
    common = AccessLogCommon(
        downstream_remote_address=ip(*remote), downstream_local_address=ip(*local), upstream_remote_address=upstream,
        upstream_cluster=cluster, response_flags=flags, filter_state_objects=objects,
        duration=None if duration_ms is None else timedelta(milliseconds=duration_ms),
        time_to_last_downstream_tx_byte=timedelta(milliseconds=7), intermediate_log_entry=intermediate)
    return HTTPAccessLogEntry(
        common_properties=common,
        request=HTTPRequestProperties(request_headers_bytes=sizes[0], request_body_bytes=sizes[1],
                                      request_headers=request_headers or {}),
        response=HTTPResponseProperties(response_code=None if code is None else UInt32Value(value=code),
                                        response_headers_bytes=sizes[2], response_body_bytes=sizes[3],
                                        response_headers=response_headers or {}, response_trailers=trailers or {}))


def stream(log_name: str | None, *batches: list[HTTPAccessLogEntry]) -> list[bytes]:
    """One ALS stream as Envoy sends it: the identifier only on the first message."""
    out = []
    for i, batch in enumerate(batches):
        message = StreamAccessLogsMessage(http_logs=StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=batch))
        if i == 0 and log_name is not None:
            message.identifier.CopyFrom(StreamAccessLogsMessage.Identifier(node=Node(id="node1"), log_name=log_name))
        out.append(message.SerializeToString(deterministic=True))
    return out


@pytest.fixture
def metrics():
    registry = CollectorRegistry()
    return RequestMetrics(registry, lambda: WORLD, principal_of=principal_of), registry


def count(registry, labels: dict[str, str]) -> float:
    return registry.get_sample_value("istio_requests_total", labels) or 0


def series(registry) -> list[dict[str, str]]:
    """The label sets istio_requests_total has, with their counts under `count`."""
    (family,) = [m for m in registry.collect() if m.name == "istio_requests"]
    return [dict(s.labels, count=s.value) for s in family.samples if s.name == "istio_requests_total"]


WAYPOINT_V2 = {
    "reporter": "waypoint", "source_workload": "productpage-v1", "source_workload_namespace": "shop",
    "source_principal": PRODUCTPAGE, "source_app": "productpage", "source_version": "v1",
    "source_canonical_service": "productpage", "source_canonical_revision": "v1",
    "destination_workload": "reviews-v2", "destination_workload_namespace": "shop",
    "destination_principal": "spiffe://cluster.local/ns/shop/sa/reviews", "destination_app": "reviews",
    "destination_version": "v2", "destination_service": REVIEWS, "destination_service_name": "reviews",
    "destination_service_namespace": "shop", "destination_canonical_service": "reviews",
    "destination_canonical_revision": "v2", "request_protocol": "http", "response_code": "200",
    "grpc_response_status": "", "response_flags": "-", "connection_security_policy": "mutual_tls",
}


def test_a_client_side_request_has_every_istio_label_from_the_tlv_endpoint_and_cluster(metrics):
    recorder, registry = metrics
    assert set(WAYPOINT_V2) == set(LABELS)
    one = entry(workload="shop/productpage-v1-5d8f9-x2x7q", endpoint="10.244.2.6:9080",
                cluster=f"outbound|9080|v2|{REVIEWS}")
    recorder.consume(stream("outbound", [one, one], [one]))
    assert series(registry) == [dict(WAYPOINT_V2, count=3)]
    assert registry.get_sample_value("istio_request_duration_milliseconds_sum", WAYPOINT_V2) == 36
    assert registry.get_sample_value("istio_request_duration_milliseconds_bucket", dict(WAYPOINT_V2, le="10.0")) == 0
    assert registry.get_sample_value("istio_request_duration_milliseconds_bucket", dict(WAYPOINT_V2, le="25.0")) == 3
    assert registry.get_sample_value("istio_request_bytes_sum", WAYPOINT_V2) == 3 * 120
    assert registry.get_sample_value("istio_response_bytes_sum", WAYPOINT_V2) == 3 * 450
    assert registry.get_sample_value("istio_response_bytes_count", WAYPOINT_V2) == 3
    assert registry.get_sample_value("nodeagent_access_log_errors_total") == 0


def test_a_server_side_request_names_the_pod_behind_the_proxy_destination_and_its_service(metrics):
    recorder, registry = metrics
    # ratings: service port 8080 → pod port 9000; the agent sent only the principal
    recorder.consume(stream("inbound", [entry(local=("10.244.1.8", 9000), cluster="inbound|9000||", code=403)]))
    assert series(registry) == [dict(
        WAYPOINT_V2, count=1, reporter="destination", destination_workload="ratings",
        destination_principal="spiffe://cluster.local/ns/shop/sa/ratings", destination_app="ratings",
        destination_version="unknown", destination_service="ratings.shop.svc.cluster.local",
        destination_service_name="ratings", destination_canonical_service="ratings",
        destination_canonical_revision="latest", response_code="403")]


def test_a_request_through_both_listeners_counts_once_under_each_reporter(metrics):
    recorder, registry = metrics
    recorder.consume(stream("outbound", [entry(workload="shop/productpage-v1-5d8f9-x2x7q", endpoint="10.244.1.8:9000",
                                               cluster="outbound|8080||ratings.shop.svc.cluster.local")]))
    recorder.consume(stream("inbound", [entry(local=("10.244.1.8", 9000), cluster="inbound|9000||")]))
    assert sorted((s["reporter"], s["source_workload"], s["destination_workload"], s["count"])
                  for s in series(registry)) == [("destination", "productpage-v1", "ratings", 1),
                                                 ("waypoint", "productpage-v1", "ratings", 1)]


def test_the_source_address_counts_only_when_its_pod_holds_the_proven_principal(metrics):
    recorder, registry = metrics
    stranger = "spiffe://cluster.local/ns/shop/sa/stranger"
    inbound = dict(local=("10.244.1.8", 9000), cluster="inbound|9000||")
    recorder.consume(stream("inbound", [entry(principal=stranger, **inbound), entry(principal=None, **inbound),
                                        entry(principal="not-spiffe", **inbound)]))
    found = {(s["source_principal"], s["source_workload"], s["source_workload_namespace"],
              s["connection_security_policy"], s["count"]) for s in series(registry)}
    assert found == {(stranger, "unknown", "shop", "mutual_tls", 1),  # the namespace is the principal's
                     ("unknown", "productpage-v1", "shop", "unknown", 1),  # nothing proven: the address's pod
                     ("not-spiffe", "unknown", "unknown", "mutual_tls", 1)}


def test_a_source_workload_of_a_pod_the_model_lost_keeps_its_namespace(metrics):
    recorder, registry = metrics
    recorder.consume(stream("outbound", [entry(workload="shop/gone-1", endpoint="10.244.2.6:9080",
                                               cluster=f"outbound|9080|v2|{REVIEWS}")]))
    (found,) = series(registry)
    assert (found["source_workload"], found["source_workload_namespace"], found["source_app"],
            found["source_canonical_revision"]) == ("unknown", "shop", "unknown", "unknown")


def test_a_fault_abort_has_no_cluster_so_the_service_is_the_one_the_chain_chose(metrics):
    recorder, registry = metrics
    recorder.consume(stream("outbound", [entry(workload="shop/productpage-v1-5d8f9-x2x7q", code=418,
                                               flags=ResponseFlags(fault_injected=True))]))
    (found,) = series(registry)
    assert {k: found[k] for k in ("destination_workload", "destination_principal", "destination_service",
                                  "destination_service_name", "response_code", "response_flags")} == {
        "destination_workload": "unknown", "destination_principal": "unknown", "destination_service": REVIEWS,
        "destination_service_name": "reviews", "response_code": "418", "response_flags": "FI"}


@pytest.mark.parametrize("cluster, endpoint, service, workload", [
    ("BlackHoleCluster", None, ("BlackHoleCluster", "BlackHoleCluster", "unknown"), "unknown"),
    (f"outbound|9080||{REVIEWS}", "passthrough", (REVIEWS, "reviews", "shop"), "unknown"),
    ("outbound|80||api.example.com", "10.9.9.9:80", ("api.example.com", "api.example.com", "unknown"), "unknown"),
    (f"outbound|9080|v1|{REVIEWS}", "10.244.1.6:9080", (REVIEWS, "reviews", "shop"), "reviews-v1"),
])
def test_destination_service_and_workload_from_cluster_and_endpoint(metrics, cluster, endpoint, service, workload):
    recorder, registry = metrics
    recorder.consume(stream("outbound", [entry(cluster=cluster, endpoint=endpoint, local=("10.96.1.99", 80))]))
    (found,) = series(registry)
    assert (found["destination_service"], found["destination_service_name"],
            found["destination_service_namespace"]) == service
    assert found["destination_workload"] == workload


@pytest.mark.parametrize("flags, short", [
    (ResponseFlags(), "-"),
    (ResponseFlags(upstream_retry_limit_exceeded=True, upstream_connection_failure=True), "UF,URX"),
    (ResponseFlags(rate_limited=True), "RL"),
    (ResponseFlags(unauthorized_details=ResponseFlags.Unauthorized()), "UAEX"),
    (ResponseFlags(no_healthy_upstream=True, downstream_remote_reset=True), "UH,DR"),
])
def test_response_flags_are_envoys_short_names_in_envoys_order(metrics, flags, short):
    recorder, registry = metrics
    recorder.consume(stream("outbound", [entry(flags=flags)]))
    assert [s["response_flags"] for s in series(registry)] == [short]


def test_grpc_is_told_by_content_type_and_its_status_read_from_trailers_or_headers(metrics):
    recorder, registry = metrics
    grpc = {"content-type": "application/grpc+proto"}
    recorder.consume(stream("outbound", [
        entry(request_headers=grpc, trailers={"grpc-status": "14"}),
        entry(request_headers=grpc, response_headers={"grpc-status": "5"}),  # trailers-only response
        entry(request_headers={"content-type": "text/plain"}, trailers={"grpc-status": "3"}),
        entry(code=None, duration_ms=None)]))  # no response at all (client went away)
    assert sorted((s["request_protocol"], s["grpc_response_status"], s["response_code"], s["count"])
                  for s in series(registry)) == [("grpc", "14", "200", 1), ("grpc", "5", "200", 1),
                                                 ("http", "", "0", 1), ("http", "", "200", 1)]
    no_response = next(s for s in series(registry) if s["response_code"] == "0")
    del no_response["count"]
    # without `duration`, the time to the last byte sent downstream
    assert registry.get_sample_value("istio_request_duration_milliseconds_sum", no_response) == 7


def test_without_principal_of_the_destination_principal_is_unknown():
    registry = CollectorRegistry()
    RequestMetrics(registry, lambda: WORLD).consume(stream("outbound", [
        entry(endpoint="10.244.2.6:9080", cluster=f"outbound|9080|v2|{REVIEWS}")]))
    assert count(registry, dict(WAYPOINT_V2, destination_principal="unknown")) == 1


def test_the_model_is_read_per_message_so_new_pods_are_named():
    registry = CollectorRegistry()
    worlds = iter([model(), WORLD])
    recorder = RequestMetrics(registry, lambda: next(worlds))
    one = entry(workload="shop/productpage-v1-5d8f9-x2x7q")
    recorder.consume(stream("outbound", [one], [one]))
    assert sorted((s["source_workload"], s["count"]) for s in series(registry)) == [
        ("productpage-v1", 1), ("unknown", 1)]


def test_malformed_input_is_counted_logged_once_and_the_stream_goes_on(metrics, caplog):
    recorder, registry = metrics
    good = entry(workload="shop/productpage-v1-5d8f9-x2x7q", endpoint="10.244.2.6:9080",
                 cluster=f"outbound|9080|v2|{REVIEWS}")
    broken_state = entry()
    broken_state.common_properties.filter_state_objects["nodeagent.source_principal"].CopyFrom(Any(
        type_url="type.googleapis.com/google.protobuf.StringValue", value=b"\x0a\x85"))  # truncated
    messages = stream("outbound", [good], [HTTPAccessLogEntry(), broken_state, good])
    messages.insert(1, b"\x0a\x85")  # a message that is not one
    with caplog.at_level(logging.WARNING, logger="nodeagent.xds.accesslog"):
        recorder.consume(messages)
        recorder.consume(stream(None, [good]))  # a stream that never said its log name
        recorder.consume(stream("sidecar", [good]))
    assert registry.get_sample_value("nodeagent_access_log_errors_total") == 5
    assert series(registry) == [dict(WAYPOINT_V2, count=2)]  # the two good entries of the first stream
    assert len(caplog.records) == 1 and "does not parse" in caplog.records[0].getMessage()


def test_intermediate_entries_are_not_counted_and_not_errors(metrics):
    recorder, registry = metrics
    recorder.consume(stream("outbound", [entry(intermediate=True), entry()]))
    assert sum(s["count"] for s in series(registry)) == 1
    assert registry.get_sample_value("nodeagent_access_log_errors_total") == 0


def test_random_bytes_never_end_a_stream(metrics):
    recorder, registry = metrics
    rng = random.Random(7)
    noise = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 80))) for _ in range(400)]
    mangled = [bytearray(stream("outbound", [entry()])[0]) for _ in range(200)]
    for data in mangled:
        data[rng.randrange(len(data))] = rng.getrandbits(8)
    recorder.consume(noise + [bytes(m) for m in mangled])  # must not raise
    # Exact for random.Random(7) and upb's parser (issue 11): 396 noise messages are errors
    # (4 happen to be valid empty messages; the pure-Python classes read before issue 11
    # took 310 as such, reading past truncated fields), and 129 mangled messages or their
    # entries; the other 71 mangled ones still parse as one request each (a corrupt field
    # nobody reads, such as the Node's id, no longer costs the batch).
    assert registry.get_sample_value("nodeagent_access_log_errors_total") == 525
    assert sum(s["count"] for s in series(registry)) == 71
    recorder.consume(stream("outbound", [entry()]))
    assert sum(s["count"] for s in series(registry)) == 72
