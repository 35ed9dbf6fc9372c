"""Route tables (RDS): one per client-side service port, one per server-side pod port.

A client-side table has one virtual host matching every authority (the listener already
chose the service by its VIP and port, as Istio's waypoints do) with the routes of the
service's VirtualService for that port: one Envoy route per HTTP match (routes for other
ports or for gateways only are left out), stopping after a catch-all. When nothing is
left for the port, or every route is for particular sources only, the default route
(the service itself, Istio's default retries, no timeout) closes the table: a sidecar
whose sources matched nothing would fall back to it too (see _routes).
"""

from __future__ import annotations

from datetime import timedelta

from envoy.config.core.v3.base_pb2 import Metadata
from envoy.config.route.v3.route_components_pb2 import Route, RouteAction, RouteMatch, VirtualHost
from envoy.config.route.v3.route_pb2 import RouteConfiguration

from nodeagent.model import Service, ServicePort
from nodeagent.xds.istio.virtualservice import MESH_GATEWAY, HttpMatch, HttpRoute, VirtualService
from nodeagent.xds.translate import actions, names
from nodeagent.xds.translate.context import Context
from nodeagent.xds.translate.matches import client_namespace_matcher, is_catch_all, route_match
from nodeagent.xds.translate.primitives import struct


def outbound_table(ctx: Context, service: Service, port: ServicePort) -> RouteConfiguration:
    """The service port's routes; first, for each namespace whose clients see other
    DestinationRules (their own: Catalog.client_rules), the same routes to that
    namespace's clusters, matching only its clients (the PRINCIPAL the agent sent)."""
    name = names.outbound_routes(service.hostname, port.port)
    every = _routes(ctx, service, port)
    routes = []
    for namespace in ctx.client_namespaces():
        with ctx.for_clients(namespace):
            own = _routes(ctx, service, port)
        if own != every:
            for route in own:
                route.match.filter_state.append(client_namespace_matcher(namespace))
            routes += own
    return RouteConfiguration(name=name, virtual_hosts=[VirtualHost(name=name, domains=["*"],
                                                                    routes=routes + every)])


def _routes(ctx: Context, service: Service, port: ServicePort) -> list[Route]:
    """The VirtualService's routes for the port; as a sidecar sees them: one that a route
    for every source applies to gets no default route (a request no route matches is a
    404); when every route is for particular sources, a client matching one of them sees
    only those (404 past them, a catch-all per condition), any other client the service
    itself (the default route), as a sidecar whose sources matched no route falls back."""
    vs = ctx.catalog.virtual_service(service)
    routes = _vs_routes(ctx, vs, port.port) if vs else []
    per_source_only = bool(routes) and all(r.match.filter_state for r in routes)
    if per_source_only:
        conditions = {}
        for r in routes:
            conditions.setdefault(b"".join(m.SerializeToString(deterministic=True) for m in r.match.filter_state),
                                  r.match.filter_state)
        for i, condition in enumerate(conditions.values()):
            past = Route(name=f"{vs.key} sources[{i}] no route", match=RouteMatch(prefix="/", filter_state=condition))
            past.direct_response.CopyFrom(actions.direct_response(404, None))
            routes.append(past)
    if not routes or per_source_only:
        routes.append(default_route(ctx, service, port))
    return routes


def _vs_routes(ctx: Context, vs: VirtualService, port: int) -> list[Route]:
    out = []
    for http in vs.http:
        for index, match in enumerate(http.matches or (None,)):
            if match is not None and not _applies(match, port):
                continue
            route = _route(ctx, vs, http, match, index, port)
            out.append(route)
            if is_catch_all(route.match):
                return out
    return out


def _applies(match: HttpMatch, port: int) -> bool:
    if match.port is not None and match.port != port:
        return False
    return not match.gateways or MESH_GATEWAY in match.gateways


def _route(ctx: Context, vs: VirtualService, http: HttpRoute, match: HttpMatch | None, index: int,
           port: int) -> Route:
    out = Route(name=_name(vs, http, match, index), match=route_match(match), metadata=_config_metadata(vs),
                typed_per_filter_config=actions.fault_config(http.fault))
    if match is not None and match.stat_prefix:
        out.stat_prefix = match.stat_prefix
    headers = actions.HeaderChanges()
    headers.extend(http.headers)
    if http.redirect is not None:
        out.redirect.CopyFrom(actions.redirect(http.redirect, port))
    elif http.direct_status is not None:
        out.direct_response.CopyFrom(actions.direct_response(http.direct_status, http.direct_body))
    else:
        out.route.CopyFrom(actions.route_action(ctx, vs, http, port, headers))
    headers.apply(out)
    return out


def _name(vs: VirtualService, http: HttpRoute, match: HttpMatch | None, index: int) -> str:
    """Istio's name (`<http.name>[.<match.name>]`) when given, else where it came from."""
    if http.name:
        return f"{http.name}.{match.name}" if match is not None and match.name else http.name
    return f"{vs.key} {http.path}" + (f".match[{index}]" if match is not None else "")


def _config_metadata(vs: VirtualService) -> Metadata:
    path = f"/apis/networking.istio.io/v1/namespaces/{vs.namespace}/virtual-service/{vs.name}"
    return Metadata(filter_metadata={"istio": struct({"config": path})})


def default_route(ctx: Context, service: Service, port: ServicePort) -> Route:
    return Route(name="default", match=RouteMatch(prefix="/"), route=RouteAction(
        cluster=ctx.cluster(service, port), timeout=timedelta(0), retry_policy=actions.retry_policy(None)))


def inbound_table(port: int) -> RouteConfiguration:
    """Everything to the pod (the agent delivers to the PROXY destination), no timeout."""
    name = names.inbound_routes(port)
    route = Route(name="default", match=RouteMatch(prefix="/"),
                  route=RouteAction(cluster=names.inbound_cluster(port), timeout=timedelta(0)))
    return RouteConfiguration(name=name, virtual_hosts=[VirtualHost(name=name, domains=["*"], routes=[route])])
