"""Every setting of the node agent, named once (as ztunnel's config.rs does).

Each setting has a typed attribute on `AgentConfig`, a command-line flag and a
`NODEAGENT_*` environment variable; the flag wins over the variable, the variable over
the default. `load` parses and validates all of them at start-up and raises ConfigError
naming the flag, the variable and the bad value, so a typo never surfaces later as a
strange runtime failure.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from nodeagent.capture.preflight import MOUNTS, mount_table
from nodeagent.errors import ConfigError
from nodeagent.kube.objects import DNS_SUBDOMAIN

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_ADMIN_SOCKET = "/run/nodeagent/agent.sock"


@dataclass(frozen=True)
class Setting:
    name: str  # attribute of AgentConfig
    parse: Callable[[str], Any]  # raises ValueError saying what is wrong
    default: Any  # a raw string (parsed like user input), None = required, or a callable
    help: str
    metavar: str = ""
    boolean: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "NODEAGENT_" + self.name.upper()


@dataclass(frozen=True)
class AgentConfig:
    node: str
    source: str  # as given: "files:DIR"
    source_dir: Path
    cgroup: Path
    bpffs: Path
    admin_socket: Path
    admin_address: tuple[str, int]
    mark: int
    delivery_mark: int
    outbound_port: int
    inbound_port: int
    tunnel_port: int
    keep_on_exit: bool
    poll_interval: float
    log_level: str
    log_format: str

    @property
    def admin_port(self) -> int:
        return self.admin_address[1]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Path) else v)
                for f in fields(self)}


# --- parsers: each takes the raw string and raises ValueError naming the rule -------
def parse_node(raw: str) -> str:
    if not DNS_SUBDOMAIN.match(raw):
        raise ValueError("must be the Kubernetes node name (a DNS-1123 subdomain)")
    return raw


def parse_source(raw: str) -> str:
    kind, _, rest = raw.partition(":")
    if kind == "kube":
        raise ValueError("the kube source is not implemented yet; use files:DIR")
    if kind != "files" or not rest:
        raise ValueError("expected files:DIR (a directory of Kubernetes YAML)")
    if not Path(rest).is_dir():
        raise ValueError(f"{rest} is not a directory")
    return raw


def parse_directory(raw: str) -> Path:
    path = Path(raw)
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    if not path.is_dir():
        raise ValueError("directory does not exist")
    return path


def parse_absolute(raw: str) -> Path:
    path = Path(raw)
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    return path


def parse_port(raw: str) -> int:
    port = parse_int(raw)
    if not 1 <= port <= 65535:
        raise ValueError("must be a TCP port, 1-65535")
    return port


def parse_int(raw: str) -> int:
    try:
        return int(raw, 0)
    except ValueError:
        raise ValueError("must be an integer (decimal or 0x hex)") from None


def parse_mark(raw: str) -> int:
    mark = parse_int(raw)
    if not 0 < mark < 2**32:
        raise ValueError("must be a non-zero 32-bit socket mark")
    return mark


def parse_address(raw: str) -> tuple[str, int]:
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", raw)
    if not match:
        raise ValueError("expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    host, port = (match[1], match[2]) if match[1] else (match[3], match[4])
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host} is not an IP address") from None
    return host, parse_port(port)


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def parse_interval(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("must be a number of seconds") from None
    if not 0.001 <= value <= 60:
        raise ValueError("must be between 0.001 and 60 seconds")
    return value


def parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return raw.lower()
    return parse


def cgroup2_root(mounts: str = MOUNTS) -> str:
    """The first cgroup2 mount point (hybrid machines mount it at /sys/fs/cgroup/unified)."""
    try:
        found = [point for point, kind in mount_table(mounts) if kind == "cgroup2"]
    except OSError:
        found = []
    if not found:
        raise ValueError("no cgroup2 mount found in /proc/self/mounts; mount cgroup v2 (scripts/setup does)")
    return found[0]


SETTINGS: tuple[Setting, ...] = (
    Setting("node", parse_node, None, "name of the node this agent serves (pods' spec.nodeName)", "NODE"),
    Setting("source", parse_source, None, "where cluster state comes from: files:DIR", "files:DIR"),
    Setting("cgroup", parse_directory, cgroup2_root,
            "cgroup v2 directory the capture programs attach to (default: the cgroup2 root)", "DIR"),
    Setting("bpffs", parse_absolute, "/sys/fs/bpf/nodeagent", "bpffs directory for pinned maps", "DIR"),
    Setting("admin_socket", parse_absolute, DEFAULT_ADMIN_SOCKET,
            "unix socket serving the admin endpoints (nodeagent status reads it)", "PATH"),
    Setting("admin_address", parse_address, "127.0.0.1:15020",
            "HTTP admin listener (/metrics, /debug/status) in the agent's netns", "HOST:PORT"),
    Setting("mark", parse_mark, "0x539", "socket mark of the agent's own sockets (never captured)", "MARK"),
    Setting("delivery_mark", parse_mark, "0x1539",
            "socket mark of inbound delivery to the app; the pod's policy routing sends the app's "
            "replies back to the agent by it", "MARK"),
    Setting("outbound_port", parse_port, "15001", "in-pod outbound listener port", "PORT"),
    Setting("inbound_port", parse_port, "15006", "in-pod plaintext inbound listener port", "PORT"),
    Setting("tunnel_port", parse_port, "15008", "in-pod HBONE tunnel listener port", "PORT"),
    Setting("keep_on_exit", parse_bool, "false",
            "leave programs attached and maps pinned on a clean exit (rolling upgrades)", boolean=True),
    Setting("poll_interval", parse_interval, "0.1", "seconds between checks of the source", "SECONDS"),
    Setting("log_level", parse_choice(LOG_LEVELS), "info", "log level", "|".join(LOG_LEVELS)),
    Setting("log_format", parse_choice(LOG_FORMATS), "text", "log format", "|".join(LOG_FORMATS)),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; every default is None so `load` can tell 'not given'."""
    for s in SETTINGS:
        help_text = f"{s.help} [env {s.env}]"
        if s.boolean:
            parser.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.metavar, help=help_text)


def _raw_value(s: Setting, given: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[str, str]:
    """(raw string, where it came from) for one setting."""
    value = given.get(s.name)
    if value is not None:
        return ("true" if value is True else "false" if value is False else str(value)), s.flag
    if s.env in environ:
        return environ[s.env], s.env
    if s.default is None:
        raise ConfigError(f"setting {s.name}", "is required", f"pass {s.flag} or set {s.env}")
    if callable(s.default):
        try:
            return s.default(), "default"
        except ValueError as exc:
            raise ConfigError(f"setting {s.name}", f"no default: {exc}", f"pass {s.flag} or set {s.env}") from None
    return s.default, "default"


def load(given: Mapping[str, Any] | argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Parse and validate every setting; raise ConfigError naming the first bad one."""
    if isinstance(given, argparse.Namespace):
        given = vars(given)
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw, origin = _raw_value(s, given, environ)
        try:
            values[s.name] = s.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"setting {s.name} ({origin})", f"bad value {raw!r}: {exc}",
                              f"fix {s.flag} / {s.env}") from None
    values["source_dir"] = Path(values["source"].partition(":")[2])
    _check_ports(values)
    if values["delivery_mark"] == values["mark"]:
        raise ConfigError("setting delivery_mark", f"must differ from mark ({values['mark']:#x})",
                          "the pod's reply routing would catch the agent's outbound connections too")
    return AgentConfig(**values)


def _check_ports(values: dict[str, Any]) -> None:
    ports = {"outbound_port": values["outbound_port"], "inbound_port": values["inbound_port"],
             "tunnel_port": values["tunnel_port"], "admin_address": values["admin_address"][1]}
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise ConfigError(f"setting {name}", f"port {port} is also used by {seen[port]}",
                              "the agent's in-pod ports and admin port must all differ")
        seen[port] = name
