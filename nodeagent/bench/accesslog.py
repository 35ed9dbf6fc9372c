"""What one request costs the agent in request metrics: the waypoint's access log, decoded.

Usage: python -m nodeagent.bench.accesslog [--entries 20000] [--batch-bytes 65536] [--rounds 5] [-o json]

Makes --entries HTTP access-log entries shaped as Envoy 1.40 fills them for the
waypoint's config (every field a real Envoy sets for a client-side request: addresses,
nine timings, cluster, route, filter state, stream id, wire byte counts, request and
response properties; tests/unit/test_xds_alsproto.py checks the shape against a real
Envoy's), batched into StreamAccessLogsMessage bytes of up to --batch-bytes as Envoy
buffers them (buffer_size_bytes: the waypoint's 64 KiB by default; the first message of
a stream carries the identifier). Then, in CPU µs per entry (process time, best of --rounds):
  decode protobuf (xds-protos, upb)
                      StreamAccessLogsMessage.FromString of the classes generated from
                      all of Envoy's schema (xds-protos), protobuf's C runtime too: the
                      full schema's cost, for comparison with the subset's below
  decode python       a hand-written pure-Python decoder of exactly the fields read
  decode upb          AlsDecoder.parse: protobuf's C runtime, the subset schema
  facts upb           parse, then AlsDecoder.facts of every entry
  labels uncached     request_labels and the four .labels() lookups, per entry
  consume             RequestMetrics.consume, the agent's whole path (cached label sets)
and through gRPC: the same messages streamed by a client process over a unix socket to
the agent's gRPC server (xds.server.AdsServer with the sink), the server process's CPU
per message and per entry, for a sink that only drains the stream and for
RequestMetrics, with batches of --batch-bytes and of Envoy's default 16 KiB.

Caveats: CPU time of this process, so other load on the machine adds little but caches
and frequency scaling still vary; compare figures of one run. Every entry of a run has
one of ~40 label sets, as steady traffic between a few pods has.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable

from nodeagent.kube.objects import parse_documents
from nodeagent.model import Model
from nodeagent.xds.alsproto import FLAGS, PRINCIPAL, SOURCE_WORKLOAD, STRING_VALUE, AlsDecoder, Measured, RequestFacts
from nodeagent.xds.translate.listeners import ACCESS_LOG_BUFFER

WORLD = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
""" + "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {{app: {app}, version: {version}}}}}
spec: {{nodeName: {node}, serviceAccountName: {app}}}
status: {{phase: Running, podIP: {ip}}}
""" for name, app, version, node, ip in [
    ("productpage-0", "productpage", "v1", "node1", "10.244.1.5"),
    ("productpage-1", "productpage", "v1", "node1", "10.244.1.7"),
    ("reviews-v1", "reviews", "v1", "node2", "10.244.2.6"),
    ("reviews-v2", "reviews", "v2", "node2", "10.244.2.7")]) + """---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.1.10, selector: {app: reviews}, ports: [{name: http, port: 9080, targetPort: 9080}]}
"""
SOURCES = (("shop/productpage-0", "10.244.1.5"), ("shop/productpage-1", "10.244.1.7"))
ENDPOINTS = (("v1", "10.244.2.6:9080"), ("v2", "10.244.2.7:9080"))
REVIEWS = "reviews.shop.svc.cluster.local"
ENVOY_DEFAULT_BUFFER = 16384  # buffer_size_bytes when the config leaves it out


def world() -> Model:
    return Model.build(parse_documents(WORLD, "bench-accesslog.yaml"))


# --- Envoy-shaped payloads -----------------------------------------------------------------
def entry(i: int, socket_dir: str = "/run/nodeagent/nalab/waypoint/node1"):
    """The i-th client-side entry, with every field Envoy 1.40 sets for one (seen in a
    capture of the real Envoy with the waypoint's config): 1 in 10 is a POST with a
    content-type, 1 in 50 a 503 after retries (UF,URX), 1 in 100 a gRPC call."""
    from envoy.config.core.v3.address_pb2 import Address, EnvoyInternalAddress, Pipe, SocketAddress
    from envoy.config.core.v3.base_pb2 import RequestMethod
    from envoy.data.accesslog.v3.accesslog_pb2 import (AccessLogCommon, AccessLogType, HTTPAccessLogEntry,
                                                       HTTPRequestProperties, HTTPResponseProperties, ResponseFlags)
    from google.protobuf.any_pb2 import Any
    from google.protobuf.wrappers_pb2 import StringValue, UInt32Value

    workload, source_ip = SOURCES[i % len(SOURCES)]
    subset, endpoint = ENDPOINTS[(i // 2) % len(ENDPOINTS)]
    failed, grpc, post = i % 50 == 49, i % 100 == 17, i % 10 == 3
    us = lambda n: timedelta(microseconds=n)  # noqa: E731
    stream_id = str(uuid.UUID(int=i + 1))
    principal = f"spiffe://cluster.local/ns/shop/sa/{workload.split('/')[1].rsplit('-', 1)[0]}"
    states = {SOURCE_WORKLOAD: Any(type_url=STRING_VALUE, value=StringValue(value=workload).SerializeToString()),
              PRINCIPAL: Any(type_url=STRING_VALUE, value=StringValue(value=principal).SerializeToString())}
    common = AccessLogCommon(
        downstream_remote_address=Address(socket_address=SocketAddress(address=source_ip, port_value=0)),
        downstream_local_address=Address(socket_address=SocketAddress(address="10.96.1.10", port_value=9080)),
        start_time=datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(milliseconds=i),
        time_to_last_rx_byte=us(15), time_to_first_upstream_tx_byte=us(79), time_to_last_upstream_tx_byte=us(79),
        time_to_first_upstream_rx_byte=us(536 + i % 97), time_to_last_upstream_rx_byte=us(633 + i % 97),
        time_to_first_downstream_tx_byte=us(624 + i % 97), time_to_last_downstream_tx_byte=us(638 + i % 97),
        upstream_remote_address=Address(envoy_internal_address=EnvoyInternalAddress(
            server_listener_name="nodeagent_upstream", endpoint_id=endpoint)),
        upstream_local_address=Address(envoy_internal_address=EnvoyInternalAddress(
            server_listener_name="internal_client_address")),
        upstream_cluster=f"outbound|9080|{subset}|{REVIEWS}", route_name="shop/reviews spec.http[0]",
        downstream_direct_remote_address=Address(pipe=Pipe(path=f"{socket_dir}/outbound.sock")),
        filter_state_objects=states, duration=us(641 + i % 97), upstream_request_attempt_count=3 if failed else 1,
        stream_id=stream_id, downstream_wire_bytes_sent=430, downstream_wire_bytes_received=76,
        upstream_wire_bytes_sent=134, upstream_wire_bytes_received=325,
        access_log_type=AccessLogType.Value("DownstreamEnd"),
        response_flags=ResponseFlags(upstream_connection_failure=True, upstream_retry_limit_exceeded=True)
        if failed else None)
    headers = {"content-type": "application/grpc" if grpc else "application/json"} if grpc or post else {}
    request = HTTPRequestProperties(
        request_method=RequestMethod.Value("POST" if grpc or post else "GET"), scheme="http",
        authority="reviews:9080", path=f"/reviews/{i}", request_id=stream_id, request_headers_bytes=133,
        request_body_bytes=120 if post else 0, request_headers=headers, upstream_header_bytes_sent=106,
        downstream_header_bytes_received=45, user_agent="wrk" if i % 2 else "")
    response = HTTPResponseProperties(
        response_code=UInt32Value(value=503 if failed else 200), response_headers_bytes=144, response_body_bytes=253,
        response_code_details="upstream_reset_before_response_started{connection_failure}" if failed
        else "via_upstream", upstream_header_bytes_received=51, downstream_header_bytes_sent=158,
        response_trailers={"grpc-status": "0"} if grpc else {})
    return HTTPAccessLogEntry(common_properties=common, protocol_version=HTTPAccessLogEntry.HTTP11,
                              request=request, response=response)


def payloads(entries: int, batch_bytes: int) -> list[bytes]:
    """One stream's messages: entries appended until a message reaches `batch_bytes`, as
    Envoy's buffer does; the identifier (node and log name) on the first message only."""
    from envoy.config.core.v3.base_pb2 import Node
    from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage

    messages, batch, size = [], [], 0
    for i in range(entries):
        one = entry(i)
        batch.append(one)
        size += one.ByteSize() + 3
        if size >= batch_bytes or i == entries - 1:
            message = StreamAccessLogsMessage(http_logs=StreamAccessLogsMessage.HTTPAccessLogEntries(log_entry=batch))
            if not messages:
                message.identifier.CopyFrom(StreamAccessLogsMessage.Identifier(
                    node=Node(id="node1", cluster="nodeagent-waypoint", user_agent_name="envoy"), log_name="outbound"))
            messages.append(message.SerializeToString(deterministic=True))  # the same bytes every run
            batch, size = [], 0
    return messages


# --- a hand-written decoder of the fields read (pure Python), for comparison ------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes, start: int = 0, end: int | None = None) -> dict[int, list]:
    """Field number → values (ints for varints, (start, end) for length-delimited);
    fixed-width fields are skipped (none of the fields read has one)."""
    end = len(buf) if end is None else end
    found: dict[int, list] = {}
    i = start
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = (i, i + length), i + length
        elif wire == 1:
            i += 8
            continue
        elif wire == 5:
            i += 4
            continue
        else:
            raise ValueError(f"wire type {wire}")
        found.setdefault(key >> 3, []).append(value)
    if i != end:
        raise ValueError("truncated")
    return found


class PythonDecoder:
    """The alternative to upb: walks the bytes and reads only what the labels read."""

    def entries(self, data: bytes) -> tuple[str | None, list[tuple[RequestFacts, Measured]]]:
        top = _fields(data)
        log_name = None
        if 1 in top:
            ident = _fields(data, *top[1][-1])
            log_name = self._str(data, ident, 2) or ""
        out = []
        for logs in top.get(2, ()):
            for span in _fields(data, *logs).get(1, ()):
                out.append(self._entry(data, span))
        return log_name, out

    def _entry(self, buf: bytes, span: tuple[int, int]) -> tuple[RequestFacts, Measured]:
        top = _fields(buf, *span)
        common = self._sub(buf, top, 1)
        request, response = self._sub(buf, top, 3), self._sub(buf, top, 4)
        states = {}
        for kv in common.get(21, ()):
            pair = _fields(buf, *kv)
            value = self._sub(buf, pair, 2)
            states[self._str(buf, pair, 1)] = (self._str(buf, value, 1), self._bytes(buf, value, 2))
        remote = self._sub(buf, self._sub(buf, common, 2), 1)
        local = self._sub(buf, self._sub(buf, common, 3), 1)
        upstream = self._sub(buf, common, 13)
        headers = self._map(buf, request, 13)
        grpc = headers.get("content-type", "").startswith("application/grpc")
        status = ""
        if grpc:
            status = self._map(buf, response, 5).get("grpc-status") or self._map(buf, response, 4).get(
                "grpc-status") or ""
        flags = "-"
        if 16 in common:
            set_flags = self._sub(buf, common, 16)
            flags = ",".join(short for n, (_, short) in enumerate(FLAGS, 1) if set_flags.get(n, [0])[-1]) or "-"
        took = common.get(23) or common.get(12)
        ms = 0.0
        if took:
            duration = _fields(buf, *took[-1])
            ms = timedelta(seconds=duration.get(1, [0])[-1], microseconds=duration.get(2, [0])[-1] / 1e3
                           ).total_seconds() * 1000
        facts = RequestFacts(
            self._state(states, PRINCIPAL), self._state(states, SOURCE_WORKLOAD), self._str(buf, remote, 2) or None,
            self._str(buf, local, 2) or None, local.get(3, [0])[-1],
            self._str(buf, self._sub(buf, upstream, 3), 2) if 3 in upstream else None, self._str(buf, common, 15),
            grpc, status, self._sub(buf, response, 1).get(1, [0])[-1] if 1 in response else 0, flags)
        return facts, Measured(ms, request.get(11, [0])[-1] + request.get(12, [0])[-1],
                               response.get(2, [0])[-1] + response.get(3, [0])[-1])

    @staticmethod
    def _sub(buf, fields, number) -> dict:
        spans = fields.get(number) if fields else None
        return _fields(buf, *spans[-1]) if spans else {}

    @staticmethod
    def _bytes(buf, fields, number) -> bytes:
        spans = fields.get(number) if fields else None
        return buf[slice(*spans[-1])] if spans else b""

    def _str(self, buf, fields, number) -> str:
        return self._bytes(buf, fields, number).decode()

    def _map(self, buf, fields, number) -> dict[str, str]:
        return {self._str(buf, pair, 1): self._str(buf, pair, 2)
                for pair in (_fields(buf, *kv) for kv in fields.get(number, ()))}

    @staticmethod
    def _state(states, key) -> str | None:
        type_url, value = states.get(key, ("", b""))
        if type_url != STRING_VALUE:
            return None
        inner = _fields(value)
        return value[slice(*inner[1][-1])].decode() if 1 in inner else None


# --- timing ----------------------------------------------------------------------------------
def cpu_us_per(work: Callable[[], object], count: int, rounds: int) -> float:
    """Best process CPU time of `rounds` runs of `work`, in µs per one of `count`."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best * 1e6 / count


def decoding(messages: list[bytes], entries: int, rounds: int) -> dict[str, float]:
    from envoy.service.accesslog.v3.als_pb2 import StreamAccessLogsMessage
    from prometheus_client import CollectorRegistry

    from nodeagent.xds.accesslog import RequestMetrics, WAYPOINT, request_labels

    upb, python, model = AlsDecoder(), PythonDecoder(), world()
    parsed = [upb.parse(m) for m in messages]
    every = [e for message in parsed for e in message.http_logs.log_entry]
    facts = [upb.facts(e)[0] for e in every]
    python_facts = [f for m in messages for f in python.entries(m)[1]]
    if python_facts != [upb.facts(e) for e in every]:
        raise AssertionError("the pure-Python and the upb decoder disagree")
    metrics = RequestMetrics(CollectorRegistry(), lambda: model)

    def labels() -> None:
        for one in facts:
            found = request_labels(WAYPOINT, one, model)
            for family in (metrics.requests, metrics.duration, metrics.request_bytes, metrics.response_bytes):
                family.labels(**found)

    def upb_facts() -> None:
        for message in messages:
            for e in upb.parse(message).http_logs.log_entry:
                upb.facts(e)

    slow = max(1, rounds // 3)  # fewer rounds for the uncached labels (~25 µs an entry)
    return {
        "decode protobuf (xds-protos, upb)": cpu_us_per(
            lambda: [StreamAccessLogsMessage.FromString(m) for m in messages], entries, rounds),
        "decode python": cpu_us_per(lambda: [python.entries(m) for m in messages], entries, rounds),
        "decode upb": cpu_us_per(lambda: [upb.parse(m) for m in messages], entries, rounds),
        "facts upb": cpu_us_per(upb_facts, entries, rounds),
        "labels uncached": cpu_us_per(labels, entries, slow),
        "consume": cpu_us_per(lambda: metrics.consume(messages), entries, rounds),
    }


# --- through gRPC ------------------------------------------------------------------------------
def through_grpc(messages: list[bytes], entries: int) -> dict[str, float]:
    """Server-process CPU per message and per entry of one stream into the agent's server."""
    from prometheus_client import CollectorRegistry

    from nodeagent.xds import accesslog
    from nodeagent.xds.cache import SnapshotCache
    from nodeagent.xds.server import AdsServer

    class Drain:
        def stream(self) -> Callable[[bytes], None]:
            return lambda data: None

    model = world()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path, feed = os.path.join(tmp, "als.sock"), os.path.join(tmp, "messages")
        with open(feed, "wb") as f:
            for message in messages:
                f.write(len(message).to_bytes(4, "big") + message)
        sinks = (("drain", Drain()), ("consume", accesslog.RequestMetrics(CollectorRegistry(), lambda: model)))
        for name, sink in sinks:
            server = AdsServer(SnapshotCache(), CollectorRegistry(), access_log=sink).start(unix_path=path)
            try:
                _send(path, feed)  # warm-up: the connection, the label cache
                before = resource.getrusage(resource.RUSAGE_SELF)
                _send(path, feed)
                after = resource.getrusage(resource.RUSAGE_SELF)
            finally:
                server.stop(0)
            cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1e6
            out[f"{name} per message"], out[f"{name} per entry"] = cpu / len(messages), cpu / entries
    return out


def _send(path: str, feed: str) -> None:
    subprocess.run([sys.executable, "-m", "nodeagent.bench.accesslog", "--send", path, feed], check=True,
                   timeout=600)


def send(path: str, feed: str) -> None:
    """The client: streams the messages of `feed` to the server at unix `path`."""
    import grpc

    with open(feed, "rb") as f:
        data = f.read()
    messages, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        messages.append(data[i + 4:i + 4 + n])
        i += 4 + n
    with grpc.insecure_channel(f"unix:{path}") as channel:
        call = channel.stream_unary("/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs")
        call(iter(messages), timeout=600)


# --- the command -------------------------------------------------------------------------------
def run(entries: int, batch_bytes: int, rounds: int) -> dict:
    result: dict = {"entries": entries, "batches": {}}
    for size in dict.fromkeys((batch_bytes, ENVOY_DEFAULT_BUFFER)):
        messages = payloads(entries, size)
        batch = {"messages": len(messages), "entries_per_message": entries / len(messages),
                 "bytes_per_entry": sum(map(len, messages[1:])) / max(1, entries - entries // len(messages))}
        if size == batch_bytes:
            batch["cpu_us_per_entry"] = decoding(messages, entries, rounds)
        batch["grpc_cpu_us"] = through_grpc(messages, entries)
        result["batches"][str(size)] = batch
    return result


def render(result: dict, output: str) -> str:
    if output == "json":
        return json.dumps(result, indent=2, sort_keys=True) + "\n"
    lines = [f"access-log bench: {result['entries']} entries shaped as the waypoint's Envoy sends them"]
    for size, batch in result["batches"].items():
        lines.append(f"batches of {size} bytes: {batch['messages']} messages, "
                     f"{batch['entries_per_message']:.1f} entries each, ~{batch['bytes_per_entry']:.0f} B an entry")
        rows = batch.get("cpu_us_per_entry", {})
        width = max(map(len, rows), default=0) + 2
        for name, value in rows.items():
            lines.append(f"  {name:<{width}}{value:>10.2f} µs CPU per entry")
        grpc_cpu = batch["grpc_cpu_us"]
        for sink in ("drain", "consume"):
            lines.append(f"  gRPC server, {sink:<8}{grpc_cpu[sink + ' per message']:>10.1f} µs CPU per message, "
                         f"{grpc_cpu[sink + ' per entry']:.2f} per entry")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.bench.accesslog",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=20000, help="access-log entries per run")
    parser.add_argument("--batch-bytes", type=int, default=ACCESS_LOG_BUFFER,
                        help="Envoy's buffer_size_bytes (default: the waypoint's, %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="runs per figure; the best is printed")
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text")
    parser.add_argument("--send", nargs=2, metavar=("SOCKET", "FEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.send:
        send(*args.send)
        return 0
    if args.entries < 1 or args.batch_bytes < 1024 or args.rounds < 1:
        parser.error("--entries and --rounds must be at least 1, --batch-bytes at least 1024")
    sys.stdout.write(render(run(args.entries, args.batch_bytes, args.rounds), args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
