"""Sub-commands of the waypoint control plane: `nodeagent proxy-config` (what the xDS
server gives a node's Envoy, read back over ADS) and `nodeagent analyze` (Istio YAML
checked offline with the waypoint's own validation and translation)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Callable

from nodeagent.errors import ConfigError

DEFAULT_XDS_SOCKET = "/run/nodeagent/waypoint/xds.sock"
DEFAULT_ADMIN_SOCKET = "/run/nodeagent/agent.sock"  # the agent's (agent/config.py), named here: xds imports no agent


def register(sub: argparse._SubParsersAction, lab_socket: Callable[[str, str], str],
             lab_agent_socket: Callable[[str, str], str] | None = None,
             agent_status: Callable[[str, float], dict] | None = None) -> None:
    """`lab_socket(lab, node)`: a lab node's xDS socket, for `proxy-config --lab`;
    `lab_agent_socket(lab, node)` its agent's admin socket and `agent_status(socket,
    timeout)` the agent's status from it, for `secret` and a workload's view (handed in by
    the top-level command: xds imports neither the lab nor the agent)."""
    pc = sub.add_parser("proxy-config", help="show the Envoy config the agent's xDS server serves",
                        description="Connect to the xDS server as an Envoy would (ADS) and print what it "
                                    "sends for node id --node; with NAMESPACE/NAME only what applies to "
                                    "that workload's traffic. `secret` shows the agent's certificates. "
                                    "Everything is bounded by --timeout.")
    pc.add_argument("kind", choices=("listeners", "routes", "clusters", "endpoints", "secret"))
    pc.add_argument("workload", nargs="?", metavar="NAMESPACE/NAME",
                    help="only what applies to this workload's traffic: the pod NAME, or the pods NAME-* of a "
                         "Deployment, among the pods enrolled on the node (its agent's status says which)")
    pc.add_argument("--xds-socket",
                    help=f"the agent's xDS unix socket (default {DEFAULT_XDS_SOCKET}), or HOST:PORT")
    pc.add_argument("--admin-socket", help=f"the agent's admin socket, for secret and NAMESPACE/NAME (default "
                                           f"{DEFAULT_ADMIN_SOCKET})")
    pc.add_argument("--node", help="the node id asked for: the xDS server answers only for the node its agent "
                                   "serves (default: $NODE_NAME or the host name); with --lab it also picks "
                                   "that lab node's sockets")
    pc.add_argument("--lab", help="read the waypoint of lab node --node in this lab (e.g. nalab)")
    pc.add_argument("--output", "-o", choices=("short", "json"), default="short")
    pc.add_argument("--timeout", type=float, default=10.0,
                    help="seconds for everything: connecting, the answer, the agent's status (default 10)")
    pc.set_defaults(func=_proxy_config, lab_socket=lab_socket, lab_agent_socket=lab_agent_socket,
                    agent_status=agent_status, one_shot_grpc=True)  # the process ends without gRPC's shutdown

    an = sub.add_parser("analyze", help="check Istio YAML offline (a verdict per resource)",
                        description="Validate Istio resources as the agents do: every problem of a "
                                    "resource with its field path, kinds the mesh does not implement, "
                                    "and (when the input has Services or workloads) references to hosts "
                                    "and subsets that do not exist. Prints each resource's problems or "
                                    "'ok'. Exit 1 if any error (or warning, with --failure-threshold "
                                    "warning).")
    an.add_argument("-f", "--filename", action="extend", nargs="+", required=True, metavar="FILE",
                    help="YAML files, directories (their *.yaml, *.yml, *.json, sorted) or - for standard input "
                         "(-f a.yaml dir/ -, or -f repeated)")
    an.add_argument("-R", "--recursive", action="store_true",
                    help="also read the files in the subdirectories of -f directories (as kubectl -R)")
    an.add_argument("--failure-threshold", choices=("error", "warning"), default="error")
    an.set_defaults(func=_analyze)


def _proxy_config(args: argparse.Namespace) -> int:
    from nodeagent.xds import client, proxyconfig, workloadview

    if args.timeout <= 0:
        raise ConfigError("--timeout", f"{args.timeout} must be positive")
    node = args.node or os.environ.get("NODE_NAME") or socket.gethostname()
    deadline = time.monotonic() + args.timeout
    if args.kind == "secret":
        if args.workload:
            raise ConfigError("NAMESPACE/NAME", "secret shows every certificate the agent holds",
                              "drop NAMESPACE/NAME")
        status = _agent_status(args, args.timeout)
        sys.stdout.write(proxyconfig.render_secrets(status.get("identity", {}), args.output, time.time()))
        return 0
    pods = None
    if args.workload:
        enrolled = [(p["namespace"], p["name"]) for p in _agent_status(args, args.timeout).get("pods", [])]
        pods = workloadview.pods_of(args.workload, enrolled)
        if not pods:
            raise ConfigError(args.workload, f"no pod of this workload is enrolled on node {node}, so none of its "
                              "traffic goes through this waypoint", "give the node it runs on with --node "
                              "(see nodeagent lab status, or kubectl get pods -o wide)")
    resources = client.fetch(xds_socket(args.xds_socket, args.lab, args.node, args.lab_socket), node,
                             timeout=args.timeout, deadline=deadline)
    if pods is not None:
        resources = workloadview.narrow(resources, pods)
    kind = proxyconfig.KINDS[args.kind]
    sys.stdout.write(proxyconfig.render(args.kind, resources.get(kind, {}), args.output))
    return 0


def _agent_status(args: argparse.Namespace, timeout: float) -> dict:
    """The agent's status from --admin-socket, or the lab node's, or the default socket."""
    if args.agent_status is None:
        raise ConfigError("proxy-config", "the agent's status cannot be read from this command")
    if args.lab is not None:
        if args.admin_socket or not args.node:
            raise ConfigError("--lab", "names the lab of --node instead of --admin-socket",
                              "give --lab with --node NODE, or --admin-socket alone")
        path = args.lab_agent_socket(args.lab, args.node)
    else:
        path = args.admin_socket or DEFAULT_ADMIN_SOCKET
    return args.agent_status(path, timeout)


def xds_socket(given: str | None, lab: str | None, node: str | None, lab_socket: Callable[[str, str], str]) -> str:
    """--xds-socket, or the socket of lab `lab`'s node `node` (`lab_socket`, the lab's
    naming, handed in by the top-level command), or the default."""
    if lab is None:
        return given or DEFAULT_XDS_SOCKET
    if given or not node:
        raise ConfigError("--lab", "names the lab of --node instead of --xds-socket",
                          "give --lab with --node NODE, or --xds-socket alone")
    return lab_socket(lab, node)


def _analyze(args: argparse.Namespace) -> int:
    from nodeagent.xds.analyze import analyze_files

    analysis = analyze_files(args.filename, recursive=args.recursive)
    for line in analysis.lines():
        print(line)
    if not analysis.translated:
        print("note: the input has no Service, Pod or workload, so references to hosts and subsets were "
              "not checked", file=sys.stderr)
    failing = analysis.errors if args.failure_threshold == "error" else analysis.errors + analysis.warnings
    if not analysis.errors and not analysis.warnings:
        print(f"no problems found in {analysis.resources} Istio resource(s)", file=sys.stderr)
    return 1 if failing else 0
