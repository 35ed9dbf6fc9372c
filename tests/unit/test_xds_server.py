"""The ADS server against the Python client over a unix socket: the initial push in
CDS, EDS, LDS, RDS order with ACKs, NACKs counted and logged with the last accepted
snapshot kept, pushes on change debounced, streams limited, and the stream protocol's
ordering rules checked without a transport."""

from __future__ import annotations

import logging
import queue
import time

import grpc
import pytest
from envoy.config.core.v3.base_pb2 import Node
from prometheus_client import CollectorRegistry

from nodeagent import grpcwire
from nodeagent.cli import main
from nodeagent.errors import ConfigError
from nodeagent.lab.layout import xds_socket as lab_xds_socket
from nodeagent.xds import adsproto, resources as rt
from nodeagent.xds.cache import SnapshotCache
from nodeagent.xds.cli import DEFAULT_XDS_SOCKET, xds_socket
from nodeagent.xds.client import AdsSession, XdsClientError, fetch
from nodeagent.xds.server import AdsServer
from nodeagent.xds.snapshot import Snapshot
from nodeagent.xds.stream import StreamState, version
from schema_check import same_fields
from xds_world import REVIEWS, doc, translation

ORDER = [rt.CLUSTER, rt.ENDPOINT, rt.LISTENER, rt.ROUTE]


def snapshot(version: str, timeout: str = "1s", ratings_policy: bool = False) -> Snapshot:
    yaml = doc("VirtualService", "reviews", f"hosts: [reviews]\nhttp:\n- route: [{{destination: {{host: reviews}}}}]\n"
                                            f"  timeout: {timeout}")
    if ratings_policy:
        yaml += doc("DestinationRule", "ratings", "host: ratings\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}")
    result = translation(yaml)
    return Snapshot.build(version, result.messages(), result.dataplane)


@pytest.fixture
def served(tmp_path):
    cache, registry = SnapshotCache(), CollectorRegistry()
    server = AdsServer(cache, registry, debounce=0.2, max_delay=2.0).start(unix_path=str(tmp_path / "xds.sock"))
    try:
        yield cache, registry, server, str(tmp_path / "xds.sock")
    finally:
        server.stop()


def sent(snap: Snapshot, type_url: str) -> str:
    """The version a response carrying all of `snap`'s resources of the type has."""
    return version(type_url, snap, frozenset(snap.names(type_url)))


def sample(registry, name: str, kind: str | None = None) -> float:
    return registry.get_sample_value(name, {"type": kind} if kind else {}) or 0.0


def types(session: AdsSession) -> list[str]:
    return [r.type_url for r in session.responses]


def test_initial_push_goes_cds_eds_lds_rds_and_every_type_is_acked(served):
    cache, registry, server, path = served
    first = snapshot("1")
    cache.set_snapshot("node1", first)
    with AdsSession(path, "node1") as session:
        session.wait(AdsSession.complete)
        assert types(session) == ORDER
        wait_until(lambda: server.accepted("node1") is first)
        assert sorted(session.resources[rt.ROUTE]) == [f"{REVIEWS}:9080"]
        assert [r.version_info for r in session.responses] == [sent(first, t) for t in ORDER]
        assert sample(registry, "nodeagent_xds_connected_proxies") == 1
    assert [sample(registry, "nodeagent_xds_pushes_total", rt.SHORT[t]) for t in ORDER] == [1, 1, 1, 1]
    wait_until(lambda: sample(registry, "nodeagent_xds_connected_proxies") == 0)


def test_nack_is_counted_logged_and_the_last_accepted_snapshot_kept(served, caplog):
    cache, registry, server, path = served
    good, bad = snapshot("1"), snapshot("2", timeout="2s")
    cache.set_snapshot("node1", good)
    bad_routes = sent(bad, rt.ROUTE)

    def reject(response):
        return "route table refused by test" if response.version_info == bad_routes else None

    with caplog.at_level(logging.WARNING, logger="nodeagent.xds.server"):
        with AdsSession(path, "node1", reject=reject) as session:
            session.wait(AdsSession.complete)
            wait_until(lambda: server.accepted("node1") is good)
            cache.set_snapshot("node1", bad)
            session.wait(lambda s: len(s.nacked) == 1)
            wait_until(lambda: sample(registry, "nodeagent_xds_nacks_total", "rds") == 1)
            time.sleep(0.5)  # nothing is sent again for the same content
            assert types(session) == ORDER + [rt.ROUTE]
            assert server.accepted("node1") is good
            assert session.resources[rt.ROUTE][f"{REVIEWS}:9080"].virtual_hosts[0].routes[0].route.timeout.seconds == 1
            fixed = snapshot("3", timeout="3s")
            cache.set_snapshot("node1", fixed)
            wait_until(lambda: server.accepted("node1") is fixed)
    assert [sample(registry, "nodeagent_xds_nacks_total", k) for k in ("cds", "eds", "lds", "rds")] == [0, 0, 0, 1]
    (record,) = [r for r in caplog.records if "NACK" in r.getMessage()]
    assert "from node1 for rds" in record.getMessage() and "route table refused by test" in record.getMessage()


class ManualTime:
    """The debounce's clock: it moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_changes_is_one_debounced_push(tmp_path):
    cache, registry, clock = SnapshotCache(), CollectorRegistry(), ManualTime()
    path = str(tmp_path / "xds.sock")
    # Binary fractions of a second, so the clock's sums are exact.
    server = AdsServer(cache, registry, debounce=0.25, max_delay=2.0, clock=clock).start(unix_path=path)
    try:
        first = snapshot("1")
        cache.set_snapshot("node1", first)
        with AdsSession(path, "node1") as session:
            session.wait(AdsSession.complete)
            wait_until(lambda: server.accepted("node1") is first)  # no ACK in flight to push early
            for i, timeout in enumerate(("2s", "3s", "4s", "5s"), start=2):
                cache.set_snapshot("node1", snapshot(str(i), timeout=timeout))
                clock.now += 0.125  # each change 0.125 s after the one before: inside the debounce
            time.sleep(0.3)
            assert len(session.responses) == 4  # 0.125 s after the last change: nothing pushed yet
            clock.now += 0.125  # the debounce after it
            session.wait(lambda s: len(s.responses) == 5)
            time.sleep(0.5)
            assert types(session) == ORDER + [rt.ROUTE]  # routes only: the other types did not change
            assert session.responses[-1].version_info == sent(snapshot("5", timeout="5s"), rt.ROUTE)
    finally:
        server.stop()
    assert sample(registry, "nodeagent_xds_pushes_total", "rds") == 2


def test_new_clusters_are_pushed_before_the_listeners_and_routes_that_use_them(served):
    cache, _, server, path = served
    cache.set_snapshot("node1", snapshot("1"))
    with AdsSession(path, "node1") as session:
        session.wait(AdsSession.complete)
        bigger = snapshot("2", ratings_policy=True)
        cache.set_snapshot("node1", bigger)
        session.wait(lambda s: "ratings.shop.svc.cluster.local:8080" in s.resources.get(rt.ROUTE, {}))
        wait_until(lambda: server.accepted("node1") is bigger)
        # Endpoints follow the clusters at once (Envoy warms changed clusters until they
        # arrive), again once the new clusters' endpoints are asked for; then the rest.
        assert types(session)[4:] == [rt.CLUSTER, rt.ENDPOINT, rt.ENDPOINT, rt.LISTENER, rt.ROUTE]
        assert "outbound|8080||ratings.shop.svc.cluster.local" in session.resources[rt.ENDPOINT]


def test_a_proxy_of_an_unknown_node_waits_for_its_snapshot(served):
    cache, _, _, path = served
    with AdsSession(path, "node9") as session:
        with pytest.raises(XdsClientError, match="did not send"):
            session.wait(AdsSession.complete, timeout=0.5)
        cache.set_snapshot("node9", snapshot("1"))
        session.wait(AdsSession.complete)


def test_proxy_config_cli_reads_back_what_envoy_gets(served, capsys):
    cache, _, _, path = served
    cache.set_snapshot("node1", snapshot("1"))
    assert main(["proxy-config", "clusters", "--xds-socket", path, "--node", "node1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["NAME", "TYPE", "LB"]
    assert f"outbound|9080||{REVIEWS}  EDS" in out
    assert main(["proxy-config", "routes", "--xds-socket", path, "--node", "node1", "-o", "json"]) == 0
    assert f'"name": "{REVIEWS}:9080"' in capsys.readouterr().out
    assert sorted(fetch(path, "node1")[rt.LISTENER]) == ["nodeagent_upstream", "outbound"]


ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


def test_a_message_over_the_limit_ends_its_stream_unread_and_the_server_serves_on(served):
    cache, registry, _, path = served
    cache.set_snapshot("node1", snapshot("1"))
    with grpc.insecure_channel(f"unix:{path}") as channel:
        call = channel.stream_stream(ADS_METHOD, request_serializer=bytes)
        with pytest.raises(grpc.RpcError) as failed:
            list(call(iter([b"\x0a" + b"\xff" * grpcwire.MAX_MESSAGE]), timeout=10))
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"{grpcwire.MAX_MESSAGE + 1} bytes is over the limit" in failed.value.details()
    assert sorted(fetch(path, "node1")[rt.ROUTE]) == [f"{REVIEWS}:9080"]
    assert registry.get_sample_value("nodeagent_xds_connected_proxies") == 0


def test_bytes_that_are_no_discovery_request_end_the_stream_invalid(served, caplog):
    cache, _, _, path = served
    cache.set_snapshot("node1", snapshot("1"))
    with grpc.insecure_channel(f"unix:{path}") as channel:
        call = channel.stream_stream(ADS_METHOD, request_serializer=bytes)
        with pytest.raises(grpc.RpcError) as failed:
            list(call(iter([b"\x12\xff\xff"]), timeout=10))  # field 2 (node) longer than the message
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a DiscoveryRequest that does not parse" in caplog.text
    assert sorted(fetch(path, "node1")[rt.ROUTE]) == [f"{REVIEWS}:9080"]


def cluster_request(node: str = "node1") -> bytes:
    from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest
    return DiscoveryRequest(node=Node(id=node), type_url=rt.CLUSTER).SerializeToString()


def ads_stream(channel, requests: queue.Queue):
    """An ADS stream fed from `requests` (None ends it); its responses' type URLs."""
    from envoy.service.discovery.v3.discovery_pb2 import DiscoveryResponse
    call = channel.stream_stream(ADS_METHOD, request_serializer=bytes,
                                 response_deserializer=DiscoveryResponse.FromString)
    return call(iter(requests.get, None))


def test_streams_beyond_max_streams_are_refused_and_the_open_ones_go_on(tmp_path):
    cache, registry = SnapshotCache(), CollectorRegistry()
    cache.set_snapshot("node1", snapshot("1"))
    path = str(tmp_path / "xds.sock")
    server = AdsServer(cache, registry, max_streams=2).start(unix_path=path)
    feeds: list[queue.Queue] = [queue.Queue(), queue.Queue()]
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            streams = []
            for feed in feeds:
                feed.put(cluster_request())
                streams.append(ads_stream(channel, feed))
                assert next(streams[-1]).type_url == rt.CLUSTER  # both are being served
            third: queue.Queue = queue.Queue()
            third.put(cluster_request())
            with pytest.raises(grpc.RpcError) as failed:
                next(ads_stream(channel, third))
            assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            third.put(None)
            feeds[0].put(None)
            streams[0].cancel()
            wait_until(lambda: server._open < 2)
            again: queue.Queue = queue.Queue()
            again.put(cluster_request())
            assert next(ads_stream(channel, again)).type_url == rt.CLUSTER  # a slot is free again
            again.put(None)
    finally:
        for feed in feeds:
            feed.put(None)
        server.stop()


def test_reset_streams_leave_the_server_serving(tmp_path):
    cache, registry = SnapshotCache(), CollectorRegistry()
    cache.set_snapshot("node1", snapshot("1"))
    path = str(tmp_path / "xds.sock")
    server = AdsServer(cache, registry, max_streams=4).start(unix_path=path)
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            for _ in range(8):  # more resets than max_streams: each reset stream is let go
                feed: queue.Queue = queue.Queue()
                feed.put(cluster_request())
                stream = ads_stream(channel, feed)
                assert next(stream).type_url == rt.CLUSTER
                stream.cancel()
                feed.put(None)
                wait_until(lambda: server._open == 0)
    finally:
        server.stop()


def test_the_ads_subset_schema_is_envoys():
    from envoy.config.core.v3.base_pb2 import ControlPlane, Node as EnvoyNode
    from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
    from google.rpc.status_pb2 import Status
    classes = {"DiscoveryRequest": DiscoveryRequest, "DiscoveryResponse": DiscoveryResponse, "Node": EnvoyNode,
               "ControlPlane": ControlPlane, "Status": Status}
    assert set(adsproto.SCHEMA) == set(classes)
    for name, fields in adsproto.SCHEMA.items():
        built = getattr(adsproto, name).DESCRIPTOR  # the class the agent uses, made from the schema
        assert [f.name for f in built.fields] == [field for field, *_ in fields]
        same_fields(built, classes[name].DESCRIPTOR)
    # and both read each other's bytes alike
    ours = request(rt.CLUSTER, ["a", "b"], nonce="3", version="v1", error="refused")
    theirs = DiscoveryRequest.FromString(ours.SerializeToString())
    assert (theirs.node.id, list(theirs.resource_names), theirs.type_url, theirs.response_nonce, theirs.version_info,
            theirs.error_detail.code, theirs.error_detail.message) == \
        ("node1", ["a", "b"], rt.CLUSTER, "3", "v1", 3, "refused")
    snap = snapshot("1")
    (cds,) = StreamState(on_nack=lambda *a: None, on_push=lambda t: None).request(request(rt.CLUSTER), lambda _: snap)
    parsed = DiscoveryResponse.FromString(cds.SerializeToString())
    assert (parsed.type_url, parsed.nonce, parsed.control_plane.identifier, len(parsed.resources)) == \
        (rt.CLUSTER, cds.nonce, "nodeagent", len(snap.names(rt.CLUSTER)))
    assert [bytes(a.value) for a in parsed.resources] == [snap.serialized[rt.CLUSTER][n] for n in sorted(snap.names(rt.CLUSTER))]


# --- the protocol without a transport ---------------------------------------------------
def request(type_url: str, names=(), nonce: str = "", version: str = "", error: str = ""):
    return adsproto.DiscoveryRequest(node=adsproto.Node(id="node1"), type_url=type_url, resource_names=list(names),
                                     response_nonce=nonce, version_info=version,
                                     error_detail=adsproto.Status(code=3, message=error) if error else None)


def test_listeners_wait_for_the_cluster_ack_and_the_endpoints_request():
    snap, nacks = snapshot("1"), []
    state = StreamState(on_nack=lambda *a: nacks.append(a), on_push=lambda t: None)
    get = {"node1": snap}.get
    (cds,) = state.request(request(rt.CLUSTER), get)
    (eds,) = state.request(request(rt.ENDPOINT, snap.names(rt.ENDPOINT)), get)  # need not wait for the ACK
    assert state.request(request(rt.LISTENER), get) == []  # CDS not answered yet
    assert state.request(request(rt.ENDPOINT, snap.names(rt.ENDPOINT), nonce=eds.nonce,
                                 version=eds.version_info), get) == []
    (lds,) = state.request(request(rt.CLUSTER, nonce=cds.nonce, version=cds.version_info), get)
    assert lds.type_url == rt.LISTENER and nacks == []
    (rds,) = state.request(request(rt.ROUTE, [f"{REVIEWS}:9080"]), get)  # after LDS is sent
    assert rds.type_url == rt.ROUTE


def test_endpoints_follow_every_cluster_push_even_unchanged():
    state = StreamState(on_nack=lambda *a: None, on_push=lambda t: None)
    first, second = snapshot("1"), snapshot("2", ratings_policy=True)
    get = {"node1": first}.get
    (cds,) = state.request(request(rt.CLUSTER), get)
    (eds,) = state.request(request(rt.ENDPOINT, [f"outbound|9080||{REVIEWS}"]), get)
    state.request(request(rt.CLUSTER, nonce=cds.nonce, version=cds.version_info), get)
    state.request(request(rt.ENDPOINT, [f"outbound|9080||{REVIEWS}"], nonce=eds.nonce, version=eds.version_info), get)
    again = state.pump(second)  # new clusters; the reviews endpoints themselves did not change
    assert [r.type_url for r in again] == [rt.CLUSTER, rt.ENDPOINT]
    assert again[1].version_info == eds.version_info


def test_stale_nonces_are_ignored_and_a_nack_is_not_answered_with_the_same_content():
    snap, nacks = snapshot("1"), []
    state = StreamState(on_nack=lambda *a: nacks.append(a[1]), on_push=lambda t: None)
    get = {"node1": snap}.get
    (cds,) = state.request(request(rt.CLUSTER), get)
    assert state.request(request(rt.CLUSTER, nonce="old"), get) == []
    assert state.request(request(rt.CLUSTER, nonce=cds.nonce, error="bad cluster"), get) == []
    assert nacks == [rt.CLUSTER] and state.types[rt.CLUSTER].acked_version == ""
    assert state.pump(snap) == []


def test_an_empty_response_of_a_type_envoy_no_longer_watches_counts_as_accepted():
    """The last cluster using endpoints went (lab delete of the last L7 resource): Envoy
    asks for no endpoints and silently takes an empty EDS response without answering it
    (no watch), so waiting for its ACK left the waypoint never in sync again."""
    state = StreamState(on_nack=lambda *a: None, on_push=lambda t: None)
    first, empty = snapshot("1"), Snapshot.build("2", [])
    get = {"node1": first}.get
    eds_names = sorted(first.names(rt.ENDPOINT))
    (cds,) = state.request(request(rt.CLUSTER), get)
    (eds,) = state.request(request(rt.ENDPOINT, eds_names), get)
    assert state.request(request(rt.LISTENER), get) == []
    assert state.request(request(rt.ENDPOINT, eds_names, nonce=eds.nonce, version=eds.version_info), get) == []
    (lds,) = state.request(request(rt.CLUSTER, nonce=cds.nonce, version=cds.version_info), get)
    assert state.request(request(rt.LISTENER, nonce=lds.nonce, version=lds.version_info), get) == []
    get = {"node1": empty}.get
    cds, eds = state.pump(empty)  # no clusters; endpoints follow every cluster push
    assert (cds.resources, eds.type_url, eds.resources) == ([], rt.ENDPOINT, [])
    # Envoy drops its endpoint watches (a request with the older nonce: stale) and takes
    # the empty response without answering.
    assert state.request(request(rt.ENDPOINT, [], nonce="1", version=""), get) == []
    (lds,) = state.request(request(rt.CLUSTER, nonce=cds.nonce, version=cds.version_info), get)
    assert lds.type_url == rt.LISTENER and lds.resources == []
    assert state.request(request(rt.LISTENER, nonce=lds.nonce, version=lds.version_info), get) == []
    assert state.accepted(empty)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_the_server_can_also_listen_on_loopback_tcp_for_tests():
    cache = SnapshotCache()
    server = AdsServer(cache, CollectorRegistry(), debounce=0.01).start(tcp=True)
    try:
        cache.set_snapshot("node1", snapshot("1"))
        assert server.port and server.path is None
        assert sorted(fetch(f"127.0.0.1:{server.port}", "node1")[rt.ROUTE]) == [f"{REVIEWS}:9080"]
    finally:
        server.stop()


def test_proxy_config_finds_a_lab_nodes_waypoint_socket():
    assert xds_socket(None, None, "node1", lab_xds_socket) == DEFAULT_XDS_SOCKET
    assert xds_socket("/tmp/x.sock", None, None, lab_xds_socket) == "/tmp/x.sock"
    assert xds_socket(None, "nalab", "node2", lab_xds_socket) == "/run/nodeagent/nalab/waypoint/node2/xds.sock"
    for given, node in (("/tmp/x.sock", "node2"), (None, None)):
        with pytest.raises(ConfigError, match="--lab"):
            xds_socket(given, "nalab", node, lab_xds_socket)
    with pytest.raises(ConfigError):
        xds_socket(None, "Not A Lab", "node1", lab_xds_socket)
