"""`nodeagent lab …`: bring a lab up, change it, look at it, run commands in it, take it down.

Sub-commands: up, apply, delete, status, exec, down, demo, echo and request (the lab's test
apps, in their own modules), kubeconfig and kubectl (a lab made with `up --kube`), and
supervise (started by `up`, not by hand). Every
command takes `--name` (default `nalab`, or $NODEAGENT_LAB). Errors are NodeagentErrors,
printed as one line by nodeagent/cli.py.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from nodeagent.errors import LabError
from nodeagent.lab import cgroups, layout
from nodeagent.lab.state import StateDir

# The lab's machinery (lifecycle, status, the control plane, the supervisor) is imported
# by the commands that use it, not here: every `nodeagent` process parses this module's
# sub-commands, the agent's too, and that machinery (pyroute2, sqlite, Envoy's message
# types through the lab's CA and status) was 11 MiB of the agent's RSS.

UP_TIMEOUT = 60.0


def _out(line: str) -> None:
    print(line, flush=True)


def _layout(args: argparse.Namespace) -> layout.Layout:
    return layout.Layout(layout.check_name(args.name), cgroups.cgroup2_root())


def _objects(args: argparse.Namespace):
    """The objects of -f (several, directories, - for standard input) as kubectl reads them."""
    from nodeagent.lab import lifecycle
    return lifecycle.read_objects(args.file, args.recursive)


def cmd_up(args: argparse.Namespace) -> int:
    from nodeagent.lab import lifecycle
    objects = _objects(args)
    lifecycle.up(layout.check_name(args.name), objects, not args.no_agents, _out, args.timeout, kube=args.kube)
    _out(f"lab {args.name} is up: nodeagent lab status --name {args.name}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from nodeagent.lab import lifecycle
    lifecycle.apply(layout.check_name(args.name), _objects(args), _out, args.timeout)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from nodeagent.kube.objects import resource_type
    from nodeagent.lab import lifecycle
    done = lifecycle.delete(layout.check_name(args.name), _objects(args), _out, args.timeout)
    if args.ignore_not_found:
        return 0
    for obj in done.missing:  # kubectl's words, on stderr, and exit 1
        print(f'Error from server (NotFound): error when deleting "{obj.source.split("#")[0]}": '
              f'{resource_type(obj, plural=True)} "{obj.name}" not found', file=sys.stderr, flush=True)
    return 1 if done.missing else 0


def cmd_down(args: argparse.Namespace) -> int:
    from nodeagent.lab import teardown
    removed = teardown.down(_layout(args))
    _out(f"lab {args.name}: removed {', '.join(removed)}" if removed else f"no lab named {args.name}; nothing to do")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from nodeagent.lab import status
    state = StateDir(_layout(args))
    data = status.collect(state.load(), state.load_runtime())
    sys.stdout.write(status.to_json(data) if args.output == "json" else status.render(data))
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from nodeagent.lab import processes
    record = StateDir(_layout(args)).load()
    namespace, _, name = args.target.rpartition("/")
    namespace = namespace or "default"
    pod = record.desired.pods.get(f"{namespace}/{name}") or record.desired.pods.get(f"{namespace}/{name}-0")
    if pod is None and record.kube:
        return _exec_api_pod(record, namespace, name, args)
    if pod is None:
        raise LabError(f"no pod or deployment {namespace}/{name} in lab {args.name}",
                       f"see: nodeagent lab status --name {args.name}")
    containers = {c.name: c for c in pod.containers}
    container = containers.get(args.container) if args.container else pod.containers[0]
    if container is None:
        raise LabError(f"pod {pod.key} has no container {args.container}", f"it has {', '.join(containers)}")
    if not args.command:
        raise LabError("no command to run", f"nodeagent lab exec {args.target} -- COMMAND ARGS…")
    sys.stdout.flush()
    processes.exec_in_pod(record, pod, container, args.command)
    return 127  # not reached: exec replaced this process


def _kube_record(args: argparse.Namespace):
    record = StateDir(_layout(args)).load()
    if not record.kube:
        raise LabError(f"lab {args.name} runs no control plane",
                       f"nodeagent lab down --name {args.name}, then lab up --kube")
    return record


def cmd_kubeconfig(args: argparse.Namespace) -> int:
    record = _kube_record(args)
    _out(record.layout.admin_kubeconfig)
    return 0


def cmd_kubectl(args: argparse.Namespace) -> int:
    from nodeagent.lab import processes
    from nodeagent.lab.kube import controlplane
    record = _kube_record(args)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    argv = controlplane.kubectl_argv(record.layout, record.controlplane, command)
    sys.stdout.flush()
    os.execvpe(argv[0], argv, {**processes.base_env(), **{k: v for k, v in os.environ.items() if k == "TERM"}})
    return 127  # not reached: exec replaced this process


def _exec_api_pod(record, namespace: str, name: str, args: argparse.Namespace) -> int:
    """`lab exec` into a pod of the API (a --kube lab's kubelet runs it)."""
    from nodeagent.lab.kube import controlplane, kubelet
    client = controlplane.admin_client(record.layout)
    status, item = client.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    if status != 200:
        raise LabError(f"no pod {namespace}/{name} in lab {args.name}'s file nor in its API ({status})",
                       f"see: nodeagent lab kubectl --name {args.name} -- get pods -A")
    if not args.command:
        raise LabError("no command to run", f"nodeagent lab exec {args.target} -- COMMAND ARGS…")
    argv, env, cgroup = kubelet.exec_plan(record, client, item, args.container, args.command)
    if "TERM" in os.environ:
        env["TERM"] = os.environ["TERM"]
    sys.stdout.flush()
    cgroups.join(cgroup)
    os.execvpe(argv[0], argv, env)
    return 127  # not reached: exec replaced this process


def cmd_supervise(args: argparse.Namespace) -> int:
    from nodeagent.lab.supervisor import Supervisor
    logging.getLogger().setLevel(logging.INFO)
    return Supervisor(StateDir(_layout(args))).run()


def cmd_demo(args: argparse.Namespace) -> int:
    from nodeagent.lab import demo
    return demo.run(layout.check_name(args.name), args.timeout, _out)


def _app(module: str):
    """`lab echo` / `lab request` live in their own modules; say so if one is missing."""
    try:
        return importlib.import_module(f"nodeagent.lab.{module}")
    except ImportError as exc:
        return exc


def _add_app(sub: argparse._SubParsersAction, module: str, help: str) -> None:
    app = _app(module)
    if isinstance(app, ImportError):
        parser = sub.add_parser(module, help=f"{help} (unavailable: {app})", add_help=False)
        parser.add_argument("ignored", nargs=argparse.REMAINDER)
        parser.set_defaults(func=lambda _args: _unavailable(module, app))
        return
    parser = sub.add_parser(module, help=help)
    app.add_arguments(parser)
    parser.set_defaults(func=app.run)


def _unavailable(module: str, exc: ImportError) -> int:
    raise LabError(f"nodeagent lab {module} is not available: {exc}")


def _add_files(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("-f", "--file", "--filename", action="extend", nargs="+", required=required, metavar="FILE",
                        help="Kubernetes-shaped YAML: files, directories (their *.yaml, *.yml, *.json, sorted) or - "
                             "for standard input, as kubectl -f (repeat -f for several; an object in a later file "
                             "wins). The lab runs v1 Node/Namespace/Pod/Service and apps/v1 Deployment; other "
                             "kinds are stored for the agents")
    parser.add_argument("-R", "--recursive", action="store_true",
                        help="also read the files in the subdirectories of -f directories")


def register(subparsers: argparse._SubParsersAction) -> None:
    lab = subparsers.add_parser("lab", help="run Kubernetes-shaped YAML on this machine (the embedded lab)",
                                description=__doc__.split("\n\n")[0])
    sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--name", default=layout.default_name(),
                       help=f"lab name, [a-z][a-z0-9]{{0,7}} (default: ${layout.NAME_ENV} or {layout.DEFAULT_NAME})")
    waits = argparse.ArgumentParser(add_help=False)
    waits.add_argument("--timeout", type=float, default=UP_TIMEOUT, help="seconds to wait for pods to run")

    up = sub.add_parser("up", parents=[named, waits], help="start a lab from files (default: the built-in demo)")
    _add_files(up, required=False)
    up.add_argument("--no-agents", action="store_true", help="do not run a node agent per node")
    up.add_argument("--kube", action="store_true", help="also run a Kubernetes control plane (etcd, "
                    "kube-apiserver, -controller-manager, -scheduler) and register the nodes with it")
    up.set_defaults(func=cmd_up)

    apply = sub.add_parser("apply", parents=[named, waits], help="add or change objects in a running lab")
    _add_files(apply, required=True)
    apply.set_defaults(func=cmd_apply)

    delete = sub.add_parser("delete", parents=[named, waits],
                            help="remove the objects of files from a running lab (as kubectl delete -f)",
                            description="Remove each object of the files from the lab, printing one line per object "
                                        "as kubectl does; a Namespace takes the objects in it along, a Deployment "
                                        "its pods. Deleted pods' processes, netns and cgroups are removed and, with "
                                        "agents, this returns once every agent has dropped what was deleted. An "
                                        "object the lab does not have is an error (exit 1) unless "
                                        "--ignore-not-found. Nodes cannot be deleted (lab down removes the lab).")
    _add_files(delete, required=True)
    delete.add_argument("--ignore-not-found", action="store_true",
                        help="an object the lab does not have is not an error")
    delete.set_defaults(func=cmd_delete)

    st = sub.add_parser("status", parents=[named], help="nodes, pods and services of a lab")
    st.add_argument("-o", "--output", choices=("table", "json"), default="table")
    st.set_defaults(func=cmd_status)

    ex = sub.add_parser("exec", parents=[named], help="run a command in a pod (of the file, or with --kube of "
                        "the API): exec NS/NAME -- CMD…")
    ex.add_argument("-c", "--container", help="whose env to use (default: the first container)")
    ex.add_argument("target", metavar="NAMESPACE/NAME", help="a pod, or a Deployment (its first pod)")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_exec)

    down = sub.add_parser("down", parents=[named], help="remove a lab and everything it made")
    down.set_defaults(func=cmd_down)

    kc = sub.add_parser("kubeconfig", parents=[named], help="print the path of a --kube lab's admin kubeconfig "
                        "(the API server is reachable from the lab's namespaces only)")
    kc.set_defaults(func=cmd_kubeconfig)

    kubectl = sub.add_parser("kubectl", parents=[named],
                             help="run kubectl as the admin of a --kube lab: kubectl -- ARGS…")
    kubectl.add_argument("command", nargs=argparse.REMAINDER)
    kubectl.set_defaults(func=cmd_kubectl)

    demo = sub.add_parser("demo", parents=[named, waits], help="start the demo lab and send traffic through it")
    demo.set_defaults(func=cmd_demo)

    _add_app(sub, "echo", "the lab's echo app (HTTP + TCP)")
    _add_app(sub, "request", "send HTTP requests and count who answered")

    sv = sub.add_parser("supervise", parents=[named])  # no help: started by `up`, not listed
    sv.set_defaults(func=cmd_supervise)
