"""AuthorizationPolicy → envoy.filters.http.rbac filters (a DENY one, then an ALLOW one).

Structure as istiod builds it: one RBAC policy per rule (`ns[<ns>]-policy[<name>]-
rule[<i>]`); a rule's principals are from (OR of sources, AND of fields, OR of values)
AND its principal-side `when` keys, its permissions are to (same shape) AND the
permission-side keys; notX and notValues negate the OR. An ALLOW policy without rules
adds nothing, so a workload whose ALLOW policies have no rules denies everything.
Field → attribute mapping is nodeagent.policy's, shared with the L4 engine.

Attributes come from what the agent vouches for: the source principal (PROXY TLV,
copied to filter state `nodeagent.source_principal`; namespaces and service accounts
are read from it), the client address (PROXY source = Envoy's direct remote address),
the destination port, the request, and the JWT payload jwt_authn verified.
`connection.sni` never matches: the waypoint sees no TLS handshake.
"""

from __future__ import annotations

import ipaddress
import re

from envoy.config.core.v3.address_pb2 import CidrRange
from envoy.config.rbac.v3.rbac_pb2 import RBAC as Rules, Permission, Policy, Principal, SourcedMetadata
from envoy.config.route.v3.route_components_pb2 import HeaderMatcher
from envoy.extensions.filters.http.rbac.v3.rbac_pb2 import RBAC as RbacFilter
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import HttpFilter
from envoy.type.matcher.v3.filter_state_pb2 import FilterStateMatcher
from envoy.type.matcher.v3.metadata_pb2 import MetadataMatcher
from envoy.type.matcher.v3.path_pb2 import PathMatcher
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from envoy.type.matcher.v3.value_pb2 import ListMatcher, ValueMatcher

from nodeagent.policy.authz import ALLOW, DENY, Rule
from nodeagent.policy.rules import OPERATION_FIELDS, SOURCE_FIELDS
from nodeagent.policy.schema import Field
from nodeagent.xds import dataplane
from nodeagent.xds.istio.security import Authorization, request_principal
from nodeagent.xds.translate.jwt import JWT_AUTHN, PAYLOAD
from nodeagent.xds.translate.matches import namespace_regex
from nodeagent.xds.translate.primitives import http_filter, istio_pattern, regex_matcher, u32

RBAC = "envoy.filters.http.rbac"
SPIFFE = "spiffe://"
PRINCIPAL_KEY = dataplane.FILTER_STATE[dataplane.TLV_PRINCIPAL]
PERMISSION_KEYS = ("destination.ip", "destination.port", "connection.sni")
CLAIM = re.compile(r"\[([^\[\]]+)\]")
NEVER = Permission(not_rule=Permission(any=True))


def rbac_filters(authorizations: list[Authorization]) -> list[HttpFilter]:
    """The DENY filter, then the ALLOW one (either absent without such policies)."""
    return [http_filter(RBAC, rbac) for action in (DENY, ALLOW)
            if (rbac := rbac_config(authorizations, action)) is not None]


def rbac_config(authorizations: list[Authorization], action: str, port: int | None = None) -> RbacFilter | None:
    """The RBAC filter's config for the policies of `action` among `authorizations` (None
    without any). `port`: the destination port the policies are for, known ahead (a
    routing waypoint enforcing its endpoints' policy, outbound.py, sees the Service's port,
    not the pod's): rules on `destination.port` (`ports`, `notPorts`, `when`) are decided
    here for it."""
    chosen = [a for a in authorizations if a.policy.action == action]
    if not chosen:
        return None
    policies = {}
    for authz in chosen:
        if authz.policy.fail_closed and authz.policy.rules in ((), (Rule(),)):
            # A refused policy's stand-in (failclosed.py; its spec is not read): an
            # ALLOW without rules adds nothing, a DENY of everything denies any request.
            if action == DENY:
                key = f"ns[{authz.obj.namespace}]-policy[{authz.obj.name}]-fail-closed"
                policies[key] = Policy(permissions=[Permission(any=True)], principals=[Principal(any=True)])
            continue
        for i, rule in enumerate(authz.obj.spec.get("rules") or []):
            key = f"ns[{authz.obj.namespace}]-policy[{authz.obj.name}]-rule[{i}]"
            policies[key] = _policy(rule or {}, authz, f"spec.rules[{i}]", port)
    return RbacFilter(rules=Rules(action=Rules.DENY if action == DENY else Rules.ALLOW, policies=policies))


def _policy(rule: dict, authz: Authorization, path: str, port: int | None = None) -> Policy:
    namespace = authz.obj.namespace
    principals = [_entries(rule.get("from"), "source", SOURCE_FIELDS, namespace, authz, path)]
    permissions = [_entries(rule.get("to"), "operation", OPERATION_FIELDS, namespace, authz, path, port)]
    for cond in rule.get("when") or []:
        if cond["key"] == "connection.sni" and authz.policy.action == DENY:
            continue  # not known here (the agent's TLS, not Envoy's): a DENY is enforced without it, as at L4
        side = permissions if cond["key"] in PERMISSION_KEYS else principals
        for name, negate in (("values", False), ("notValues", True)):
            if cond.get(name):
                side.append(_values(cond["key"], cond[name], negate, namespace, authz, f"{path}.when", port))
    return Policy(principals=[_all([p for p in principals if p is not None], Principal)],
                  permissions=[_all([p for p in permissions if p is not None], Permission)])


def _entries(entries, inner: str, table: dict, namespace: str, authz: Authorization, path: str,
             port: int | None = None):
    if not entries:
        return None
    kind = Principal if inner == "source" else Permission
    alternatives = []
    for entry in entries:
        fields = entry.get(inner) or {}
        alternatives.append(_all([_values(table[name][0], values, table[name][1], namespace, authz, path, port)
                                  for name, values in fields.items() if values], kind))
    return _any(alternatives, kind)


def _values(attribute: str, values: list[str], negate: bool, namespace: str, authz: Authorization, path: str,
            port: int | None = None):
    side = Permission if attribute in PERMISSION_KEYS or attribute in _PERMISSION_BUILDERS else Principal
    if attribute == "destination.port" and port is not None:  # decided here: matches all, or none
        matchers = [Permission(any=True) if int(v) == port else NEVER for v in values]
    else:
        matchers = [_matcher(attribute, v, namespace, authz, path) for v in values]
    one = _any(matchers, side)
    return (Principal(not_id=one) if side is Principal else Permission(not_rule=one)) if negate else one


def _all(items: list, kind):
    if not items:
        return kind(any=True)
    if len(items) == 1:
        return items[0]
    return Principal(and_ids=Principal.Set(ids=items)) if kind is Principal else \
        Permission(and_rules=Permission.Set(rules=items))


def _any(items: list, kind):
    if len(items) == 1:
        return items[0]
    return Principal(or_ids=Principal.Set(ids=items)) if kind is Principal else \
        Permission(or_rules=Permission.Set(rules=items))


def _matcher(attribute: str, value: str, namespace: str, authz: Authorization, path: str):
    if attribute in _PERMISSION_BUILDERS:
        return _PERMISSION_BUILDERS[attribute](value)
    if attribute.startswith("request.headers["):
        return Principal(header=_header(attribute[len("request.headers["):-1], value))
    if attribute.startswith("request.auth.claims["):
        return _claim(CLAIM.findall(attribute[len("request.auth.claims"):]), value)
    if attribute == "request.auth.principal":
        issuer, subject = request_principal(Field(f"{authz.obj.source} ({authz.obj})", path, value), value)
        # as istiod: "any" issuer or subject is a non-empty one (`.+`), and a principal has both
        return _all([_claim(["iss"], "*" if issuer is None else issuer, lists=False),
                     _claim(["sub"], "*" if subject is None else subject, lists=False)], Principal)
    return _PRINCIPAL_BUILDERS[attribute](value, namespace)


def _header(name: str, value: str) -> HeaderMatcher:
    if value == "*":
        return HeaderMatcher(name=name, present_match=True)
    return HeaderMatcher(name=name, string_match=istio_pattern(value))


def _cidr(value: str) -> CidrRange:
    network = ipaddress.ip_network(value, strict=False)
    return CidrRange(address_prefix=str(network.network_address), prefix_len=u32(network.prefixlen))


def _client_ip(value: str, namespace: str) -> Principal:
    """source.ip and remote.ip alike: the PROXY source, the client the agent verified (the
    server-side HCM's `use_remote_address`: no X-Forwarded-For moves it), as at L4."""
    return Principal(remote_ip=_cidr(value))


def _principal_state(matcher: StringMatcher) -> Principal:
    return Principal(filter_state=FilterStateMatcher(key=PRINCIPAL_KEY, string_match=matcher))


def _namespace(value: str, namespace: str) -> Principal:
    if value == "*":
        return _principal_state(regex_matcher(namespace_regex("", "any")))
    if value.endswith("*"):
        return _principal_state(regex_matcher(namespace_regex(value[:-1], "prefix")))
    if value.startswith("*"):
        return _principal_state(regex_matcher(namespace_regex(value[1:], "suffix")))
    return _principal_state(regex_matcher(namespace_regex(value)))


def _service_account(value: str, namespace: str) -> Principal:
    ns, _, sa = value.rpartition("/")
    pattern = namespace_regex(ns or namespace)[:-len(".*")] + "sa/" + dataplane.re2_escape(sa)
    return _principal_state(regex_matcher(pattern))


def _claim(path: list[str], value: str, lists: bool = True) -> Principal:
    """A JWT payload value (a string, or for `lists` a list holding one) as jwt_authn
    stored it, as istiod matches it: `*` is any non-empty string (`.+`), never any value
    at all (false, "", [] or {} are no match: a present_match let them through)."""
    segments = [MetadataMatcher.PathSegment(key=k) for k in [PAYLOAD, *path]]
    string = ValueMatcher(string_match=istio_pattern(value))
    found = [string] + ([ValueMatcher(list_match=ListMatcher(one_of=string))] if lists else [])
    return _any([Principal(sourced_metadata=SourcedMetadata(metadata_matcher=MetadataMatcher(
        filter=JWT_AUTHN, path=segments, value=v))) for v in found], Principal)


_PRINCIPAL_BUILDERS = {
    "source.principal": lambda v, ns: _principal_state(istio_pattern(v, prefix=SPIFFE)),
    "source.namespace": _namespace,
    "source.serviceAccount": _service_account,
    "source.ip": _client_ip,
    "remote.ip": _client_ip,
    "request.auth.audiences": lambda v, ns: _claim(["aud"], v),
    "request.auth.presenter": lambda v, ns: _claim(["azp"], v),  # istiod: a string or a list
}
_PERMISSION_BUILDERS = {
    "request.host": lambda v: Permission(header=HeaderMatcher(
        name=":authority", string_match=istio_pattern(v, ignore_case=True))),
    "request.method": lambda v: Permission(header=_header(":method", v)),
    "request.path": lambda v: Permission(url_path=PathMatcher(path=istio_pattern(v))),
    "destination.port": lambda v: Permission(destination_port=int(v)),
    "destination.ip": lambda v: Permission(destination_ip=_cidr(v)),
    "connection.sni": lambda v: Permission(not_rule=Permission(any=True)),
}
