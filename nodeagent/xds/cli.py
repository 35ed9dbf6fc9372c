"""Sub-commands of the waypoint control plane: `nodeagent proxy-config` (what the xDS
server gives a node's Envoy, read back over ADS) and `nodeagent analyze` (Istio YAML
checked offline with the waypoint's own validation and translation)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Callable

from nodeagent.errors import ConfigError

DEFAULT_XDS_SOCKET = "/run/nodeagent/waypoint/xds.sock"


def register(sub: argparse._SubParsersAction, lab_socket: Callable[[str, str], str]) -> None:
    """`lab_socket(lab, node)`: a lab node's xDS socket, for `proxy-config --lab`."""
    pc = sub.add_parser("proxy-config", help="show the Envoy config the agent's xDS server serves",
                        description="Connect to the xDS server as an Envoy would (ADS) and print "
                                    "what it sends for the node.")
    pc.add_argument("kind", choices=("listeners", "routes", "clusters", "endpoints"))
    pc.add_argument("--xds-socket",
                    help=f"the agent's xDS unix socket (default {DEFAULT_XDS_SOCKET}), or HOST:PORT")
    pc.add_argument("--node", help="node id to ask for (default: $NODE_NAME or the host name)")
    pc.add_argument("--lab", help="read the waypoint of lab node --node in this lab (e.g. nalab)")
    pc.add_argument("--output", "-o", choices=("short", "json"), default="short")
    pc.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server")
    pc.set_defaults(func=_proxy_config, lab_socket=lab_socket)

    an = sub.add_parser("analyze", help="check Istio YAML offline (a verdict per resource)",
                        description="Validate Istio resources as the agents do: every problem of a "
                                    "resource with its field path, kinds the mesh does not implement, "
                                    "and (when the input has Services or workloads) references to hosts "
                                    "and subsets that do not exist. Prints each resource's problems or "
                                    "'ok'. Exit 1 if any error (or warning, with --failure-threshold "
                                    "warning).")
    an.add_argument("-f", "--filename", action="extend", nargs="+", required=True, metavar="FILE",
                    help="YAML files, directories (their *.yaml, *.yml, *.json) or - for standard input "
                         "(-f a.yaml dir/ -, or -f repeated)")
    an.add_argument("--failure-threshold", choices=("error", "warning"), default="error")
    an.set_defaults(func=_analyze)


def _proxy_config(args: argparse.Namespace) -> int:
    from nodeagent.xds import client, proxyconfig

    if args.timeout <= 0:
        raise ConfigError("--timeout", f"{args.timeout} must be positive")
    node = args.node or os.environ.get("NODE_NAME") or socket.gethostname()
    resources = client.fetch(xds_socket(args.xds_socket, args.lab, args.node, args.lab_socket), node, timeout=args.timeout)
    kind = proxyconfig.KINDS[args.kind]
    sys.stdout.write(proxyconfig.render(args.kind, resources.get(kind, {}), args.output))
    return 0


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

    analysis = analyze_files(args.filename)
    for line in analysis.lines():
        print(line)
    if not analysis.translated:
        print("note: the input has no Service, Pod or workload, so references to hosts and subsets were "
              "not checked", file=sys.stderr)
    failing = analysis.errors if args.failure_threshold == "error" else analysis.errors + analysis.warnings
    if not analysis.errors and not analysis.warnings:
        print(f"no problems found in {analysis.resources} Istio resource(s)", file=sys.stderr)
    return 1 if failing else 0
