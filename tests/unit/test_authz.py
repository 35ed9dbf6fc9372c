"""L4 AuthorizationPolicy decisions, table-driven from Istio's documented examples
(authorization-policy reference, authz tasks for TCP, ambient L4 policy): each case
checks the exact Decision — allowed, deciding policy, rule and reason."""

from __future__ import annotations

import pytest

from nodeagent.policy import Connection, Decision
from policy_world import connection, document, pod, spiffe, valid


def policy(name: str, spec: str, namespace: str = "foo", metadata: str = "") -> str:
    return document("AuthorizationPolicy", namespace, name, spec, metadata=metadata)


def from_source(name: str, source: str, action: str = "ALLOW") -> str:
    """A foo policy of one rule with one source, e.g. `{namespaces: [dev]}`."""
    return policy(name, f"action: {action}\nrules:\n- from:\n  - source: {source}")


def with_when(name: str, conditions: str, action: str = "ALLOW") -> str:
    """A foo policy of one rule made of `when` conditions (a YAML list)."""
    return policy(name, f"action: {action}\nrules:\n- when: {conditions}")


def allowed_by(key: str, rule: int = 0) -> Decision:
    return Decision(True, key, rule, f"allowed by ALLOW policy {key} rule {rule}")


def denied_by(key: str, rule: int = 0, ignoring: str = "") -> Decision:
    reason = f"denied by DENY policy {key} rule {rule}"
    if ignoring:
        reason += f" (ignoring {ignoring}, which L4 cannot see)"
    return Decision(False, key, rule, reason)


def no_allow_match(count: int = 1) -> Decision:
    return Decision(False, None, None, f"no ALLOW policy matched ({count} apply)")


OPEN = Decision(True, None, None, "no ALLOW policy applies")

ALLOW_NOTHING = policy("allow-nothing", "{}")
DENY_ALL = policy("deny-all", "action: DENY\nrules:\n- {}")
ALLOW_ALL = policy("allow-all", "rules:\n- {}")
BY_PRINCIPAL = policy("httpbin", """
action: ALLOW
rules:
- from:
  - source:
      principals: ["cluster.local/ns/default/sa/sleep"]
  - source:
      namespaces: ["test"]
""")
BY_NAMESPACE = from_source("ns-only", '{namespaces: ["default"]}')
BY_IP = from_source("by-ip", '{ipBlocks: ["10.244.1.0/24"]}')
TCP_PORTS = policy("tcp-policy", """
selector: {matchLabels: {app: tcp-echo}}
action: ALLOW
rules:
- to:
  - operation: {ports: ["9000", "9001"]}
""")
DENY_PLAINTEXT = from_source("require-mtls", '{notPrincipals: ["*"]}', "DENY")
DENY_NOT_SLEEP = from_source("only-sleep", '{notPrincipals: ["cluster.local/ns/default/sa/sleep"]}', "DENY")
WHEN_SOURCE_IP = with_when("when-ip", '[{key: source.ip, values: ["10.244.1.20"]}]')
WHEN_NOT_VALUES = with_when("when-not", '[{key: source.namespace, notValues: [dev]}, '
                                        '{key: destination.port, values: ["80", "8000"]}]')
ROOT_ALLOW_NOTHING = policy("allow-nothing", "{}", namespace="istio-system")
ROOT_SELECTOR_V1 = policy("allow-nothing-v1", "selector: {matchLabels: {version: v1}}", namespace="istio-system")
BAR_SELECTOR = policy("allow-nothing", "selector: {matchLabels: {app: httpbin}}", namespace="bar")
ALLOW_GET = policy("get-only", """
rules:
- to:
  - operation: {methods: ["GET"], ports: ["8000"]}
- from:
  - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
""")
ALLOW_JWT_ONLY = from_source("jwt", '{requestPrincipals: ["*"]}')
ALLOW_CLAIM = policy("claim", """
rules:
- from:
  - source: {namespaces: ["default"]}
  when:
  - key: request.auth.claims[iss]
    values: ["https://accounts.google.com"]
""")
ALLOW_SNI = with_when("sni", '[{key: connection.sni, values: ["www.example.com"]}]')
DENY_POST_8080 = policy("httpbin", """
action: DENY
rules:
- to:
  - operation: {methods: ["POST"], ports: ["8080"]}
""")
DENY_DEV_POST = policy("httpbin-dev", """
action: DENY
rules:
- from:
  - source: {namespaces: ["dev"]}
  to:
  - operation: {methods: ["POST"]}
""")
DENY_NO_JWT = from_source("deny-no-jwt", '{notRequestPrincipals: ["*"]}', "DENY")
DENY_HEADER = policy("header", """
action: DENY
rules:
- to:
  - operation: {ports: ["9000"]}
  when:
  - key: request.headers[x-token]
    values: ["admin"]
""")
DRY_RUN_DENY = policy("dry-run-example", "action: DENY\nrules:\n- {}",
                      metadata=', annotations: {istio.io/dry-run: "true"}')
TARGET_REF_DENY = policy("target-ref-example", """
targetRefs:
- {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}
action: DENY
rules:
- {}
""")
SERVICE = """apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 80}]}
---
"""
SERVICE_DENY = SERVICE + policy("svc-deny", """
targetRefs:
- {kind: Service, group: "", name: httpbin}
action: DENY
rules:
- from: [{source: {namespaces: [default]}}]
""")
SERVICE_HTTP_ALLOW = SERVICE + policy("svc-allow-get", """
targetRefs:
- {kind: Service, group: "", name: httpbin}
rules:
- to: [{operation: {methods: [GET]}}]
""")
WILDCARDS = policy("wildcards", """
rules:
- from:
  - source: {principals: ["cluster.local/ns/default/*"]}
- from:
  - source: {principals: ["*/sa/reviews"]}
- from:
  - source: {namespaces: ["prod-*"]}
""")
ANY_PRINCIPAL = from_source("any-identity", '{principals: ["*"]}')
SERVICE_ACCOUNTS = from_source("by-sa", '{serviceAccounts: ["default/sleep", "httpbin"]}')
NOT_IP = from_source("block-subnet", '{notIpBlocks: ["10.244.0.0/16"]}', "DENY")
REMOTE_IP = from_source("remote", '{remoteIpBlocks: ["10.244.1.20"]}')
DENY_REMOTE = from_source("deny-remote", '{remoteIpBlocks: ["203.0.113.7"]}', "DENY")
DENY_NOT_REMOTE = from_source("deny-not-remote", '{notRemoteIpBlocks: ["203.0.113.0/24"]}', "DENY")
DENY_REMOTE_WHEN = with_when("deny-remote-when", '[{key: remote.ip, values: ["203.0.113.7"]}]', "DENY")
DENY_REMOTE_NS = from_source("deny-remote-ns", '{namespaces: [dev], remoteIpBlocks: ["203.0.113.7"]}', "DENY")
DEST_IP = with_when("dest-ip", '[{key: destination.ip, values: ["10.244.1.11/32"]}]')
SOURCE_AND = from_source("fields-and", '{principals: ["cluster.local/ns/default/sa/sleep"], '
                                       'ipBlocks: ["10.244.2.0/24"]}')
RULE_AND = policy("sections-and", """
rules:
- from:
  - source: {namespaces: ["default"]}
  to:
  - operation: {ports: ["8000"]}
""")

CASES = [
    # (id, policies, connection, decision)
    ("no-policy", "", connection("foo/httpbin", 8000), OPEN),
    ("allow-nothing", ALLOW_NOTHING, connection("foo/httpbin", 8000), no_allow_match()),
    ("allow-nothing-other-namespace", ALLOW_NOTHING, connection("bar/httpbin", 8000), OPEN),
    ("deny-all", DENY_ALL, connection("foo/httpbin", 8000), denied_by("foo/deny-all")),
    ("allow-all", ALLOW_ALL, connection("foo/httpbin", 8000, source=None), allowed_by("foo/allow-all")),
    ("deny-beats-allow", ALLOW_ALL + DENY_ALL, connection("foo/httpbin", 8000),
     denied_by("foo/deny-all")),
    ("principal", BY_PRINCIPAL, connection("foo/httpbin", 8000), allowed_by("foo/httpbin")),
    ("principal-other-sa", BY_PRINCIPAL, connection("foo/httpbin", 8000, source="default/other"),
     no_allow_match()),
    ("principal-namespace-entry", BY_PRINCIPAL, connection("foo/httpbin", 8000, source="test/any"),
     allowed_by("foo/httpbin")),
    ("principal-plaintext", BY_PRINCIPAL, connection("foo/httpbin", 8000, source=None), no_allow_match()),
    ("namespace", BY_NAMESPACE, connection("foo/httpbin", 8000), allowed_by("foo/ns-only")),
    ("namespace-other", BY_NAMESPACE, connection("foo/httpbin", 8000, source="dev/x"), no_allow_match()),
    ("namespace-plaintext", BY_NAMESPACE, connection("foo/httpbin", 8000, source=None), no_allow_match()),
    ("ipblocks", BY_IP, connection("foo/httpbin", 8000), allowed_by("foo/by-ip")),
    ("ipblocks-plaintext", BY_IP, connection("foo/httpbin", 8000, source=None), allowed_by("foo/by-ip")),
    ("ipblocks-outside", BY_IP, connection("foo/httpbin", 8000, source_ip="10.244.2.5"), no_allow_match()),
    ("ipblocks-ipv4-mapped", BY_IP, connection("foo/httpbin", 8000, source_ip="::ffff:10.244.1.20"),
     allowed_by("foo/by-ip")),
    ("ports-9000", TCP_PORTS, connection("foo/tcp-echo", 9000), allowed_by("foo/tcp-policy")),
    ("ports-9002", TCP_PORTS, connection("foo/tcp-echo", 9002), no_allow_match()),
    ("ports-selector-elsewhere", TCP_PORTS, connection("foo/httpbin", 9002), OPEN),
    ("not-principals-star-plaintext", DENY_PLAINTEXT, connection("foo/httpbin", 80, source=None),
     denied_by("foo/require-mtls")),
    ("not-principals-star-mtls", DENY_PLAINTEXT, connection("foo/httpbin", 80), OPEN),
    ("not-principals-other", DENY_NOT_SLEEP, connection("foo/httpbin", 80, source="default/x"),
     denied_by("foo/only-sleep")),
    ("not-principals-self", DENY_NOT_SLEEP, connection("foo/httpbin", 80), OPEN),
    ("not-principals-plaintext", DENY_NOT_SLEEP, connection("foo/httpbin", 80, source=None),
     denied_by("foo/only-sleep")),
    ("when-source-ip", WHEN_SOURCE_IP, connection("foo/httpbin", 80, source=None), allowed_by("foo/when-ip")),
    ("when-source-ip-other", WHEN_SOURCE_IP, connection("foo/httpbin", 80, source_ip="10.244.1.21"),
     no_allow_match()),
    ("when-not-values", WHEN_NOT_VALUES, connection("foo/httpbin", 8000), allowed_by("foo/when-not")),
    ("when-not-values-dev", WHEN_NOT_VALUES, connection("foo/httpbin", 8000, source="dev/x"), no_allow_match()),
    ("when-and", WHEN_NOT_VALUES, connection("foo/httpbin", 9000), no_allow_match()),
    ("mesh-wide", ROOT_ALLOW_NOTHING, connection("bar/httpbin", 80), no_allow_match()),
    ("mesh-wide-root-pods", ROOT_ALLOW_NOTHING, connection("istio-system/istiod", 15012), no_allow_match()),
    ("mesh-wide-plus-namespace", ROOT_ALLOW_NOTHING + BY_NAMESPACE, connection("foo/httpbin", 80),
     allowed_by("foo/ns-only")),
    ("mesh-wide-plus-namespace-miss", ROOT_ALLOW_NOTHING + BY_NAMESPACE,
     connection("foo/httpbin", 80, source="dev/x"), no_allow_match(2)),
    ("root-selector-match", ROOT_SELECTOR_V1, connection("foo/httpbin", 80), no_allow_match()),
    ("root-selector-miss", ROOT_SELECTOR_V1, connection("bar/httpbin", 80), OPEN),
    ("workload-selector", BAR_SELECTOR, connection("bar/httpbin", 80), no_allow_match()),
    ("workload-selector-other-pod", BAR_SELECTOR, connection("bar/finance", 80), OPEN),
    ("workload-selector-same-labels-other-ns", BAR_SELECTOR, connection("foo/httpbin", 80), OPEN),
    ("second-allow-policy-matches", BY_PRINCIPAL + BY_IP,
     connection("foo/httpbin", 80, source=None), allowed_by("foo/by-ip")),
    ("http-allow-rule-matches-nothing", ALLOW_GET, connection("foo/httpbin", 8000, source="dev/x"),
     no_allow_match()),
    ("http-allow-next-rule", ALLOW_GET, connection("foo/httpbin", 8000), allowed_by("foo/get-only", 1)),
    ("http-allow-request-principals", ALLOW_JWT_ONLY, connection("foo/httpbin", 8000), no_allow_match()),
    ("http-allow-claim", ALLOW_CLAIM, connection("foo/httpbin", 8000), no_allow_match()),
    ("http-allow-sni", ALLOW_SNI, connection("foo/httpbin", 8000), no_allow_match()),
    ("http-deny-port", DENY_POST_8080, connection("foo/httpbin", 8080),
     denied_by("foo/httpbin", ignoring="methods")),
    ("http-deny-other-port", DENY_POST_8080, connection("foo/httpbin", 9000), OPEN),
    ("http-deny-namespace", DENY_DEV_POST, connection("foo/httpbin", 8000, source="dev/x"),
     denied_by("foo/httpbin-dev", ignoring="methods")),
    ("http-deny-namespace-other", DENY_DEV_POST, connection("foo/httpbin", 8000), OPEN),
    ("http-deny-only-jwt", DENY_NO_JWT, connection("foo/httpbin", 8000),
     denied_by("foo/deny-no-jwt", ignoring="notRequestPrincipals")),
    ("http-deny-when-header", DENY_HEADER, connection("foo/httpbin", 9000),
     denied_by("foo/header", ignoring="request.headers[x-token]")),
    ("http-deny-when-header-port", DENY_HEADER, connection("foo/httpbin", 9001), OPEN),
    ("dry-run-no-effect", DRY_RUN_DENY, connection("foo/httpbin", 80), OPEN),
    ("target-ref-gateway-no-pod", TARGET_REF_DENY, connection("foo/httpbin", 80), OPEN),
    # bound to a Service: its pods, at L4 too (the waypoint serves only its HTTP ports, and
    # only once Envoy ACKed: the L4 engine ignoring them left them enforced nowhere else)
    ("target-ref-service-deny", SERVICE_DENY, connection("foo/httpbin", 80), denied_by("foo/svc-deny")),
    ("target-ref-service-other-pod", SERVICE_DENY, connection("foo/tcp-echo", 80), OPEN),
    ("target-ref-service-http-allow", SERVICE_HTTP_ALLOW, connection("foo/httpbin", 80), no_allow_match()),
    ("principal-prefix", WILDCARDS, connection("foo/httpbin", 80, source="default/any"),
     allowed_by("foo/wildcards")),
    ("principal-suffix", WILDCARDS, connection("foo/httpbin", 80, source="bar/reviews"),
     allowed_by("foo/wildcards", 1)),
    ("namespace-prefix", WILDCARDS, connection("foo/httpbin", 80, source="prod-eu/x"),
     allowed_by("foo/wildcards", 2)),
    ("wildcards-miss", WILDCARDS, connection("foo/httpbin", 80, source="prod/x"), no_allow_match()),
    ("any-principal", ANY_PRINCIPAL, connection("foo/httpbin", 80), allowed_by("foo/any-identity")),
    ("any-principal-plaintext", ANY_PRINCIPAL, connection("foo/httpbin", 80, source=None), no_allow_match()),
    ("service-account", SERVICE_ACCOUNTS, connection("foo/httpbin", 80), allowed_by("foo/by-sa")),
    ("service-account-bare-name", SERVICE_ACCOUNTS, connection("foo/httpbin", 80, source="foo/httpbin"),
     allowed_by("foo/by-sa")),
    ("service-account-bare-name-other-ns", SERVICE_ACCOUNTS,
     connection("foo/httpbin", 80, source="bar/httpbin"), no_allow_match()),
    ("not-ip-blocks-inside", NOT_IP, connection("foo/httpbin", 80), OPEN),
    ("not-ip-blocks-outside", NOT_IP, connection("foo/httpbin", 80, source_ip="192.168.0.9"),
     denied_by("foo/block-subnet")),
    # remote.ip is the original client behind a proxy, which L4 does not see (as ztunnel):
    # an ALLOW naming it matches nothing, a DENY is enforced without it
    ("remote-ip-allow-matches-nothing", REMOTE_IP, connection("foo/httpbin", 80), no_allow_match()),
    ("remote-ip-deny-behind-a-gateway", DENY_REMOTE, connection("foo/httpbin", 80, source="istio-system/gateway"),
     denied_by("foo/deny-remote", ignoring="remoteIpBlocks")),
    ("not-remote-ip-deny", DENY_NOT_REMOTE, connection("foo/httpbin", 80), denied_by("foo/deny-not-remote",
                                                                                     ignoring="notRemoteIpBlocks")),
    ("remote-ip-when-deny", DENY_REMOTE_WHEN, connection("foo/httpbin", 80), denied_by("foo/deny-remote-when",
                                                                                       ignoring="remote.ip")),
    ("remote-ip-deny-keeps-its-l4-parts", DENY_REMOTE_NS, connection("foo/httpbin", 80), OPEN),
    ("remote-ip-deny-keeps-its-l4-parts-match", DENY_REMOTE_NS, connection("foo/httpbin", 80, source="dev/sleep"),
     denied_by("foo/deny-remote-ns", ignoring="remoteIpBlocks")),
    ("destination-ip", DEST_IP, connection("foo/tcp-echo", 80), allowed_by("foo/dest-ip")),
    ("destination-ip-other", DEST_IP, connection("foo/httpbin", 80), no_allow_match()),
    ("source-fields-and", SOURCE_AND, connection("foo/httpbin", 80), no_allow_match()),
    ("source-fields-and-both", SOURCE_AND, connection("foo/httpbin", 80, source_ip="10.244.2.3"),
     allowed_by("foo/fields-and")),
    ("rule-sections-and", RULE_AND, connection("foo/httpbin", 8000), allowed_by("foo/sections-and")),
    ("rule-sections-and-port", RULE_AND, connection("foo/httpbin", 8001), no_allow_match()),
]


@pytest.mark.parametrize("policies, conn, decision", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision(policies: str, conn: Connection, decision: Decision):
    assert valid(policies).authorize(conn) == decision


def test_principal_without_spiffe_scheme_is_no_identity():
    conn = Connection("10.244.1.20", "cluster.local/ns/default/sa/sleep", "default",
                      pod("foo/httpbin"), "10.244.1.10", 80)
    assert valid(BY_PRINCIPAL).authorize(conn) == no_allow_match()


def test_namespace_comes_from_the_verified_identity():
    # A caller's namespace field cannot grant what the certificate does not say.
    conn = Connection("10.244.1.20", spiffe("dev", "x"), "default", pod("foo/httpbin"), "10.244.1.10", 80)
    assert valid(BY_NAMESPACE).authorize(conn) == no_allow_match()


def test_plaintext_namespace_field_is_ignored():
    conn = Connection("10.244.1.20", None, "default", pod("foo/httpbin"), "10.244.1.10", 80)
    assert valid(BY_NAMESPACE).authorize(conn) == no_allow_match()


JWT_HTTPBIN = document("RequestAuthentication", "foo", "jwt", """
selector: {matchLabels: {app: httpbin}}
jwtRules:
- issuer: issuer-foo
  jwksUri: https://example.com/.well-known/jwks.json
""")
L7_CASES = [
    ("l4-only", BY_PRINCIPAL, "foo/httpbin", False),
    ("allow-http", ALLOW_GET, "foo/httpbin", True),
    ("deny-http", DENY_POST_8080, "foo/httpbin", True),
    ("deny-http-other-namespace", DENY_POST_8080, "bar/httpbin", False),
    ("dry-run-http", DRY_RUN_DENY.replace("- {}", "- to: [{operation: {paths: [/x]}}]"), "foo/httpbin", False),
    ("request-authentication", JWT_HTTPBIN, "foo/httpbin", True),
    ("request-authentication-other-pod", JWT_HTTPBIN, "foo/tcp-echo", False),
    ("request-authentication-mesh-wide",
     document("RequestAuthentication", "istio-system", "jwt", "jwtRules: [{issuer: issuer-foo}]",
              api_version="security.istio.io/v1beta1"), "bar/finance", True),
]


@pytest.mark.parametrize("policies, key, expected", [c[1:] for c in L7_CASES], ids=[c[0] for c in L7_CASES])
def test_workload_has_l7_policy(policies: str, key: str, expected: bool):
    assert valid(policies).workload_has_l7_policy(pod(key)) is expected
