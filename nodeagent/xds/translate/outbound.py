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
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.http.fault.v3.fault_pb2 import HTTPFault
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy

from nodeagent.model import Service, ServicePort
from nodeagent.xds import dataplane
from nodeagent.xds.istio.virtualservice import VirtualService
from nodeagent.xds.translate import listeners, names, routes
from nodeagent.xds.translate.context import Context
from nodeagent.xds.translate.primitives import http_filter, u32
from nodeagent.xds.translate.services import TCP, client_side, protocol

TLVS = (dataplane.TLV_PRINCIPAL, dataplane.TLV_SOURCE_LABELS, dataplane.TLV_SOURCE_WORKLOAD)


def build(ctx: Context) -> tuple[Listener | None, list[RouteConfiguration], frozenset[tuple[str, int]]]:
    """(the outbound listener or None, its route tables, the (VIP, port)s it serves)."""
    chains, tables, served = [], [], set()
    for service in client_side(ctx.catalog):
        vs = ctx.catalog.virtual_service(service)
        for port in service.ports:
            if port.protocol.upper() != "TCP":
                continue
            chains.append(_chain(ctx, service, port, vs, tables))
            served.add((service.cluster_ip, port.port))
    if not chains:
        return None, [], frozenset()
    listener = listeners.listener(names.OUTBOUND_LISTENER, ctx.options.sockets.outbound, TLVS, chains)
    return listener, tables, frozenset(served)


def _chain(ctx: Context, service: Service, port: ServicePort, vs: VirtualService | None,
           tables: list[RouteConfiguration]) -> FilterChain:
    name = names.outbound_cluster(service.hostname, port.port)
    ip = ipaddress.ip_address(service.cluster_ip)
    match = FilterChainMatch(prefix_ranges=[CidrRange(address_prefix=str(ip), prefix_len=u32(ip.max_prefixlen))],
                             destination_port=u32(port.port))
    if protocol(port, vs) == TCP:
        network = listeners.tcp_proxy(name, _tcp_target(ctx, service, port, vs))
    else:
        table = routes.outbound_table(ctx, service, port)
        tables.append(table)
        network = listeners.http_connection_manager(name, table.name,
                                                    [http_filter("envoy.filters.http.fault", HTTPFault())],
                                                    log_name=names.OUTBOUND_LISTENER,
                                                    log_path=ctx.options.sockets.access_log)
    return FilterChain(name=name, filter_chain_match=match, filters=[listeners.set_filter_state(TLVS), network])


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
