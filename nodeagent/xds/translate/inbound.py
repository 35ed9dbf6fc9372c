"""The server-side waypoint: one listener on inbound.sock with a filter chain per
(local pod IP, HTTP port) for the meshed pods of this node that need L7 policy, chosen
by the destination in the agent's PROXY header.

A pod needs it when an enforced AuthorizationPolicy applying to it has fields only HTTP
can evaluate, a RequestAuthentication selects it, or a rate-limit EnvoyFilter does. Its
chains then enforce *every* policy applying to it (the agent sends its HTTP traffic here
and leaves authorization to Envoy): local rate limits placed first, jwt_authn, RBAC
DENY, RBAC ALLOW, rate limits placed before the router, router. Only the pod ports a
Service names as HTTP get a chain; the agent keeps enforcing the others at L4.
Policies bound by targetRef to a Service apply to that Service's pods. A pod that a
withheld policy selects (Envoy refused it; IstioConfig.withheld) gets no chain: Envoy
would enforce all its policies but that one, the agent enforces them all at L4.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from functools import cached_property

from envoy.config.core.v3.address_pb2 import CidrRange
from envoy.config.listener.v3.listener_components_pb2 import FilterChain, FilterChainMatch
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import HttpFilter

from nodeagent.model import MESHED_PHASES, Pod
from nodeagent.policy.authz import ALLOW, DENY
from nodeagent.policy.scope import Scope, labels_match
from nodeagent.xds import dataplane
from nodeagent.xds.istio.envoyfilter import LOCAL_RATELIMIT, EnvoyFilter, RateLimitPatch
from nodeagent.xds.istio.security import Authentication, Authorization
from nodeagent.xds.resources import serialize
from nodeagent.xds.translate import listeners, names, routes
from nodeagent.xds.translate.authz import rbac_filters
from nodeagent.xds.translate.context import Context
from nodeagent.xds.translate.jwt import jwt_filter
from nodeagent.xds.translate.primitives import http_filter, u32
from nodeagent.xds.translate.services import TCP, protocol

TLVS = (dataplane.TLV_PRINCIPAL,)


@dataclass(frozen=True)
class ServerSide:
    """What a meshed pod's server-side chains enforce: its AuthorizationPolicies (ALLOW and
    DENY, enforced), RequestAuthentications and rate-limit patches."""

    authz: tuple[Authorization, ...]
    authn: tuple[Authentication, ...]
    limits: tuple[RateLimitPatch, ...]

    @property
    def policy(self) -> bool:
        """HTTP policy: every HTTP port gets a chain."""
        return any(a.policy.has_l7 for a in self.authz) or bool(self.authn)

    def served(self, port: int) -> bool:
        """Whether its port (one a Service names as HTTP) gets a chain."""
        return self.policy or any(p.port in (None, port) for p in self.limits)

    @cached_property
    def digest(self) -> str | None:
        """What a routing waypoint enforcing it for the pod says it enforced (one waypoint per
        request, outbound.py): a digest of its AuthorizationPolicies (each one's namespace,
        name, action and spec); None when it cannot be enforced there but here: a
        RequestAuthentication (jwt_authn's keys are this node's to fetch), a rate limit (a
        bucket per pod), or a rule on the destination address, which the routing waypoint
        sees as the Service's (`destination.ip`; a rule on the port it decides for the
        endpoints' port, outbound.py)."""
        if self.authn or self.limits or not self.policy or any(_on_destination(a) for a in self.authz):
            return None
        parts = sorted((a.obj.namespace, a.obj.name, a.policy.action, a.policy.fail_closed,
                        json.dumps(a.obj.spec, sort_keys=True, default=str)) for a in self.authz)
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]

    def enforced(self, port: int) -> str | None:
        """What a routing waypoint that enforced it for the pod's `port` says: the digest and
        the port its rules on the port were decided for (so a router's rules decided for one
        port never pass for a request to another)."""
        return f"{self.digest}-{port}" if self.digest is not None else None


DESTINATION_ATTRIBUTES = ("destination.ip",)


def _on_destination(authz: Authorization) -> bool:
    return any(c.attribute in DESTINATION_ATTRIBUTES for rule in authz.policy.rules
               for c in (*rule.conditions, *(c for group in rule.operations for c in group),
                         *(c for group in rule.sources for c in group)))


def server_side(ctx: Context, pod: Pod) -> ServerSide | None:
    """What `pod`'s server-side chains enforce (on any node: a routing waypoint reads it
    for the endpoints it picks), or None when it gets none: not meshed, selected by a
    withheld policy (the agent enforces all its policies at L4), or nothing HTTP applies."""
    if pod.key not in ctx.sides:
        ctx.sides[pod.key] = _server_side(ctx, pod)
    return ctx.sides[pod.key]


def _server_side(ctx: Context, pod: Pod) -> ServerSide | None:
    if not (ctx.model.is_meshed(pod) and pod.ip and pod.phase in MESHED_PHASES):  # as enrolment
        return None
    if any(selects(ctx, w.policy.scope, pod) for w in ctx.config.withheld):
        return None
    side = ServerSide(
        tuple(a for a in ctx.config.authorizations if a.policy.action in (ALLOW, DENY)
              and not a.policy.dry_run and selects(ctx, a.policy.scope, pod)),
        tuple(r for r in ctx.config.authentications if selects(ctx, r.policy.scope, pod)),
        tuple(p for ef in _ordered(ctx) if _filter_selects(ctx, ef, pod) for p in ef.patches))
    return side if side.policy or side.limits else None


def build(ctx: Context) -> tuple[Listener | None, list[RouteConfiguration], list[int], dict[tuple[str, int], str],
                                 dict[tuple[str, int], str]]:
    """(the inbound listener or None, its route tables, the pod ports it delivers to,
    the (pod IP, port)s it serves with the digest of each one's filter chain, and those a
    routing waypoint may enforce with ServerSide.digest)."""
    _warn_unbound(ctx)
    chains, served, enforceable = [], {}, {}
    for pod in ctx.model.pods_on_node(ctx.node):
        side = server_side(ctx, pod)
        if side is None:
            continue
        head = ([jwt_filter(ctx, list(side.authn))] if any(a.rules for a in side.authn) else []) + \
            rbac_filters(list(side.authz))
        for port in http_ports(ctx, pod):
            if side.served(port):
                chain = _chain(ctx, pod, port, _with_limits(head, list(side.limits), port))
                chains.append(chain)
                served[(pod.ip, port)] = chain_digest(chain)
                if side.digest is not None:
                    enforceable[(pod.ip, port)] = side.enforced(port)
    if not chains:
        return None, [], [], {}, {}
    ports = sorted({port for _, port in served})
    listener = listeners.listener(names.INBOUND_LISTENER, ctx.options.sockets.inbound, TLVS, chains)
    return listener, [routes.inbound_table(p) for p in ports], ports, served, enforceable


def chain_digest(chain: FilterChain) -> str:
    """What Envoy compares to keep a filter chain across a listener update (its serialized
    config): equal digests, the connections on it keep their policy; else they are drained."""
    return hashlib.sha256(serialize(chain)).hexdigest()[:16]


def selects(ctx: Context, scope: Scope, pod: Pod) -> bool:
    """As the L4 engine selects: targetRefs to a Service bound to its pods (Scope.bound)."""
    return scope.bound(ctx.model.services).selects(pod, ctx.config.root_namespace)


def _warn_unbound(ctx: Context) -> None:
    for resource in ctx.config.authorizations + ctx.config.authentications:
        for ref in resource.policy.scope.target_refs:
            if ref.kind != "Service":
                ctx.warn(f"{resource.obj.source} ({resource.obj}) spec.targetRef",
                         f"{ref.kind} {ref.name} is not served by nodeagent's waypoint; the policy applies "
                         "to no workload here", "target a Service, or select pods with selector")


def _ordered(ctx: Context) -> list[EnvoyFilter]:
    """istiod's order: priority, then the root namespace's before the workload's."""
    root = ctx.config.root_namespace
    return sorted(ctx.config.envoy_filters, key=lambda ef: (ef.priority, ef.namespace != root, ef.namespace, ef.name))


def _filter_selects(ctx: Context, ef: EnvoyFilter, pod: Pod) -> bool:
    if ef.namespace not in (ctx.config.root_namespace, pod.namespace):
        return False
    return ef.selector is None or labels_match(ef.selector, pod)


def http_ports(ctx: Context, pod: Pod) -> list[int]:
    """The pod's ports that a Service selecting it names as HTTP."""
    if pod.key not in ctx.pod_http_ports:
        ctx.pod_http_ports[pod.key] = _http_ports(ctx, pod)
    return ctx.pod_http_ports[pod.key]


def _http_ports(ctx: Context, pod: Pod) -> list[int]:
    ports = set()
    for service in ctx.model.services.values():
        if service.namespace != pod.namespace or not service.selector or not labels_match(service.selector, pod):
            continue
        vs = ctx.catalog.virtual_service(service)
        for port in service.ports:
            if port.protocol.upper() != "TCP" or protocol(port, vs) == TCP:
                continue
            target = ctx.options.target_port(pod, port)
            if target is None:
                ctx.warn(f"Service {service.namespace}/{service.name} port {port.port}",
                         f"pod {pod.namespace}/{pod.name} has no container port named {port.target_port!r}; "
                         "it gets no server-side L7 on it", "name the port in the pod's containers")
                continue
            ports.add(target)
    return sorted(ports)


def _with_limits(head: list[HttpFilter], patches: list[RateLimitPatch], port: int) -> list[HttpFilter]:
    first, before_router = [], []
    for patch in patches:
        if patch.port is not None and patch.port != port:
            continue
        taken = len(first) + len(before_router)
        name = LOCAL_RATELIMIT if taken == 0 else f"{LOCAL_RATELIMIT}.{taken}"
        if patch.first:
            first.insert(0, http_filter(name, patch.config))  # each INSERT_FIRST goes to the head
        else:
            before_router.append(http_filter(name, patch.config))
    return first + head + before_router


def _chain(ctx: Context, pod: Pod, port: int, filters: list[HttpFilter]) -> FilterChain:
    ip = ipaddress.ip_address(pod.ip)
    match = FilterChainMatch(prefix_ranges=[CidrRange(address_prefix=str(ip), prefix_len=u32(ip.max_prefixlen))],
                             destination_port=u32(port))
    hcm = listeners.http_connection_manager(f"inbound|{port}|{pod.namespace}/{pod.name}",
                                            names.inbound_routes(port), filters,
                                            log_name=names.INBOUND_LISTENER, log_path=ctx.options.sockets.access_log)
    return FilterChain(name=f"inbound|{pod.namespace}/{pod.name}|{port}", filter_chain_match=match,
                       filters=[listeners.set_filter_state(TLVS), hcm])
