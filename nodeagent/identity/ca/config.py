"""Every setting of the mesh CA (`nodeagent ca`), named once.

Each setting is a typed attribute of `CaConfig`, a flag and a `NODEAGENT_CA_*`
environment variable (flag over variable over default), parsed and validated at start-up
by `load`, which raises ConfigError naming the setting, where the value came from and
the bad value. Flags, variables and the shared parsers are nodeagent.settings', so the
CA and the agent read settings the same way.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping

from nodeagent import settings
from nodeagent.identity.caproto import SERVER_ACCOUNT, default_server_name
from nodeagent.identity.spiffe import parse_trust_domain
from nodeagent.kube.objects import DNS_SUBDOMAIN
from nodeagent.settings import (Setting, parse_address, parse_dir_to_create, parse_file, parse_namespace,
                                parse_optional_address, parse_source)

DEFAULT_PORT = 15012  # Istio's CA/xDS port
MIN_TTL, MAX_TTL = dt.timedelta(minutes=1), dt.timedelta(days=90)
CaSetting = partial(Setting, prefix="NODEAGENT_CA_")


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


# --- parsers: raw string in, ValueError naming the rule out -------------------------
parse_duration = settings.parse_duration_between(MIN_TTL, MAX_TTL)  # a certificate lifetime


def parse_names(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for name in names:
        if not DNS_SUBDOMAIN.match(name):
            raise ValueError(f"{name!r} is not a DNS name")
    return names


SETTINGS: tuple[Setting, ...] = (
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
    settings.add_arguments(parser, SETTINGS)


def load(given: Mapping[str, Any] | argparse.Namespace, environ: Mapping[str, str] | None = None) -> CaConfig:
    """Parse and validate every setting; ConfigError naming the first bad one."""
    values = settings.parse_settings(SETTINGS, given, environ)
    values["source_dir"] = Path(values["source"].partition(":")[2])
    values["server_names"] = values["server_names"] or (default_server_name(values["namespace"]),)
    return CaConfig(**values)
