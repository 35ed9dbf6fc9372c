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
from nodeagent.errors import ConfigError
from nodeagent.identity.caproto import SERVER_ACCOUNT, default_server_name
from nodeagent.identity.spiffe import parse_trust_domain
from nodeagent.kube.client import ClusterConfig, from_kubeconfig, in_cluster
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
    state_dir: Path | None  # files source only: the keys on disk
    tokens: Path | None  # files source only: node tokens
    source: str
    source_dir: Path | None  # files:DIR's directory
    cert_ttl: dt.timedelta
    namespace: str
    server_names: tuple[str, ...]
    metrics_address: tuple[str, int] | None
    # The kube source's (defaults as the settings', so the files source's callers need not name them):
    kubeconfig: Path | None = None  # kube:KUBECONFIG's file (kube alone: in-cluster)
    token_audience: str = "nodeagent-ca"
    agent_service_account: tuple[str, str] = ("nodeagent-system", "nodeagent")
    root_secret: str = "nodeagent-ca-keys"
    root_configmap: str = "nodeagent-ca-root-cert"

    @property
    def kube(self) -> bool:
        return self.source_dir is None

    @property
    def server_identity_uri(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{SERVER_ACCOUNT}"


# --- parsers: raw string in, ValueError naming the rule out -------------------------
parse_duration = settings.parse_duration_between(MIN_TTL, MAX_TTL)  # a certificate lifetime


def parse_ca_source(raw: str) -> str:
    """files:DIR (as the agent's), kube (in a pod: in-cluster config) or kube:KUBECONFIG."""
    kind, _, rest = raw.partition(":")
    if kind == "kube":
        if rest and not Path(rest).is_file():
            raise ValueError(f"kubeconfig {rest} is not a file")
        return raw
    return parse_source(raw)


def parse_optional_dir(raw: str) -> Path | None:
    return None if raw.strip().lower() in settings.OFF else parse_dir_to_create(raw)


def parse_optional_tokens(raw: str) -> Path | None:
    return None if raw.strip().lower() in settings.OFF else parse_file(raw)


def parse_account(raw: str) -> tuple[str, str]:
    namespace, sep, name = raw.partition("/")
    if not sep:
        raise ValueError("expected NAMESPACE/NAME")
    parse_namespace(namespace)
    if not DNS_SUBDOMAIN.match(name):
        raise ValueError(f"{name!r} is not a ServiceAccount name")
    return namespace, name


def parse_object_name(raw: str) -> str:
    if not DNS_SUBDOMAIN.match(raw):
        raise ValueError(f"{raw!r} is not a Kubernetes object name")
    return raw


def parse_audience(raw: str) -> str:
    if not raw.strip() or any(c.isspace() for c in raw):
        raise ValueError("must be a non-empty word")
    return raw


def parse_names(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for name in names:
        if not DNS_SUBDOMAIN.match(name):
            raise ValueError(f"{name!r} is not a DNS name")
    return names


SETTINGS: tuple[Setting, ...] = (
    CaSetting("listen", parse_address, f"0.0.0.0:{DEFAULT_PORT}", "gRPC/TLS listener of the CA", "HOST:PORT"),
    CaSetting("trust_domain", parse_trust_domain, "cluster.local", "SPIFFE trust domain of the mesh", "DOMAIN"),
    CaSetting("state_dir", parse_optional_dir, "off",
              "files source: directory of the CA's keys (Istio cacerts layout: ca-cert.pem, ca-key.pem 0600, "
              "root-cert.pem, optional cert-chain.pem); a root is generated there when empty", "DIR"),
    CaSetting("tokens", parse_optional_tokens, "off", "files source: file of node tokens: YAML/JSON map "
              "node name -> token (re-read on change)", "FILE"),
    CaSetting("source", parse_ca_source, None, "where cluster state comes from: files:DIR, or kube (the "
              "API server, in-cluster) or kube:KUBECONFIG; with kube, agents prove themselves by "
              "TokenReview and the keys live in --root-secret", "files:DIR|kube[:KUBECONFIG]"),
    CaSetting("cert_ttl", parse_duration, "24h", "lifetime of workload certificates (and the most a "
              "request may ask for)", "DURATION"),
    CaSetting("namespace", parse_namespace, "istio-system",
              f"namespace of the CA; its server identity is ns/<this>/sa/{SERVER_ACCOUNT}", "NAMESPACE"),
    CaSetting("server_names", parse_names, "", "DNS names in the CA's server certificate, comma "
              f"separated (default {default_server_name('<namespace>')})", "NAMES"),
    CaSetting("metrics_address", parse_optional_address, "127.0.0.1:15014",
              "Prometheus /metrics listener, or off", "HOST:PORT|off"),
    CaSetting("token_audience", parse_audience, "nodeagent-ca", "kube source: the audience agents' "
              "projected tokens must be for (TokenReview spec.audiences)", "AUDIENCE"),
    CaSetting("agent_service_account", parse_account, "nodeagent-system/nodeagent",
              "kube source: the only ServiceAccount whose tokens may ask for certificates", "NAMESPACE/NAME"),
    CaSetting("root_secret", parse_object_name, "nodeagent-ca-keys", "kube source: Secret in --namespace "
              "holding the CA's keys (cacerts layout), created with a new root when absent", "NAME"),
    CaSetting("root_configmap", parse_object_name, "nodeagent-ca-root-cert", "kube source: ConfigMap in "
              "--namespace where the root certificate is published (key root-cert.pem)", "NAME"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, SETTINGS)


def load(given: Mapping[str, Any] | argparse.Namespace, environ: Mapping[str, str] | None = None) -> CaConfig:
    """Parse and validate every setting; ConfigError naming the first bad one."""
    values = settings.parse_settings(SETTINGS, given, environ)
    kind, _, rest = values["source"].partition(":")
    values["source_dir"] = Path(rest) if kind == "files" else None
    values["kubeconfig"] = Path(rest).absolute() if kind == "kube" and rest else None
    values["server_names"] = values["server_names"] or (default_server_name(values["namespace"]),)
    if kind == "files":
        for name in ("state_dir", "tokens"):
            if values[name] is None:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"setting {name}", "is required with the files source",
                                  f"pass {flag} or set NODEAGENT_CA_{name.upper()}")
    else:
        for name in ("state_dir", "tokens"):
            if values[name] is not None:
                raise ConfigError(f"setting {name}", "is for the files source; with kube the keys live in "
                                  "--root-secret and agents prove themselves by TokenReview",
                                  "drop --" + name.replace("_", "-"))
        cluster_config(values["kubeconfig"], environ)  # a missing token or bad kubeconfig fails now
    return CaConfig(**values)


def cluster_config(kubeconfig: Path | None, environ: Mapping[str, str] | None = None) -> ClusterConfig:
    """The API server and the CA's credentials: the kubeconfig's, else the pod's (in-cluster)."""
    return from_kubeconfig(kubeconfig) if kubeconfig is not None else in_cluster(environ)
