"""The `nodeagent` command: one sub-command per subsystem.

Each subsystem module in COMMANDS provides `register(subparsers)`, which adds its
sub-commands and sets `func(args) -> int` on them. Errors raised on purpose
(NodeagentError) are printed as one line naming what is wrong; the exit code is 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nodeagent import __version__
from nodeagent.errors import NodeagentError

# Modules that register sub-commands, in the order `--help` lists them.
COMMANDS = [
    "nodeagent.lab.cli",
    "nodeagent.agent.cli",
    "nodeagent.identity.cli",
    "nodeagent.xds.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodeagent",
        description="Sidecarless service mesh node agent: eBPF capture, HBONE mTLS tunnel, Envoy waypoint.")
    parser.add_argument("--version", action="version", version=f"nodeagent {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except NodeagentError as exc:
        print(f"nodeagent: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
