"""`nodeagent bench`: benchmarks on throwaway pods and labs (root). `bench capture`
measures enrolment latency and per-request capture overhead on throwaway pods;
`bench tunnel` compares HBONE with a direct connection on a lab of its own; `bench mesh`
measures direct, nodeagent L4, nodeagent L7 and an Envoy sidecar pair in one run.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks on throwaway pods (root)")
    which = bench.add_subparsers(dest="bench", metavar="BENCH", required=True)
    capture = which.add_parser("capture", help="enrolment latency and per-request capture overhead")
    capture.add_argument("--pods", type=int, default=50, help="pods enrolled by one label change")
    capture.add_argument("--requests", type=int, default=1000, help="requests per latency series")
    capture.add_argument("--name", help="prefix of every netns, cgroup and pin the bench makes "
                                         "(default bench-<random>)")
    capture.add_argument("--output", "-o", choices=("text", "json"), default="text")
    capture.set_defaults(func=_bench_capture)
    tunnel = which.add_parser("tunnel", help="HBONE vs direct between two lab nodes: latency and throughput")
    tunnel.add_argument("--requests", type=int, default=1000, help="round trips on one connection")
    tunnel.add_argument("--size", type=int, default=64, help="bytes per request and per response")
    tunnel.add_argument("--megabytes", type=int, default=128, help="MiB sent on one connection")
    tunnel.add_argument("--name", help="name of the lab the bench brings up and down (default bt<random>)")
    tunnel.add_argument("--output", "-o", choices=("text", "json"), default="text")
    tunnel.set_defaults(func=_bench_tunnel)
    mesh = which.add_parser("mesh", help="direct, nodeagent L4/L7 and an Envoy sidecar pair: latency, rates, "
                                         "throughput, CPU, memory (takes minutes)")
    mesh.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are their medians")
    mesh.add_argument("--duration", type=float, help="seconds per wrk or iperf3 run (default 5; 1 with --quick)")
    mesh.add_argument("--pods", default="1,10,50", help="meshed pods per node for the memory figures")
    mesh.add_argument("--name", help="name of the lab the bench brings up and down (default bm<random>)")
    mesh.add_argument("--output", "-o", choices=("text", "json"), default="text", help="what goes to stdout")
    mesh.add_argument("--json", metavar="PATH", default="bench-mesh.json", help="where the JSON result goes "
                      "(default %(default)s; '' for nowhere)")
    mesh.add_argument("--png", metavar="PATH", default="bench-mesh.png", help="where the chart goes "
                      "(default %(default)s; '' for nowhere)")
    mesh.add_argument("--quick", action="store_true", help="1 s runs and warm-ups (for tests)")
    mesh.set_defaults(func=_bench_mesh)



def _bench_tunnel(args: argparse.Namespace) -> int:
    from nodeagent.bench import tunnel as bench_tunnel

    result = bench_tunnel.run_tunnel(args.requests, args.size, args.megabytes, args.name)
    sys.stdout.write(bench_tunnel.render(result, args.output))
    return 0


def _bench_mesh(args: argparse.Namespace) -> int:
    from nodeagent.bench import chart, mesh

    duration = args.duration if args.duration is not None else 1.0 if args.quick else 5.0
    options = mesh.Options(rounds=args.rounds, duration=duration, pods=mesh.parse_pods(args.pods), name=args.name,
                           quick=args.quick)
    result = mesh.run_mesh(options)
    if args.json:
        with open(args.json, "w") as f:
            f.write(mesh.render(result, "json"))
    if args.png:
        with open(args.png, "wb") as f:
            f.write(chart.render(result))
    written = [p for p in (args.json, args.png) if p]
    if written:
        print(f"wrote {', '.join(written)}", file=sys.stderr)
    sys.stdout.write(mesh.render(result, args.output))
    return 0


def _bench_capture(args: argparse.Namespace) -> int:
    from nodeagent.bench import capture as bench

    result = bench.run_capture(pods=args.pods, requests=args.requests, name=args.name)
    sys.stdout.write(bench.render(result, args.output))
    return 0
