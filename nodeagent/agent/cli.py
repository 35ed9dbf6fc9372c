"""Sub-commands of the node agent: `nodeagent run` (the daemon), `nodeagent uninstall`
(remove the capture agents keep across restarts), `nodeagent status`
(what a running agent is doing; `--kube`: every node's agent from the API, kubestatus.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from nodeagent.agent import config, kubestatus
from nodeagent.errors import ConfigError


def register(sub: argparse._SubParsersAction, lab_socket: Callable[[str | None, str], str]) -> None:
    """`lab_socket(lab, node)`: a lab node's agent socket, for `status --node`."""
    run = sub.add_parser("run", help="run the node agent (capture, in-pod listeners, relays)",
                         description="Run the node agent until SIGTERM/SIGINT. Every flag has a "
                                     "NODEAGENT_* environment variable; the flag wins.")
    config.add_arguments(run)
    run.set_defaults(func=_run)

    uninstall = sub.add_parser("uninstall", help="remove the capture agents leave in place when they stop (root)",
                               description="Detach the capture programs from the cgroup and unpin the maps "
                                           "and links agents keep across restarts (--on-exit=keep, or owner "
                                           "when the agent could not tell an uninstall). Run it on a node "
                                           "taken out of the mesh, after its agent stopped; meshed pods then "
                                           "talk directly again.")
    config.add_uninstall_arguments(uninstall)
    uninstall.set_defaults(func=_uninstall)

    status = sub.add_parser("status", help="show what a node agent is doing (--kube: every node's, from the API)")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--socket", help="the agent's admin socket (default /run/nodeagent/agent.sock)")
    where.add_argument("--node", help="a lab node: read that node's agent socket")
    where.add_argument("--kube", action="store_true",
                       help="every node's agent from the Kubernetes API: the DaemonSet's counts, then per node "
                            "the agent pod, phase, Ready and why not, restarts, age, image, Warning Events; "
                            "exit 1 when a node lacks a Ready agent")
    status.add_argument("--kubeconfig", help="with --kube: kubeconfig (default $KUBECONFIG, ~/.kube/config, "
                                             "else in-cluster)")
    status.add_argument("--namespace", default=kubestatus.NAMESPACE, help="with --kube: the agent DaemonSet's "
                                                                          "namespace (default %(default)s)")
    status.add_argument("--lab", help="lab name with --node (default: $NODEAGENT_LAB or nalab)")
    status.add_argument("--output", "-o", choices=("text", "json"), default="text")
    status.add_argument("--json", dest="output", action="store_const", const="json", help="same as -o json")
    status.set_defaults(func=_status, lab_socket=lab_socket)


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
    from nodeagent import admin
    from nodeagent.agent import status

    if args.kube:
        return _kube_status(args)
    if args.kubeconfig or args.namespace != kubestatus.NAMESPACE:
        raise ConfigError("--kubeconfig/--namespace", "are read with --kube only", "add --kube")
    if args.lab and not args.node:
        raise ConfigError("--lab", "names the lab of --node", "add --node NODE, or drop --lab")
    state = admin.fetch_status(status.socket_path(args.socket, args.node, args.lab, args.lab_socket))
    sys.stdout.write(status.render(state, args.output))
    return 0



def _kube_status(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from nodeagent.kube.client import KubeClient

    if args.lab:
        raise ConfigError("--lab", "names the lab of --node", "drop --lab with --kube (use --kubeconfig)")
    client = KubeClient(kubestatus.kube_config(args.kubeconfig))
    summary = kubestatus.summarise(asyncio.run(kubestatus.read(client, args.namespace)), time.time())
    sys.stdout.write(kubestatus.render(summary, args.output))
    return 0 if summary["ok"] else 1
