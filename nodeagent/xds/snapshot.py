"""An immutable, versioned, internally consistent set of xDS resources for one node.

As go-control-plane's snapshot: resources are grouped by type, each type gets a version
(here a hash of its content, so an unchanged type is never pushed again), and
`Snapshot.build` refuses, with InconsistentSnapshot naming the dangling reference, a set
in which a listener names a route table or cluster that is absent, a route names an
absent cluster, an EDS cluster has no endpoints resource, or an endpoint names an
internal listener that does not exist. Resources are kept serialized, so nobody can
change a published snapshot; `resources()` hands out fresh copies. `wanted` names what a
proxy holding it subscribes to by name: the route tables its listeners use and the
endpoints its EDS clusters ask for.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Iterator, Mapping

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_components_pb2 import Route
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager)
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy
from google.protobuf.message import Message

from nodeagent.errors import NodeagentError
from nodeagent.xds import resources as rt
from nodeagent.xds.dataplane import DataPlane

KIND = {rt.CLUSTER: "cluster", rt.ENDPOINT: "endpoints", rt.LISTENER: "listener", rt.ROUTE: "route table"}


class InconsistentSnapshot(NodeagentError):
    """A resource references one the snapshot lacks; the snapshot is not published."""

    def __init__(self, dangling: list[tuple[str, str, str, str]]):
        self.dangling = dangling  # (kind, name, missing kind, missing name)
        kind, name, missing_kind, missing = dangling[0]
        more = f" (and {len(dangling) - 1} more)" if len(dangling) > 1 else ""
        super().__init__(f"{kind} {name!r} references {missing_kind} {missing!r}, which the snapshot "
                         f"does not have{more}", "this is a translation bug: the previous snapshot stays in force")


@dataclass(frozen=True)
class Snapshot:
    version: str
    serialized: Mapping[str, Mapping[str, bytes]] = field(repr=False)  # type URL → name → message bytes
    versions: Mapping[str, str]  # type URL → content version
    dataplane: DataPlane | None = None
    wanted: Mapping[str, frozenset[str]] = field(default_factory=dict)  # type URL (EDS, RDS) → names

    @classmethod
    def build(cls, version: str, messages: Iterable[Message],
              dataplane: DataPlane | None = None) -> "Snapshot":
        by_type: dict[str, dict[str, Message]] = {t: {} for t in rt.PUSH_ORDER}
        for message in messages:
            kind, name = rt.type_of(message), rt.name_of(message)
            if not name or name in by_type[kind]:
                raise ValueError(f"{KIND[kind]} name {name!r} is empty or given twice")
            by_type[kind][name] = message
        dangling = list(_dangling(by_type))
        if dangling:
            raise InconsistentSnapshot(dangling)
        serialized = {t: MappingProxyType({n: rt.serialize(m) for n, m in sorted(ms.items())})
                      for t, ms in by_type.items()}
        versions = {t: _content_version(s) for t, s in serialized.items()}
        wanted = {rt.ROUTE: frozenset(t for x in by_type[rt.LISTENER].values() for t in listener_routes(x)),
                  rt.ENDPOINT: frozenset(eds_name(c) for c in by_type[rt.CLUSTER].values()
                                         if c.type == Cluster.DiscoveryType.EDS)}
        return cls(version, MappingProxyType(serialized), MappingProxyType(versions), dataplane,
                   MappingProxyType(wanted))

    def names(self, type_url: str) -> list[str]:
        return list(self.serialized.get(type_url, {}))

    def resources(self, type_url: str) -> dict[str, Message]:
        cls = rt.MESSAGE[type_url]
        return {n: cls.FromString(b) for n, b in self.serialized.get(type_url, {}).items()}

    def version_of(self, type_url: str) -> str:
        return self.versions.get(type_url, "")


def _content_version(resources: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name, data in resources.items():
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()[:16]


def _dangling(by_type: dict[str, dict[str, Message]]) -> Iterator[tuple[str, str, str, str]]:
    clusters, routes, listeners = by_type[rt.CLUSTER], by_type[rt.ROUTE], by_type[rt.LISTENER]
    for listener in listeners.values():
        for table in listener_routes(listener):
            if table not in routes:
                yield "listener", listener.name, "route table", table
        for cluster in listener_clusters(listener):
            if cluster not in clusters:
                yield "listener", listener.name, "cluster", cluster
    for table in routes.values():
        for cluster in route_clusters(table):
            if cluster not in clusters:
                yield "route table", table.name, "cluster", cluster
    for cluster in clusters.values():
        yield from _cluster_dangling(cluster, by_type[rt.ENDPOINT], listeners)


def _cluster_dangling(cluster: Cluster, endpoints: dict, listeners: dict) -> Iterator[tuple[str, str, str, str]]:
    if cluster.type == Cluster.DiscoveryType.EDS:
        name = eds_name(cluster)
        if name not in endpoints:
            yield "cluster", cluster.name, "endpoints", name
            return
        assignment = endpoints[name]
    else:
        assignment = cluster.load_assignment
    for listener in internal_listeners(assignment):
        if listener not in listeners or not listeners[listener].HasField("internal_listener"):
            yield "cluster", cluster.name, "internal listener", listener


def eds_name(cluster: Cluster) -> str:
    """The endpoints resource an EDS cluster asks for."""
    return cluster.eds_cluster_config.service_name or cluster.name


def internal_listeners(assignment: ClusterLoadAssignment | None) -> set[str]:
    out = set()
    for locality in assignment.endpoints if assignment is not None else []:
        for lb in locality.lb_endpoints:
            address = lb.endpoint.address
            if address.HasField("envoy_internal_address"):
                out.add(address.envoy_internal_address.server_listener_name)
    return out


def _network_filters(listener: Listener) -> Iterator[Message]:
    for chain in list(listener.filter_chains) + ([listener.default_filter_chain]
                                                 if listener.HasField("default_filter_chain") else []):
        for f in chain.filters:
            if f.HasField("typed_config"):
                yield rt.unpack(f.typed_config)


def listener_routes(listener: Listener) -> Iterator[str]:
    for config in _network_filters(listener):
        if isinstance(config, HttpConnectionManager) and config.HasField("rds"):
            yield config.rds.route_config_name


def listener_clusters(listener: Listener) -> Iterator[str]:
    for config in _network_filters(listener):
        if isinstance(config, TcpProxy):
            if config.cluster:
                yield config.cluster
            if config.HasField("weighted_clusters"):
                yield from (c.name for c in config.weighted_clusters.clusters)


def route_clusters(table: RouteConfiguration) -> Iterator[str]:
    """Every cluster a route table can send a request (or a mirrored copy) to."""
    for vhost in table.virtual_hosts:
        for route in vhost.routes:
            yield from action_clusters(route)


def action_clusters(route: Route) -> Iterator[str]:
    if not route.HasField("route"):
        return
    action = route.route
    if action.cluster:
        yield action.cluster
    if action.HasField("weighted_clusters"):
        yield from (c.name for c in action.weighted_clusters.clusters)
    yield from (m.cluster for m in action.request_mirror_policies)
