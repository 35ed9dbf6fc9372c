"""Validation of security.istio.io resources into the policy engine's typed form.

`validate(obj)` turns one AuthorizationPolicy, PeerAuthentication or
RequestAuthentication from the Model into the immutable type the engine evaluates, or
raises ConfigError naming the resource, the field path, what is wrong and what to do.
The checks are the CRD schema's (unknown fields, types, enums) plus those of istiod's
webhook, so YAML Istio accepts is accepted and YAML it refuses is refused. Deliberate
refusals beyond Istio: action CUSTOM (no ext-authz provider here) and AUDIT (no audit
provider: it would be accepted and do nothing). What a refused resource enforces when it
has no last good version is failclosed.py's. Pure.
"""

from __future__ import annotations

import re
from types import MappingProxyType
from typing import Callable
from urllib.parse import urlparse

from nodeagent.kube.objects import KubeObject
from nodeagent.policy import jwkset, rules as rule_reader
from nodeagent.policy.authz import ALLOW, AUDIT, CUSTOM, DENY, AuthorizationPolicy
from nodeagent.policy.peerauth import MODES, UNSET, PeerAuthentication
from nodeagent.policy.requestauth import RequestAuthentication
from nodeagent.policy.schema import Field, attempt, created, resource_name
from nodeagent.policy.scope import Scope, TargetRef

GROUP = "security.istio.io"
VERSIONS = (f"{GROUP}/v1", f"{GROUP}/v1beta1")
AUTHORIZATION_POLICY = "AuthorizationPolicy"
PEER_AUTHENTICATION = "PeerAuthentication"
REQUEST_AUTHENTICATION = "RequestAuthentication"
KINDS = (AUTHORIZATION_POLICY, PEER_AUTHENTICATION, REQUEST_AUTHENTICATION)
ACTIONS = (ALLOW, DENY, AUDIT, CUSTOM)
DRY_RUN_ANNOTATION = "istio.io/dry-run"
# (group, kind) a targetRef may name; "core" is the Kubernetes core group, as in istiod.
TARGET_KINDS = (("core", "Service"), ("networking.istio.io", "ServiceEntry"),
                ("gateway.networking.k8s.io", "Gateway"), ("gateway.networking.k8s.io", "GatewayClass"))
DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+\Z")
JWT_FIELDS = ("issuer", "audiences", "jwksUri", "jwks", "fromHeaders", "fromParams", "fromCookies",
              "outputPayloadToHeader", "forwardOriginalToken", "outputClaimToHeaders", "timeout",
              "spaceDelimitedClaims")

Policy = AuthorizationPolicy | PeerAuthentication | RequestAuthentication


def validate(obj: KubeObject) -> Policy:
    """The typed form of `obj`; raises ConfigError if it is invalid."""
    if obj.kind not in KINDS:
        raise Field(resource_name(obj), "kind", obj.kind).error(
            f"{obj.kind} is not a security.istio.io kind the policy engine reads")
    if obj.api_version not in VERSIONS:
        raise Field(resource_name(obj), "apiVersion", obj.api_version).error(
            f"{obj.api_version} {obj.kind} is not supported", f"use {' or '.join(VERSIONS)}")
    return _READERS[obj.kind](obj)


# --- AuthorizationPolicy -------------------------------------------------------------
def authorization_policy(obj: KubeObject) -> AuthorizationPolicy:
    spec = Field.spec_of(obj)
    f = spec.fields(("selector", "targetRef", "targetRefs", "rules", "action", "provider"))
    scope = attempt(lambda: read_scope(obj, spec, f))
    action = attempt(lambda: f["action"].enum(ACTIONS, ALLOW), ALLOW)
    attempt(lambda: _action(f, action))
    rules = tuple(f["rules"].each(lambda r: rule_reader.rule(r, obj.namespace)))
    if action == DENY and not f["rules"].items():
        raise f["rules"].error("a DENY policy without rules would never match",
                               "add the empty rule `- {}` to deny every connection, as Istio requires")
    return AuthorizationPolicy(obj.name, scope, action, rules, dry_run(obj))


def _action(f: dict[str, Field], action: str) -> None:
    if action == CUSTOM:
        raise f["action"].error("CUSTOM needs an ext-authz provider, and nodeagent has none",
                                "express the policy with ALLOW/DENY rules, or remove it")
    if action == AUDIT:
        raise f["action"].error("AUDIT only marks requests for an audit log provider (Istio's Stackdriver), "
                                "and nodeagent has none: the policy would decide nothing and record nothing",
                                "to see what a policy would decide without enforcing it, annotate an ALLOW "
                                f"or DENY policy with {DRY_RUN_ANNOTATION}: \"true\"; or remove it")
    if f["provider"].present:
        raise f["provider"].error("provider is only for action CUSTOM", "remove it")


def dry_run(obj: KubeObject) -> bool:
    """Go's strconv.ParseBool, as istiod reads the annotation: anything else (`tRUE`) is
    no dry run, the policy enforced (istiod logs it and enforces it)."""
    return obj.annotations.get(DRY_RUN_ANNOTATION, "") in ("1", "t", "T", "TRUE", "true", "True")


# --- PeerAuthentication --------------------------------------------------------------
def peer_authentication(obj: KubeObject) -> PeerAuthentication:
    f = Field.spec_of(obj).fields(("selector", "mtls", "portLevelMtls"))
    labels = attempt(lambda: match_labels(f["selector"]), {})
    return PeerAuthentication(obj.namespace, obj.name, attempt(lambda: created(obj)), MappingProxyType(labels),
                              attempt(lambda: _mode(f["mtls"]), UNSET),
                              MappingProxyType(attempt(lambda: _port_modes(f["portLevelMtls"], labels), {})))


def _mode(field: Field) -> str:
    return field.fields(("mode",))["mode"].enum(MODES, UNSET)


def _port_modes(field: Field, labels: dict[str, str]) -> dict[int, str]:
    if not field.present:
        return {}
    if not isinstance(field.value, dict) or not field.value:
        raise field.error("must map at least one port number to an mtls mode",
                          "for example portLevelMtls: {8080: {mode: DISABLE}}")
    if not labels:
        raise field.error("a mesh- or namespace-wide policy (no selector) cannot set portLevelMtls",
                          "add selector.matchLabels, as Istio requires")
    out = {}
    for key, value in field.value.items():
        item = Field(field.where, f"{field.path}.{key}", value)
        out[_port_key(item, key)] = _mode(item)
    return out


def _port_key(field: Field, key: object) -> int:
    text = str(key) if isinstance(key, (int, str)) and not isinstance(key, bool) else ""
    if not rule_reader.NUMBER.match(text) or not 0 < int(text) < 65536:
        raise field.error(f"port {key!r} must be a port number 1-65535",
                          "portLevelMtls is keyed by the pod's (target) port number, not a name")
    return int(text)


# --- RequestAuthentication -----------------------------------------------------------
def request_authentication(obj: KubeObject) -> RequestAuthentication:
    spec = Field.spec_of(obj)
    f = spec.fields(("selector", "targetRef", "targetRefs", "jwtRules"))
    scope = attempt(lambda: read_scope(obj, spec, f))
    return RequestAuthentication(obj.name, scope, tuple(f["jwtRules"].each(_jwt_rule)))


def _jwt_rule(field: Field) -> str:
    """Check one jwtRules entry as istiod does; returns its issuer."""
    j = field.fields(JWT_FIELDS)
    issuer, uri = j["issuer"].string(), j["jwksUri"].string()
    unknown = isinstance(field.value, dict) and not set(field.value) <= set(JWT_FIELDS)
    if not issuer and not uri and not unknown:  # (a misspelt issuer is its own error)
        raise field.error("a JWT rule needs issuer or jwksUri")
    try:
        url = urlparse(uri)
        hostname = url.hostname  # parses the authority: ValueError for "http://[zz]/"
    except ValueError as exc:
        raise j["jwksUri"].error(f"{uri!r} is not a URL ({exc})") from None
    if uri and (url.scheme not in ("http", "https") or not hostname):
        raise j["jwksUri"].error(f"{uri!r} is not an http(s) URL")
    _jwks(j["jwks"])
    for name in ("audiences", "fromParams", "fromCookies"):
        j[name].strings()
    j["outputPayloadToHeader"].string()
    j["forwardOriginalToken"].boolean()
    _named_pairs(j["fromHeaders"], ("name",), ("prefix",))
    _named_pairs(j["outputClaimToHeaders"], ("header", "claim"), ())
    timeout = j["timeout"].string()
    if timeout and not DURATION.match(timeout):
        raise j["timeout"].error(f"{timeout!r} is not a duration", 'for example "5s"')
    return issuer


def _jwks(field: Field) -> None:
    text = field.string()
    if text:
        problem = jwkset.problem(text, usable_key=False)
        if problem is not None:
            raise field.error(problem, jwkset.HINT)


def _named_pairs(field: Field, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    for item in field.items():
        parts = item.fields(required + optional)
        for name in required:
            if not parts[name].string():
                raise parts[name].error("must be set")
        for name in optional:
            parts[name].string()


# --- scope: selector and targetRef(s) ------------------------------------------------
def read_scope(obj: KubeObject, spec: Field, f: dict[str, Field]) -> Scope:
    ways = [name for name in ("selector", "targetRef", "targetRefs") if f[name].present]
    if len(ways) > 1:
        raise spec.error(f"{' and '.join(ways)} exclude each other", "keep one of them")
    refs = ([f["targetRef"]] if f["targetRef"].present else []) + f["targetRefs"].items()
    return Scope(obj.namespace, MappingProxyType(match_labels(f["selector"])),
                 tuple(_target_ref(r) for r in refs))


def match_labels(selector: Field) -> dict[str, str]:
    field = selector.fields(("matchLabels",))["matchLabels"]
    labels = field.labels()
    for key, value in labels.items():
        if not key or "*" in key or "*" in value:
            raise Field(field.where, f"{field.path}.{key}", value).error(
                f"{key}={value} cannot select workloads", "use exact, non-empty label keys and values")
    return labels


def _target_ref(field: Field) -> TargetRef:
    t = field.fields(("group", "kind", "name", "namespace"))
    group, kind, name = t["group"].string(), t["kind"].string(), t["name"].string()
    if not name:
        raise t["name"].error("must be set")
    if t["namespace"].string():
        raise t["namespace"].error("cross-namespace targetRef is not supported",
                                   "remove it: the target must be in the policy's namespace")
    if (group or "core", kind) not in TARGET_KINDS:
        raise t["kind"].error(f"{group or 'core'}/{kind} cannot be a policy target",
                              "use a Service, a networking.istio.io ServiceEntry, or a "
                              "gateway.networking.k8s.io Gateway or GatewayClass")
    return TargetRef(group, kind, name)


_READERS: dict[str, Callable[[KubeObject], Policy]] = {
    AUTHORIZATION_POLICY: authorization_policy,
    PEER_AUTHENTICATION: peer_authentication,
    REQUEST_AUTHENTICATION: request_authentication,
}
