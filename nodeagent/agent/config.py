"""Every setting of the node agent, named once (as ztunnel's config.rs does).

Each setting has a typed attribute on `AgentConfig`, a command-line flag and a
`NODEAGENT_*` environment variable; the flag wins over the variable, the variable over
the default (nodeagent.settings does that for every command). `load` parses and
validates all of them at start-up and raises ConfigError naming the flag, the variable
and the bad value, so a typo never surfaces later as a strange runtime failure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from nodeagent import settings
from nodeagent.agent.proxy.splice import ENGINES
from nodeagent.capture.compiler import COMPILE_TIMEOUT, COMPILE_TIMEOUT_MAX
from nodeagent.capture.preflight import MOUNTS, mount_table
from nodeagent.errors import ConfigError
from nodeagent.identity.caproto import default_server_name
from nodeagent.identity.spiffe import parse_trust_domain
from nodeagent.kube.client import ClusterConfig, from_kubeconfig, in_cluster
from nodeagent.kube.objects import DNS_SUBDOMAIN
from nodeagent.native import DEFAULT_MAX_RELAYS
from nodeagent.xds.dataplane import UNIX_PATH_MAX, Sockets
from nodeagent.xds.envoy import EnvoyUser
from nodeagent.settings import (OFF, Setting, parse_absolute, parse_address, parse_bool, parse_choice,
                                parse_directory, parse_int, parse_namespace, parse_optional_file,
                                parse_port, parse_source, parse_target)
from nodeagent.tunnel.settings import SERVER_HANDSHAKE_TIMEOUT_MAX, TunnelSettings

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
DEFAULT_ADMIN_SOCKET = "/run/nodeagent/agent.sock"
DEFAULT_IDENTITY_DIR = "/run/nodeagent/identity"
DEFAULT_WAYPOINT_DIR = "/run/nodeagent/waypoint"  # tmpfs: workload keys never reach a disk
FLOW_LOG_STDERR = "stderr"


@dataclass(frozen=True)
class AgentConfig:
    node: str
    source: str  # as given: "files:DIR", "kube" or "kube:KUBECONFIG"
    source_dir: Path | None  # the files source's directory; None for kube
    kubeconfig: Path | None  # the kube source's kubeconfig; None: in-cluster (or the files source)
    cgroup: Path
    bpffs: Path
    admin_socket: Path
    admin_address: tuple[str, int]
    mark: int
    delivery_mark: int
    outbound_port: int
    inbound_port: int
    tunnel_port: int
    keep_on_exit: bool  # on_exit != "remove": what the agent does when it cannot tell (or is told to keep)
    on_exit: str  # keep, remove, or owner: remove only when its DaemonSet or Namespace is going away
    pod: tuple[str, str] | None  # (namespace, name) of the agent's own pod (downward API); None outside one
    poll_interval: float
    resync_interval: float
    log_level: str
    log_format: str
    ca_address: tuple[str, int] | None  # None: no CA, so no workload identities and no HBONE
    ca_root_cert: Path | None
    ca_token_file: Path | None
    ca_server_name: str
    trust_domain: str
    cert_ttl: dt.timedelta
    identity_dir: Path
    root_namespace: str
    flow_log: str | Path  # "stderr", "off" or a file
    flow_log_max_mib: int  # a flow log file is rotated at this size
    waypoint: bool  # run the node's waypoint Envoy (L7); off: L4 only
    waypoint_dir: Path
    envoy_user: EnvoyUser | None  # who the waypoint Envoy runs as; None: as the agent (root)
    data_path_engine: str  # who moves the bytes of relayed socket pairs: auto, native or python
    hbone_engine: str  # who carries HBONE (TLS, HTTP/2, the streams' bytes): auto, native or python
    same_node_fast_path: bool  # meshed pod to meshed pod of this node: admitted and joined here, no HBONE
    same_node_sockmap: bool  # ... joined in the kernel (bpf/samenode.c) when it loads, else by the engine
    outbound_in_engine: bool  # the native HBONE engine accepts on the pods' outbound listeners (source_routes.py)
    compile_timeout: float  # seconds a compile process of the eBPF programs may take before it is killed
    hbone_handshake_timeout: float  # seconds from accept on a pod's tunnel port to TLS done (the server's side)
    memory_limit_mib: int | None  # the container's memory limit: near it, no new inbound HBONE connections
    max_connections_per_pod: int | None  # connections relayed for one local pod at once; more are refused

    @property
    def admin_port(self) -> int:
        return self.admin_address[1]

    @property
    def identity_enabled(self) -> bool:
        return self.ca_address is not None

    @property
    def source_kind(self) -> str:
        return self.source.partition(":")[0]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _plain(value: Any) -> Any:
    """A JSON-ready value (status shows the config)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, EnvoyUser):
        return str(value)
    return value


# --- parsers: each takes the raw string and raises ValueError naming the rule -------
def parse_node(raw: str) -> str:
    if not DNS_SUBDOMAIN.match(raw):
        raise ValueError("must be the Kubernetes node name (a DNS-1123 subdomain)")
    return raw


def parse_mark(raw: str) -> int:
    mark = parse_int(raw)
    if not 0 < mark < 2**32:
        raise ValueError("must be a non-zero 32-bit socket mark")
    return mark


def seconds_between(low: float, high: float):
    """A parser of a number of seconds from `low` to `high`."""
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("must be a number of seconds") from None
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds")
        return value
    return parse


def parse_agent_source(raw: str) -> str:
    """files:DIR, kube (in-cluster) or kube:KUBECONFIG."""
    kind, sep, rest = raw.partition(":")
    if kind == "kube":
        if sep and not rest:
            raise ValueError("kube:KUBECONFIG needs the kubeconfig's path (plain `kube` in a pod)")
        if rest and not Path(rest).is_file():
            raise ValueError(f"kubeconfig {rest} is not a file")
        return raw
    try:
        return parse_source(raw)
    except ValueError as exc:
        raise ValueError(f"{exc}; or kube (in a pod), or kube:KUBECONFIG") from None


ON_EXIT = ("keep", "remove", "owner")


def parse_on_exit(raw: str) -> str:
    """keep, remove, owner; empty: as --[no-]keep-on-exit says."""
    value = raw.strip().lower()
    if value and value not in ON_EXIT:
        raise ValueError(f"must be one of {', '.join(ON_EXIT)}")
    return value


def parse_pod(raw: str) -> tuple[str, str] | None:
    if raw.strip().lower() in OFF:
        return None
    namespace, sep, name = raw.partition("/")
    if not sep or not DNS_SUBDOMAIN.match(name):
        raise ValueError("must be NAMESPACE/NAME of the agent's own pod (the downward API's "
                         "metadata.namespace and metadata.name)")
    return parse_namespace(namespace), name


parse_interval = seconds_between(0.001, 60)
parse_resync_interval = seconds_between(1, 3600)


def parse_optional_target(raw: str) -> tuple[str, int] | None:
    return None if raw.strip().lower() in OFF else parse_target(raw)


def parse_server_name(raw: str) -> str:
    if not DNS_SUBDOMAIN.match(raw):
        raise ValueError("must be a DNS name (the one in the CA's certificate)")
    return raw


def parse_flow_log_size(raw: str) -> int:
    size = parse_int(raw)
    if not 1 <= size <= 1 << 20:
        raise ValueError("must be from 1 to 1048576 (MiB)")
    return size


def parse_memory_limit(raw: str) -> int | None:
    if raw.strip().lower() in OFF:
        return None
    mib = parse_int(raw)
    if not 64 <= mib <= 1 << 20:
        raise ValueError("must be from 64 to 1048576 (MiB), or off")
    return mib


def parse_connection_cap(raw: str) -> int | None:
    if raw.strip().lower() in OFF:
        return None
    cap = parse_int(raw)
    if not 1 <= cap <= DEFAULT_MAX_RELAYS:
        raise ValueError(f"must be from 1 to {DEFAULT_MAX_RELAYS}, or off")
    return cap


def parse_flow_log(raw: str) -> str | Path:
    if raw.strip().lower() in (FLOW_LOG_STDERR, "off"):
        return raw.strip().lower()
    path = parse_absolute(raw)
    if not path.parent.is_dir():
        raise ValueError(f"{path.parent} is not a directory")
    return path


def parse_waypoint_dir(raw: str) -> Path:
    path = parse_absolute(raw)
    longest = Sockets(str(path), check=False).outbound
    if len(longest.encode()) > UNIX_PATH_MAX:
        raise ValueError(f"socket paths such as {longest} would exceed {UNIX_PATH_MAX} bytes; use a shorter directory")
    return path


def parse_envoy_user(raw: str) -> EnvoyUser | None:
    if raw == "root":
        return None
    match = re.fullmatch(r"(\d{1,10})(?::(\d{1,10}))?\Z", raw)
    if not match:
        raise ValueError("expected UID[:GID] (numbers) or root")
    uid, gid = int(match[1]), int(match[2] if match[2] is not None else match[1])
    if uid == 0 or gid == 0:
        raise ValueError("0 is root's: write root to run Envoy as the agent does")
    if uid >= 2**32 - 1 or gid >= 2**32 - 1:
        raise ValueError("a uid and a gid are below 4294967295")
    return EnvoyUser(uid, gid)


parse_cert_ttl = settings.parse_duration_between(dt.timedelta(minutes=1), dt.timedelta(days=90))


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
    Setting("source", parse_agent_source, None,
            "where cluster state comes from: files:DIR (a directory of Kubernetes YAML), kube (the API "
            "server, from inside a pod: its service-account token) or kube:KUBECONFIG",
            "files:DIR|kube|kube:KUBECONFIG"),
    Setting("kubeconfig", parse_optional_file, "off",
            "kubeconfig of the kube source (its current context's server and client certificate or token); "
            "off: in-cluster, or the path in kube:KUBECONFIG", "FILE"),
    Setting("cgroup", parse_directory, cgroup2_root,
            "cgroup v2 directory the capture programs attach to (default: the cgroup2 root)", "DIR"),
    Setting("bpffs", parse_absolute, "/sys/fs/bpf/nodeagent", "bpffs directory for pinned maps", "DIR"),
    Setting("admin_socket", parse_absolute, DEFAULT_ADMIN_SOCKET,
            "unix socket serving the admin endpoints (nodeagent status reads it)", "PATH"),
    Setting("admin_address", parse_address, "127.0.0.1:15020",
            "HTTP admin listener (/metrics, /healthz/ready; /debug/status only on the admin socket) "
            "in the agent's netns", "HOST:PORT"),
    Setting("mark", parse_mark, "0x539", "socket mark of the agent's own sockets (never captured)", "MARK"),
    Setting("delivery_mark", parse_mark, "0x1539",
            "socket mark of inbound delivery to the app; the pod's policy routing sends the app's "
            "replies back to the agent by it", "MARK"),
    Setting("outbound_port", parse_port, "15001", "in-pod outbound listener port", "PORT"),
    Setting("inbound_port", parse_port, "15006", "in-pod plaintext inbound listener port", "PORT"),
    Setting("tunnel_port", parse_port, "15008", "in-pod HBONE tunnel listener port", "PORT"),
    Setting("keep_on_exit", parse_bool, "true",
            "leave programs attached and maps pinned when the agent stops, so its pods stay captured "
            "(fail closed) until the next agent adopts them; `nodeagent uninstall` removes them. "
            "--no-keep-on-exit removes capture at exit (meshed pods then talk plaintext); "
            "--on-exit says more", boolean=True),
    Setting("on_exit", parse_on_exit, "",
            "what a stopping agent does with capture: keep (for the next agent, fail closed), remove (as "
            "`nodeagent uninstall`, with the pods' routing), or owner (kube source and --pod: remove only "
            "when it saw its DaemonSet deleted or its Namespace terminating — `kubectl delete -k` —, else "
            "keep: a rolling update, a pod deleted by hand, an API it cannot read). Default: keep, or "
            "remove with --no-keep-on-exit", "|".join(ON_EXIT)),
    Setting("pod", parse_pod, "off",
            "the agent's own pod as NAMESPACE/NAME (from the downward API), read for --on-exit=owner",
            "NAMESPACE/NAME"),
    Setting("poll_interval", parse_interval, "0.1",
            "seconds between checks of the source when inotify cannot report its changes, or while a "
            "pod's enrolment waits for a retry", "SECONDS"),
    Setting("resync_interval", parse_resync_interval, "30",
            "seconds between full scans of the source while inotify reports its changes", "SECONDS"),
    Setting("log_level", parse_choice(LOG_LEVELS), "info", "log level", "|".join(LOG_LEVELS)),
    Setting("log_format", parse_choice(LOG_FORMATS), "text", "log format", "|".join(LOG_FORMATS)),
    Setting("ca_address", parse_optional_target, "off",
            "the mesh CA (nodeagent ca) as HOST:PORT; off: no workload certificates, so no mTLS "
            "(meshed destinations are refused, plaintext inbound still obeys policy)", "HOST:PORT|off"),
    Setting("ca_root_cert", parse_optional_file, "off",
            "PEM file of the mesh root: trust anchor of mTLS and of the CA (root-cert.pem)", "FILE"),
    Setting("ca_token_file", parse_optional_file, "off",
            "file holding this node's bearer token for the CA", "FILE"),
    Setting("ca_server_name", parse_server_name, default_server_name(),
            "DNS name the CA's certificate must carry", "NAME"),
    Setting("trust_domain", parse_trust_domain, "cluster.local", "SPIFFE trust domain of the mesh", "DOMAIN"),
    Setting("cert_ttl", parse_cert_ttl, "24h", "lifetime to ask the CA for (it may give less)", "DURATION"),
    Setting("identity_dir", parse_absolute, DEFAULT_IDENTITY_DIR,
            "directory (0700, tmpfs) of the workload key and certificate files", "DIR"),
    Setting("root_namespace", parse_namespace, "istio-system",
            "Istio root namespace: its policies apply mesh-wide", "NAMESPACE"),
    Setting("flow_log", parse_flow_log, FLOW_LOG_STDERR,
            "where one JSON line per closed connection goes: stderr, off or an absolute file path",
            "stderr|off|FILE"),
    Setting("flow_log_max_mib", parse_flow_log_size, "64",
            "size in MiB at which a flow log file is rotated (to FILE.1, replacing it)", "MIB"),
    Setting("waypoint", parse_bool, "true",
            "run the node's waypoint Envoy for VirtualService, DestinationRule and HTTP-level policy; "
            "false: L4 only (HTTP-only policy rules then fail safe)", boolean=True),
    Setting("waypoint_dir", parse_waypoint_dir, DEFAULT_WAYPOINT_DIR,
            "directory of the waypoint's unix sockets (xDS, Envoy <-> agent), bootstrap and Envoy log", "DIR"),
    Setting("envoy_user", parse_envoy_user, "10337",
            "who the waypoint Envoy runs as, UID[:GID] (numbers; GID defaults to UID), with no capability and "
            "no_new_privs: it parses every meshed pod's HTTP; its admin API is the unix socket envoy/admin.sock in "
            "waypoint_dir. root: as the agent (not recommended). Needs an agent running as root",
            "UID[:GID]|root"),
    Setting("data_path_engine", parse_choice(ENGINES), "auto",
            "who moves the bytes of relayed socket pairs: native (the C engine of native/, splice(2) on its own "
            "thread), python (asyncio), or auto (native when scripts/setup built it, else python); HBONE "
            "streams are hbone_engine's. nodeagent status says which is in use and why",
            "|".join(ENGINES)),
    Setting("hbone_engine", parse_choice(ENGINES), "auto",
            "who carries HBONE (mTLS, HTTP/2 CONNECT and the streams' bytes): native (the C engine of "
            "native/hbone.c on its own thread; refused at start-up unless scripts/setup built it), python "
            "(nodeagent/tunnel, asyncio), or auto (native when scripts/setup built it, else python). "
            "nodeagent status says which is in use and why", "|".join(ENGINES)),
    Setting("same_node_fast_path", parse_bool, "true",
            "a connection from a meshed pod to a meshed pod of this same node skips HBONE: the agent admits it "
            "as the destination would (PeerAuthentication, AuthorizationPolicy with the source's identity), "
            "reports it from both ends as over HBONE and joins the two sockets itself; "
            "--no-same-node-fast-path sends it through HBONE", boolean=True),
    Setting("same_node_sockmap", parse_bool, "false",
            "join the two sockets of a same-node fast-path connection in the kernel (a sockmap verdict "
            "program, bpf/samenode.c) when it loads, so no byte passes through the agent (less CPU; one stream "
            "~0.85 of direct, splice ~0.95); off by default: with a receiver that stops reading, the kernel "
            "queues what its client sends without bound and charged to no cgroup (measured: 6 GiB in 17 s for "
            "one connection), so any pod could exhaust the node's memory. Off, or when it cannot load "
            "(nodeagent status says why): the data path engine joins them, holding at most a pipe per "
            "direction", boolean=True),
    Setting("outbound_in_engine", parse_bool, "true",
            "with the native HBONE engine, the engine accepts the pods' outbound connections itself and opens "
            "the HBONE stream of each on the route the agent learned from the first connection to that "
            "destination (the agent hears of it afterwards, for flows and metrics); the agent still decides "
            "everything else. --no-outbound-in-engine: the agent accepts each one. nodeagent status says which",
            boolean=True),
    Setting("compile_timeout", seconds_between(10, COMPILE_TIMEOUT_MAX), f"{COMPILE_TIMEOUT:g}",
            "seconds the process compiling and loading the eBPF programs (bcc, LLVM) may take before the agent "
            "kills it: then capture does not start and the agent stops, or the same-node join falls back to the "
            "data path engine. ~1 s on two idle cores; 15-100 s under software emulation (the kernel lab's "
            "VMs) or on a starved node", "SECONDS"),
    Setting("hbone_handshake_timeout", seconds_between(1, SERVER_HANDSHAKE_TIMEOUT_MAX),
            f"{TunnelSettings.server_handshake_timeout:g}",
            "seconds a connection to a pod's HBONE port may take from accept to TLS done, its silence before the "
            "ClientHello included, before the agent drops it (hbone_handshake_failures_total{reason=timeout}); "
            "until then it holds one of max_pending_handshakes (1024, all pods) and of "
            "max_pending_handshakes_per_source (128, one client IP). A handshake is milliseconds in a cluster; "
            "raise it only where the agent itself runs slowly (software emulation)", "SECONDS"),
    Setting("memory_limit_mib", parse_memory_limit, "off",
            "the memory limit of the agent's container in MiB (the DaemonSet passes limits.memory through the "
            "downward API): while the agent and its waypoint Envoy hold 90 % of it, new inbound HBONE "
            "connections are reset at accept (hbone_limit_hits_total{limit=memory_limit}) until they hold less "
            "than 85 %, so a flood of connections cannot get the agent killed with every connection of the "
            "node; off: no such limit", "MIB|off"),
    Setting("max_connections_per_pod", parse_connection_cap, str(DEFAULT_MAX_RELAYS // 4),
            "connections the agent relays for one local pod at once (its app's outbound ones and those to it, "
            "plaintext or HBONE streams); a new one past it is reset, or answered 503 on HBONE "
            "(nodeagent_connection_failures_total / nodeagent_hbone_streams_refused_total, reason pod_connection_limit), so one pod "
            "cannot take the relay slots (%d) and descriptors every pod of the node shares; off: no cap"
            % DEFAULT_MAX_RELAYS, "COUNT|off"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    settings.add_arguments(parser, SETTINGS)


UNINSTALL_SETTINGS = tuple(s for s in SETTINGS if s.name in ("cgroup", "bpffs"))


def add_uninstall_arguments(parser: argparse.ArgumentParser) -> None:
    """`nodeagent uninstall` takes the agent's own --cgroup and --bpffs (and variables)."""
    settings.add_arguments(parser, UNINSTALL_SETTINGS)


def load_uninstall(given: Mapping[str, Any] | argparse.Namespace,
                   environ: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """(cgroup, bpffs) of an uninstall, validated as the agent validates them."""
    values = settings.parse_settings(UNINSTALL_SETTINGS, given, environ)
    return values["cgroup"], values["bpffs"]


def load(given: Mapping[str, Any] | argparse.Namespace, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Parse and validate every setting; raise ConfigError naming the first bad one."""
    if "NODEAGENT_ENVOY_ADMIN_PORT" in (os.environ if environ is None else environ):
        raise ConfigError("setting envoy_admin_port (NODEAGENT_ENVOY_ADMIN_PORT)",
                          "is gone: the waypoint Envoy's admin API listens on envoy/admin.sock in waypoint_dir, "
                          "not on a port of the node", "unset it; nodeagent status shows the admin socket")
    values = settings.parse_settings(SETTINGS, given, environ)
    _check_source(values, os.environ if environ is None else environ)
    _check_ports(values)
    if values["delivery_mark"] == values["mark"]:
        raise ConfigError("setting delivery_mark", f"must differ from mark ({values['mark']:#x})",
                          "the pod's reply routing would catch the agent's outbound connections too")
    _check_identity(values)
    _check_on_exit(values, given, os.environ if environ is None else environ)
    return AgentConfig(**values)


def _check_on_exit(values: dict[str, Any], given: Mapping[str, Any] | argparse.Namespace,
                   environ: Mapping[str, str]) -> None:
    """on_exit from --on-exit, else from --[no-]keep-on-exit; keep_on_exit follows it."""
    given = vars(given) if isinstance(given, argparse.Namespace) else given
    keep_given = given.get("keep_on_exit") is not None or "NODEAGENT_KEEP_ON_EXIT" in environ
    on_exit = values["on_exit"]
    if not on_exit:
        on_exit = "keep" if values["keep_on_exit"] else "remove"
    elif keep_given and (on_exit == "remove") == values["keep_on_exit"]:
        raise ConfigError("setting on_exit", f"{on_exit} contradicts keep_on_exit={values['keep_on_exit']}",
                          "give one of --on-exit and --[no-]keep-on-exit")
    if on_exit == "owner":
        if values["source"].partition(":")[0] != "kube":
            raise ConfigError("setting on_exit", "owner reads the agent's DaemonSet from the API",
                              "use it with --source kube, or choose keep or remove")
        if values["pod"] is None:
            raise ConfigError("setting on_exit", "owner needs the agent's own pod",
                              "pass --pod=$(POD_NAMESPACE)/$(POD_NAME) from the downward API")
    values["on_exit"], values["keep_on_exit"] = on_exit, on_exit != "remove"


def _check_source(values: dict[str, Any], environ: Mapping[str, str]) -> None:
    """source_dir and kubeconfig from the source; the kube source's credentials read once
    now, so a missing token or a bad kubeconfig fails the start, naming what is wrong."""
    kind, _, rest = values["source"].partition(":")
    values["source_dir"] = Path(rest) if kind == "files" else None
    if kind != "kube":
        if values["kubeconfig"] is not None:
            raise ConfigError("setting kubeconfig", f"is for the kube source, not {values['source']}",
                              "pass --source kube with --kubeconfig, or drop --kubeconfig")
        return
    if rest:
        if values["kubeconfig"] is not None and values["kubeconfig"] != Path(rest):
            raise ConfigError("setting kubeconfig", f"{values['kubeconfig']} differs from the source's {rest}",
                              "name the kubeconfig once: --source kube:PATH or --source kube --kubeconfig PATH")
        values["kubeconfig"] = Path(rest)
    cluster_config(values["kubeconfig"], environ)


def cluster_config(kubeconfig: Path | None, environ: Mapping[str, str] | None = None) -> ClusterConfig:
    """The kube source's API server and credentials: the kubeconfig's, else in-cluster."""
    return from_kubeconfig(kubeconfig) if kubeconfig is not None else in_cluster(environ)


def _check_identity(values: dict[str, Any]) -> None:
    if values["ca_address"] is None:
        return
    for name in ("ca_root_cert", "ca_token_file"):
        if values[name] is None:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"setting {name}", "is required when ca_address is set",
                              f"pass {flag} or set NODEAGENT_{name.upper()}")


def _check_ports(values: dict[str, Any]) -> None:
    ports = {"outbound_port": values["outbound_port"], "inbound_port": values["inbound_port"],
             "tunnel_port": values["tunnel_port"], "admin_address": values["admin_address"][1]}
    seen: dict[int, str] = {}
    for name, port in ports.items():
        if port in seen:
            raise ConfigError(f"setting {name}", f"port {port} is also used by {seen[port]}",
                              "the agent's in-pod ports and admin port must all differ")
        seen[port] = name
