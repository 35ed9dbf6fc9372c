"""Validation of the Istio resources the waypoint translates: every spelling of the API,
errors naming the resource and the field path, deprecated fields read with a warning,
what the waypoint refuses and says so, and one bad resource never hiding the others
(nor, when it was good before, its previous version)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from xds_world import config, doc, valid

ROUTE_TO_REVIEWS = "hosts: [reviews]\nhttp:\n- route:\n  - destination: {host: reviews}\n"


def errors(yaml: str) -> list[str]:
    return [str(e) for e in config(yaml).errors]


def only_error(yaml: str) -> str:
    found = errors(yaml)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("api", ["networking.istio.io/v1", "networking.istio.io/v1beta1",
                                 "networking.istio.io/v1alpha3"])
def test_every_networking_spelling_is_read(api):
    built = valid(doc("VirtualService", "r", ROUTE_TO_REVIEWS, api) +
                  doc("DestinationRule", "r", "host: reviews\nsubsets: [{name: v1, labels: {version: v1}}]", api))
    assert [vs.name for vs in built.virtual_services] == ["r"]
    assert [dr.subsets[0].name for dr in built.destination_rules] == ["v1"]


def test_an_unknown_version_is_refused_naming_api_version():
    message = only_error(doc("VirtualService", "r", ROUTE_TO_REVIEWS, "networking.istio.io/v2"))
    assert "(VirtualService shop/r) apiVersion: networking.istio.io/v2 VirtualService is not supported" in message
    assert "networking.istio.io/v1 or networking.istio.io/v1beta1 or networking.istio.io/v1alpha3" in message


def test_envoy_filter_exists_only_as_v1alpha3():
    message = only_error(doc("EnvoyFilter", "e", "configPatches: []", "networking.istio.io/v1"))
    assert "use networking.istio.io/v1alpha3" in message


def test_error_names_source_resource_and_field_path_with_a_suggestion():
    message = only_error(doc("VirtualService", "bad", ROUTE_TO_REVIEWS + "  timeot: 5s\n"))
    assert message.startswith("test.yaml#")
    assert "(VirtualService shop/bad) spec.http[0].timeot: unknown field (did you mean timeout?" in message


@pytest.mark.parametrize("spec, path, words", [
    ("hosts: [reviews]\nhttp:\n- route:\n  - destination: {host: reviews}\n    weight: '50'",
     "spec.http[0].route[0].weight", "must be an integer"),
    (ROUTE_TO_REVIEWS + "  timeout: 10", "spec.http[0].timeout", "must be a string"),
    (ROUTE_TO_REVIEWS + "  timeout: ten", "spec.http[0].timeout", "is not a duration"),
    (ROUTE_TO_REVIEWS + "  retries: {attempts: 2, perTryTimeout: 0.5ms}", "spec.http[0].retries.perTryTimeout",
     "shorter than the minimum 1ms"),
    (ROUTE_TO_REVIEWS + "  fault: {abort: {httpStatus: 503, percentage: {value: 101}}}",
     "spec.http[0].fault.abort.percentage.value", "out of range"),
    (ROUTE_TO_REVIEWS + "  fault: {abort: {httpStatus: 99}}", "spec.http[0].fault.abort.httpStatus", "out of range"),
    (ROUTE_TO_REVIEWS + "  redirect: {uri: /x}", "spec.http[0]", "exactly one of route, redirect, directResponse"),
    ("hosts: [reviews]\nhttp:\n- match: [{uri: {regex: '/(?=a)'}}]\n  route: [{destination: {host: reviews}}]",
     "spec.http[0].match[0].uri.regex", "RE2 does not support"),
    ("hosts: [reviews]\nhttp:\n- match: [{uri: {regex: '/[a'}}]\n  route: [{destination: {host: reviews}}]",
     "spec.http[0].match[0].uri.regex", "not a valid regular expression"),
    ("hosts: [reviews]\nhttp:\n- match: [{uri: {exact: /a, prefix: /b}}]\n  route: [{destination: {host: reviews}}]",
     "spec.http[0].match[0].uri", "exact and prefix exclude each other"),
    ("hosts: []\nhttp:\n- route: [{destination: {host: reviews}}]", "spec.hosts", "at least one host"),
    ("hosts: [reviews]\nhttp:\n- route:\n  - {destination: {host: reviews}, weight: 0}\n"
     "  - {destination: {host: ratings}, weight: 0}", "spec.http[0].route", "every destination has weight 0"),
    ('hosts: [reviews]\nhttp:\n- match: [{headers: {"x-user\\n": {exact: a}}}]\n'
     "  route: [{destination: {host: reviews}}]", "spec.http[0].match[0].headers.x-user\n",
     "'x-user\\n' is not a valid HTTP header name"),  # a final newline: `$` let it through
    # what Istio's webhook refuses (found by review: each was a silent no-op or a takeover)
    ("hosts: ['*']\nhttp:\n- route: [{destination: {host: ratings}}]", "spec.hosts",
     'the wildcard host "*" is not allowed for a VirtualService bound to the mesh'),
    (ROUTE_TO_REVIEWS + "  retries: {perTryTimeout: 2s, retryOn: 5xx}", "spec.http[0].retries",
     "sets perTryTimeout, retryOn but no attempts"),
    ("hosts: [reviews]\nhttp:\n- redirect: {}", "spec.http[0].redirect", "must set uri, authority, scheme or port"),
    ("hosts: [reviews]\nhttp:\n- redirect: {uri: ''}", "spec.http[0].redirect", "must set uri, authority"),  # empty
    (ROUTE_TO_REVIEWS + "  rewrite: {}", "spec.http[0].rewrite", "must set uri, uriRegexRewrite or authority"),
    (ROUTE_TO_REVIEWS + "  timeout: 99999999999h", "spec.http[0].timeout",
     "99999999999h is longer than the maximum 9223372037s"),  # OverflowError before
])
def test_virtual_service_errors_name_the_field(spec, path, words):
    message = only_error(doc("VirtualService", "r", spec))
    assert f"(VirtualService shop/r) {path}: " in message and words in message


@pytest.mark.parametrize("spec, path, words", [
    (ROUTE_TO_REVIEWS + "  corsPolicy: {allowOrigins: [{exact: x}]}", "spec.http[0].corsPolicy", "corsPolicy is not"),
    (ROUTE_TO_REVIEWS + "  delegate: {name: d}", "spec.http[0].delegate", "delegate is not"),
    (ROUTE_TO_REVIEWS + "tls: [{match: [{sniHosts: [a]}], route: [{destination: {host: reviews}}]}]",
     "spec.tls", "tls routes"),
    (ROUTE_TO_REVIEWS + "exportTo: ['.']", "spec.exportTo", "exportTo ['.'] is not supported"),
    (ROUTE_TO_REVIEWS + "  fault: {delay: {exponentialDelay: 1s}}", "spec.http[0].fault.delay.exponentialDelay",
     "exponentialDelay"),
    ("hosts: [db]\ntcp:\n- match: [{sourceLabels: {app: x}}]\n  route: [{destination: {host: db}}]",
     "spec.tcp[0].match[0].sourceLabels", "tcp match sourceLabels"),
])
def test_what_the_waypoint_cannot_do_is_refused_by_name(spec, path, words):
    message = only_error(doc("VirtualService", "r", spec))
    assert f"{path}: " in message and words in message and "not supported by nodeagent's waypoint" in message


@pytest.mark.parametrize("spec, path, words", [
    ("host: reviews\nworkloadSelector: {matchLabels: {app: x}}", "spec.workloadSelector", "workloadSelector"),
    ("host: reviews\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x}}}",
     "spec.trafficPolicy.loadBalancer.consistentHash", "consistentHash"),
    ("host: reviews\ntrafficPolicy: {tls: {mode: SIMPLE}}", "spec.trafficPolicy.tls.mode", "TLS origination"),
    ("host: reviews\ntrafficPolicy: {loadBalancer: {simple: round_robin}}", "spec.trafficPolicy.loadBalancer.simple",
     "write ROUND_ROBIN"),
    ("host: reviews\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: 0}}}",
     "spec.trafficPolicy.connectionPool.tcp.maxConnections", "out of range"),
    ("host: reviews\nsubsets: [{name: v1}, {name: v1}]", "spec.subsets[1].name", "defined twice"),
    ("host: reviews\ntrafficPolicy:\n  portLevelSettings: [{port: {number: 9080}}, {port: {number: 9080}}]",
     "spec.trafficPolicy.portLevelSettings[1].port", "not given by another entry"),
    ("host: reviews\ntrafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 2000000h}}}}",
     "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive.time", "longer than the maximum 4294967295s"),
])
def test_destination_rule_errors_name_the_field(spec, path, words):
    message = only_error(doc("DestinationRule", "d", spec))
    assert f"(DestinationRule shop/d) {path}: " in message and words in message


RATE_LIMIT = """
workloadSelector: {{labels: {{app: reviews}}}}
configPatches:
- applyTo: {apply_to}
  match:
    context: {context}
    listener:
      filterChain:
        filter:
          name: envoy.filters.network.http_connection_manager
          subFilter: {{name: envoy.filters.http.router}}
  patch:
    operation: INSERT_BEFORE
    value:
      name: envoy.filters.http.local_ratelimit
      typed_config:
        "@type": type.googleapis.com/udpa.type.v1.TypedStruct
        type_url: {type_url}
        value:
          {field}: http_local_rate_limiter
          token_bucket: {{max_tokens: 10, tokens_per_fill: 10, fill_interval: 60s}}
          filter_enabled: {{default_value: {{numerator: 100, denominator: HUNDRED}}}}
          filter_enforced: {{default_value: {{numerator: 100, denominator: HUNDRED}}}}
"""
LRL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"


def rate_limit(apply_to="HTTP_FILTER", context="SIDECAR_INBOUND", type_url=LRL, field="stat_prefix") -> str:
    spec = RATE_LIMIT.format(apply_to=apply_to, context=context, type_url=type_url, field=field)
    return doc("EnvoyFilter", "rl", spec, "networking.istio.io/v1alpha3")


def test_the_supported_rate_limit_patch_is_read():
    built = valid(rate_limit())
    (patch,) = built.envoy_filters[0].patches
    assert (patch.first, patch.port, patch.config.stat_prefix) == (False, None, "http_local_rate_limiter")
    assert patch.config.token_bucket.max_tokens == 10
    assert built.warnings == ()


@pytest.mark.parametrize("kwargs, path, words", [
    ({"apply_to": "CLUSTER"}, "spec.configPatches[0].applyTo", "applyTo CLUSTER is not supported"),
    ({"context": "SIDECAR_OUTBOUND"}, "spec.configPatches[0].match.context", "use SIDECAR_INBOUND"),
    ({"type_url": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"},
     "spec.configPatches[0].patch.value.typed_config", "type_url"),
    ({"field": "stat_prefx"}, "spec.configPatches[0].patch.value.typed_config.value",
     'no field named "stat_prefx"'),
])
def test_unsupported_envoy_filters_are_refused_naming_the_field(kwargs, path, words):
    message = only_error(rate_limit(**kwargs))
    assert f"(EnvoyFilter shop/rl) {path}: " in message and words in message


def test_a_gateway_patch_is_valid_but_applies_nowhere():
    built = valid(rate_limit(context="GATEWAY"))
    assert built.envoy_filters[0].patches == ()
    assert any("context GATEWAY applies to gateways" in str(w) for w in built.warnings)


def test_deprecated_fault_percent_is_read_with_a_warning():
    built = valid(doc("VirtualService", "r", ROUTE_TO_REVIEWS +
                      "  fault: {delay: {fixedDelay: 2s, percent: 30}, abort: {httpStatus: 500, percent: 7}}"))
    fault = built.virtual_services[0].http[0].fault
    assert (fault.delay, fault.delay_fraction.value, fault.delay_fraction.legacy_integer) == (
        timedelta(seconds=2), 30.0, True)
    assert (fault.abort_http, fault.abort_fraction.value, fault.abort_fraction.legacy_integer) == (500, 7.0, True)
    warnings = [str(w) for w in built.warnings]
    assert any("spec.http[0].fault.delay.percent: is deprecated (write percentage: {value: 30})" in w
               for w in warnings)
    assert any("spec.http[0].fault.abort.percent: is deprecated" in w for w in warnings)


def test_percentage_wins_over_the_deprecated_percent():
    built = valid(doc("VirtualService", "r", ROUTE_TO_REVIEWS +
                      "  fault: {delay: {fixedDelay: 1s, percent: 30, percentage: {value: 2.5}}}"))
    fraction = built.virtual_services[0].http[0].fault.delay_fraction
    assert (fraction.value, fraction.legacy_integer) == (2.5, False)
    assert built.warnings == ()


def test_retries_with_empty_fields_and_no_attempts_are_istios_no_retries():
    """Istio's webhook looks at values: an empty retryOn with no attempts is valid."""
    built = valid(doc("VirtualService", "r", ROUTE_TO_REVIEWS + "  retries: {retryOn: ''}"))
    assert built.virtual_services[0].http[0].retries.attempts == 0


def test_deprecated_mirror_percent_and_consecutive_errors_are_read_with_warnings():
    built = valid(doc("VirtualService", "r", ROUTE_TO_REVIEWS + "  mirror: {host: ratings}\n  mirrorPercent: 40") +
                  doc("DestinationRule", "d", "host: reviews\n"
                                              "trafficPolicy: {outlierDetection: {consecutiveErrors: 4}}"))
    mirror = built.virtual_services[0].http[0].mirrors[0]
    assert (mirror.destination.host, mirror.fraction.value, mirror.fraction.legacy_integer) == ("ratings", 40.0, True)
    outlier = built.destination_rules[0].policy.base.outlier_detection
    # istiod: gateway errors only; ejection on any 5xx (Envoy's default, 5 in a row) off
    assert (outlier.consecutive_gateway, outlier.consecutive_5xx) == (4, 0)
    assert len(built.warnings) == 2


def test_a_bad_resource_is_rejected_alone_and_the_rest_apply():
    built = config(doc("VirtualService", "bad", ROUTE_TO_REVIEWS + "  timeout: soon") +
                   doc("VirtualService", "good", "hosts: [ratings]\nhttp:\n- route: [{destination: {host: ratings}}]") +
                   doc("DestinationRule", "d", "host: reviews"))
    assert [vs.name for vs in built.virtual_services] == ["good"]
    assert [dr.name for dr in built.destination_rules] == ["d"]
    assert len(built.errors) == 1 and "(VirtualService shop/bad) spec.http[0].timeout" in str(built.errors[0])
    assert "the whole resource is refused" in str(built.errors[0])


def test_a_bad_edit_keeps_the_previous_good_version():
    good = valid(doc("VirtualService", "r", ROUTE_TO_REVIEWS + "  timeout: 3s"))
    edited = config(doc("VirtualService", "r", ROUTE_TO_REVIEWS + "  timeout: 3"), previous=good)
    assert edited.virtual_services[0].http[0].timeout == timedelta(seconds=3)
    assert "the whole resource is refused; its last good version stays in force" in str(edited.errors[0])
    fixed = config(doc("VirtualService", "r", ROUTE_TO_REVIEWS + "  timeout: 4s"), previous=edited)
    assert fixed.virtual_services[0].http[0].timeout == timedelta(seconds=4) and fixed.errors == ()


def test_a_resource_given_twice_uses_the_first():
    built = config(doc("DestinationRule", "d", "host: reviews") + doc("DestinationRule", "d", "host: ratings"))
    assert [dr.host for dr in built.destination_rules] == ["reviews"]
    assert "defined twice" in str(built.errors[0])


def test_security_resources_use_the_policy_engine_validation():
    message = only_error(doc("AuthorizationPolicy", "a", "action: PERMIT", "security.istio.io/v1"))
    assert "(AuthorizationPolicy shop/a) spec.action: 'PERMIT' is not one of ALLOW, DENY, AUDIT, CUSTOM" in message


@pytest.mark.parametrize("spec, words", [
    ("rules: [{when: [{key: experimental.envoy.filters.a, values: [x]}]}]", "condition key"),
    ("rules: [{from: [{source: {requestPrincipals: ['https://a*']}}]}]", "request principal 'https://a*'"),
    # read at translation before: the waypoint's whole snapshot stayed at its last version
    ("rules: [{when: [{key: request.auth.principal, values: ['*@corp.example']}]}]",
     "request principal '*@corp.example'"),
    ("rules: [{when: [{key: request.auth.principal, notValues: [a*/b]}]}]", "request principal 'a*/b'"),
])
def test_what_only_the_waypoint_refuses_in_authorization_policies(spec, words):
    message = only_error(doc("AuthorizationPolicy", "a", spec, "security.istio.io/v1"))
    assert words in message and "not supported by nodeagent's waypoint" in message


def test_request_authentication_rules_are_read_for_the_waypoint():
    built = valid(doc("RequestAuthentication", "jwt", """
selector: {matchLabels: {app: reviews}}
jwtRules:
- issuer: https://issuer.example
  audiences: [a, b]
  jwks: '{"keys": []}'
  fromHeaders: [{name: x-token, prefix: "Bearer "}]
  outputClaimToHeaders: [{header: x-sub, claim: sub}]
  forwardOriginalToken: true
""", "security.istio.io/v1beta1"))
    (rule,) = built.authentications[0].rules
    assert (rule.issuer, rule.audiences, rule.jwks, rule.from_headers, rule.claims_to_headers,
            rule.forward_original_token) == ("https://issuer.example", ("a", "b"), '{"keys": []}',
                                             (("x-token", "Bearer "),), (("x-sub", "sub"),), True)


# --- regexes, compiled as Envoy's RE2 compiles them -------------------------------------
# Each was accepted by Python's `re` and then NACKed by Envoy, freezing the waypoint.
RE2_REFUSED = [
    ("[a-z]{200}", "is too large for Envoy: its RE2 program size is 204, over Envoy's limit of 100"),
    ("a++", "is not a valid regular expression for RE2, Envoy's engine: bad repetition operator: ++"),
    (r"\Z", r"is not a valid regular expression for RE2, Envoy's engine: invalid escape sequence: \Z"),
    ("a{1001}", "is not a valid regular expression for RE2, Envoy's engine: invalid repetition size: {1001}"),
]
# Where a VirtualService takes a regex: (http route with RE in it, the field path named).
REGEX_FIELDS = [
    ("- match: [{uri: {regex: '@RE@'}}]", "spec.http[0].match[0].uri.regex"),
    ("- match: [{headers: {x-user: {regex: '@RE@'}}}]", "spec.http[0].match[0].headers.x-user.regex"),
    ("- match: [{withoutHeaders: {x-user: {regex: '@RE@'}}}]", "spec.http[0].match[0].withoutHeaders.x-user.regex"),
    ("- match: [{queryParams: {id: {regex: '@RE@'}}}]", "spec.http[0].match[0].queryParams.id.regex"),
    ("- match: [{authority: {regex: '@RE@'}}]", "spec.http[0].match[0].authority.regex"),
    ("- rewrite: {uriRegexRewrite: {match: '@RE@', rewrite: /x}}", "spec.http[0].rewrite.uriRegexRewrite.match"),
]


def route_with(http: str, regex: str) -> str:
    return "hosts: [reviews]\nhttp:\n" + http.replace("@RE@", regex) + "\n  route: [{destination: {host: reviews}}]"


@pytest.mark.parametrize("http, path", REGEX_FIELDS)
@pytest.mark.parametrize("regex, words", RE2_REFUSED)
def test_regexes_envoy_refuses_are_refused_naming_the_field(http, path, regex, words):
    message = only_error(doc("VirtualService", "r", route_with(http, regex)))
    assert f"(VirtualService shop/r) {path}: {regex!r} {words}" in message, message
    assert "the whole resource is refused" in message


@pytest.mark.parametrize("regex", [r"^/api/v[0-9]+/.*", r"(?i)^/admin", r"[[:alpha:]]+", r"\d{3}-\d{4}",
                                   r"(?P<id>[0-9]+)", r"(?<id>[0-9]+)", r"\pL+", r".{15}",
                                   "[a-z]{96}"])  # program size 100: Envoy's limit itself
def test_valid_re2_is_accepted_in_every_regex_field(regex):
    for http, _ in REGEX_FIELDS:
        valid(doc("VirtualService", "r", route_with(http, regex)))


def test_a_regex_envoy_refuses_keeps_the_previous_good_version():
    good = valid(doc("VirtualService", "r", route_with(REGEX_FIELDS[0][0], "/v[0-9]+")))
    edited = config(doc("VirtualService", "r", route_with(REGEX_FIELDS[0][0], "/v[0-9]++")), previous=good)
    assert edited.virtual_services[0].http[0].matches[0].uri.value == "/v[0-9]+"
    assert "bad repetition operator" in str(edited.errors[0])
    assert "the whole resource is refused; its last good version stays in force" in str(edited.errors[0])


def test_source_labels_too_many_for_one_envoy_matcher_are_refused():
    labels = ("{app.kubernetes.io/name: productpage, app.kubernetes.io/version: v1, "
              "app.kubernetes.io/part-of: bookinfo}")
    message = only_error(doc("VirtualService", "r", route_with(f"- match: [{{sourceLabels: {labels}}}]", "")))
    assert "(VirtualService shop/r) spec.http[0].match[0].sourceLabels: these 3 labels make a matcher too " \
           "large for Envoy: its RE2 program size is 118, over Envoy's limit of 100" in message
    valid(doc("VirtualService", "r", route_with("- match: [{sourceLabels: {app: productpage, version: v1}}]", "")))


def test_regexes_in_a_rate_limit_patch_are_compiled_as_envoy_does():
    action = ("          rate_limits: [{actions: [{header_value_match: {descriptor_value: x, headers: "
              "[{name: x-user, string_match: {safe_regex: {regex: '@RE@'}}}]}}]}]\n")
    spec = RATE_LIMIT.format(apply_to="HTTP_FILTER", context="SIDECAR_INBOUND", type_url=LRL, field="stat_prefix")
    spec = spec.replace("          token_bucket:", action + "          token_bucket:")
    valid(doc("EnvoyFilter", "rl", spec.replace("@RE@", "^alice$"), "networking.istio.io/v1alpha3"))
    message = only_error(doc("EnvoyFilter", "rl", spec.replace("@RE@", "a++"), "networking.istio.io/v1alpha3"))
    assert ("(EnvoyFilter shop/rl) spec.configPatches[0].patch.value.typed_config.value.rate_limits[0].actions[0]"
            ".header_value_match.headers[0].string_match.safe_regex.regex: 'a++' is not a valid regular "
            "expression for RE2") in message, message


def test_a_negative_duration_in_a_rate_limit_patch_is_refused():
    """protobuf's JSON parser takes "-1s" (the old one did not); Envoy wants a positive fill_interval."""
    spec = RATE_LIMIT.format(apply_to="HTTP_FILTER", context="SIDECAR_INBOUND", type_url=LRL, field="stat_prefix")
    message = only_error(doc("EnvoyFilter", "rl", spec.replace("fill_interval: 60s", "fill_interval: -1s"),
                             "networking.istio.io/v1alpha3"))
    assert ("(EnvoyFilter shop/rl) spec.configPatches[0].patch.value.typed_config.value.token_bucket.fill_interval: "
            "-1s is negative") in message, message


@pytest.mark.parametrize("field, value", [("weight", -5), ("weight", 2**31), ("retries", -1), ("retries", 2**31)])
def test_int32_fields_say_their_range_as_istio_has_it(field, value):
    """weight and retries.attempts are int32 in Istio's API: 0 to 2147483647 (issue 9.10:
    the message said 0-2147483648)."""
    route = (f"- route: [{{destination: {{host: reviews}}, weight: {value}}}]\n" if field == "weight" else
             f"- route: [{{destination: {{host: reviews}}}}]\n  retries: {{attempts: {value}}}\n")
    where = "spec.http[0].route[0].weight" if field == "weight" else "spec.http[0].retries.attempts"
    message = only_error(doc("VirtualService", "r", "hosts: [reviews]\nhttp:\n" + route))
    assert f"(VirtualService shop/r) {where}: {value} is out of range: it must be from 0 to 2147483647 (" \
        in message, message


def test_retry_on_takes_envoys_conditions_and_status_codes_and_refuses_others():
    from xds_world import config as built, doc as istio_doc

    def retry(on: str):
        return built(istio_doc("VirtualService", "reviews", "hosts: [reviews]\nhttp:\n- route: [{destination: "
                                                            f"{{host: reviews}}}}]\n  retries: {{attempts: 2, retryOn: '{on}'}}"))
    good = retry("5xx,retriable-4xx,503,reset-before-request,unavailable")
    assert good.errors == () and good.virtual_services[0].http[0].retries.retry_on.startswith("5xx,")
    (bad,) = retry("5xx,connect_failure").errors
    assert bad.where.endswith("(VirtualService shop/reviews) spec.http[0].retries.retryOn")
    assert bad.message.endswith("'connect_failure' is not a retryOn policy")
