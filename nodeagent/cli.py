"""The `nodeagent` command: one sub-command per subsystem.

Each subsystem's cli module provides `register(subparsers, ...)`, which adds its
sub-commands and sets `func(args) -> int` on them. This module sits on top: it hands the
agent's and the xDS commands the lab's naming of a node's sockets (`--node`, `--lab`),
so no product package imports the lab. Errors raised on purpose
(NodeagentError) are printed as one line naming what is wrong; the exit code is 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn

from nodeagent import __version__
from nodeagent import admin
from nodeagent.agent import cli as agent_cli
from nodeagent.bench import cli as bench_cli
from nodeagent.errors import NodeagentError
from nodeagent.identity.ca import cli as identity_cli
from nodeagent.lab import cli as lab_cli
from nodeagent.lab import layout
from nodeagent.xds import cli as xds_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodeagent",
        description="Sidecarless service mesh node agent: eBPF capture, HBONE mTLS tunnel, Envoy waypoint.")
    parser.add_argument("--version", action="version", version=f"nodeagent {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # In the order `--help` lists them.
    lab_cli.register(sub)
    agent_cli.register(sub, lab_socket=layout.agent_socket)
    identity_cli.register(sub)
    xds_cli.register(sub, lab_socket=layout.xds_socket, lab_agent_socket=layout.agent_socket,
                     agent_status=admin.fetch_status)
    bench_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser(), argv)[0]


def command() -> NoReturn:
    """The process's entry point (`nodeagent`, `python -m nodeagent`). A one-shot gRPC
    client (proxy-config) ends the process with os._exit once its output is flushed:
    gRPC's core shutdown at interpreter exit waits on gRPC's own threads, and in CI it
    did not return (1 run of 80: the whole table printed, the process still alive a
    minute later, past its --timeout of 5 s). Nothing of ours is left to finalize by
    then: the session was closed before the output was written."""
    code, args = _run(build_parser(), None)
    if getattr(args, "one_shot_grpc", False):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: the exit code still tells
                pass
        os._exit(code)
    sys.exit(code)


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[int, argparse.Namespace]:
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2, args
    try:
        return int(args.func(args) or 0), args
    except NodeagentError as exc:
        print(f"nodeagent: error: {exc}", file=sys.stderr)
        return 1, args
    except KeyboardInterrupt:
        return 130, args
