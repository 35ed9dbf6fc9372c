"""What one request costs the agent in request metrics: the waypoint's access-log lines, read.

Usage: python -m nodeagent.bench.accesslog [--lines 200000] [--rounds 5] [-o json]

Makes --lines access-log lines as the waypoint's Envoy writes them for client-side
requests (nodeagent/xds/logline.py; tests/unit/test_xds_accesslog.py checks their shape
against a real Envoy's): 1 in 10 a POST with a content-type, 1 in 50 a 503 after retries
(UF,URX), 1 in 100 a gRPC call, from two source pods to two endpoints, so a run has ~30
label sets, as steady traffic between a few pods has. Then, in CPU µs per line (process
time, best of --rounds):
  split               logline.split and logline.measured of every line
  labels uncached     the label part parsed, request_labels and the series looked up, per
                      line: what a line with a label set not seen before costs
  consume             RequestMetrics.consume, the agent's whole path (cached label sets)
and through the FIFO: the lines written by a child process into an AccessLogPipe in
chunks of 64 KiB (Envoy's flush size), the reading process's CPU per line.

Caveats: CPU time of this process, so other load on the machine adds little but caches
and frequency scaling still vary; compare figures of one run.
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
from typing import Callable

from prometheus_client import CollectorRegistry

from nodeagent.kube.objects import parse_documents
from nodeagent.model import Model
from nodeagent.xds import logline
from nodeagent.xds.accesslog import AccessLogPipe, RequestMetrics

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
FLUSH = 64 * 1024  # what Envoy's flush thread writes at once under load


def world() -> Model:
    return Model.build(parse_documents(WORLD, "bench-accesslog.yaml"))


def line(i: int) -> bytes:
    """The i-th client-side line, as Envoy writes it (compact JSON, keys sorted, absent
    values null)."""
    workload, source_ip = SOURCES[i % len(SOURCES)]
    subset, endpoint = ENDPOINTS[(i // 2) % len(ENDPOINTS)]
    failed, grpc, post = i % 50 == 49, i % 100 == 17, i % 10 == 3
    principal = f"spiffe://cluster.local/ns/shop/sa/{workload.split('/')[1].rsplit('-', 1)[0]}"
    labels = {"c": f"outbound|9080|{subset}|{REVIEWS}", "ct": "application/grpc" if grpc else
              "application/json" if post else None, "d": "10.96.1.10", "dp": 9080, "f": "UF,URX" if failed else "-",
              "gh": None, "gt": "0" if grpc else None, "log": "outbound", "p": principal, "r": 503 if failed else 200,
              "s": source_ip, "u": f"envoy://nodeagent_upstream/{endpoint}", "w": workload}
    measures = f"{i % 7} {121 + (40 if post else 0)} {64 if post else 0} 122 {53 + i % 13}"
    return json.dumps({"l": labels, "m": measures}, sort_keys=True, separators=(",", ":")).encode()


def cpu_us_per(work: Callable[[], object], count: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return best * 1e6 / count


def reading(lines: list[bytes], rounds: int) -> dict[str, float]:
    model = world()

    def split_all() -> None:
        for item in lines:
            logline.measured(logline.split(item)[1])

    def labels_uncached() -> None:
        metrics = RequestMetrics(CollectorRegistry(), lambda: model)
        for item in lines:
            metrics._series_of(logline.split(item)[0], model)

    def consume() -> None:
        RequestMetrics(CollectorRegistry(), lambda: model).consume(lines)

    return {"split": cpu_us_per(split_all, len(lines), rounds),
            "labels uncached": cpu_us_per(labels_uncached, len(lines), rounds),
            "consume": cpu_us_per(consume, len(lines), rounds)}


def through_fifo(lines: list[bytes], rounds: int) -> float:
    """CPU µs per line of the reading process, the lines written by a child process."""
    model, best = world(), float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        feed = os.path.join(tmp, "lines")
        with open(feed, "wb") as f:
            f.write(b"".join(item + b"\n" for item in lines))
        for _ in range(rounds):
            metrics = RequestMetrics(CollectorRegistry(), lambda: model)
            pipe = AccessLogPipe(os.path.join(tmp, "access-log.fifo"), metrics).open()
            try:
                before = resource.getrusage(resource.RUSAGE_SELF)
                subprocess.run([sys.executable, "-m", "nodeagent.bench.accesslog", "--write", pipe.path, feed],
                               check=True, timeout=300)
                deadline = time.monotonic() + 60
                while pipe.lines < len(lines):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the pipe read {pipe.lines} of {len(lines)} lines")
                    time.sleep(0.01)
                after = resource.getrusage(resource.RUSAGE_SELF)
            finally:
                pipe.close()
            used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            best = min(best, used)
    return best * 1e6 / len(lines)


def write(path: str, feed: str) -> None:
    """The child: the feed's bytes into the FIFO in FLUSH-sized writes, as Envoy's flush thread."""
    with open(feed, "rb") as f:
        data = f.read()
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:FLUSH]):]
    finally:
        os.close(fd)


def run(count: int, rounds: int) -> dict:
    lines = [line(i) for i in range(count)]
    return {"lines": count, "bytes_per_line": sum(map(len, lines)) / count + 1,
            "cpu_us_per_line": {**reading(lines, rounds), "through the FIFO": through_fifo(lines, rounds)}}


def render(result: dict, output: str) -> str:
    if output == "json":
        return json.dumps(result, indent=2, sort_keys=True) + "\n"
    out = [f"access-log bench: {result['lines']} lines shaped as the waypoint's Envoy writes them, "
           f"~{result['bytes_per_line']:.0f} B each"]
    rows = result["cpu_us_per_line"]
    width = max(map(len, rows)) + 2
    out += [f"  {name:<{width}}{value:>8.2f} µs CPU per line" for name, value in rows.items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.bench.accesslog",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=200000, help="access-log lines per run")
    parser.add_argument("--rounds", type=int, default=5, help="runs per figure; the best is printed")
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text")
    parser.add_argument("--write", nargs=2, metavar=("FIFO", "FEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write:
        write(*args.write)
        return 0
    if args.lines < 1 or args.rounds < 1:
        parser.error("--lines and --rounds must be at least 1")
    sys.stdout.write(render(run(args.lines, args.rounds), args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
