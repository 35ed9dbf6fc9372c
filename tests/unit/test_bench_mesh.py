"""The pure parts of `nodeagent bench mesh`: reading wrk and iperf3 output, CPU and memory
from /proc-shaped files, the figures (medians, added latency as the median of per-round
differences, ratios to the anchor), the text table, the chart's PNG, the labs' YAML and
targets, the path checks, and the anchor's certificates and Envoy configurations (checked
by the real Envoy in validate mode)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from cryptography import x509

from nodeagent.bench import chart, loadgen, mesh, meshlab, meshreport, sidecars, usage
from nodeagent.cli import main
from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.identity.ca import keys as cakeys
from nodeagent.identity.spiffe import Identity
from nodeagent.kube.objects import parse_documents
from nodeagent.lab import spec
from nodeagent.xds.envoy import find_envoy

WRK_KEEPALIVE = """Running 3s test @ http://10.96.0.10:8080/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   389.77us  317.98us   6.31ms   96.76%
    Req/Sec     2.80k   259.87     3.19k    56.67%
  Latency Distribution
     50%  333.00us
     75%  391.00us
     90%  472.00us
     99%    1.93ms
  8373 requests in 3.00s, 0.97MB read
Requests/sec:   2788.98
Transfer/sec:    329.56KB
"""

WRK_ERRORS = """Running 1m test @ http://127.0.0.1:15001/
  2 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20s   100.00ms   2.00s    90.00%
    Req/Sec     7.00      2.00     9.00     80.00%
  Latency Distribution
     50%    1.10s
     75%    1.20s
     90%    1.50s
     99%    2.00s
  840 requests in 1.00m, 100.00KB read
  Socket errors: connect 1, read 2, write 3, timeout 4
  Non-2xx or 3xx responses: 5
Requests/sec:     14.00
Transfer/sec:      1.67KB
"""


# --- load generators --------------------------------------------------------------------------
def test_wrk_keepalive_output():
    assert loadgen.parse_wrk(WRK_KEEPALIVE) == loadgen.WrkResult(333.0, 1930.0, 8373, 3.0, 2788.98, 0)


def test_wrk_errors_units_and_minutes():
    r = loadgen.parse_wrk(WRK_ERRORS)
    assert (r.p50_us, r.p99_us, r.requests, r.seconds, r.rps, r.errors) == (1.1e6, 2.0e6, 840, 60.0, 14.0, 15)


def test_wrk_without_latency_lines_is_an_error():
    text = WRK_KEEPALIVE.replace("  Latency Distribution\n", "").replace("     50%  333.00us\n", "")
    with pytest.raises(loadgen.LoadError, match="no latency distribution"):
        loadgen.parse_wrk(text)


def test_wrk_argv():
    assert loadgen.wrk_argv("http://a/", 1, 5) == ["wrk", "-t", "1", "-c", "1", "-d", "5s", "--latency",
                                                   "--timeout", "5s", "http://a/"]
    assert loadgen.wrk_argv("http://a/", 16, 0.4, close=True) == [
        "wrk", "-t", "2", "-c", "16", "-d", "1s", "--latency", "--timeout", "5s", "-H", "Connection: close",
        "http://a/"]


def test_iperf3_json():
    text = json.dumps({"start": {}, "end": {"sum_sent": {"bits_per_second": 3.0e9},
                                            "sum_received": {"bits_per_second": 2.5e9}}})
    assert loadgen.parse_iperf3(text) == 2.5
    assert loadgen.iperf3_argv("10.0.0.1", 5201, 2.6) == ["iperf3", "-c", "10.0.0.1", "-p", "5201", "-t", "3",
                                                          "-P", "1", "-J"]


@pytest.mark.parametrize("text, message", [
    (json.dumps({"start": {}, "error": "unable to connect to server: Connection refused"}), "Connection refused"),
    ("iperf3: error - unable to connect", "no JSON"),
    (json.dumps({"end": {}}), "no end.sum_received"),
])
def test_iperf3_failures(text, message):
    with pytest.raises(loadgen.LoadError, match=message):
        loadgen.parse_iperf3(text)


# --- /proc ------------------------------------------------------------------------------------
def _stat(pid: int, comm: str, ppid: int, utime: int, stime: int) -> str:
    fields = ["S", str(ppid)] + ["0"] * 9 + [str(utime), str(stime)] + ["0"] * 10
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def _proc(tmp_path: Path, table: dict[int, tuple[str, int, int, int, int]]) -> str:
    for pid, (comm, ppid, utime, stime, rss_kb) in table.items():
        d = tmp_path / str(pid)
        d.mkdir(exist_ok=True)
        (d / "stat").write_text(_stat(pid, comm, ppid, utime, stime))
        (d / "status").write_text(f"Name:\t{comm}\nVmRSS:\t  {rss_kb} kB\nThreads:\t3\n")
    (tmp_path / "self").mkdir(exist_ok=True)  # not a pid: skipped
    return str(tmp_path)


def test_stat_with_parentheses_and_spaces_in_the_command_name():
    assert usage.parse_stat(_stat(7, "a (b) c)", 3, 120, 30)) == (3, 120, 30)


def test_rss_of_a_status_file_and_of_a_kernel_thread():
    assert usage.parse_rss("Name:\tx\nVmRSS:\t  2048 kB\n") == 2 << 20
    assert usage.parse_rss("Name:\tkthreadd\nThreads:\t1\n") == 0


def test_tree_cpu_and_rss(tmp_path):
    proc = _proc(tmp_path, {1: ("init", 0, 0, 0, 10), 10: ("nodeagent", 1, 300, 100, 1000),
                            11: ("envoy", 10, 50, 50, 500), 12: ("helper", 11, 5, 5, 20),
                            20: ("other", 1, 999, 999, 999)})
    assert usage.tree(10, proc) == [10, 11, 12]
    assert usage.tree(99, proc) == []
    assert usage.cpu_seconds([10, 11, 12], proc) == 510 / usage.CLOCK_TICKS
    assert usage.rss_bytes(11, proc) == 500 * 1024
    before = usage.cpu_snapshot([10], proc)
    _proc(tmp_path, {10: ("nodeagent", 1, 400, 150, 1000), 13: ("new", 10, 7, 3, 1)})
    after = usage.cpu_snapshot([10], proc)
    assert usage.cpu_delta(before, after) == (150 + 10) / usage.CLOCK_TICKS  # 100+50 more, and the new one's 10


# --- figures ----------------------------------------------------------------------------------
def _round(p50, p99, rps, new_p50, cps, gbps, cpu):
    return {"p50_us": p50, "p99_us": p99, "rps": rps, "new_p50_us": new_p50, "cps": cps, "gbps": gbps,
            "cpu_ms_per_1k": cpu}


ROUNDS = {
    "direct": [_round(100, 300, 9000, 150, 5000, 10.0, None), _round(110, 310, 9100, 160, 5100, 11.0, None),
               _round(200, 900, 8000, 250, 4000, 9.0, None)],
    "l4": [_round(300, 700, 6000, 650, 900, 2.0, 100.0), _round(330, 800, 6100, 660, 950, 2.2, 110.0),
           _round(350, 1100, 5000, 700, 800, 1.8, 130.0)],
    "l7": [_round(900, 2000, 2000, 1500, 700, 1.0, 400.0), _round(950, 2100, 2100, 1600, 720, 1.1, 420.0),
           _round(1000, 2200, 1900, 1700, 650, 0.9, 380.0)],
    "l7s": [_round(500, 1200, 4400, 900, 1500, 1.6, 140.0), _round(520, 1250, 4500, 950, 1550, 1.7, 150.0),
            _round(600, 1500, 4200, 1000, 1400, 1.5, 160.0)],
    "envoy": [_round(400, 800, 4000, 1100, 3000, 4.0, 150.0), _round(420, 820, 4100, 1150, 3100, 4.1, 160.0),
              _round(450, 1000, 3900, 1300, 2900, 3.9, 170.0)],
}


def test_medians_added_latency_and_ratios():
    s = meshreport.summarize(ROUNDS)
    assert s["median"]["direct"] == _round(110, 310, 9000, 160, 5000, 10.0, None)
    assert s["median"]["l4"]["p50_us"] == 330
    # added = median of the per-round differences (200, 220, 150) = 200, not 330 - 110 = 220
    assert s["table"]["l4"]["p50_us"] == 200
    assert s["table"]["l4"]["p99_us"] == 400  # (400, 490, 200)
    assert s["table"]["envoy"]["p50_us"] == 300  # (300, 310, 250)
    assert s["table"]["l4"]["rps"] == 6000 and s["table"]["direct"]["p50_us"] == 110
    assert s["table"]["direct"]["cpu_ms_per_1k"] is None and s["table"]["l4"]["cpu_ms_per_1k"] == 110.0
    assert s["ratio"]["l4"]["p50_us"] == pytest.approx(200 / 300)
    assert s["ratio"]["l7"]["rps"] == pytest.approx(2000 / 4000)
    assert s["ratio"]["l7"]["cpu_ms_per_1k"] == pytest.approx(400 / 160)
    assert s["table"]["l7s"]["p50_us"] == 400  # (400, 410, 400)
    assert s["ratio"]["l7s"]["rps"] == pytest.approx(4400 / 4000)
    assert set(s["ratio"]) == {"l4", "l7", "l7s"}


def test_no_ratio_of_noise():
    rounds = json.loads(json.dumps(ROUNDS))
    for r, d in zip(rounds["envoy"], rounds["direct"]):
        r["p99_us"] = d["p99_us"] - 5  # the anchor's added p99 is negative: noise, no ratio
    for r, d in zip(rounds["l7"], rounds["direct"]):
        r["new_p50_us"] = d["new_p50_us"] - 3  # nodeagent's added latency is negative: no ratio either
    s = meshreport.summarize(rounds)
    assert s["table"]["envoy"]["p99_us"] == -5 and s["ratio"]["l4"]["p99_us"] is None
    assert s["table"]["l7"]["new_p50_us"] == -3 and s["ratio"]["l7"]["new_p50_us"] is None
    assert s["ratio"]["l4"]["new_p50_us"] == pytest.approx(500 / 990)  # medians of (500, 500, 450), (950, 990, 1050)


def _with_tcp_pair(rounds: dict, new_p50: tuple, cps: tuple) -> dict:
    out = json.loads(json.dumps(rounds))
    for r, a, b in zip(out["envoy"], new_p50, cps):
        r.update(tcp_new_p50_us=a, tcp_cps=b)
    return out


def test_the_l4_anchor_is_the_tcp_proxy_pair():
    """Rounds with the sidecars' TCP proxy figures: their added new-connection latency
    (to direct's new-connection figure of the same round) and connections/s, with
    nodeagent L4's ratio to each; the goals' ratios stay the HTTP pair's."""
    s = meshreport.summarize(_with_tcp_pair(ROUNDS, (900, 1000, 1100), (1000, 1200, 1100)))
    tcp = s["tcp_pair"]
    assert tcp["table"] == {"tcp_new_p50_us": 840, "tcp_cps": 1100}  # (750, 840, 850); (1000, 1200, 1100)
    assert tcp["ratio_l4"]["new_p50_us"] == pytest.approx(500 / 840)  # L4 added: (500, 500, 450)
    assert tcp["ratio_l4"]["cps"] == pytest.approx(900 / 1100)
    assert s["ratio"]["l4"]["new_p50_us"] == pytest.approx(500 / 990)  # the HTTP pair's, unchanged
    lines = meshreport.placement_lines("cross", s)
    assert len(lines) == 2 + len(meshreport.FIGURES) + 3 + len(meshreport.TCP_FIGURES)
    assert lines[-3].split() == ["FIGURE", "DIRECT", "NODEAGENT", "L4", "ENVOY", "TCP", "PAIR"]
    assert lines[-2] == (f"{'p50 latency, new connection per request (us)':<46}{'160':>18}{'+500 x0.60':>18}"
                         f"{'+840':>18}")
    assert lines[-1].endswith(f"{'5000':>18}{'900 x0.82':>18}{'1100':>18}")
    assert "tcp_pair" not in meshreport.summarize(ROUNDS)  # rounds of a run before it: no such rows


def test_uneven_rounds_are_refused():
    rounds = {k: list(v) for k, v in ROUNDS.items()}
    rounds["l7"] = rounds["l7"][:2]
    with pytest.raises(ValueError, match="same number of rounds"):
        meshreport.summarize(rounds)


def test_placement_table_text():
    lines = meshreport.placement_lines("cross", meshreport.summarize(ROUNDS))
    assert lines[0] == "cross-node: client pod on node1, server pod on node2"
    assert lines[1].split() == ["FIGURE", "DIRECT", "NODEAGENT", "L4", "NODEAGENT", "L7", "L7", "SERVER", "ONLY",
                                "ENVOY", "SIDECARS"]
    assert lines[2] == (f"{'p50 latency, 1 keep-alive connection (us)':<46}{'110':>18}{'+200 x0.67':>18}"
                        f"{'+800 x2.67':>18}{'+400 x1.33':>18}{'+300':>18}")
    assert lines[7].endswith(f"{'10.00':>18}{'2.00 x0.50':>18}{'1.00 x0.25':>18}{'1.60 x0.40':>18}{'4.00':>18}")
    assert lines[8].endswith(f"{'-':>18}{'110.0 x0.69':>18}{'400.0 x2.50':>18}{'150.0 x0.94':>18}{'160.0':>18}")
    assert len(lines) == 2 + len(meshreport.FIGURES)


def test_memory_per_node_against_sidecars():
    mib = meshreport.MIB
    def node(agent, waypoint):
        return {"agent": agent * mib, "waypoint": waypoint * mib}

    samples = {1: {"node1": node(100, 60), "node2": node(120, 60)},
               10: {"node1": node(110, 62), "node2": node(130, 62)}}
    rss = meshreport.rss_summary(samples, {"plain/client": 40 * mib, "plain/server": 50 * mib})
    assert rss["sidecar_mib"] == 45
    assert rss["pods"]["1"] == {"nodes": {"node1": {"agent": 100, "waypoint": 60},
                                          "node2": {"agent": 120, "waypoint": 60}},
                                "agent_mib": 110, "waypoint_mib": 60, "nodeagent_mib": 170, "sidecars_mib": 45,
                                "ratio": 170 / 45}
    assert rss["pods"]["10"]["sidecars_mib"] == 450 and rss["pods"]["10"]["ratio"] == 182 / 450
    lines = meshreport.rss_lines(rss)
    assert lines[2].split() == ["1", "110.0", "60.0", "170.0", "45.0", "x3.78"]
    assert lines[3].split() == ["10", "120.0", "62.0", "182.0", "450.0", "x0.40"]


# --- chart --------------------------------------------------------------------------------------
def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB rows without filter bytes) of a PNG `chart.png` wrote."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        length, kind = struct.unpack("!I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack("!I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack("!IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 3 * width + 1
    assert len(raw) == stride * height and all(raw[y * stride] == 0 for y in range(height))
    return width, height, b"".join(raw[y * stride + 1:(y + 1) * stride] for y in range(height))


def test_png_round_trip_of_a_canvas():
    c = chart.Canvas(7, 5)
    c.rect(2, 1, 3, 2, (10, 20, 30))
    width, height, pixels = decode_png(chart.png(c))
    assert (width, height) == (7, 5)
    coloured = {(i // 3 % 7, i // 3 // 7) for i in range(0, len(pixels), 3) if pixels[i:i + 3] == bytes((10, 20, 30))}
    assert coloured == {(x, y) for x in (2, 3, 4) for y in (1, 2)}


def test_text_uses_the_font():
    c = chart.Canvas(20, 10)
    end = c.text(0, 0, "1", scale=1)
    assert end == 6
    assert [c.pixel(x, 0) for x in range(5)] == [chart.WHITE, chart.WHITE, chart.BLACK, chart.WHITE, chart.WHITE]


def _result() -> dict:
    summary = meshreport.summarize(ROUNDS)
    mib = meshreport.MIB
    rss = meshreport.rss_summary({1: {"node1": {"agent": 100 * mib, "waypoint": 60 * mib},
                                      "node2": {"agent": 100 * mib, "waypoint": 60 * mib}}}, {"plain/client": 40 * mib})
    return {"rounds": 3, "placements": {"cross": summary, "same": summary}, "rss": rss}


def test_chart_bars_have_the_ratio_lengths():
    width, height, pixels = decode_png(chart.render(_result()))
    assert width == chart.WIDTH

    def extents(colour):
        """Per pixel row holding `colour`: from its first to its last such pixel (the dashed
        anchor line may cross a bar, not extend it)."""
        rows = []
        for y in range(height):
            row = pixels[3 * width * y:3 * width * (y + 1)]
            xs = [x for x in range(width) if row[3 * x:3 * x + 3] == bytes(colour)]
            if xs:
                rows.append(xs[-1] - xs[0] + 1)
        return rows

    # cross and same: 7 figures each, every bar BAR_H rows high, plus the legend square (14 rows of 14)
    for mesh_setup in meshreport.MESHES:
        bars = extents(chart.COLOURS[mesh_setup])
        expected = [chart.bar_length(meshreport.summarize(ROUNDS)["ratio"][mesh_setup][f.key])
                    for f in meshreport.FIGURES]
        assert sorted(bars) == sorted([14] * 14 + expected * 2 * chart.BAR_H), mesh_setup
    assert extents(chart.COLOURS["rss"]) == [chart.bar_length(160 / 40)] * chart.BAR_H


def test_a_bar_beyond_the_axis_stops_at_its_end():
    assert chart.bar_length(1.0) == chart.BAR_W / chart.AXIS_MAX
    assert chart.bar_length(25.0) == chart.BAR_W


# --- labs, targets, paths ---------------------------------------------------------------------
def test_main_lab_is_a_valid_lab_file():
    desired = spec.load(parse_documents(meshlab.main_lab(sidecars.app_argv(8080)), "bench-mesh.yaml"))
    assert sorted(desired.pods) == ["mesh/client", "mesh/local", "mesh/local7", "mesh/server", "mesh/server7",
                                    "plain/client", "plain/local", "plain/server"]
    nodes = {k: p.node for k, p in desired.pods.items()}
    assert {k for k, n in nodes.items() if n == "node2"} == {"mesh/server", "mesh/server7", "plain/server"}
    kinds = sorted(f"{o.kind} {o.namespace}/{o.name}" for o in desired.objects
                   if o.kind in ("Service", "VirtualService", "AuthorizationPolicy"))
    assert kinds == ["AuthorizationPolicy mesh/l7", "Service mesh/web", "Service mesh/web-local", "Service mesh/web7",
                     "Service mesh/web7-local", "Service mesh/web7s", "Service mesh/web7s-local",
                     "Service plain/web", "Service plain/web-local",
                     "VirtualService mesh/web7", "VirtualService mesh/web7-local"]


def test_memory_lab_and_fillers():
    desired = spec.load(parse_documents(meshlab.memory_lab(["sleep", "infinity"]) + "---\n"
                                        + meshlab.fillers_yaml(1, 10), "m.yaml"))
    per_node = {n: sorted(k for k, p in desired.pods.items() if p.node == n) for n in ("node1", "node2")}
    assert [len(v) for v in per_node.values()] == [10, 10]
    assert "mesh/fill1-9" in per_node["node1"] and "mesh/fill2-1" in per_node["node2"]
    accounts = {p.service_account for p in desired.pods.values()}
    assert len(accounts) == 20  # each pod its own identity


def test_targets():
    vips = {"plain/web": "10.96.0.10", "plain/web-local": "10.96.0.11", "mesh/web": "10.96.0.12",
            "mesh/web-local": "10.96.0.13", "mesh/web7": "10.96.0.14", "mesh/web7-local": "10.96.0.15",
            "mesh/web7s": "10.96.0.16", "mesh/web7s-local": "10.96.0.17"}
    t = {(p, s): meshlab.target(p, s, vips) for p in ("cross", "same") for s in meshreport.SETUPS}
    assert t["cross", "direct"] == meshlab.Target("plain/client", "http://10.96.0.10:8080/", ("10.96.0.10", 5201),
                                                  "plain/server")
    assert t["same", "l4"] == meshlab.Target("mesh/client", "http://10.96.0.13:8080/", ("10.96.0.13", 5201),
                                             "mesh/local")
    assert t["cross", "l7"] == meshlab.Target("mesh/client", "http://10.96.0.14:8080/", ("10.96.0.14", 5201),
                                              "mesh/server7")
    assert t["same", "l7s"] == meshlab.Target("mesh/client", "http://10.96.0.17:8080/", ("10.96.0.17", 5201),
                                              "mesh/local7")
    assert t["same", "envoy"] == meshlab.Target("plain/client", "http://127.0.0.1:15002/", ("127.0.0.1", 15012),
                                                "plain/local", "http://127.0.0.1:15022/")
    assert t["cross", "envoy"].tcp_url == "http://127.0.0.1:15021/"
    assert all(t[key].tcp_url is None for key in t if key[1] != "envoy")


def _delta(captured=0, wp_out=0, wp_in_node2=0, wp_in_node1=0, tls_server=0, tls_local=0, rq_server=0,
           rq_local=0):
    return {"node1/captured": captured, "node1/waypoint_out": wp_out, "node2/waypoint_in": wp_in_node2,
            "node1/waypoint_in": wp_in_node1, "node2/captured": 0, "node2/waypoint_out": 0,
            "plain/server/tls13": tls_server, "plain/local/tls13": tls_local, "plain/client/tls13": 0,
            "plain/server/http_in": rq_server, "plain/local/http_in": rq_local, "plain/client/http_in": 0}


@pytest.mark.parametrize("placement, setup, delta", [
    ("cross", "direct", _delta()),
    ("cross", "l4", _delta(captured=40)),
    ("cross", "l7", _delta(captured=40, wp_out=40)),  # one waypoint per request: the client node's
    ("same", "l7", _delta(captured=40, wp_out=40)),
    ("cross", "l7s", _delta(captured=40, wp_in_node2=3)),
    ("same", "l7s", _delta(captured=40, wp_in_node1=3)),
    ("cross", "envoy", _delta(rq_server=20)),  # pooled: the HTTP pair makes no new handshake
    ("same", "envoy", _delta(rq_local=20)),
])
def test_paths_taken(placement, setup, delta):
    path = mesh.check_path(placement, setup, delta)
    assert path["captured"] == delta["node1/captured"]


@pytest.mark.parametrize("placement, setup, delta", [
    ("cross", "direct", _delta(captured=1)),  # the unmeshed client was captured
    ("cross", "l4", _delta(captured=40, wp_out=2)),  # L4 traffic went through a waypoint
    ("cross", "l4", _delta()),  # not captured at all
    ("cross", "l7", _delta(captured=40, wp_out=40, wp_in_node2=3)),  # the server's waypoint too: not one a request
    ("cross", "l7", _delta(captured=40, wp_in_node2=3)),  # the server's alone
    ("cross", "l7s", _delta(captured=40, wp_out=40, wp_in_node2=3)),  # through the client's waypoint too
    ("cross", "l7s", _delta(captured=40)),  # through no waypoint
    ("cross", "direct", _delta(rq_server=1)),  # through the sidecars
    ("cross", "envoy", _delta(rq_local=20)),  # the other sidecar took it
    ("cross", "envoy", _delta(tls_server=20)),  # handshakes, no request: not the HTTP pair
    ("same", "envoy", _delta(captured=3, rq_local=20)),
])
def test_paths_not_taken(placement, setup, delta):
    with pytest.raises(NodeagentError, match=f"the {setup} set-up"):
        mesh.check_path(placement, setup, delta)


@pytest.mark.parametrize("placement, setup, delta, ok", [
    ("cross", "direct", _delta(), True),
    ("cross", "direct", _delta(captured=2), False),
    ("cross", "l4", _delta(captured=2), True),
    ("cross", "l4", _delta(captured=2, wp_out=1), False),  # the stream went through a waypoint
    ("cross", "l4", _delta(), False),  # not captured
    ("cross", "l7", _delta(captured=2, wp_out=2), True),  # iperf3's port: the client waypoint's tcp_proxy only
    ("cross", "l7", _delta(captured=2), False),
    ("same", "l7s", _delta(captured=2), True),
    ("cross", "envoy", _delta(tls_server=2), True),
    ("cross", "envoy", _delta(tls_local=2), False),  # the other sidecar took it
    ("same", "envoy", _delta(captured=1, tls_local=2), False),
])
def test_stream_paths(placement, setup, delta, ok):
    if ok:
        mesh.check_stream_path(placement, setup, delta)
    else:
        with pytest.raises(NodeagentError, match=f"the {setup} set-up's stream \\({placement}\\)"):
            mesh.check_stream_path(placement, setup, delta)


def test_rotation_options_and_chunks():
    assert mesh.rotated(("a", "b", "c", "d"), 1) == ["b", "c", "d", "a"]
    assert mesh.rotated(("a", "b", "c", "d"), 5) == ["b", "c", "d", "a"]
    assert mesh.parse_pods("50,1,10,10") == (1, 10, 50)
    with pytest.raises(ConfigError, match="--pods"):
        mesh.parse_pods("1,x")
    for bad in (mesh.Options(rounds=0), mesh.Options(duration=0.5), mesh.Options(pods=(0, 10)), mesh.Options(pods=())):
        with pytest.raises(ConfigError):
            bad.check()


def test_cli_refuses_bad_options_before_anything_runs(capsys):
    assert main(["bench", "mesh", "--rounds", "0", "--json", "", "--png", ""]) == 1
    assert "--rounds: 0 is out of range" in capsys.readouterr().err
    assert main(["bench", "mesh", "--pods", "1,500", "--json", "", "--png", ""]) == 1


# --- the anchor -------------------------------------------------------------------------------
@pytest.fixture
def ca_dir(tmp_path) -> Path:
    directory = tmp_path / "ca"
    cakeys.load_or_create(directory, "cluster.local", dt.datetime.now(dt.timezone.utc), logging.getLogger("test"))
    return directory


def test_sidecar_certificates_carry_the_spiffe_id_and_chain_to_the_root(ca_dir, tmp_path):
    tls = sidecars.issue(str(ca_dir), Identity("cluster.local", "plain", "server"), tmp_path / "tls")
    chain = x509.load_pem_x509_certificates(Path(tls.chain).read_bytes())
    root = x509.load_pem_x509_certificate(Path(tls.root).read_bytes())
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local/ns/plain/sa/server"]
    assert chain[-1] == root == x509.load_pem_x509_certificate((ca_dir / "root-cert.pem").read_bytes())
    chain[0].verify_directly_issued_by(root)
    assert oct(Path(tls.key).stat().st_mode & 0o777) == "0o600"


def _validate(config: dict, path: Path) -> subprocess.CompletedProcess:
    path.write_text(json.dumps(config))
    return subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path), "--disable-hot-restart",
                           "--log-level", "warning"], capture_output=True, text=True, timeout=60)


def test_envoy_accepts_the_sidecar_and_app_configs(ca_dir, tmp_path):
    client_tls = sidecars.issue(str(ca_dir), Identity("cluster.local", "plain", "client"), tmp_path / "c")
    server_tls = sidecars.issue(str(ca_dir), Identity("cluster.local", "plain", "server"), tmp_path / "s")
    targets = [sidecars.Target("cross", 15001, 15011, 15021, "10.244.2.2", "spiffe://cluster.local/ns/plain/sa/server"),
               sidecars.Target("same", 15002, 15012, 15022, "10.244.1.3", "spiffe://cluster.local/ns/plain/sa/local")]
    configs = {"client": sidecars.client_sidecar(str(tmp_path / "c.sock"), targets, client_tls),
               "server": sidecars.server_sidecar(str(tmp_path / "s.sock"), server_tls, "cluster.local", 8080, 5201),
               "app": sidecars.app_config(8080)}
    for name, config in configs.items():
        proc = _validate(config, tmp_path / f"{name}.json")
        assert proc.returncode == 0, f"{name}: {proc.stdout}{proc.stderr}"
    client = configs["client"]["static_resources"]
    assert [x["address"]["socket_address"]["port_value"] for x in client["listeners"]] == [
        15001, 15011, 15021, 15002, 15012, 15022]
    for cluster in client["clusters"][:3]:  # the HTTP, iperf3 and L4-anchor upstreams of the cross target
        tls = cluster["transport_socket"]["typed_config"]["common_tls_context"]
        assert tls["tls_params"] == {"tls_minimum_protocol_version": "TLSv1_3",
                                     "tls_maximum_protocol_version": "TLSv1_3"}
        assert tls["validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/plain/sa/server"}}]
    # the L4 anchor: tcp_proxy on both sides, the server's to the app's HTTP port, behind mutual TLS
    assert client["listeners"][2]["filter_chains"][0]["filters"][0]["typed_config"]["@type"] == sidecars.TCP_PROXY
    assert client["clusters"][2]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "socket_address": {"address": "10.244.2.2", "port_value": sidecars.SERVER_TCP_HTTP_PORT}}
    server = configs["server"]["static_resources"]
    for listener in server["listeners"]:
        assert listener["filter_chains"][0]["transport_socket"]["typed_config"]["require_client_certificate"] is True
    tcp_http = server["listeners"][2]
    assert tcp_http["address"]["socket_address"]["port_value"] == sidecars.SERVER_TCP_HTTP_PORT
    assert tcp_http["filter_chains"][0]["filters"][0]["typed_config"]["cluster"] == "app_http"
    assert [c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
        "port_value"] for c in server["clusters"] if c["name"] == "app_http"] == [8080]


def test_envoy_refuses_a_broken_sidecar_config(tmp_path):
    config = sidecars.app_config(8080)
    config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["route_config"][
        "virtual_hosts"][0]["routes"][0] = {"match": {"prefix": "/"}, "route": {"cluster": "nowhere"}}
    assert _validate(config, tmp_path / "bad.json").returncode != 0


def test_the_whole_text_report():
    rounds = json.loads(json.dumps(ROUNDS))
    for setup, cells in rounds.items():
        for i, cell in enumerate(cells):
            cell.update(errors=i, loadavg=1.5 + i, requests={}, path={})
    result = {**_result(), "lab": "bm1", "kernel": "6.1", "cpus": 2, "envoy_version": "1.40.0",
              "envoy_concurrency": 2, "code": "abc1234", "data_path": {"node1": "python", "node2": "python"},
              "duration_s": 5.0, "elapsed_s": 700.4, "loadavg_start": [0.7, 0.5, 0.4],
              "left_behind": []}
    result["placements"] = {p: {"rounds": rounds, **meshreport.summarize(rounds)} for p in ("cross", "same")}
    lines = mesh.render(result, "text").splitlines()
    assert lines[0] == ("nodeagent bench mesh: lab bm1, kernel 6.1, 2 CPUs, envoy 1.40.0 (--concurrency 2 for "
                        "waypoints and sidecars)")
    assert lines[1] == "nodeagent abc1234; the agents' data path: node1: python; node2: python"
    assert lines[2] == ("median of 3 interleaved rounds, 5 s per run, 700 s in all; the machine's load average "
                        "0.70 before, 1.50-3.50 during the runs")
    assert lines[5] == meshreport.L7_NOTE
    assert lines.index(meshreport.PLACEMENTS["same"]) == lines.index(meshreport.PLACEMENTS["cross"]) + 10
    assert lines[-2:] == ["wrk errors: 30 in all runs", "cleanup: nothing left behind"]  # (0+1+2) x 5 set-ups x 2
    assert json.loads(mesh.render(result, "json")) == json.loads(json.dumps(result))


def test_the_command_joins_the_cgroup_as_itself(tmp_path):
    """The pid written to cgroup.procs (here a plain file) is the command's own: sh execs it."""
    procs = tmp_path / "cgroup.procs"
    out = subprocess.run(["/bin/sh", "-c", mesh.JOIN_AND_EXEC, str(procs), "/bin/sh", "-c", "echo $$"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert procs.read_text().strip() == out.strip() and out.strip().isdigit()


def test_a_signal_stops_the_run_even_when_its_exception_was_swallowed():
    stop = mesh.Stop()
    before = signal.getsignal(signal.SIGTERM)
    with stop.installed():
        stop.check()  # nothing yet
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        except KeyboardInterrupt:
            pass  # swallowed, as an at-fork hook does
        with pytest.raises(KeyboardInterrupt, match=f"signal {signal.SIGTERM}"):
            stop.check()
    assert signal.getsignal(signal.SIGTERM) == before
