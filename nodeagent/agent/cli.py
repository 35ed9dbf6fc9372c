"""Sub-commands of the node agent: `nodeagent run` (the daemon), `nodeagent uninstall`
(remove the capture agents keep across restarts), `nodeagent status`
(what a running agent is doing), `nodeagent bench capture` (enrolment latency and
per-request overhead on throwaway pods) and `nodeagent bench tunnel` (HBONE against a
direct connection on a lab of its own)."""

from __future__ import annotations

import argparse
import sys

from nodeagent.agent import config
from nodeagent.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the node agent (capture, in-pod listeners, relays)",
                         description="Run the node agent until SIGTERM/SIGINT. Every flag has a "
                                     "NODEAGENT_* environment variable; the flag wins.")
    config.add_arguments(run)
    run.set_defaults(func=_run)

    uninstall = sub.add_parser("uninstall", help="remove the capture agents leave in place when they stop (root)",
                               description="Detach the capture programs from the cgroup and unpin the maps "
                                           "and links agents keep across restarts (keep-on-exit). Run it on a "
                                           "node taken out of the mesh, after its agent stopped; meshed pods "
                                           "then talk directly again.")
    config.add_uninstall_arguments(uninstall)
    uninstall.set_defaults(func=_uninstall)

    status = sub.add_parser("status", help="show what a node agent is doing")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--socket", help="the agent's admin socket (default /run/nodeagent/agent.sock)")
    where.add_argument("--node", help="a lab node: read that node's agent socket")
    status.add_argument("--lab", help="lab name with --node (default: $NODEAGENT_LAB or nalab)")
    status.add_argument("--output", "-o", choices=("text", "json"), default="text")
    status.set_defaults(func=_status)

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


def _run(args: argparse.Namespace) -> int:
    from nodeagent.agent import daemon

    return daemon.run(config.load(args))


def _uninstall(args: argparse.Namespace) -> int:
    from nodeagent.capture.loader import CaptureLoader

    cgroup, bpffs = config.load_uninstall(args)
    removed = CaptureLoader(cgroup=str(cgroup), pin_dir=str(bpffs)).uninstall()
    print("\n".join(removed) if removed else f"nothing to remove: no capture on {cgroup}, nothing pinned in {bpffs}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from nodeagent.agent import admin, status

    if args.lab and not args.node:
        raise ConfigError("--lab", "names the lab of --node", "add --node NODE, or drop --lab")
    state = admin.fetch_status(status.socket_path(args.socket, args.node, args.lab))
    sys.stdout.write(status.render(state, args.output))
    return 0


def _bench_tunnel(args: argparse.Namespace) -> int:
    from nodeagent.agent import bench_tunnel

    result = bench_tunnel.run_tunnel(args.requests, args.size, args.megabytes, args.name)
    sys.stdout.write(bench_tunnel.render(result, args.output))
    return 0


def _bench_capture(args: argparse.Namespace) -> int:
    from nodeagent.agent import bench

    result = bench.run_capture(pods=args.pods, requests=args.requests, name=args.name)
    sys.stdout.write(bench.render(result, args.output))
    return 0
