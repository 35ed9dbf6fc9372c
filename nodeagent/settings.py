"""How every nodeagent command reads its settings: one flag and one environment variable
per setting, the flag over the variable over the default, each value parsed and checked
at start-up.

A command lists its `Setting`s once (its config module), `add_arguments` turns them
into flags and `parse_settings` into typed values, raising ConfigError naming the
setting, where the bad value came from (flag, variable or default) and the value. The
parsers here are the ones several commands share; each takes the raw string and raises
ValueError saying what the value must be.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import DNS_LABEL, DNS_SUBDOMAIN

DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
OFF = ("", "off", "none")


@dataclass(frozen=True)
class Setting:
    name: str  # attribute of the command's config
    parse: Callable[[str], Any]  # raises ValueError saying what is wrong
    default: Any  # a raw string (parsed like user input), None = required, or a callable
    help: str
    metavar: str = ""
    boolean: bool = False
    prefix: str = "NODEAGENT_"  # of the environment variable

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return self.prefix + self.name.upper()


def add_arguments(parser: argparse.ArgumentParser, settings: Sequence[Setting]) -> None:
    """One flag per setting; every default is None so parsing can tell 'not given'."""
    for s in settings:
        help_text = f"{s.help} [env {s.env}]".replace("%", "%%")  # argparse formats help with %
        if s.boolean:
            parser.add_argument(s.flag, dest=s.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.metavar, help=help_text)


def raw_value(s: Setting, given: Mapping[str, Any], environ: Mapping[str, str]) -> tuple[str, str]:
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


def parse_settings(settings: Sequence[Setting], given: Mapping[str, Any] | argparse.Namespace,
                   environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every setting parsed, by name; ConfigError naming the first bad one."""
    given = vars(given) if isinstance(given, argparse.Namespace) else given
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in settings:
        raw, origin = raw_value(s, given, environ)
        try:
            values[s.name] = s.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"setting {s.name} ({origin})", f"bad value {raw!r}: {exc}",
                              f"fix {s.flag} / {s.env}") from None
    return values


# --- parsers: raw string in, ValueError naming the rule out -------------------------------
def parse_int(raw: str) -> int:
    try:
        return int(raw, 0)
    except ValueError:
        raise ValueError("must be an integer (decimal or 0x hex)") from None


def parse_port(raw: str) -> int:
    port = parse_int(raw)
    if not 1 <= port <= 65535:
        raise ValueError("must be a TCP port, 1-65535")
    return port


def _host_port(raw: str) -> tuple[str, str]:
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", raw)
    if not match:
        raise ValueError("expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    return (match[1], match[2]) if match[1] else (match[3], match[4])


def parse_address(raw: str) -> tuple[str, int]:
    """IP:PORT (a listen address)."""
    host, port = _host_port(raw)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host} is not an IP address") from None
    return host, parse_port(port)


def parse_optional_address(raw: str) -> tuple[str, int] | None:
    return None if raw.strip().lower() in OFF else parse_address(raw)


def parse_target(raw: str) -> tuple[str, int]:
    """HOST:PORT to dial, the host an IP address or a DNS name."""
    host, port = _host_port(raw)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not DNS_SUBDOMAIN.match(host):
            raise ValueError(f"{host} is neither an IP address nor a DNS name") from None
    return host, parse_port(port)


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return raw.lower()
    return parse


def parse_source(raw: str) -> str:
    kind, _, rest = raw.partition(":")
    if kind == "kube":
        raise ValueError("the kube source is not implemented yet; use files:DIR")
    if kind != "files" or not rest:
        raise ValueError("expected files:DIR (a directory of Kubernetes YAML)")
    if not Path(rest).is_dir():
        raise ValueError(f"{rest} is not a directory")
    return raw


def parse_absolute(raw: str) -> Path:
    path = Path(raw)
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    return path


def parse_directory(raw: str) -> Path:
    path = parse_absolute(raw)
    if not path.is_dir():
        raise ValueError("directory does not exist")
    return path


def parse_dir_to_create(raw: str) -> Path:
    path = Path(raw).absolute()
    if path.exists() and not path.is_dir():
        raise ValueError("exists and is not a directory")
    return path


def parse_file(raw: str) -> Path:
    path = Path(raw).absolute()
    if not path.is_file():
        raise ValueError("no such file")
    return path


def parse_optional_file(raw: str) -> Path | None:
    return None if raw.strip().lower() in OFF else parse_file(raw)


def parse_duration_between(low: dt.timedelta, high: dt.timedelta) -> Callable[[str], dt.timedelta]:
    """A parser of `24h`, `90m`, `1h30m`, `2d`, `3600s` or plain seconds, within [low, high]."""
    def parse(raw: str) -> dt.timedelta:
        text = raw.strip()
        if text.isdigit():
            seconds = int(text)
        elif re.fullmatch(r"(\d+[dhms])+", text):
            seconds = sum(int(n) * DURATION_UNITS[u] for n, u in re.findall(r"(\d+)([dhms])", text))
        else:
            raise ValueError("expected a duration such as 24h, 90m, 1h30m or a number of seconds")
        value = dt.timedelta(seconds=seconds)
        if not low <= value <= high:
            raise ValueError(f"must be between {_short(low)} and {_short(high)}")
        return value
    return parse


def _short(value: dt.timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit, size in DURATION_UNITS.items():
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_namespace(raw: str) -> str:
    if not DNS_LABEL.match(raw):
        raise ValueError("must be a Kubernetes namespace name")
    return raw
