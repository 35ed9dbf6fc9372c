"""Every setting of the mesh CA (`nodeagent ca`), named once.

Each setting is a typed attribute of `CaConfig`, a flag and a `NODEAGENT_CA_*`
environment variable (flag over variable over default), parsed and validated at start-up
by `load`, which raises ConfigError naming the setting, where the value came from and
the bad value. The parsers and the flag/variable resolution are the agent's
(nodeagent.agent.config), so both commands read settings the same way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from nodeagent.agent.config import Setting, _raw_value, parse_address, parse_source
from nodeagent.errors import ConfigError
from nodeagent.identity.spiffe import trust_domain_problem
from nodeagent.kube.objects import DNS_LABEL, DNS_SUBDOMAIN

DEFAULT_PORT = 15012  # Istio's CA/xDS port
SERVER_ACCOUNT = "nodeagent-ca"  # the CA's service account: its server identity
MIN_TTL, MAX_TTL = dt.timedelta(minutes=1), dt.timedelta(days=90)
UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


class CaSetting(Setting):
    @property
    def env(self) -> str:
        return "NODEAGENT_CA_" + self.name.upper()


@dataclass(frozen=True)
class CaConfig:
    listen: tuple[str, int]
    trust_domain: str
    state_dir: Path
    tokens: Path
    source: str
    source_dir: Path
    cert_ttl: dt.timedelta
    namespace: str
    server_names: tuple[str, ...]
    metrics_address: tuple[str, int] | None

    @property
    def server_identity_uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{SERVER_ACCOUNT}"


def default_server_name(ca_namespace: str = "istio-system") -> str:
    """The DNS name agents expect in the CA's certificate (the CA Service's name)."""
    return f"{SERVER_ACCOUNT}.{ca_namespace}.svc"


# --- parsers: raw string in, ValueError naming the rule out -------------------------
def parse_duration(raw: str) -> dt.timedelta:
    """`24h`, `90m`, `1h30m`, `2d`, `3600s` or plain seconds; 1m to 90d."""
    text = raw.strip()
    if text.isdigit():
        seconds = int(text)
    elif re.fullmatch(r"(\d+[dhms])+", text):
        seconds = sum(int(n) * UNITS[u] for n, u in re.findall(r"(\d+)([dhms])", text))
    else:
        raise ValueError("expected a duration such as 24h, 90m, 1h30m or a number of seconds")
    ttl = dt.timedelta(seconds=seconds)
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise ValueError("must be between 1m and 90d")
    return ttl


def parse_trust_domain(raw: str) -> str:
    problem = trust_domain_problem(raw)
    if problem:
        raise ValueError(problem)
    return raw


def parse_namespace(raw: str) -> str:
    if not DNS_LABEL.match(raw):
        raise ValueError("must be a Kubernetes namespace name")
    return raw


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


def parse_names(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for name in names:
        if not DNS_SUBDOMAIN.match(name):
            raise ValueError(f"{name!r} is not a DNS name")
    return names


def parse_optional_address(raw: str) -> tuple[str, int] | None:
    return None if raw.strip().lower() in ("", "off", "none") else parse_address(raw)


SETTINGS: tuple[CaSetting, ...] = (
    CaSetting("listen", parse_address, f"0.0.0.0:{DEFAULT_PORT}", "gRPC/TLS listener of the CA", "HOST:PORT"),
    CaSetting("trust_domain", parse_trust_domain, "cluster.local", "SPIFFE trust domain of the mesh", "DOMAIN"),
    CaSetting("state_dir", parse_dir_to_create, None,
              "directory of the CA's keys (Istio cacerts layout: ca-cert.pem, ca-key.pem 0600, "
              "root-cert.pem, optional cert-chain.pem); a root is generated there when empty", "DIR"),
    CaSetting("tokens", parse_file, None, "file of node tokens: YAML/JSON map node name -> token "
              "(re-read on change)", "FILE"),
    CaSetting("source", parse_source, None, "where cluster state comes from: files:DIR", "files:DIR"),
    CaSetting("cert_ttl", parse_duration, "24h", "lifetime of workload certificates (and the most a "
              "request may ask for)", "DURATION"),
    CaSetting("namespace", parse_namespace, "istio-system",
              f"namespace of the CA; its server identity is ns/<this>/sa/{SERVER_ACCOUNT}", "NAMESPACE"),
    CaSetting("server_names", parse_names, "", "DNS names in the CA's server certificate, comma "
              f"separated (default {default_server_name('<namespace>')})", "NAMES"),
    CaSetting("metrics_address", parse_optional_address, "127.0.0.1:15014",
              "Prometheus /metrics listener, or off", "HOST:PORT|off"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; defaults are None so `load` can tell 'not given'."""
    for s in SETTINGS:
        parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.metavar,
                            help=f"{s.help} [env {s.env}]")


def load(given: Mapping[str, Any] | argparse.Namespace, environ: Mapping[str, str] | None = None) -> CaConfig:
    """Parse and validate every setting; ConfigError naming the first bad one."""
    given = vars(given) if isinstance(given, argparse.Namespace) else given
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
    values["server_names"] = values["server_names"] or (default_server_name(values["namespace"]),)
    return CaConfig(**values)
