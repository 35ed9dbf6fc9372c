"""AuthorizationPolicy and RequestAuthentication as the server-side waypoint needs them.

Validation is nodeagent.policy's (Istio's schema and webhook checks, shared with the L4
engine); this module adds what only the waypoint refuses (`experimental.*` condition
keys, requestPrincipals wildcards other than `*`, `iss/*`, `*/sub`) and keeps the
resource itself next to the validated form, since Envoy's RBAC and jwt_authn filters
are built from the HTTP fields the L4 engine leaves out. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject
from nodeagent.policy import validate as policy
from nodeagent.policy.authz import AuthorizationPolicy
from nodeagent.policy.requestauth import RequestAuthentication
from nodeagent.policy.schema import Field
from nodeagent.xds.istio import fields as f
from nodeagent.xds.istio.virtualservice import UNSUPPORTED

Warn = Callable[[ConfigError], None]
AUTHZ_FIELDS = ("selector", "targetRef", "targetRefs", "rules", "action", "provider")


@dataclass(frozen=True)
class Authorization:
    obj: KubeObject
    policy: AuthorizationPolicy

    @property
    def key(self) -> str:
        return self.policy.key


@dataclass(frozen=True)
class JwtRule:
    issuer: str
    audiences: tuple[str, ...] = ()
    jwks: str = ""
    jwks_uri: str = ""
    from_headers: tuple[tuple[str, str], ...] = ()  # (name, prefix)
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    claims_to_headers: tuple[tuple[str, str], ...] = ()  # (header, claim)
    timeout: timedelta | None = None
    space_delimited_claims: tuple[str, ...] = ()  # beyond scope and permission, which always are


@dataclass(frozen=True)
class Authentication:
    obj: KubeObject
    policy: RequestAuthentication
    rules: tuple[JwtRule, ...]

    @property
    def key(self) -> str:
        return self.policy.key


def authorization(obj: KubeObject, warn: Warn) -> Authorization:
    typed = policy.validate(obj)
    assert isinstance(typed, AuthorizationPolicy)
    spec = Field.spec_of(obj)
    for rule in spec.fields(AUTHZ_FIELDS)["rules"].items():
        parts = rule.fields(("from", "to", "when"))
        for cond in parts["when"].items():
            fields = cond.fields(("key", "values", "notValues"))
            key = fields["key"]
            if key.string().startswith("experimental."):
                raise key.error(f"condition key {key.string()!r} {UNSUPPORTED}")
            if key.string() == "request.auth.principal":  # read as requestPrincipals are, here not at translation
                for name in ("values", "notValues"):
                    for item, text in fields[name].string_items():
                        request_principal(item, text)
        for item, text in _strings(parts["to"], "operation", ("paths", "notPaths")):
            if "{" in text or "}" in text:
                raise item.error(f"path template {text!r} {UNSUPPORTED}",
                                 "write the path exactly, as a prefix (/a/*) or a suffix (*.html)")
        for item, text in _strings(parts["from"], "source", ("requestPrincipals", "notRequestPrincipals")):
            request_principal(item, text)
    return Authorization(obj, typed)


def _strings(entries: Field, inner_name: str, names: tuple[str, ...]):
    """(Field, text) of each string of the fields `names` of each entry's `inner_name`
    (a rule's `from[].source` or `to[].operation`)."""
    for entry in entries.items():
        inner = entry.fields((inner_name,))[inner_name]
        for name in names:
            if isinstance(inner.value, dict) and name in inner.value:
                yield from Field(inner.where, f"{inner.path}.{name}", inner.value[name]).string_items()


def request_principal(field: Field, text: str) -> tuple[str | None, str | None]:
    """(issuer, subject) an `iss/sub` pattern requires; None for "any" (an empty subject,
    `iss/`, is the empty one, which Istio matches exactly)."""
    if text == "*":
        return None, None
    if text.startswith("*/") and "*" not in text[2:]:
        return None, text[2:]
    issuer, _, subject = text.rpartition("/")
    if not issuer or "*" in issuer or ("*" in subject and subject != "*"):
        raise field.error(f"request principal {text!r} {UNSUPPORTED}",
                          'use "*", "<issuer>/<subject>", "<issuer>/*" or "*/<subject>"')
    return issuer, None if subject == "*" else subject


def authentication(obj: KubeObject, warn: Warn) -> Authentication:
    typed = policy.validate(obj)
    assert isinstance(typed, RequestAuthentication)
    spec = Field.spec_of(obj)
    rules = spec.fields(("selector", "targetRef", "targetRefs", "jwtRules"))["jwtRules"]
    return Authentication(obj, typed, tuple(_jwt_rule(item) for item in rules.items()))


def _jwt_rule(field: Field) -> JwtRule:
    j = field.fields(policy.JWT_FIELDS)
    headers = tuple(_pair(h, "name", "prefix") for h in j["fromHeaders"].items())
    claims = tuple(_pair(c, "header", "claim") for c in j["outputClaimToHeaders"].items())
    issuer = j["issuer"].string()
    if not issuer:
        raise j["issuer"].error("must be set: the waypoint names each JWT provider by its issuer")
    return JwtRule(issuer, j["audiences"].strings(), j["jwks"].string(), j["jwksUri"].string(), headers,
                   j["fromParams"].strings(), j["fromCookies"].strings(), j["outputPayloadToHeader"].string(),
                   j["forwardOriginalToken"].boolean(), claims, f.duration(j["timeout"]),
                   j["spaceDelimitedClaims"].strings())


def _pair(field: Field, first: str, second: str) -> tuple[str, str]:
    parts = field.fields((first, second))
    return parts[first].string(), parts[second].string()
