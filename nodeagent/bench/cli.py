"""`nodeagent bench`: benchmarks on throwaway pods and labs (root). `bench capture`
measures enrolment latency and per-request capture overhead on throwaway pods;
`bench tunnel` compares HBONE with a direct connection on a lab of its own.
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



def _bench_tunnel(args: argparse.Namespace) -> int:
    from nodeagent.bench import tunnel as bench_tunnel

    result = bench_tunnel.run_tunnel(args.requests, args.size, args.megabytes, args.name)
    sys.stdout.write(bench_tunnel.render(result, args.output))
    return 0


def _bench_capture(args: argparse.Namespace) -> int:
    from nodeagent.bench import capture as bench

    result = bench.run_capture(pods=args.pods, requests=args.requests, name=args.name)
    sys.stdout.write(bench.render(result, args.output))
    return 0
