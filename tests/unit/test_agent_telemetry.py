"""telemetry.py: Istio's TCP metrics with their labels, exact counts per connection,
DENY and CONNECT flags, and the flow log line (stream, file, off, a failing stream)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

from prometheus_client import CollectorRegistry

from nodeagent.agent.proxy.telemetry import (DESTINATION, FLAG_CONNECT, LABELS, MTLS, PLAINTEXT, SOURCE, Flow, FlowLog,
                                       Peer, Telemetry, TrafficMetrics)
from nodeagent.model import Pod, Service, ServicePort

LOG = logging.getLogger("test.telemetry")
CLIENT = Pod("mesh", "client-0", "u1", "node1", "10.244.1.2", {}, {}, "client", workload="client")
SERVER = Pod("mesh", "backend-v1-0", "u2", "node2", "10.244.2.2", {"app": "backend", "version": "v1"}, {}, "backend",
             workload="backend-v1")
SERVICE = Service("mesh", "backend", "10.96.0.10", (ServicePort(9000, 9000),), {"app": "backend"})
CLIENT_ID, SERVER_ID = "spiffe://cluster.local/ns/mesh/sa/client", "spiffe://cluster.local/ns/mesh/sa/backend"


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(stream=None):
    registry = CollectorRegistry()
    mono, wall = Clock(100.0), Clock(1_800_000_000.25)
    stream = io.StringIO() if stream is None else stream
    return Telemetry(TrafficMetrics(registry), FlowLog(stream, LOG), mono, wall), registry, stream, mono


def hbone_flow() -> Flow:
    return Flow(DESTINATION, ("10.244.1.2", 40000), ("10.244.2.2", 9000), Peer.of(CLIENT, CLIENT_ID),
                Peer.of(SERVER, SERVER_ID), SERVICE, MTLS, upstream=("10.244.2.2", 15008))


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


def test_labels_are_istios():
    """Istio's TCP label set (Kiali groups L4 edges by the canonical names and the
    service's name and namespace)."""
    assert hbone_flow().labels("-") == {
        "reporter": "destination", "source_workload": "client", "source_workload_namespace": "mesh",
        "source_principal": CLIENT_ID, "source_app": "unknown", "source_version": "unknown",
        "source_canonical_service": "client", "source_canonical_revision": "latest",
        "destination_workload": "backend-v1", "destination_workload_namespace": "mesh",
        "destination_principal": SERVER_ID, "destination_app": "backend", "destination_version": "v1",
        "destination_service": "backend.mesh.svc.cluster.local", "destination_service_name": "backend",
        "destination_service_namespace": "mesh", "destination_canonical_service": "backend",
        "destination_canonical_revision": "v1", "request_protocol": "tcp",
        "connection_security_policy": "mutual_tls", "response_flags": "-"}
    assert sorted(hbone_flow().labels("-")) == sorted(LABELS)  # every label the metrics have
    unknown = Flow(SOURCE, ("10.244.1.2", 1), ("203.0.113.1", 443), Peer.of(CLIENT), Peer(), None, PLAINTEXT)
    assert {k: v for k, v in unknown.labels("CONNECT").items() if v == "unknown"}.keys() == {
        "source_principal", "source_app", "source_version", "destination_workload", "destination_workload_namespace",
        "destination_principal", "destination_app", "destination_version", "destination_service",
        "destination_service_name", "destination_service_namespace", "destination_canonical_service",
        "destination_canonical_revision"}


def test_three_connections_counted_exactly_with_bytes():
    telemetry, registry, stream, clock = make()
    for _ in range(3):
        flow = telemetry.open(hbone_flow())
        clock.t += 0.5
        telemetry.close(flow, received=100, sent=250)
        telemetry.close(flow, received=100, sent=250)  # a second close counts nothing
    labels = hbone_flow().labels("-")
    assert value(registry, "istio_tcp_connections_opened_total", **labels) == 3
    assert value(registry, "istio_tcp_connections_closed_total", **labels) == 3
    assert value(registry, "istio_tcp_received_bytes_total", **labels) == 300
    assert value(registry, "istio_tcp_sent_bytes_total", **labels) == 750
    telemetry.flow_log.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 3
    assert lines[0] == {
        "time": "2027-01-15T08:00:00.250Z", "reporter": "destination",
        "src": {"addr": "10.244.1.2:40000", "workload": "client", "namespace": "mesh", "principal": CLIENT_ID},
        "dst": {"addr": "10.244.2.2:9000", "workload": "backend-v1", "namespace": "mesh", "principal": SERVER_ID,
                "service": "backend.mesh.svc.cluster.local"},
        "upstream": "10.244.2.2:15008", "security": "mutual_tls", "bytes_received": 100, "bytes_sent": 250,
        "duration_ms": 500.0, "verdict": "allowed", "response_flags": "-", "reason": ""}


def test_denied_and_failed_connections_are_flagged():
    telemetry, registry, stream, _ = make()
    telemetry.denied(telemetry.open(hbone_flow()), "mesh/deny-all", "denied by DENY policy mesh/deny-all rule 0")
    telemetry.close(telemetry.open(hbone_flow()), flags=FLAG_CONNECT, verdict="failed", reason="connect_refused")
    opened = hbone_flow().labels("-")
    assert value(registry, "istio_tcp_connections_opened_total", **opened) == 2  # opened with "-", as ztunnel
    assert value(registry, "istio_tcp_connections_closed_total", **hbone_flow().labels("DENY")) == 1
    assert value(registry, "istio_tcp_connections_closed_total", **hbone_flow().labels("CONNECT")) == 1
    assert value(registry, "istio_tcp_connections_closed_total", **opened) == 0
    assert value(registry, "nodeagent_policy_denials_total", policy="mesh/deny-all") == 1
    assert value(registry, "istio_tcp_received_bytes_total", **opened) == 0
    telemetry.flow_log.flush()
    denied, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (denied["verdict"], denied["response_flags"], denied["reason"]) == (
        "denied", "DENY", "denied by DENY policy mesh/deny-all rule 0")
    assert (failed["verdict"], failed["response_flags"], failed["reason"]) == ("failed", "CONNECT", "connect_refused")


def test_flow_log_file_off_and_failures(tmp_path, caplog):
    path = tmp_path / "flows.log"
    log = FlowLog.open(path, LOG)
    log.write('{"a":1}')
    log.write('{"b":2}')
    log.close()
    assert path.read_text() == '{"a":1}\n{"b":2}\n'
    off = FlowLog.open("off", LOG)
    off.write('{"a":1}')  # nothing, and no error

    class Broken(io.StringIO):
        def write(self, _text):
            raise OSError(28, "No space left on device")

    broken = FlowLog(Broken(), LOG)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            broken.write('{"a":1}')
            broken.flush()
        broken.close()
    assert [r.message for r in caplog.records].count(
        "cannot write the flow log: [Errno 28] No space left on device (flow lines are dropped until it works)") == 1
    assert broken.dropped == 3


def test_peer_of_a_pod_uses_istios_workload_name_and_canonical_labels():
    assert Peer.of(CLIENT) == Peer("client", "mesh", "unknown", canonical_service="client",
                                   canonical_revision="latest")
    bare = Pod("mesh", "lonely", "u3", "node1", "10.244.1.5", {}, {})
    assert Peer.of(bare, CLIENT_ID) == Peer("lonely", "mesh", CLIENT_ID, canonical_service="lonely",
                                            canonical_revision="latest")
    assert Peer.of(None) == Peer("unknown", "unknown", "unknown")
    named = Pod("mesh", "r-0", "u4", "node1", "10.244.1.6",
                {"app.kubernetes.io/name": "reviews", "app.kubernetes.io/version": "2",
                 "service.istio.io/canonical-name": "reviews-svc", "service.istio.io/canonical-revision": "r2"}, {})
    assert Peer.of(named) == Peer("r-0", "mesh", "unknown", "reviews", "2", "reviews-svc", "r2")


def test_a_flow_log_file_is_rotated_at_its_size_limit(tmp_path):
    """Issue 9.9: 100k reset streams wrote a 70 MB flow log; the file is bounded."""
    path = tmp_path / "flows.log"
    path.write_text('{"old":0}\n')  # an agent appends to what its predecessor wrote
    line = '{"n":1}\n'
    log = FlowLog.open(path, LOG, max_bytes=10 + 3 * len(line))
    for n in range(1, 10):
        log.write(f'{{"n":{n}}}')
    log.close()
    # The old 10 bytes and lines 1-3 fill the first file (34 bytes); lines 4-7 (32) the
    # second, which replaces the first as flows.log.1; lines 8 and 9 start the third.
    assert (tmp_path / "flows.log.1").read_text() == "".join(f'{{"n":{n}}}\n' for n in (4, 5, 6, 7))
    assert path.read_text() == '{"n":8}\n{"n":9}\n'
    assert log.rotations == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["flows.log", "flows.log.1"]


def test_cached_label_sets_count_each_flow_under_its_own_labels_across_a_cache_restart(monkeypatch):
    from nodeagent.agent.proxy import telemetry as module
    monkeypatch.setattr(module, "SERIES_CACHE", 2)  # three label sets: the cache starts over once
    telemetry, registry, _, _ = make()
    peers = [Peer.of(SERVER, SERVER_ID), Peer(), Peer("other", "mesh", "spiffe://cluster.local/ns/mesh/sa/other")]
    for round_ in range(3):
        for i, peer in enumerate(peers):
            flow = telemetry.open(Flow(SOURCE, ("10.244.1.2", 40000 + i), ("10.96.0.10", 9000),
                                       Peer.of(CLIENT, CLIENT_ID), peer, SERVICE, MTLS))
            telemetry.close(flow, received=10 * (i + 1), sent=0 if i == 1 else 7,
                            flags=FLAG_CONNECT if round_ == 2 and i == 0 else "-")
    assert len(telemetry._series) <= 2
    for i, peer in enumerate(peers):
        labels = Flow(SOURCE, ("10.244.1.2", 1), ("10.96.0.10", 9000), Peer.of(CLIENT, CLIENT_ID), peer, SERVICE,
                      MTLS).labels("-")
        assert value(registry, "istio_tcp_connections_opened_total", **labels) == 3
        assert value(registry, "istio_tcp_connections_closed_total", **labels) == (2 if i == 0 else 3)
        assert value(registry, "istio_tcp_connections_closed_total", **{**labels, "response_flags": "CONNECT"}) == \
            (1 if i == 0 else 0)
        assert value(registry, "istio_tcp_received_bytes_total", **labels) == 30 * (i + 1)
        assert value(registry, "istio_tcp_sent_bytes_total", **labels) == (0 if i == 1 else 21)
    # a label set with no bytes sent has no sent series at all, as before the cache
    assert registry.get_sample_value("istio_tcp_sent_bytes_total", Flow(
        SOURCE, ("10.244.1.2", 1), ("10.96.0.10", 9000), Peer.of(CLIENT, CLIENT_ID), Peer(), SERVICE,
        MTLS).labels("-")) is None


def test_the_flow_line_is_exactly_what_json_dumps_writes_for_awkward_values():
    """The line is built from pieces (telemetry._line), not through json.dumps: byte for
    byte what json.dumps(separators=(",", ":")) writes for the same object, with quotes,
    backslashes, control characters and non-ASCII in the free-text fields, IPv6, no
    upstream, the fast path's flag, and durations that round."""
    reason = 'policy "deny\\all"\nrule 0\t\x01 – é 🚫'
    odd = Peer("wörk\"load", "ns\\x", "spiffe://cluster.local/ns/a/sa/\u2028")
    cases = [
        (Flow(SOURCE, ("fd00::2", 40000), ("fd00::9", 443), odd, Peer(), None, PLAINTEXT, same_node=True),
         0.0004, 0, 0, "-", "allowed", ""),
        (hbone_flow(), 1234.56789, 10**12, 7, "DENY", "denied", reason),
        (Flow(DESTINATION, ("10.244.1.2", 1), ("10.244.2.2", 9000), Peer.of(CLIENT), Peer.of(SERVER), SERVICE,
              MTLS, upstream=("fd00::5", 15008)), 2.0, 5, 6, "CONNECT", "failed", "connect_refused"),
    ]
    for flow, elapsed, received, sent, flags, verdict, why in cases:
        telemetry, _, stream, clock = make()
        telemetry.open(flow)
        clock.t += elapsed
        telemetry.close(flow, received=received, sent=sent, flags=flags, verdict=verdict, reason=why)
        telemetry.flow_log.flush()
        expected = {
            "time": "2027-01-15T08:00:00.250Z", "reporter": flow.reporter,
            "src": {"addr": f"[{flow.src[0]}]:{flow.src[1]}" if ":" in flow.src[0] else f"{flow.src[0]}:{flow.src[1]}",
                    "workload": flow.source.workload, "namespace": flow.source.namespace,
                    "principal": flow.source.principal},
            "dst": {"addr": f"[{flow.dst[0]}]:{flow.dst[1]}" if ":" in flow.dst[0] else f"{flow.dst[0]}:{flow.dst[1]}",
                    "workload": flow.destination.workload, "namespace": flow.destination.namespace,
                    "principal": flow.destination.principal, "service": flow.labels(flags)["destination_service"]},
            "upstream": (None if flow.upstream is None else f"[{flow.upstream[0]}]:{flow.upstream[1]}"
                         if ":" in flow.upstream[0] else f"{flow.upstream[0]}:{flow.upstream[1]}"),
            "security": flow.security, "bytes_received": received, "bytes_sent": sent,
            "duration_ms": round(elapsed * 1000, 3), "verdict": verdict, "response_flags": flags, "reason": why,
            **({"same_node": True} if flow.same_node else {}),
        }
        assert stream.getvalue() == json.dumps(expected, separators=(",", ":")) + "\n"
        assert stream.getvalue().isascii()


class Recorder(io.StringIO):
    """A stream that records each write(2)'s text and can be held (a stalled disk or reader)."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []
        self.held = threading.Event()
        self.held.set()

    def write(self, text):
        self.held.wait(10)
        self.writes.append(text)
        return super().write(text)


def test_lines_reach_the_stream_from_the_writer_thread_in_one_write_per_gathering():
    stream = Recorder()
    log = FlowLog(stream, LOG, flush_every=0.5)
    for n in range(100):
        log.write(f'{{"n":{n}}}')  # the caller only queues
    assert stream.writes == []
    deadline = time.monotonic() + 10
    while not stream.writes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.writes == ["".join(f'{{"n":{n}}}\n' for n in range(100))]  # in order, one write
    log.write('{"n":100}')
    writer = log._writer
    log.close()  # what is queued is written, and the thread ends
    assert stream.writes[-1] == '{"n":100}\n' and not writer.is_alive()
    log.write('{"n":101}')  # after close: nothing, and no error
    assert "".join(stream.writes).count("\n") == 101


def test_a_stalled_stream_never_blocks_the_caller_and_overflow_is_counted(caplog, monkeypatch):
    monkeypatch.setattr(FlowLog, "MAX_QUEUED", 5)
    stream = Recorder()
    stream.held.clear()  # the first write blocks the writer thread
    log = FlowLog(stream, LOG, flush_every=0.0)
    with caplog.at_level(logging.WARNING):
        log.write('{"n":0}')
        deadline = time.monotonic() + 10
        while log._queued and time.monotonic() < deadline:  # the writer took it and is stuck writing it
            time.sleep(0.01)
        for n in range(1, 9):
            log.write(f'{{"n":{n}}}')  # 1-5 queue, 6-8 are dropped
        # the writer is still stuck (had a write waited for it, the stream's 10 s hold
        # would have run out and the write gone through)
        assert stream.writes == [] and log.dropped == 3
        stream.held.set()
        log.close()
    assert "".join(stream.writes) == "".join(f'{{"n":{n}}}\n' for n in range(6))
    messages = [r.message for r in caplog.records]
    assert messages == ["the flow log is 5 lines behind: flow lines are dropped until it catches up",
                        "the flow log is written again; 3 flow lines were dropped"]


def test_close_gives_up_on_a_writer_stuck_in_a_write(caplog):
    """A full pipe nobody reads must not keep the agent from stopping."""
    stream = Recorder()
    stream.held.clear()
    log = FlowLog(stream, LOG, flush_every=0.0)
    log.write('{"n":0}')
    deadline = time.monotonic() + 10
    while log._queued and time.monotonic() < deadline:  # the writer took it and is stuck writing it
        time.sleep(0.01)
    log.write('{"n":1}')
    with caplog.at_level(logging.WARNING):
        log.close(timeout=0.2)
    assert [r.message for r in caplog.records] == [
        "the flow log's writer is stuck in a write after 0.2 s: 1 queued flow lines are not written"]
    assert stream.writes == []  # nothing went through, and close() returned
    stream.held.set()  # the stuck write ends; the thread goes
