"""The client-side waypoint: one listener on outbound.sock with a filter chain per
(service VIP, port) that needs L7, chosen by the original destination the agent put in
the PROXY header. HTTP ports get an HTTP connection manager (fault filter, router) with
the port's route table over RDS; TCP ports a tcp_proxy to the first tcp route of the
VirtualService that applies to the port (weighted clusters), else to the service.
"""

from __future__ import annotations

import ipaddress

from envoy.config.core.v3.address_pb2 import CidrRange
from envoy.config.listener.v3.listener_components_pb2 import FilterChain, FilterChainMatch
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_components_pb2 import Route
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.http.fault.v3.fault_pb2 import HTTPFault
from envoy.extensions.filters.http.rbac.v3.rbac_pb2 import RBAC as RbacFilter, RBACPerRoute
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy

from nodeagent.model import Pod, Service, ServicePort
from nodeagent.policy.authz import ALLOW, DENY
from nodeagent.xds import dataplane
from nodeagent.xds.istio.virtualservice import VirtualService
from nodeagent.xds.resources import pack
from nodeagent.xds.translate import clusters, listeners, names, routes
from nodeagent.xds.translate.authz import rbac_config
from nodeagent.xds.translate.context import Context
from nodeagent.xds.translate.inbound import ServerSide, http_ports, server_side
from nodeagent.xds.translate.primitives import http_filter, u32
from nodeagent.xds.translate.services import TCP, client_side, protocol

TLVS = (dataplane.TLV_PRINCIPAL, dataplane.TLV_SOURCE_LABELS, dataplane.TLV_SOURCE_WORKLOAD)


Enforced = dict[tuple[str, int], dict[tuple[str, int], str]]


def build(ctx: Context) -> tuple[Listener | None, list[RouteConfiguration], frozenset[tuple[str, int]], Enforced]:
    """(the outbound listener or None, its route tables, the (VIP, port)s it serves, and
    for those with routes that enforce their endpoints' HTTP policy (_enforce), each such
    endpoint's ServerSide.digest)."""
    chains, tables, served, enforced = [], [], set(), {}
    for service in client_side(ctx.catalog):
        vs = ctx.catalog.virtual_service(service)
        for port in service.ports:
            if port.protocol.upper() != "TCP":
                continue
            chains.append(_chain(ctx, service, port, vs, tables, enforced))
            served.add((service.cluster_ip, port.port))
    if not chains:
        return None, [], frozenset(), {}
    listener = listeners.listener(names.OUTBOUND_LISTENER, ctx.options.sockets.outbound, TLVS, chains)
    return listener, tables, frozenset(served), enforced


def _chain(ctx: Context, service: Service, port: ServicePort, vs: VirtualService | None,
           tables: list[RouteConfiguration], enforced: Enforced) -> FilterChain:
    name = names.outbound_cluster(service.hostname, port.port)
    ip = ipaddress.ip_address(service.cluster_ip)
    match = FilterChainMatch(prefix_ranges=[CidrRange(address_prefix=str(ip), prefix_len=u32(ip.max_prefixlen))],
                             destination_port=u32(port.port))
    if protocol(port, vs) == TCP:
        network = listeners.tcp_proxy(name, _tcp_target(ctx, service, port, vs))
    else:
        table = routes.outbound_table(ctx, service, port)
        tables.append(table)
        endpoints = _enforce(ctx, table)
        if endpoints:
            enforced[(service.cluster_ip, port.port)] = endpoints
        network = listeners.http_connection_manager(name, table.name, list(HTTP_FILTERS),
                                                    log_name=names.OUTBOUND_LISTENER,
                                                    log_path=ctx.options.sockets.access_log)
    return FilterChain(name=name, filter_chain_match=match, filters=[listeners.set_filter_state(TLVS), network])


# Every HTTP chain has both RBAC filters, without rules of their own (so doing nothing):
# the routes that enforce their endpoints' HTTP policy give them its rules (_enforce), so
# a policy change reaches the routes and their clusters in one route table, never a chain.
RBAC_DENY, RBAC_ALLOW = "nodeagent.rbac.deny", "nodeagent.rbac.allow"
HTTP_FILTERS = (http_filter("envoy.filters.http.fault", HTTPFault()), http_filter(RBAC_DENY, RbacFilter()),
                http_filter(RBAC_ALLOW, RbacFilter()))


def _enforce(ctx: Context, table: RouteConfiguration) -> dict[tuple[str, int], str]:
    """One waypoint per request (design.md): a route all of whose endpoints have the same
    server-side HTTP policy, one a routing waypoint can enforce (ServerSide.digest),
    enforces it here (RBAC_DENY and RBAC_ALLOW get its rules for the route, after the
    fault filter, where the sidecar pair's server enforces it after the client's faults;
    its rules on the destination port decided for the endpoints' one pod port, which
    Envoy here would read as the Service's) and goes to its clusters' enforced variants, whose connections tell the agent the
    policy's digest (dataplane.TLV_ENFORCED): the destination's agent then delivers straight
    to the pod, its own waypoint skipped. Any other route is left as it was, and the
    destination's waypoint enforces the policy: an endpoint without such a policy or with
    another one, a route that changes what the policy reads before the destination would
    read it (a rewrite of the path or authority, request headers set or removed) or sends
    a copy elsewhere (a mirror). Returns the endpoints enforced, with the digest."""
    enforced: dict[tuple[str, int], str] = {}
    for route in (r for vh in table.virtual_hosts for r in vh.routes):
        found = _route_policy(ctx, route)
        if found is None:
            continue
        side, endpoints = found
        port = endpoints[0][1]  # every endpoint's (_route_policy): what rules on the port are decided for
        said = side.enforced(port)
        action = route.route
        if action.cluster:
            action.cluster = ctx.enforced_cluster(action.cluster, said)
        for weighted in action.weighted_clusters.clusters:
            weighted.name = ctx.enforced_cluster(weighted.name, said)
        for name, config in ((RBAC_DENY, DENY), (RBAC_ALLOW, ALLOW)):
            rbac = rbac_config(list(side.authz), config, port)
            if rbac is not None:
                route.typed_per_filter_config[name].CopyFrom(pack(RBACPerRoute(rbac=rbac)))
        enforced.update(dict.fromkeys(endpoints, said))
    return enforced


def _route_policy(ctx: Context, route: Route) -> tuple[ServerSide, list[tuple[str, int]]] | None:
    """The one HTTP policy every endpoint of `route` has, and those endpoints; None when
    the route cannot enforce it (_enforce)."""
    if not route.HasField("route") or route.request_headers_to_add or route.request_headers_to_remove:
        return None
    action = route.route
    if action.request_mirror_policies or action.prefix_rewrite or action.HasField("regex_rewrite") or \
            action.host_rewrite_literal or action.HasField("host_rewrite_header") or \
            action.HasField("host_rewrite_path_regex") or action.HasField("path_rewrite_policy") or \
            action.HasField("auto_host_rewrite"):
        return None
    targets = [action.cluster] if action.cluster else []
    for weighted in action.weighted_clusters.clusters:
        if weighted.request_headers_to_add or weighted.request_headers_to_remove or weighted.host_rewrite_literal:
            return None
        targets.append(weighted.name)
    sides: dict[str, ServerSide] = {}
    endpoints: list[tuple[str, int]] = []
    for cluster in targets:
        found = _endpoints(ctx, cluster)
        if not found:  # a dangling destination, a passthrough, no endpoint: nothing to vouch for
            return None
        for pod, target in found:
            side = server_side(ctx, pod)
            if side is None or side.digest is None or not side.served(target) or target not in http_ports(ctx, pod):
                return None
            sides[side.digest] = side
            endpoints.append((pod.ip, target))
    if len(sides) != 1 or len({port for _, port in endpoints}) != 1:  # one policy, on one pod port
        return None
    return next(iter(sides.values())), endpoints


def _endpoints(ctx: Context, cluster: str) -> list[tuple[Pod, int]] | None:
    """The pods (and target ports) cluster `cluster` balances over, as clusters.py assigns
    them; None for one of another kind (BlackHoleCluster, a PASSTHROUGH DestinationRule)."""
    spec = ctx.clusters.get(cluster)
    if spec is None or clusters.passthrough(ctx, spec):
        return None
    return [(pod, port) for pod, port in clusters.members(ctx, spec) if port is not None]


def _tcp_target(ctx: Context, service: Service, port: ServicePort, vs: VirtualService | None) -> TcpProxy:
    for route in vs.tcp if vs else ():
        if not route.mesh or (route.ports and not any(p in (None, port.port) for p in route.ports)):
            continue
        live = [(i, d) for i, d in enumerate(route.route) if d.weight or len(route.route) == 1]
        targets = [(ctx.destination(d.destination, vs.namespace, port.port,
                                    f"{vs.where} {route.path}.route[{i}].destination"), d.weight)
                   for i, d in live]
        if len(targets) == 1:
            return TcpProxy(cluster=targets[0][0])
        return TcpProxy(weighted_clusters=TcpProxy.WeightedCluster(clusters=[
            TcpProxy.WeightedCluster.ClusterWeight(name=c, weight=w) for c, w in targets]))
    return TcpProxy(cluster=ctx.cluster(service, port))
