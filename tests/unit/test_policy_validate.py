"""Validation of security.istio.io resources: each invalid resource is refused on its
own with a ConfigError naming the resource and the field path; Istio's documented
examples are accepted; a resource that turns invalid keeps its last good version."""

from __future__ import annotations

import pytest

from nodeagent.policy import Decision
from policy_world import build, connection, document, valid


def resource(kind: str, spec: str, api_version: str = "security.istio.io/v1", meta: str = "") -> str:
    """A `kind` foo/bad document whose spec is the YAML `spec`."""
    return document(kind, "foo", "bad", spec, api_version, meta)


AP, PA, RA = "AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"
SOURCE_IP_RULE = """
rules:
- from:
  - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
  - source: {ipBlocks: [%s]}
"""
PORT_RULE = """
rules:
- to:
  - operation: {ports: [%s]}
"""
WHEN_RULE = """
rules:
- when:
  - %s
"""
JWT_RULE = """
jwtRules:
- %s
"""

INVALID = [
    # (id, kind, spec, field path, message fragment)
    ("unknown-top-field", AP, "rule: []", "spec.rule", "unknown field (did you mean rules?"),
    ("unknown-source-field", AP, "rules: [{from: [{source: {principal: [x]}}]}]",
     "spec.rules[0].from[0].source.principal", "unknown field (did you mean principals?"),
    ("rules-not-a-list", AP, "rules: {from: []}", "spec.rules", "must be a list, not a map"),
    ("action-lower-case", AP, "action: deny", "spec.action", "'deny' is not one of ALLOW, DENY, AUDIT, CUSTOM (write DENY"),
    ("action-unknown", AP, "action: REJECT", "spec.action", "'REJECT' is not one of"),
    ("action-custom", AP, "action: CUSTOM\nprovider: {name: my-authz}\nrules: [{}]", "spec.action",
     "CUSTOM needs an ext-authz provider"),
    ("action-audit", AP, 'selector: {matchLabels: {app: myapi}}\naction: AUDIT\nrules:\n'
                         '- to:\n  - operation: {methods: ["GET"], paths: ["/user/profile/*"]}', "spec.action",
     "AUDIT only marks requests for an audit log provider (Istio's Stackdriver), and nodeagent has none"),
    ("provider-without-custom", AP, "provider: {name: x}\nrules: [{}]", "spec.provider", "only for action CUSTOM"),
    ("deny-without-rules", AP, "action: DENY", "spec.rules", "a DENY policy without rules would never match"),
    ("ip-block", AP, SOURCE_IP_RULE % '"10.0.0.300"', "spec.rules[0].from[1].source.ipBlocks[0]",
     "'10.0.0.300' is not an IP address or CIDR"),
    # remote addresses are HTTP's alone at L4 (rules.HTTP_ONLY), and still checked
    ("remote-ip-block", AP, "action: DENY\nrules: [{from: [{source: {remoteIpBlocks: ['203.0.113.300']}}]}]",
     "spec.rules[0].from[0].source.remoteIpBlocks[0]", "'203.0.113.300' is not an IP address or CIDR"),
    ("remote-ip-when", AP, "action: DENY\nrules: [{when: [{key: remote.ip, notValues: ['x']}]}]",
     "spec.rules[0].when[0].notValues[0]", "'x' is not an IP address or CIDR"),
    ("cidr-bits", AP, SOURCE_IP_RULE % '"10.0.0.0/33"', "spec.rules[0].from[1].source.ipBlocks[0]",
     "not an IP address or CIDR"),
    ("cidr-netmask", AP, SOURCE_IP_RULE % '"10.0.0.0/255.0.0.0"', "spec.rules[0].from[1].source.ipBlocks[0]",
     "not an IP address or CIDR"),
    ("ip-block-number", AP, SOURCE_IP_RULE % "10", "spec.rules[0].from[1].source.ipBlocks[0]",
     "must be a string, not int 10"),
    ("port-name", AP, PORT_RULE % '"http"', "spec.rules[0].to[0].operation.ports[0]", "'http' is not a port number"),
    ("port-range", AP, PORT_RULE % '"70000"', "spec.rules[0].to[0].operation.ports[0]", "'70000' is not a port"),
    ("port-negative", AP, PORT_RULE % '"-1"', "spec.rules[0].to[0].operation.ports[0]", "'-1' is not a port"),
    ("port-unquoted", AP, PORT_RULE % "8080", "spec.rules[0].to[0].operation.ports[0]",
     'must be a string, not int 8080 (quote it: "8080"'),
    ("port-empty", AP, PORT_RULE % '""', "spec.rules[0].to[0].operation.ports[0]", "must not be empty"),
    ("when-unknown-key", AP, WHEN_RULE % "{key: source.ips, values: [10.0.0.1]}", "spec.rules[0].when[0].key",
     "unknown condition key 'source.ips'"),
    ("when-no-values", AP, WHEN_RULE % "{key: source.ip}", "spec.rules[0].when[0]",
     "condition source.ip needs values or notValues"),
    ("when-no-key", AP, WHEN_RULE % "{values: [a]}", "spec.rules[0].when[0].key", "must be set"),
    ("when-port", AP, WHEN_RULE % "{key: destination.port, values: ['80', eighty]}",
     "spec.rules[0].when[0].values[1]", "'eighty' is not a port number"),
    ("when-not-values-ip", AP, WHEN_RULE % "{key: source.ip, notValues: [nowhere]}",
     "spec.rules[0].when[0].notValues[0]", "'nowhere' is not an IP address"),
    ("when-header-brackets", AP, WHEN_RULE % "{key: request.headers, values: [x]}", "spec.rules[0].when[0].key",
     "must name what it reads in brackets"),
    ("from-empty-list", AP, "rules: [{from: []}]", "spec.rules[0].from", "must not be an empty list"),
    ("from-without-source", AP, "rules: [{from: [{}]}]", "spec.rules[0].from[0].source",
     "source must set at least one field"),
    ("source-empty-lists", AP, "rules: [{from: [{source: {principals: []}}]}]", "spec.rules[0].from[0].source",
     "source must set at least one field"),
    ("operation-empty", AP, "rules: [{to: [{operation: {}}]}]", "spec.rules[0].to[0].operation",
     "operation must set at least one field"),
    ("empty-principal", AP, "rules: [{from: [{source: {principals: ['']}}]}]",
     "spec.rules[0].from[0].source.principals[0]", "must not be empty"),
    ("service-accounts-with-principals", AP,
     "rules: [{from: [{source: {serviceAccounts: [sleep], notPrincipals: [x]}}]}]",
     "spec.rules[0].from[0].source", "cannot be combined with principals or namespaces"),
    ("service-account-wildcard", AP, "rules: [{from: [{source: {serviceAccounts: ['default/*']}}]}]",
     "spec.rules[0].from[0].source.serviceAccounts[0]", "'default/*' is not a service account"),
    ("null-rule", AP, "rules: [null]", "spec.rules[0]", "a rule must not be null"),
    ("selector-wildcard", AP, "selector: {matchLabels: {app: '*'}}", "spec.selector.matchLabels.app",
     "app=* cannot select workloads"),
    ("selector-expressions", AP, "selector: {matchExpressions: []}", "spec.selector.matchExpressions",
     "unknown field"),
    ("selector-number", AP, "selector: {matchLabels: {version: 1}}", "spec.selector.matchLabels",
     "labels['version'] must be a string, not int 1"),
    ("selector-and-target-ref", AP,
     "selector: {matchLabels: {app: a}}\ntargetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: w}",
     "spec", "selector and targetRef exclude each other"),
    ("target-ref-kind", AP, "targetRefs: [{kind: Deployment, group: apps, name: w}]", "spec.targetRefs[0].kind",
     "apps/Deployment cannot be a policy target"),
    ("target-ref-namespace", AP, "targetRef: {kind: Service, name: w, namespace: bar}",
     "spec.targetRef.namespace", "cross-namespace targetRef is not supported"),
    ("target-ref-name", AP, "targetRefs: [{kind: Service}]", "spec.targetRefs[0].name", "must be set"),
    ("mode-lower-case", PA, "mtls: {mode: strict}", "spec.mtls.mode", "'strict' is not one of UNSET, DISABLE, "
     "PERMISSIVE, STRICT (write STRICT"),
    ("mode-unknown", PA, "mtls: {mode: REQUIRED}", "spec.mtls.mode", "'REQUIRED' is not one of"),
    ("mtls-unknown-field", PA, "mtls: {mod: STRICT}", "spec.mtls.mod", "unknown field (did you mean mode?"),
    ("port-level-without-selector", PA, "mtls: {mode: STRICT}\nportLevelMtls: {8080: {mode: DISABLE}}",
     "spec.portLevelMtls", "a mesh- or namespace-wide policy (no selector) cannot set portLevelMtls"),
    ("port-level-name", PA, "selector: {matchLabels: {app: a}}\nportLevelMtls: {http: {mode: DISABLE}}",
     "spec.portLevelMtls.http", "port 'http' must be a port number 1-65535"),
    ("port-level-zero", PA, "selector: {matchLabels: {app: a}}\nportLevelMtls: {0: {mode: DISABLE}}",
     "spec.portLevelMtls.0", "port 0 must be a port number 1-65535"),
    ("port-level-range", PA, "selector: {matchLabels: {app: a}}\nportLevelMtls: {'65536': {mode: DISABLE}}",
     "spec.portLevelMtls.65536", "port '65536' must be a port number"),
    ("port-level-empty", PA, "selector: {matchLabels: {app: a}}\nportLevelMtls: {}", "spec.portLevelMtls",
     "must map at least one port number"),
    ("port-level-mode", PA, "selector: {matchLabels: {app: a}}\nportLevelMtls: {8080: {mode: TLS}}",
     "spec.portLevelMtls.8080.mode", "'TLS' is not one of"),
    ("port-level-mode-yaml-bool", PA, "selector: {matchLabels: {app: a}}\nportLevelMtls: {8080: {mode: OFF}}",
     "spec.portLevelMtls.8080.mode", "must be a string, not bool False (quote it: YAML reads"),
    ("jwt-no-issuer", RA, JWT_RULE % "{audiences: [a]}", "spec.jwtRules[0]", "a JWT rule needs issuer or jwksUri"),
    ("jwks-uri", RA, JWT_RULE % "{issuer: a, jwksUri: 'ftp://example.com/keys'}", "spec.jwtRules[0].jwksUri",
     "is not an http(s) URL"),
    ("jwks", RA, JWT_RULE % "{issuer: a, jwks: 'not json'}", "spec.jwtRules[0].jwks", "is not JSON (JSONDecodeError)"),
    ("jwks-not-a-set", RA, JWT_RULE % "{issuer: a, jwks: '[1]'}", "spec.jwtRules[0].jwks", "not a JSON Web Key Set"),
    # the next two raised past the readers: every later policy change of the node was ignored
    ("jwks-uri-unparsable", RA, JWT_RULE % "{issuer: a, jwksUri: 'http://[zz]/k'}", "spec.jwtRules[0].jwksUri",
     "'http://[zz]/k' is not a URL"),
    ("jwks-nested-deep", RA, JWT_RULE % ("{issuer: a, jwks: '" + "[" * 50000 + "'}"), "spec.jwtRules[0].jwks",
     "is not JSON (RecursionError)"),
    ("claim-key-brackets", AP, WHEN_RULE % "{key: 'request.auth.claims[a]b]', values: [x]}",
     "spec.rules[0].when[0].key", "must name what it reads in brackets, without brackets in a name"),
    ("claim-key-empty", AP, WHEN_RULE % "{key: 'request.auth.claims[]]', values: [x]}",
     "spec.rules[0].when[0].key", "without brackets in a name"),
    ("header-key-nested", AP, WHEN_RULE % "{key: 'request.headers[x][y]', values: [x]}",
     "spec.rules[0].when[0].key", "without brackets in a name"),
    ("from-header-name", RA, JWT_RULE % "{issuer: a, fromHeaders: [{prefix: 'Bearer '}]}",
     "spec.jwtRules[0].fromHeaders[0].name", "must be set"),
    ("jwt-timeout", RA, JWT_RULE % "{issuer: a, timeout: soon}", "spec.jwtRules[0].timeout", "'soon' is not a duration"),
    ("jwt-unknown-field", RA, JWT_RULE % "{issuers: [a]}", "spec.jwtRules[0].issuers",
     "unknown field (did you mean issuer?"),
]


@pytest.mark.parametrize("kind, spec, path, fragment", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_resource_is_refused_naming_the_field(kind: str, spec: str, path: str, fragment: str):
    policies, errors = build(resource(kind, spec))
    assert len(errors) == 1, [str(e) for e in errors]
    err = errors[0]
    assert err.where.startswith("policies.yaml#")
    assert err.where.endswith(f" ({kind} foo/bad) {path}")
    assert fragment in str(err)
    if "action: CUSTOM" in spec:  # enforced as a DENY of its rules (test_a_custom_policy_is_enforced_as_a_deny)
        assert str(err).endswith("enforced as a DENY, as istiod enforces a CUSTOM policy whose provider it cannot use)")
        return
    # With no last good version, an AuthorizationPolicy or a PeerAuthentication is enforced
    # fail-closed (test_policy_failclosed.py); an AUDIT one and a RequestAuthentication enforce nothing.
    enforced = policies.get(kind, "foo", "bad")
    if kind == RA or "action: AUDIT" in spec:
        assert str(err).endswith("the whole resource is refused)") and enforced is None
        return
    assert "the whole resource is refused; with no last good version to keep, it is enforced fail-closed" in str(err)
    expected = "STRICT" if kind == PA else "DENY" if "action:" in spec else "ALLOW"  # (every other action is unreadable)
    assert enforced.fail_closed and (enforced.mode if kind == PA else enforced.action) == expected


def test_a_custom_policy_is_enforced_as_a_deny_of_its_rules():
    """nodeagent has no ext-authz provider, so CUSTOM is refused; refused alone, what it
    would have sent to the provider went through unchecked. As istiod does with a CUSTOM
    policy whose provider it cannot use, its rules are enforced as a DENY."""
    policies, errors = build(resource(AP, "action: CUSTOM\nprovider: {name: my-authz}\n"
                                          "rules: [{to: [{operation: {ports: ['80']}}]}]"))
    assert len(errors) == 1 and "CUSTOM needs an ext-authz provider" in str(errors[0])
    denying = policies.get(AP, "foo", "bad")
    assert (denying.action, denying.key) == ("DENY", "foo/bad")
    assert not policies.authorize(connection("foo/httpbin", 80)).allowed
    assert policies.authorize(connection("foo/httpbin", 8000)).allowed


@pytest.mark.parametrize("value, dry", [("true", True), ("True", True), ("TRUE", True), ("1", True), ("t", True),
                                        ("tRUE", False), ("yes", False), ("false", False), ("", False)])
def test_the_dry_run_annotation_is_read_as_istiod_reads_it(value, dry):
    """strconv.ParseBool's trues make a dry run; anything else (`tRUE`) is enforced, as
    istiod enforces a policy whose annotation it cannot parse (it was a dry run here)."""
    policies, errors = build(document("AuthorizationPolicy", "foo", "deny-all", "action: DENY\nrules: [{}]",
                                      metadata=f", annotations: {{istio.io/dry-run: {value!r}}}"))
    assert errors == []
    assert policies.authorize(connection("foo/httpbin", 80)).allowed is dry


def test_an_ipv4_mapped_block_matches_the_ipv4_sources_it_names():
    """::ffff:10.244.1.0/120 is 10.244.1.0/24, as IPv4-mapped sources are read as IPv4:
    it matched nothing, a DENY written so denying nobody."""
    policies = valid(document("AuthorizationPolicy", "foo", "deny-block", "action: DENY\n"
                              "rules: [{from: [{source: {ipBlocks: ['::ffff:10.244.1.0/120']}}]}]"))
    assert not policies.authorize(connection("foo/httpbin", 80, source_ip="10.244.1.20")).allowed
    assert not policies.authorize(connection("foo/httpbin", 80, source_ip="::ffff:10.244.1.20")).allowed
    assert policies.authorize(connection("foo/httpbin", 80, source_ip="10.244.2.20")).allowed


def test_message_names_resource_field_problem_remedy_and_fate():
    _, [err] = build(resource(AP, SOURCE_IP_RULE % '"10.0.0.300"'))
    assert str(err) == (
        "policies.yaml#10 (AuthorizationPolicy foo/bad) spec.rules[0].from[1].source.ipBlocks[0]: "
        "'10.0.0.300' is not an IP address or CIDR "
        '(write an address ("10.1.2.3") or a CIDR ("10.1.0.0/16"); the whole resource is refused; with no last '
        "good version to keep, it is enforced fail-closed as an ALLOW policy without rules for every workload of "
        "namespace foo: what no other ALLOW policy allows is denied)")


@pytest.mark.parametrize("api_version, kind", [
    ("security.istio.io/v1alpha1", AP), ("security.istio.io/v1alpha3", PA), ("networking.istio.io/v1", AP)])
def test_unsupported_api_version_is_refused(api_version: str, kind: str):
    _, [err] = build(resource(kind, "{}", api_version))
    assert err.where.endswith(f"({kind} foo/bad) apiVersion")
    assert f"{api_version} {kind} is not supported (use security.istio.io/v1 or security.istio.io/v1beta1" in str(err)


def test_bad_creation_timestamp_is_refused():
    _, [err] = build(resource(PA, "mtls: {mode: STRICT}", meta=", creationTimestamp: yesterday"))
    assert err.where.endswith("(PeerAuthentication foo/bad) metadata.creationTimestamp")


# Istio's documented examples (authorization-policy, peer_authentication and
# request_authentication references, security tasks), all of which must be accepted.
DOCUMENTED = [
    (AP, "security.istio.io/v1beta1", """
action: ALLOW
rules:
- from:
  - source:
      principals: ["cluster.local/ns/default/sa/sleep"]
  - source:
      namespaces: ["test"]
  to:
  - operation:
      methods: ["GET"]
      paths: ["/info*"]
  - operation:
      methods: ["POST"]
      paths: ["/data"]
  when:
  - key: request.auth.claims[iss]
    values: ["https://accounts.google.com"]
"""),
    (AP, "security.istio.io/v1", 'action: DENY\nrules:\n- from:\n  - source: {namespaces: ["dev"]}\n'
                                 '  to:\n  - operation: {methods: ["POST"]}'),
    (AP, "security.istio.io/v1", 'action: DENY\nrules:\n- to:\n  - operation: {methods: ["POST"], ports: ["8080"]}'),
    (AP, "security.istio.io/v1", "{}"),
    (AP, "security.istio.io/v1", "rules:\n- {}"),
    (AP, "security.istio.io/v1", "selector:\n  matchLabels: {app: httpbin}"),
    (AP, "security.istio.io/v1", 'action: DENY\nrules:\n- to:\n  - operation: {paths: ["/headers"]}\n'
                                 "targetRefs:\n- {kind: Gateway, name: waypoint, group: gateway.networking.k8s.io}"),
    (AP, "security.istio.io/v1", "targetRef: {kind: Service, group: '', name: httpbin}\nrules: [{}]"),
    (AP, "security.istio.io/v1", 'action: ALLOW\nrules:\n- from:\n  - source:\n'
                                 '      principals: ["cluster.local/ns/default/sa/sleep"]\n'
                                 '  to:\n  - operation: {ports: ["9000", "9001"]}\n'
                                 "  when:\n  - {key: source.ip, values: ['10.1.2.3', '10.2.0.0/16']}\n"
                                 "  - {key: destination.port, notValues: ['15000']}\n"
                                 "  - {key: remote.ip, values: ['10.1.2.3']}\n"
                                 "  - {key: connection.sni, values: ['www.example.com']}\n"
                                 "  - {key: 'experimental.envoy.filters.network.mysql_proxy[db.table]', values: ['[update]']}"),
    (AP, "security.istio.io/v1", 'rules:\n- from:\n  - source:\n      principals: ["admin", "dev"]\n'
                                 '      namespaces: ["prod", "test"]\n      notIpBlocks: ["203.0.113.4"]'),
    (AP, "security.istio.io/v1", 'rules:\n- to:\n  - operation:\n      hosts: ["*.example.com"]\n'
                                 '      methods: ["GET", "HEAD"]\n      notPaths: ["/admin*"]'),
    (AP, "security.istio.io/v1", "rules:\n- from:\n  - source: {serviceAccounts: [default/sleep, sleep]}"),
    (PA, "security.istio.io/v1", "mtls: {mode: STRICT}"),
    (PA, "security.istio.io/v1beta1", "selector: {matchLabels: {app: finance}}\nmtls: {mode: STRICT}\n"
                                      "portLevelMtls:\n  8080: {mode: DISABLE}"),
    (PA, "security.istio.io/v1", "selector: {matchLabels: {app: finance}}\nmtls: {mode: UNSET}\n"
                                 "portLevelMtls:\n  '8080': {mode: DISABLE}\n  9090: {}"),
    (PA, "security.istio.io/v1", "{}"),
    (RA, "security.istio.io/v1", """
selector: {matchLabels: {app: httpbin}}
jwtRules:
- issuer: "issuer-foo"
  jwksUri: https://example.com/.well-known/jwks.json
  audiences: [bookstore_android.apps.example.com]
  fromHeaders:
  - {name: x-jwt-assertion, prefix: "Bearer "}
  fromParams: [my_token]
  fromCookies: [auth-token]
  outputClaimToHeaders:
  - {header: x-my-company-jwt-group, claim: my-group}
  forwardOriginalToken: true
  timeout: 5s
- issuer: "issuer-bar"
  jwks: '{"keys": []}'
"""),
]


@pytest.mark.parametrize("kind, api_version, spec", DOCUMENTED,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(DOCUMENTED)])
def test_documented_examples_are_accepted(kind: str, api_version: str, spec: str):
    policies = valid(resource(kind, spec, api_version))
    assert policies.get(kind, "foo", "bad") is not None


# --- last good configuration ----------------------------------------------------------
DENY_SLEEP = document(AP, "foo", "deny-sleep", """
action: DENY
rules:
- from:
  - source: {principals: [%s]}
""")
GOOD_DENY = DENY_SLEEP % '"cluster.local/ns/default/sa/sleep"'
BROKEN_DENY = DENY_SLEEP % "42"
DENIED = Decision(False, "foo/deny-sleep", 0, "denied by DENY policy foo/deny-sleep rule 0")
OPEN = Decision(True, None, None, "no ALLOW policy applies")


def test_invalid_update_keeps_the_previous_version():
    first = valid(GOOD_DENY)
    second, [err] = build(BROKEN_DENY, previous=first)
    assert err.where.endswith("(AuthorizationPolicy foo/deny-sleep) spec.rules[0].from[0].source.principals[0]")
    assert str(err).endswith("the whole resource is refused; its last good version stays in force)")
    assert second.authorize(connection("foo/httpbin", 80)) == DENIED


def test_kept_version_survives_further_invalid_builds_and_is_replaced_when_fixed():
    kept, _ = build(BROKEN_DENY, previous=valid(GOOD_DENY))
    still, [err] = build(BROKEN_DENY, previous=kept)
    assert "the whole resource is refused; its last good version stays in force" in str(err)
    assert still.authorize(connection("foo/httpbin", 80)) == DENIED
    fixed, errors = build(DENY_SLEEP % '"cluster.local/ns/default/sa/other"', previous=still)
    assert errors == []
    assert fixed.authorize(connection("foo/httpbin", 80)) == OPEN


def test_new_invalid_resource_is_reported_and_enforced_fail_closed():
    """Until 2026-12-07 it was ignored: the workloads of a DENY created invalid, or first
    seen invalid after a restart, were not denied (test_policy_failclosed.py)."""
    policies, [err] = build(BROKEN_DENY, previous=valid(""))
    assert str(err).endswith("the whole resource is refused; with no last good version to keep, it is enforced "
                             "fail-closed: every connection to every workload of namespace foo is denied)")
    assert policies.keys() == [(AP, "foo", "deny-sleep")] and policies.last_good(AP, "foo", "deny-sleep") is None
    assert policies.authorize(connection("foo/httpbin", 80)) == Decision(
        False, "foo/deny-sleep", 0, "denied by DENY policy foo/deny-sleep rule 0 (the policy is invalid and "
        "enforced fail-closed; see the agent's policy errors)")
    assert policies.authorize(connection("bar/httpbin", 80)) == OPEN


def test_deleted_resource_is_not_kept():
    policies, errors = build("", previous=valid(GOOD_DENY))
    assert (policies.keys(), errors) == ([], [])
    assert policies.authorize(connection("foo/httpbin", 80)) == OPEN


def test_each_invalid_resource_is_refused_on_its_own_and_the_rest_apply():
    yaml = "".join([
        GOOD_DENY,
        resource(PA, "mtls: {mode: STRICT}").replace("name: bad", "name: strict"),
        resource(AP, "action: deny"),
        resource(PA, "mtls: {mode: strict}"),
    ])
    policies, errors = build(yaml)
    assert sorted(e.where.split(" (")[1] for e in errors) == [
        "AuthorizationPolicy foo/bad) spec.action", "PeerAuthentication foo/bad) spec.mtls.mode"]
    good = [key for key in policies.keys() if policies.last_good(*key)]
    assert good == [(AP, "foo", "deny-sleep"), (PA, "foo", "strict")]
    assert [key for key in policies.keys() if key not in good] == [(AP, "foo", "bad"), (PA, "foo", "bad")]  # fail-closed
    denied = policies.authorize(connection("foo/httpbin", 80))  # `action: deny` cannot be read: it denies all
    assert (denied.allowed, denied.policy) == (False, "foo/bad")
    assert policies.authorize(connection("bar/httpbin", 80)) == OPEN
    assert policies.mtls_mode(connection("foo/httpbin", 80).destination, 80) == "STRICT"


def test_an_exception_no_reader_foresaw_refuses_that_resource_alone(monkeypatch):
    """A reader raising something else than a ConfigError (a value no check foresaw) made
    the whole build raise: the agent kept every policy at its old version (none after a
    restart). Now it refuses that resource as any invalid one, the rest apply."""
    from nodeagent.policy import policyset
    validate = policyset.validate

    def choking(obj):
        if obj.name == "bad":
            raise RecursionError("maximum recursion depth exceeded")
        return validate(obj)

    monkeypatch.setattr(policyset, "validate", choking)
    policies, [err] = build(GOOD_DENY + resource(AP, "action: DENY\nrules: [{}]"))
    assert err.where.endswith("(AuthorizationPolicy foo/bad)")
    assert "cannot be read (RecursionError: maximum recursion depth exceeded)" in str(err)
    assert str(err).endswith("the whole resource is refused; with no last good version to keep, it is enforced "
                             "fail-closed: every connection to every workload of namespace foo is denied)")
    assert policies.authorize(connection("foo/httpbin", 80)).allowed is False
    assert policies.last_good(AP, "foo", "deny-sleep") is not None


def test_a_resource_defined_twice_is_reported_and_the_first_kept():
    policies, [err] = build(GOOD_DENY + BROKEN_DENY)
    assert "defined twice; the first one is used" in str(err)
    assert policies.authorize(connection("foo/httpbin", 80)) == DENIED
