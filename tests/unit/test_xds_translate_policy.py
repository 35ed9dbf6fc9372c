"""The server-side waypoint: which pods get it, and AuthorizationPolicy → RBAC,
RequestAuthentication → jwt_authn, the rate-limit EnvoyFilter → local_ratelimit, each
field to the exact Envoy field, in the filter order the chain runs them."""

from __future__ import annotations

import json
import re

import pytest

from envoy.config.rbac.v3.rbac_pb2 import RBAC

from nodeagent.policy import PolicySet
from nodeagent.xds.dataplane import Sockets
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.resources import unpack
from nodeagent.xds.translate.build import translate
from nodeagent.xds.translate.options import WaypointOptions
from xds_world import OPTIONS, RUN, WEB, chain, clusters, doc, listeners, model, network, routes, translation

SEC = "security.istio.io/v1"
HTTP_POLICY = doc("AuthorizationPolicy", "allow-get", """
selector: {matchLabels: {app: reviews}}
rules:
- to: [{operation: {methods: [GET]}}]
""", SEC)
CHAIN = "inbound|shop/reviews-v1|9080"
JWKS = json.dumps({"keys": [{"kty": "RSA", "e": "AQAB", "n": "sXch"}]})


def inbound_chain(yaml: str, options=None):
    result = translation(yaml, options=options) if options else translation(yaml)
    return chain(listeners(result)["inbound"], CHAIN), result


def http_filters(yaml: str, options=None):
    found, result = inbound_chain(yaml, options)
    return {f.name: unpack(f.typed_config) for f in network(found).http_filters}, [
        f.name for f in network(found).http_filters], result


def policies(yaml: str, action: RBAC.Action = RBAC.Action.ALLOW):
    found, _ = inbound_chain(yaml)
    for f in network(found).http_filters:
        config = unpack(f.typed_config)
        if f.name == "envoy.filters.http.rbac" and config.rules.action == action:
            return config.rules.policies
    raise AssertionError(f"no {action} RBAC filter")


def pattern(matcher) -> tuple[str, str]:
    """A StringMatcher as (the kind set, its value)."""
    kind = matcher.WhichOneof("match_pattern")
    return kind, matcher.safe_regex.regex if kind == "safe_regex" else getattr(matcher, kind)


def test_a_policy_only_the_waypoint_refuses_leaves_its_pods_to_the_l4_engine():
    """A DENY the L4 engine accepts and the waypoint cannot express (an `experimental.*`
    condition key; a requestPrincipals wildcard; a path template, which Istio matches as
    Envoy's URI templates and the waypoint took as text) beside the pod's HTTP policy: the pod gets
    no inbound chain, so the L4 engine enforces all its policies. It went to a chain
    without that DENY: enforced nowhere on its HTTP ports (an ALLOW so, everybody in)."""
    for rule in ("{when: [{key: experimental.envoy.filters.network.a, values: [x]}]}",
                 "{from: [{source: {requestPrincipals: ['*@corp.example']}}]}",
                 "{to: [{operation: {paths: ['/admin/{**}']}}]}"):  # a path template: was matched as text
        world = model(HTTP_POLICY + doc("AuthorizationPolicy", "deny-odd", f"""
selector: {{matchLabels: {{app: reviews}}}}
action: DENY
rules: [{rule}]
""", SEC))
        built = IstioConfig.build(world)
        assert ["(AuthorizationPolicy shop/deny-odd) spec.rules[0]" in e.where for e in built.errors] == [True]
        assert [w.key for w in built.withheld] == ["shop/deny-odd"]
        result = translate(world, "node1", built, OPTIONS)
        assert set(result.dataplane.inbound) == set()


def served_after(yaml: str, previous=None):
    """(the IstioConfig of `yaml`, the (pod IP, port)s node1's waypoint serves, the L4
    engine's PolicySet of the same model, its errors); `previous` is an earlier answer,
    as the agent builds both from each new model with the last as previous."""
    world = model(yaml)
    built = IstioConfig.build(world, previous[0] if previous else None)
    policies, errors = PolicySet.build(world, previous[2] if previous else None)
    return built, set(translate(world, "node1", built, OPTIONS).dataplane.inbound), policies, errors


REVIEWS_V1 = ("10.244.1.6", 9080)
BAD_IP = "rules: [{from: [{source: {ipBlocks: ['10.1.2.300']}}]}]"  # the CRD schema accepts it


@pytest.mark.parametrize("action", ["DENY", "ALLOW", "REJECT"])
def test_a_policy_both_engines_refuse_is_enforced_fail_closed_by_both(action):
    """With no last good version, the L4 engine enforces an invalid AuthorizationPolicy
    fail-closed (a DENY of everything it selects; an ALLOW without rules); the waypoint
    refuses it too, and its chain enforced the pod's HTTP policy without it (a DENY
    nowhere, an ALLOW's pods open to whatever the HTTP policy allows). The waypoint
    enforces the same stand-in: a DENY of any request, or an ALLOW adding nothing to the
    valid ALLOW's rules. (Withheld, its pods went to the L4 engine, where the valid
    ALLOW's HTTP rule matches nothing: a broken ALLOW denied even the GETs allow-get
    allows.) Both report it alike."""
    yaml = HTTP_POLICY + doc("AuthorizationPolicy", "bad", "selector: {matchLabels: {app: reviews}}\n"
                                                           f"action: {action}\n{BAD_IP}", SEC)
    built, served, policies_, errors = served_after(yaml)
    assert [str(e) for e in built.errors] == [str(e) for e in errors] and "enforced fail-closed" in str(errors[0])
    stand_in = built.entries[("AuthorizationPolicy", "shop", "bad")]
    assert (stand_in.key, stand_in.policy.fail_closed, stand_in.policy.action) == (
        "shop/bad", True, "ALLOW" if action == "ALLOW" else "DENY")
    assert built.withheld == () and served == {REVIEWS_V1}  # on the waypoint, with it
    result = translate(model(yaml), "node1", built, OPTIONS)
    rbac = {unpack(f.typed_config).rules.action: unpack(f.typed_config).rules.policies
            for f in network(chain(listeners(result)["inbound"], CHAIN)).http_filters
            if f.name == "envoy.filters.http.rbac"}
    assert list(rbac[RBAC.Action.ALLOW]) == ["ns[shop]-policy[allow-get]-rule[0]"]  # the stand-in adds nothing
    if action == "ALLOW":
        assert list(rbac) == [RBAC.Action.ALLOW]
    else:
        denied = rbac[RBAC.Action.DENY]["ns[shop]-policy[bad]-fail-closed"]
        assert list(rbac[RBAC.Action.DENY]) == ["ns[shop]-policy[bad]-fail-closed"]
        assert (denied.permissions[0].any, denied.principals[0].any) == (True, True)


def test_a_stand_in_is_never_kept_as_the_waypoints_last_good_version():
    """Edited, still invalid, the resource is read again: its stand-in follows the new
    selector (one kept as a last good version would go on denying the pods it selected,
    and not those it selects now); fixed, it is the policy."""
    bad = doc("AuthorizationPolicy", "bad", f"selector: {{matchLabels: {{app: reviews}}}}\naction: DENY\n{BAD_IP}", SEC)
    key = ("AuthorizationPolicy", "shop", "bad")
    first = served_after(HTTP_POLICY + bad)
    assert first[0].entries[key].policy.fail_closed and first[1] == {REVIEWS_V1}
    moved = served_after(HTTP_POLICY + bad.replace("app: reviews", "app: ratings"), first)
    assert moved[0].entries[key].policy.fail_closed
    assert dict(moved[0].entries[key].policy.scope.match_labels) == {"app": "ratings"}
    fixed = bad.replace("10.1.2.300", "10.1.2.30")
    built, served, _, errors = served_after(HTTP_POLICY + fixed, moved)
    assert errors == [] and built.errors == () and not built.entries[key].policy.fail_closed and served == {REVIEWS_V1}
    assert list(policies(HTTP_POLICY + fixed, RBAC.Action.DENY)) == ["ns[shop]-policy[bad]-rule[0]"]


def test_a_refused_policy_that_enforces_nothing_withholds_nothing():
    built, served, _, errors = served_after(HTTP_POLICY + doc("AuthorizationPolicy", "bad",
                                                              f"action: AUDIT\n{BAD_IP}", SEC))
    assert built.withheld == () and served == {REVIEWS_V1}
    assert [str(e) for e in built.errors] == [str(e) for e in errors]
    assert all(str(e).endswith("the whole resource is refused)") for e in errors)


DENY_BLOCK = doc("AuthorizationPolicy", "deny-ip", "selector: {matchLabels: {app: reviews}}\naction: DENY\n"
                                                   "rules: [{from: [{source: {ipBlocks: ['10.244.2.0/24']}}]}]", SEC)


def test_a_last_good_version_stays_on_the_waypoint_chain():
    first = served_after(HTTP_POLICY + DENY_BLOCK)
    built, served, _, errors = served_after(HTTP_POLICY + DENY_BLOCK.replace("10.244.2.0/24", "10.1.2.300"), first)
    key = ("AuthorizationPolicy", "shop", "deny-ip")
    assert built.withheld == () and served == {REVIEWS_V1} and built.entries[key] is first[0].entries[key]
    assert [str(e) for e in built.errors] == [str(e) for e in errors]
    assert str(errors[0]).endswith("the whole resource is refused; its last good version stays in force)")


def test_the_l4_last_good_version_of_a_policy_only_the_waypoint_refused_stays_withheld():
    """v1 only the waypoint refuses (the L4 engine enforces it, its pods withheld); v2 both
    refuse: the L4 engine keeps v1, so v1's pods stay withheld, whatever v2 would select."""
    v1 = HTTP_POLICY + doc("AuthorizationPolicy", "deny-odd", "selector: {matchLabels: {app: reviews}}\naction: DENY\n"
                                                              "rules: [{when: [{key: experimental.envoy.filters.a, "
                                                              "values: [x]}]}]", SEC)
    v2 = HTTP_POLICY + doc("AuthorizationPolicy", "deny-odd", "selector: {matchLabels: {app: ratings}}\n"
                                                              f"action: DENY\n{BAD_IP}", SEC)
    first = served_after(v1)
    assert [w.key for w in first[0].withheld] == ["shop/deny-odd"] and first[1] == set()
    second = served_after(v2, first)
    built, served, _, errors = second
    assert built.withheld == first[0].withheld and served == set()
    assert [str(e) for e in built.errors] == [str(e) for e in errors]
    assert str(errors[0]).endswith("the whole resource is refused; its last good version stays in force)")
    third = served_after(v2, second)  # and on, while v2 stays invalid
    assert third[0].withheld == first[0].withheld and third[1] == set()


def test_pods_of_this_node_with_http_policy_get_an_inbound_chain_per_http_port():
    result = translation(HTTP_POLICY)
    inbound = listeners(result)["inbound"]
    assert (inbound.address.pipe.path, inbound.address.pipe.mode) == (f"{RUN}/envoy/inbound.sock", 0o666)
    assert [c.name for c in inbound.filter_chains] == [CHAIN]  # reviews-v2/v3 run on node2
    match = inbound.filter_chains[0].filter_chain_match
    assert (match.prefix_ranges[0].address_prefix, match.destination_port.value) == ("10.244.1.6", 9080)
    assert set(result.dataplane.inbound) == {("10.244.1.6", 9080)}
    assert [r.tlv_type for r in unpack(inbound.listener_filters[0].typed_config).rules] == [0xE0]
    hcm = network(inbound.filter_chains[0])
    assert (hcm.rds.route_config_name, hcm.normalize_path.value) == ("inbound|9080", True)
    assert (hcm.use_remote_address.value, hcm.skip_xff_append) == (True, True)  # the client is the PROXY source
    (route,) = routes(result)["inbound|9080"].virtual_hosts[0].routes
    assert route.route.cluster == "inbound|9080||"
    deliver = clusters(result)["inbound|9080||"]
    assert deliver.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path == f"{RUN}/deliver.sock"
    assert deliver.transport_socket.name == "envoy.transport_sockets.upstream_proxy_protocol"


def test_a_pending_pod_with_its_ip_gets_its_chain_as_enrolment_meshes_it_and_a_finished_one_none():
    """Enrolment meshes a pod from Pending on once it has status.podIP (its init
    containers run): its HTTP policy must be Envoy's by then too, or the agent would
    enforce it at L4 only. A finished pod keeps its IP but is no one's."""
    extra = "".join(
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: reviews}}}}\n"
        f"spec: {{nodeName: node1, serviceAccountName: reviews}}\nstatus: {{phase: {phase}, podIP: {ip}}}\n---\n"
        for name, phase, ip in (("reviews-init", "Pending", "10.244.1.66"), ("reviews-done", "Succeeded",
                                                                            "10.244.1.67")))
    result = translation(HTTP_POLICY + extra)
    assert [c.name for c in listeners(result)["inbound"].filter_chains] == ["inbound|shop/reviews-init|9080", CHAIN]
    assert set(result.dataplane.inbound) == {("10.244.1.6", 9080), ("10.244.1.66", 9080)}


def test_l4_only_policies_need_no_waypoint():
    result = translation(doc("AuthorizationPolicy", "l4", "selector: {matchLabels: {app: reviews}}\n"
                                                         "rules: [{from: [{source: {namespaces: [shop]}}]}]", SEC))
    assert "inbound" not in listeners(result) and result.dataplane.inbound == {}


def test_operations_methods_paths_hosts_ports_and_their_negations():
    (policy,) = policies(doc("AuthorizationPolicy", "ops", """
selector: {matchLabels: {app: reviews}}
rules:
- to:
  - operation:
      methods: [GET, POST]
      paths: ["/api/*", "*/info", /exact, "*"]
      hosts: [Reviews.Shop]
      notPorts: ["9999"]
""", SEC)).values()
    (permission,) = policy.permissions
    methods, paths, hosts, not_ports = permission.and_rules.rules
    assert [r.header.string_match.exact for r in methods.or_rules.rules] == ["GET", "POST"]
    assert [pattern(p.url_path.path) for p in paths.or_rules.rules] == [
        ("prefix", "/api/"), ("suffix", "/info"), ("exact", "/exact"), ("safe_regex", ".+")]
    assert (hosts.header.name, hosts.header.string_match.exact, hosts.header.string_match.ignore_case) == (
        ":authority", "Reviews.Shop", True)
    assert not_ports.not_rule.destination_port == 9999
    assert policy.principals[0].any is True


def test_sources_via_the_principal_filter_state_and_the_client_address():
    (policy,) = policies(doc("AuthorizationPolicy", "src", """
selector: {matchLabels: {app: reviews}}
rules:
- from:
  - source: {principals: ["cluster.local/ns/shop/sa/productpage", "*/sa/admin"], notNamespaces: [legacy]}
  - source: {ipBlocks: [10.244.0.0/16]}
  to: [{operation: {methods: [GET]}}]
""", SEC)).values()
    (principal,) = policy.principals
    first, second = principal.or_ids.ids
    principals, not_namespaces = first.and_ids.ids
    exact, suffix = principals.or_ids.ids
    assert (exact.filter_state.key, exact.filter_state.string_match.exact) == (
        "nodeagent.source_principal", "spiffe://cluster.local/ns/shop/sa/productpage")
    assert suffix.filter_state.string_match.suffix == "/sa/admin"
    assert not_namespaces.not_id.filter_state.string_match.safe_regex.regex == "spiffe://[^/]+/ns/legacy/.*"
    # remote_ip: the connection's address (the PROXY source: use_remote_address), not the unix socket's peer
    assert (second.remote_ip.address_prefix, second.remote_ip.prefix_len.value) == ("10.244.0.0", 16)


def test_when_conditions_on_headers_and_jwt_claims():
    (policy,) = policies(doc("AuthorizationPolicy", "when", """
selector: {matchLabels: {app: reviews}}
rules:
- when:
  - {key: "request.headers[x-tenant]", values: ["acme", "beta*"]}
  - {key: "request.auth.claims[groups]", values: [admins]}
  - {key: destination.port, notValues: ["9999"]}
""", SEC)).values()
    tenant, groups = policy.principals[0].and_ids.ids
    assert [(h.header.name, pattern(h.header.string_match)) for h in tenant.or_ids.ids] == [
        ("x-tenant", ("exact", "acme")), ("x-tenant", ("prefix", "beta"))]
    string, listed = (p.sourced_metadata.metadata_matcher for p in groups.or_ids.ids)
    assert (string.filter, [s.key for s in string.path], string.value.string_match.exact) == (
        "envoy.filters.http.jwt_authn", ["payload", "groups"], "admins")
    assert listed.value.list_match.one_of.string_match.exact == "admins"
    assert policy.permissions[0].not_rule.destination_port == 9999


def test_request_principals_read_the_verified_jwt_issuer_and_subject():
    found = policies(doc("AuthorizationPolicy", "jwt", """
selector: {matchLabels: {app: reviews}}
rules:
- from: [{source: {requestPrincipals: ["https://issuer.example/*"]}}]
- from: [{source: {requestPrincipals: ["https://issuer.example/alice"]}}]
""", SEC))
    issuer, subject = (p.sourced_metadata.metadata_matcher
                       for p in found["ns[shop]-policy[jwt]-rule[0]"].principals[0].and_ids.ids)
    assert ([s.key for s in issuer.path], issuer.value.string_match.exact) == (
        ["payload", "iss"], "https://issuer.example")
    # any subject is a non-empty one, as istiod has it (a token without `sub` was let through)
    assert ([s.key for s in subject.path], subject.value.string_match.safe_regex.regex) == (["payload", "sub"], ".+")
    issuer, subject = found["ns[shop]-policy[jwt]-rule[1]"].principals[0].and_ids.ids
    assert subject.sourced_metadata.metadata_matcher.value.string_match.exact == "alice"


def _metadata(principal) -> list[tuple[list[str], str, str]]:
    """(path, value kind, pattern) of each JWT metadata match OR-ed in `principal`."""
    ids = principal.or_ids.ids if principal.HasField("or_ids") else [principal]
    out = []
    for one in ids:
        m = one.sourced_metadata.metadata_matcher
        kind = m.value.WhichOneof("match_pattern")
        string = m.value.list_match.one_of.string_match if kind == "list_match" else m.value.string_match
        out.append(([s.key for s in m.path], kind, "/".join(pattern(string))))
    return out


def test_any_claim_audience_or_presenter_is_a_non_empty_string_or_a_list_holding_one():
    """As istiod (`*` is `.+`): a present_match let a token whose claim was false, "", [] or
    {} through an ALLOW on `claims[admin]: ["*"]`."""
    (policy,) = policies(doc("AuthorizationPolicy", "any", """
selector: {matchLabels: {app: reviews}}
rules:
- when:
  - {key: "request.auth.claims[admin]", values: ["*"]}
  - {key: request.auth.audiences, values: ["*"]}
  - {key: request.auth.presenter, values: [web]}
""", SEC)).values()
    admin, audiences, presenter = policy.principals[0].and_ids.ids
    assert _metadata(admin) == [(["payload", "admin"], "string_match", "safe_regex/.+"),
                                (["payload", "admin"], "list_match", "safe_regex/.+")]
    assert _metadata(audiences) == [(["payload", "aud"], "string_match", "safe_regex/.+"),
                                    (["payload", "aud"], "list_match", "safe_regex/.+")]
    assert _metadata(presenter) == [(["payload", "azp"], "string_match", "exact/web"),
                                    (["payload", "azp"], "list_match", "exact/web")]


def test_a_request_principal_with_an_empty_subject_matches_the_empty_subject_only():
    found = policies(doc("AuthorizationPolicy", "jwt", """
selector: {matchLabels: {app: reviews}}
rules:
- from: [{source: {requestPrincipals: ["https://issuer.example/"]}}]
- when: [{key: request.auth.principal, values: ["*/alice"]}]
""", SEC))
    issuer, subject = found["ns[shop]-policy[jwt]-rule[0]"].principals[0].and_ids.ids
    assert _metadata(issuer) == [(["payload", "iss"], "string_match", "exact/https://issuer.example")]
    assert _metadata(subject) == [(["payload", "sub"], "string_match", "exact/")]  # was `.+`: any subject
    issuer, subject = found["ns[shop]-policy[jwt]-rule[1]"].principals[0].and_ids.ids
    assert (_metadata(issuer), _metadata(subject)) == ([(["payload", "iss"], "string_match", "safe_regex/.+")],
                                                       [(["payload", "sub"], "string_match", "exact/alice")])


def test_connection_sni_drops_out_of_a_deny_and_matches_nothing_in_an_allow():
    """The client's SNI is the agent's TLS, not Envoy's: as the L4 engine reads it, a DENY
    rule is enforced without the condition (broader) and an ALLOW rule holding it matches
    nothing. In the DENY it matched nothing too, so the whole rule was enforced nowhere."""
    yaml = HTTP_POLICY + doc("AuthorizationPolicy", "sni", """
selector: {matchLabels: {app: reviews}}
action: DENY
rules: [{to: [{operation: {paths: [/admin]}}], when: [{key: connection.sni, values: [a.example]}]}]
""", SEC)
    (deny,) = policies(yaml, RBAC.Action.DENY).values()
    assert deny.permissions[0].url_path.path.exact == "/admin"
    (allow,) = policies(doc("AuthorizationPolicy", "allow-get", """
selector: {matchLabels: {app: reviews}}
rules: [{to: [{operation: {methods: [GET]}}], when: [{key: connection.sni, values: [a.example]}]}]
""", SEC)).values()
    assert allow.permissions[0].and_rules.rules[-1].not_rule.any


def test_deny_runs_before_allow_and_rule_less_allow_policies_deny_everything():
    yaml = HTTP_POLICY + doc("AuthorizationPolicy", "deny-all", "{}", SEC) + doc(
        "AuthorizationPolicy", "no-delete", "selector: {matchLabels: {app: reviews}}\naction: DENY\n"
                                            "rules: [{to: [{operation: {methods: [DELETE]}}]}]", SEC)
    configs, names, _ = http_filters(yaml)
    assert names == ["envoy.filters.http.rbac", "envoy.filters.http.rbac", "envoy.filters.http.router"]
    assert list(policies(yaml, RBAC.Action.DENY)) == ["ns[shop]-policy[no-delete]-rule[0]"]
    assert list(policies(yaml)) == ["ns[shop]-policy[allow-get]-rule[0]"]  # deny-all adds no rule


def test_dry_run_policies_are_not_enforced():
    yaml = HTTP_POLICY + ("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: dry, namespace: shop, "
             "annotations: {istio.io/dry-run: 'true'}}\nspec: {action: DENY, rules: [{}]}\n---\n")
    _, names, _ = http_filters(yaml)
    assert names.count("envoy.filters.http.rbac") == 1
    assert list(policies(yaml)) == ["ns[shop]-policy[allow-get]-rule[0]"]


def test_a_policy_targeting_a_service_applies_to_its_pods():
    result = translation(doc("AuthorizationPolicy", "svc", "targetRefs: [{kind: Service, group: '', name: reviews}]\n"
                                                          "rules: [{to: [{operation: {paths: [/x]}}]}]", SEC))
    assert [c.name for c in listeners(result)["inbound"].filter_chains] == [CHAIN]


REQUEST_AUTHN = """
selector: {{matchLabels: {{app: reviews}}}}
jwtRules:
- issuer: https://issuer.example
  audiences: [reviews]
  {keys}
  forwardOriginalToken: true
"""


def jwt_config(keys: str, options=None):
    configs, names, result = http_filters(doc("RequestAuthentication", "jwt", REQUEST_AUTHN.format(keys=keys),
                                              "security.istio.io/v1beta1"), options)
    return configs["envoy.filters.http.jwt_authn"], names, result


def test_jwt_rules_become_providers_any_of_which_or_no_token_passes():
    config, names, _ = jwt_config(f"jwks: '{JWKS}'")
    assert names == ["envoy.filters.http.jwt_authn", "envoy.filters.http.router"]
    provider = config.providers["shop/jwt/jwtRules[0]"]
    assert (provider.issuer, provider.audiences, provider.local_jwks.inline_string, provider.forward,
            provider.payload_in_metadata) == ("https://issuer.example", ["reviews"], JWKS, True, "payload")
    (rule,) = config.rules
    assert rule.match.prefix == "/"
    any_of = rule.requires.requires_any.requirements
    assert [r.WhichOneof("requires_type") for r in any_of] == ["provider_name", "allow_missing"]
    assert any_of[0].provider_name == "shop/jwt/jwtRules[0]"


def test_a_request_authentication_without_rules_adds_no_filter():
    """istiod adds none; a requirement list of allow_missing alone was NACKed by Envoy."""
    configs, names, _ = http_filters(doc("RequestAuthentication", "none", "selector: {matchLabels: {app: reviews}}",
                                         "security.istio.io/v1"))
    assert names == ["envoy.filters.http.router"]


@pytest.mark.parametrize("keys", ['{"keys": []}', '{"keys": [{"kty": "RSA", "n": "sXch"}, {"kty": "EC"}]}',
                                  '{"keys": [{"kty": "RSA", "e": "AQAB", "n": "sXch", "alg": "ES256"}]}'])
def test_an_inline_key_set_envoy_would_refuse_gives_the_issuer_no_key_with_a_warning(keys):
    config, _, result = jwt_config(f"jwks: '{keys}'")
    served = json.loads(config.providers["shop/jwt/jwtRules[0]"].local_jwks.inline_string)
    assert [k["kid"] for k in served["keys"]] == ["nodeagent-unmatchable"]
    assert [str(w) for w in result.warnings] == [
        "test.yaml#12 (RequestAuthentication shop/jwt) spec.jwtRules[0].jwks: has no key Envoy can use: Envoy "
        "would refuse it (and with it the node's whole waypoint configuration) (every token of this issuer is "
        "refused (401) until it holds a usable key)"]


EC = {"kty": "EC", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
      "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}  # RFC 7517's P-256 example


@pytest.mark.parametrize("key, usable", [
    (EC, True), ({**EC, "alg": "ES256"}, True), ({**EC, "crv": "P-256"}, True),  # no crv: P-256, or the alg's
    ({**EC, "alg": "ES384"}, False), ({**EC, "crv": "P-384"}, False),  # a P-256 point is on no other curve
    ({**EC, "y": "AQAB"}, False),  # off the curve
    ({"kty": "RSA", "e": "AQAB", "n": "sXch", "alg": "RSA-OAEP"}, True),  # any RS… alg, as jwt_verify_lib
    ({"kty": "RSA", "e": "EQ", "n": "sXch"}, False),  # e=17: BoringSSL takes 3 or 65537 only
    ({"kty": "RSA", "e": "AQAB", "n": "sXch", "alg": "ES256"}, False), ({"kty": "oct", "k": "c2VjcmV0"}, True),
    ({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}, True),
    ({"kty": "RSA", "n": "sXch"}, False), ({"kty": "oops"}, False), ("a string", False)])
def test_a_key_is_usable_as_envoy_reads_keys(key, usable):
    from nodeagent.policy import jwkset
    assert jwkset.usable(key) is usable


def test_a_local_copy_without_a_usable_key_fails_closed_with_a_warning(tmp_path):
    keys = tmp_path / "issuer.json"
    keys.write_text('{"keys": []}')
    options = WaypointOptions(Sockets(RUN), jwks_files={"https://issuer.example/keys": str(keys)})
    config, _, result = jwt_config("jwksUri: https://issuer.example/keys", options)
    served = json.loads(config.providers["shop/jwt/jwtRules[0]"].local_jwks.inline_string)
    assert [k["kid"] for k in served["keys"]] == ["nodeagent-unmatchable"]
    assert any(f"{keys} has no key Envoy can use" in str(w) for w in result.warnings)


def test_jwks_uri_reads_a_local_copy_never_the_network(tmp_path):
    keys = tmp_path / "issuer.json"
    keys.write_text(JWKS)
    options = WaypointOptions(Sockets(RUN), jwks_files={"https://issuer.example/keys": str(keys)})
    config, _, result = jwt_config("jwksUri: https://issuer.example/keys", options)
    assert config.providers["shop/jwt/jwtRules[0]"].local_jwks.inline_string == JWKS
    assert result.warnings == ()


def test_an_unresolved_jwks_uri_fails_closed_with_a_warning():
    config, _, result = jwt_config("jwksUri: https://issuer.example/keys")
    keys = json.loads(config.providers["shop/jwt/jwtRules[0]"].local_jwks.inline_string)
    assert [k["kid"] for k in keys["keys"]] == ["nodeagent-unmatchable"]
    assert any("is not fetched by Envoy" in str(w) for w in result.warnings)


RATE_LIMIT = """
workloadSelector: {{labels: {{app: reviews}}}}
configPatches:
- applyTo: HTTP_FILTER
  match:
    context: SIDECAR_INBOUND
    listener:
      {port}
      filterChain: {{filter: {{name: envoy.filters.network.http_connection_manager{sub}}}}}
  patch:
    operation: INSERT_BEFORE
    value:
      name: envoy.filters.http.local_ratelimit
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
        stat_prefix: {prefix}
        token_bucket: {{max_tokens: 5, tokens_per_fill: 5, fill_interval: 1s}}
        filter_enabled: {{default_value: {{numerator: 100}}}}
        filter_enforced: {{default_value: {{numerator: 100}}}}
"""


def rate_limit(name: str, prefix: str, router: bool, port: str = "", priority: int = 0) -> str:
    sub = ", subFilter: {name: envoy.filters.http.router}" if router else ""
    spec = RATE_LIMIT.format(port=port, sub=sub, prefix=prefix) + f"priority: {priority}\n"
    return doc("EnvoyFilter", name, spec, "networking.istio.io/v1alpha3")


def test_rate_limits_go_before_the_router_or_first_as_istio_places_them():
    configs, names, result = http_filters(HTTP_POLICY + rate_limit("a", "before_router", True) +
                                          rate_limit("b", "at_head", False))
    assert names == ["envoy.filters.http.local_ratelimit.1", "envoy.filters.http.rbac",
                     "envoy.filters.http.local_ratelimit", "envoy.filters.http.router"]
    assert configs["envoy.filters.http.local_ratelimit"].stat_prefix == "before_router"
    assert configs["envoy.filters.http.local_ratelimit.1"].stat_prefix == "at_head"
    assert configs["envoy.filters.http.local_ratelimit"].token_bucket.max_tokens == 5


def test_rate_limits_apply_in_priority_order():
    configs, names, _ = http_filters(rate_limit("a", "second", True, priority=5) +
                                     rate_limit("b", "first", True, priority=-1))
    assert [configs[n].stat_prefix for n in names[:-1]] == ["first", "second"]


def test_a_rate_limit_alone_puts_a_pod_behind_the_waypoint_and_port_number_narrows_it():
    result = translation(rate_limit("a", "limited", True, port="portNumber: 9080"))
    assert [c.name for c in listeners(result)["inbound"].filter_chains] == [CHAIN]
    elsewhere = translation(rate_limit("a", "limited", True, port="portNumber: 1234"))
    assert "inbound" not in listeners(elsewhere)


def test_service_accounts_remote_ip_blocks_and_not_hosts():
    (policy,) = policies(doc("AuthorizationPolicy", "more", """
selector: {matchLabels: {app: reviews}}
rules:
- from: [{source: {serviceAccounts: [productpage, other/robot], remoteIpBlocks: [192.0.2.0/24]}}]
  to: [{operation: {notHosts: ["*.internal"]}}]
""", SEC)).values()
    accounts, remote = policy.principals[0].and_ids.ids
    patterns = [p.filter_state.string_match.safe_regex.regex for p in accounts.or_ids.ids]
    assert re.fullmatch(patterns[0], "spiffe://cluster.local/ns/shop/sa/productpage")
    assert not re.fullmatch(patterns[0], "spiffe://cluster.local/ns/shop/sa/productpage2")
    assert re.fullmatch(patterns[1], "spiffe://td/ns/other/sa/robot")
    assert (remote.remote_ip.address_prefix, remote.remote_ip.prefix_len.value) == ("192.0.2.0", 24)
    (permission,) = policy.permissions
    assert permission.not_rule.header.string_match.suffix == ".internal"


def test_inbound_chains_use_each_pods_named_container_port():
    result = translation(WEB + doc("AuthorizationPolicy", "web", "selector: {matchLabels: {app: web}}\n"
                                                                "rules: [{to: [{operation: {paths: [/x]}}]}]", SEC))
    chains = [c.name for c in listeners(result)["inbound"].filter_chains]
    assert chains == ["inbound|shop/web-1|8081", "inbound|shop/web-2|8082"]
    assert any("pod shop/web-3 has no container port named 'http-web'" in str(w) for w in result.warnings)
