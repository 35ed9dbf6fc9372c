"""RequestAuthentication jwtRules → the envoy.filters.http.jwt_authn filter of a pod.

As istiod configures it: one provider per jwtRule, and one requirement "any of the
providers, or no token at all", so a request without a token passes (RBAC decides, 403
when a policy needs a request principal) and a request with a token no provider
accepts is refused with 401. The verified payload goes to dynamic metadata
`envoy.filters.http.jwt_authn` / `payload`, where the RBAC filter reads iss, sub and
claims. Keys are always local: the rule's `jwks`, or the file WaypointOptions maps its
`jwksUri` to; without either, a key set no token can match (fail closed), and a warning.
"""

from __future__ import annotations

import base64
import hashlib
import json

from envoy.config.core.v3.base_pb2 import DataSource
from envoy.config.route.v3.route_components_pb2 import RouteMatch
from envoy.extensions.filters.http.jwt_authn.v3.config_pb2 import (
    JwtAuthentication, JwtClaimToHeader, JwtHeader, JwtProvider, JwtRequirement, JwtRequirementOrList, RequirementRule)
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import HttpFilter
from google.protobuf.empty_pb2 import Empty

from nodeagent.errors import ConfigError
from nodeagent.policy import jwkset
from nodeagent.xds.istio.security import Authentication, JwtRule
from nodeagent.xds.translate.context import Context
from nodeagent.xds.translate.options import read_jwks
from nodeagent.xds.translate.primitives import http_filter

JWT_AUTHN = "envoy.filters.http.jwt_authn"
PAYLOAD = "payload"  # dynamic metadata key of the verified payload


def jwt_filter(ctx: Context, authentications: list[Authentication]) -> HttpFilter:
    """The filter of `authentications`, at least one of which has a jwtRule (without any,
    istiod adds no filter: a requirement list needs two entries, Envoy NACKed one)."""
    providers = {}
    for authn in authentications:
        for i, rule in enumerate(authn.rules):
            where = f"{authn.obj.source} ({authn.obj}) spec.jwtRules[{i}]"
            providers[f"{authn.key}/jwtRules[{i}]"] = _provider(ctx, rule, where)
    any_of = [JwtRequirement(provider_name=name) for name in providers]
    any_of.append(JwtRequirement(allow_missing=Empty()))
    rule = RequirementRule(match=RouteMatch(prefix="/"), requires=JwtRequirement(
        requires_any=JwtRequirementOrList(requirements=any_of)))
    return http_filter(JWT_AUTHN, JwtAuthentication(providers=providers, rules=[rule]))


def _provider(ctx: Context, rule: JwtRule, where: str) -> JwtProvider:
    return JwtProvider(
        issuer=rule.issuer, audiences=list(rule.audiences),
        local_jwks=DataSource(inline_string=_jwks(ctx, rule, where)),
        forward=rule.forward_original_token,
        from_headers=[JwtHeader(name=name, value_prefix=prefix) for name, prefix in rule.from_headers],
        from_params=list(rule.from_params), from_cookies=list(rule.from_cookies),
        forward_payload_header=rule.output_payload_to_header,
        claim_to_headers=[JwtClaimToHeader(header_name=h, claim_name=c) for h, c in rule.claims_to_headers],
        payload_in_metadata=PAYLOAD,
        # as istiod: "read admin" in scope is the list [read, admin], so a rule on `admin` sees it
        normalize_payload_in_metadata=JwtProvider.NormalizePayload(space_delimited_claims=list(dict.fromkeys(
            ("permission", "scope", *rule.space_delimited_claims)))))


def _jwks(ctx: Context, rule: JwtRule, where: str) -> str:
    if rule.jwks:
        problem = jwkset.problem(rule.jwks)
        if problem is None:
            return rule.jwks
        ctx.warn(f"{where}.jwks", f"{problem}: Envoy would refuse it (and with it the node's whole waypoint "
                 "configuration)", "every token of this issuer is refused (401) until it holds a usable key")
        return unmatchable_jwks(rule.issuer)
    path = ctx.options.jwks_files.get(rule.jwks_uri)
    if path:
        try:
            return read_jwks(path, where)
        except ConfigError as err:
            ctx.warnings.append(ConfigError(err.where, err.message.removeprefix(f"{err.where}: "),
                                            "every token of this issuer is refused (401) until it is fixed"))
            return unmatchable_jwks(rule.issuer)
    ctx.warn(where, f"jwksUri {rule.jwks_uri} is not fetched by Envoy and no local copy is configured",
             "every token of this issuer is refused (401); give the waypoint a local copy (jwks_files)")
    return unmatchable_jwks(rule.issuer)


def unmatchable_jwks(issuer: str) -> str:
    """A well-formed RSA key set whose modulus is derived from the issuer by hashing:
    nobody has a private key for it, so no token verifies (istiod's fake JWKS idea)."""
    seed = hashlib.sha512(f"nodeagent unmatchable jwks {issuer}".encode()).digest()
    modulus = b"".join(hashlib.sha512(seed + bytes([i])).digest() for i in range(4))  # 2048 bits
    modulus = bytes([modulus[0] | 0x80]) + modulus[1:-1] + bytes([modulus[-1] | 1])
    n = base64.urlsafe_b64encode(modulus).rstrip(b"=").decode()
    return json.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "nodeagent-unmatchable",
                                 "e": "AQAB", "n": n}]})
