"""Client-side route tables: each VirtualService HTTP field → the exact Envoy route
field, as istiod's route.go translates it, plus the per-source matches only the
per-node waypoint needs (sourceLabels, sourceNamespace as filter-state matches)."""

from __future__ import annotations

import re
from datetime import timedelta

from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.config.route.v3.route_components_pb2 import RedirectAction
from envoy.type.v3.percent_pb2 import FractionalPercent

from nodeagent.xds import dataplane
from nodeagent.xds.resources import unpack
from xds_world import RATINGS, REVIEWS, clusters, doc, routes, translation

Append = HeaderValueOption.HeaderAppendAction
Denominator = FractionalPercent.DenominatorType
SUBSETS = doc("DestinationRule", "reviews", "host: reviews\nsubsets:\n- {name: v1, labels: {version: v1}}\n"
                                            "- {name: v2, labels: {version: v2}}\n")


def table(http: str, extra: str = "", host: str = "reviews", port: int = 9080):
    result = translation(doc("VirtualService", "r", f"hosts: [{host}]\nhttp:\n{http}") + extra)
    return routes(result)[f"{host}.shop.svc.cluster.local:{port}"], result


def first(http: str, extra: str = ""):
    found, _ = table(http, extra)
    return found.virtual_hosts[0].routes[0]


def duration(message, field: str) -> timedelta | None:
    """A Duration field as a timedelta, None when unset (Envoy tells 0 from unset)."""
    return getattr(message, field).ToTimedelta() if message.HasField(field) else None


def test_one_virtual_host_for_every_authority_named_after_the_service_port():
    found, _ = table("- route: [{destination: {host: reviews}}]")
    (vhost,) = found.virtual_hosts
    assert (vhost.name, vhost.domains) == (f"{REVIEWS}:9080", ["*"])


def test_uri_exact_prefix_and_regex():
    found, _ = table("""
- match: [{uri: {exact: /a}}, {uri: {prefix: /b}}, {uri: {regex: '/c/[0-9]+'}}]
  route: [{destination: {host: reviews}}]
""")
    a, b, c = found.virtual_hosts[0].routes[:3]
    assert (a.match.WhichOneof("path_specifier"), a.match.path) == ("path", "/a")
    assert (b.match.WhichOneof("path_specifier"), b.match.prefix) == ("prefix", "/b")
    assert (c.match.WhichOneof("path_specifier"), c.match.safe_regex.regex) == ("safe_regex", "/c/[0-9]+")
    assert a.name == "shop/r spec.http[0].match[0]" and c.name == "shop/r spec.http[0].match[2]"


def test_headers_method_authority_query_and_case():
    route = first("""
- match:
  - headers: {x-user: {exact: jason}, x-b: {prefix: beta}, x-c: {regex: 'v[12]'}, x-any: {}}
    withoutHeaders: {x-skip: {exact: "1"}}
    method: {exact: POST}
    authority: {prefix: reviews}
    queryParams: {debug: {exact: "true"}, trace: {regex: "*"}}
    ignoreUriCase: true
  route: [{destination: {host: reviews}}]
""")
    match = route.match
    by_name = {h.name: h for h in match.headers}
    assert [h.name for h in match.headers] == ["x-any", "x-b", "x-c", "x-skip", "x-user", ":method", ":authority"]
    assert by_name["x-user"].string_match.exact == "jason"
    assert by_name["x-b"].string_match.prefix == "beta"
    assert by_name["x-c"].string_match.safe_regex.regex == "v[12]"
    assert by_name["x-any"].present_match is True
    assert (by_name["x-skip"].invert_match, by_name["x-skip"].treat_missing_header_as_empty) == (True, True)
    assert by_name[":method"].string_match.exact == "POST"
    assert by_name[":authority"].string_match.prefix == "reviews"
    query = {q.name: q for q in match.query_parameters}
    assert query["debug"].string_match.exact == "true" and query["trace"].present_match is True
    assert match.HasField("case_sensitive") and match.case_sensitive.value is False


def test_source_labels_and_namespace_become_filter_state_matches():
    route = first("""
- match: [{sourceLabels: {app: productpage, version: v1}, sourceNamespace: shop}]
  route: [{destination: {host: reviews}}]
""")
    labels, namespace = route.match.filter_state
    assert labels.key == dataplane.FILTER_STATE[dataplane.TLV_SOURCE_LABELS] == "nodeagent.source_labels"
    pattern = labels.string_match.safe_regex.regex
    assert re.fullmatch(pattern, dataplane.encode_labels({"app": "productpage", "version": "v1", "zone": "a"}).decode())
    assert not re.fullmatch(pattern, dataplane.encode_labels({"app": "productpage", "version": "v10"}).decode())
    assert namespace.key == "nodeagent.source_principal"
    assert re.fullmatch(namespace.string_match.safe_regex.regex, "spiffe://cluster.local/ns/shop/sa/productpage")
    assert not re.fullmatch(namespace.string_match.safe_regex.regex, "spiffe://cluster.local/ns/shopx/sa/a")


def test_a_table_with_source_restricted_routes_only_ends_with_a_404_per_condition_then_the_default_route():
    """As a sidecar sees the table: one whose labels match a route sees only those (a 404
    past them), any other falls back to the service."""
    found, _ = table("""
- match: [{sourceLabels: {app: productpage}, uri: {prefix: /canary}}]
  route: [{destination: {host: reviews, subset: v2}}]
- match: [{sourceLabels: {app: productpage}, uri: {prefix: /beta}}, {sourceNamespace: other}]
  route: [{destination: {host: reviews, subset: v2}}]
""", SUBSETS)
    canary, beta, other, past_labels, past_namespace, default = found.virtual_hosts[0].routes
    assert [r.name for r in (past_labels, past_namespace, default)] == [
        "shop/r sources[0] no route", "shop/r sources[1] no route", "default"]
    for past, restricted in ((past_labels, canary), (past_namespace, other)):
        assert (past.match.prefix, list(past.match.filter_state), past.direct_response.status) == (
            "/", list(restricted.match.filter_state), 404)
    assert list(beta.match.filter_state) == list(canary.match.filter_state)  # one condition, one 404
    assert default.route.cluster == f"outbound|9080||{REVIEWS}" and not default.match.filter_state


def test_envoy_accepts_the_404_past_source_restricted_routes(tmp_path):
    from envoy_validate import static_bootstrap, validate
    from xds_world import OPTIONS
    result = translation(doc("VirtualService", "r", """
hosts: [reviews]
http:
- match: [{sourceLabels: {app: productpage}, uri: {prefix: /canary}}, {sourceNamespace: other}]
  route: [{destination: {host: reviews, subset: v2}}]
""") + SUBSETS)
    check = validate(static_bootstrap(result, "node1", OPTIONS.sockets), tmp_path)
    assert (check.returncode, "OK" in check.output) == (0, True), check.output


def test_a_route_for_every_source_leaves_no_default_route_past_the_restricted_ones():
    """A sidecar whose labels match nothing still sees /public: anything else is a 404,
    never the service (the default route let /admin through to any version, review)."""
    found, _ = table("""
- match: [{sourceLabels: {app: productpage}, uri: {prefix: /canary}}]
  route: [{destination: {host: reviews, subset: v2}}]
- match: [{uri: {prefix: /public}}]
  route: [{destination: {host: reviews, subset: v1}}]
""", SUBSETS)
    assert [r.name for r in found.virtual_hosts[0].routes] == ["shop/r spec.http[0].match[0]",
                                                               "shop/r spec.http[1].match[0]"]


def test_weighted_destinations_with_subsets_and_ports_skip_zero_weights():
    route = first("""
- route:
  - {destination: {host: reviews, subset: v1}, weight: 75}
  - {destination: {host: reviews, subset: v2}, weight: 25}
  - {destination: {host: ratings, port: {number: 9090}}, weight: 0}
""", SUBSETS)
    weighted = route.route.weighted_clusters.clusters
    assert [(c.name, c.weight.value) for c in weighted] == [(f"outbound|9080|v1|{REVIEWS}", 75),
                                                      (f"outbound|9080|v2|{REVIEWS}", 25)]


def test_a_destination_port_picks_the_cluster_port():
    route = first("- route: [{destination: {host: ratings, port: {number: 9090}}}]")
    assert route.route.cluster == f"outbound|9090||{RATINGS}"


def test_timeout_and_default_no_timeout():
    assert duration(first("- route: [{destination: {host: reviews}}]\n  timeout: 2.5s").route, "timeout") == timedelta(
        seconds=2.5)
    assert duration(first("- route: [{destination: {host: reviews}}]").route, "timeout") == timedelta(0)


def test_retries_as_istio_converts_them():
    policy = first("- route: [{destination: {host: reviews}}]\n  retries: {attempts: 4, perTryTimeout: 2s, "
                   "retryOn: 'gateway-error,connect-failure,503'}").route.retry_policy
    assert (policy.num_retries.value, duration(policy, "per_try_timeout"), policy.retry_on,
            policy.retriable_status_codes) == (
        4, timedelta(seconds=2), "gateway-error,connect-failure,retriable-status-codes", [503])
    assert [p.name for p in policy.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]
    assert policy.host_selection_retry_max_attempts == 5


def test_default_retries_and_none_when_attempts_is_zero():
    default = first("- route: [{destination: {host: reviews}}]").route.retry_policy
    assert (default.num_retries.value, default.retry_on, default.retriable_status_codes) == (
        2, "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes", [503])
    assert not first("- route: [{destination: {host: reviews}}]\n  retries: {attempts: 0}").route.HasField(
        "retry_policy")


def fault(route):
    return unpack(route.typed_per_filter_config["envoy.filters.http.fault"])


def test_fault_percentage_in_millionths_and_deprecated_percent_in_hundredths():
    new = fault(first("- route: [{destination: {host: reviews}}]\n  fault: {delay: {fixedDelay: 5s, "
                      "percentage: {value: 12.5}}, abort: {httpStatus: 503, percentage: {value: 5}}}"))
    assert duration(new.delay, "fixed_delay") == timedelta(seconds=5)
    assert (new.delay.percentage.numerator, new.delay.percentage.denominator) == (125000, Denominator.MILLION)
    assert (new.abort.http_status, new.abort.percentage.numerator, new.abort.percentage.denominator) == (
        503, 50000, Denominator.MILLION)
    old = fault(first("- route: [{destination: {host: reviews}}]\n  fault: {delay: {fixedDelay: 1s, percent: 10}, "
                      "abort: {grpcStatus: UNAVAILABLE, percent: 3}}"))
    assert (old.delay.percentage.numerator, old.delay.percentage.denominator) == (10, Denominator.HUNDRED)
    assert (old.abort.grpc_status, old.abort.percentage.numerator, old.abort.percentage.denominator) == (
        14, 3, Denominator.HUNDRED)


def test_mirror_with_percentage_and_default_hundred_percent():
    route = first("- route: [{destination: {host: reviews}}]\n  mirror: {host: ratings, port: {number: 8080}}\n"
                  "  mirrorPercentage: {value: 25}")
    (mirror,) = route.route.request_mirror_policies
    assert mirror.cluster == f"outbound|8080||{RATINGS}"
    assert (mirror.runtime_fraction.default_value.numerator, mirror.runtime_fraction.default_value.denominator) == (
        250000, Denominator.MILLION)
    assert mirror.HasField("trace_sampled") and mirror.trace_sampled.value is False
    mirror_ratings = "- route: [{destination: {host: reviews}}]\n  mirror: {host: ratings, port: {number: 8080}}"
    (whole,) = first(mirror_ratings).route.request_mirror_policies
    assert whole.runtime_fraction.default_value.numerator == 100
    none = first(mirror_ratings + "\n  mirrorPercentage: {value: 0}")
    assert list(none.route.request_mirror_policies) == []


def test_rewrite_uri_authority_and_regex():
    action = first("- route: [{destination: {host: reviews}}]\n  rewrite: {uri: /v2, authority: new.host}").route
    assert (action.prefix_rewrite, action.host_rewrite_literal) == ("/v2", "new.host")
    regex = first("- route: [{destination: {host: reviews}}]\n  rewrite: {uriRegexRewrite: {match: '^/a/(.*)', "
                  "rewrite: '/b/\\1'}}").route.regex_rewrite
    assert (regex.pattern.regex, regex.substitution) == ("^/a/(.*)", "/b/\\1")


def test_redirect_and_direct_response():
    redirect = first("- redirect: {uri: /new, authority: other, redirectCode: 302, port: 8443, "
                     "scheme: https}").redirect
    assert (redirect.path_redirect, redirect.host_redirect, redirect.response_code, redirect.port_redirect,
            redirect.scheme_redirect) == ("/new", "other", RedirectAction.FOUND, 8443, "https")
    direct = first("- directResponse: {status: 418, body: {string: teapot}}").direct_response
    assert (direct.status, direct.body.inline_string) == (418, "teapot")


def test_header_operations_on_route_and_weighted_destination():
    route = first("""
- headers:
    request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
    response: {set: {x-d: "3"}, remove: [x-e]}
  route:
  - {destination: {host: reviews, subset: v1}, weight: 50, headers: {request: {set: {x-f: "4", host: h1}}}}
  - {destination: {host: reviews, subset: v2}, weight: 50}
""", SUBSETS)
    assert [(h.header.key, h.header.value, h.append_action) for h in route.request_headers_to_add] == [
        ("x-a", "1", Append.OVERWRITE_IF_EXISTS_OR_ADD), ("x-b", "2", Append.APPEND_IF_EXISTS_OR_ADD)]
    assert route.request_headers_to_remove == ["x-c"]
    assert [(h.header.key, h.header.value) for h in route.response_headers_to_add] == [("x-d", "3")]
    assert route.response_headers_to_remove == ["x-e"]
    weighted = route.route.weighted_clusters.clusters[0]
    assert [h.header.key for h in weighted.request_headers_to_add] == ["x-f"]
    assert weighted.host_rewrite_literal == "h1"


def test_routes_for_other_ports_and_gateways_only_are_left_out_and_a_catch_all_ends_the_table():
    found, _ = table("""
- match: [{port: 9999, uri: {prefix: /a}}, {gateways: [edge], uri: {prefix: /b}}, {uri: {prefix: /c}}]
  route: [{destination: {host: reviews}}]
- route: [{destination: {host: reviews}}]
- route: [{destination: {host: ratings}}]
""")
    assert [r.name for r in found.virtual_hosts[0].routes] == ["shop/r spec.http[0].match[2]", "shop/r spec.http[1]"]


def test_a_missing_subset_or_host_goes_to_the_blackhole_with_a_warning():
    found, result = table("- route:\n  - {destination: {host: reviews, subset: v9}, weight: 50}\n"
                          "  - {destination: {host: nowhere}, weight: 50}")
    weighted = found.virtual_hosts[0].routes[0].route.weighted_clusters.clusters
    assert [c.name for c in weighted] == ["BlackHoleCluster", "BlackHoleCluster"]
    assert "BlackHoleCluster" in clusters(result)
    warnings = [str(w) for w in result.warnings]
    assert any("spec.http[0].route[0].destination: subset 'v9'" in w for w in warnings)
    assert any("spec.http[0].route[1].destination: host 'nowhere' is not a known service" in w for w in warnings)


def test_a_destination_rule_with_a_policy_alone_gets_the_default_route():
    result = translation(doc("DestinationRule", "d", "host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}"))
    (route,) = routes(result)[f"{REVIEWS}:9080"].virtual_hosts[0].routes
    assert (route.name, route.match.prefix, route.route.cluster, duration(route.route, "timeout")) == (
        "default", "/", f"outbound|9080||{REVIEWS}", timedelta(0))
    assert route.route.retry_policy.num_retries.value == 2


def test_app_protocol_chooses_the_protocol_before_the_port_name():
    """As istiod: a port named http but appProtocol tcp (a database) gets a tcp_proxy, one
    named tcp-web but appProtocol http an HTTP connection manager."""
    from xds_world import listeners
    services = """apiVersion: v1
kind: Service
metadata: {name: pg, namespace: shop}
spec: {clusterIP: 10.96.1.30, selector: {app: db}, ports: [{name: http-main, port: 5432, appProtocol: tcp}]}
---
apiVersion: v1
kind: Service
metadata: {name: web2, namespace: shop}
spec: {clusterIP: 10.96.1.31, selector: {app: ratings}, ports: [{name: tcp-web, port: 80, targetPort: 9000,
  appProtocol: kubernetes.io/h2c}]}
---
"""
    result = translation(services + doc("DestinationRule", "pg", "host: pg\ntrafficPolicy: {loadBalancer: {simple: "
                                                                  "RANDOM}}")
                         + doc("DestinationRule", "web2", "host: web2\ntrafficPolicy: {loadBalancer: {simple: "
                                                              "RANDOM}}"))
    chains = {c.name: c.filters[-1].name for c in listeners(result)["outbound"].filter_chains}
    assert chains["outbound|5432||pg.shop.svc.cluster.local"] == "envoy.filters.network.tcp_proxy"
    assert chains["outbound|80||web2.shop.svc.cluster.local"] == "envoy.filters.network.http_connection_manager"
    assert clusters(result)["outbound|80||web2.shop.svc.cluster.local"].typed_extension_protocol_options


def test_a_virtual_service_for_a_headless_service_is_said_to_apply_to_nothing():
    headless = """apiVersion: v1
kind: Service
metadata: {name: stateful, namespace: shop}
spec: {clusterIP: None, selector: {app: db}, ports: [{name: http, port: 80}]}
---
"""
    result = translation(headless + doc("VirtualService", "s", "hosts: [stateful]\nhttp:\n"
                                                               "- fault: {abort: {httpStatus: 503, percentage: "
                                                               "{value: 100}}}\n  route: [{destination: {host: "
                                                               "stateful}}]"))
    assert routes(result) == {}
    assert [str(w) for w in result.warnings] == [
        "test.yaml#13 (VirtualService shop/s) spec.hosts[0]: Service shop/stateful is headless (clusterIP None): "
        "nodeagent applies a VirtualService to traffic sent to a Service's cluster IP, so this one applies to no "
        "traffic for it (give the Service a cluster IP)"]


def test_a_virtual_service_for_gateways_only_changes_nothing():
    result = translation(doc("VirtualService", "edge", "hosts: [reviews]\ngateways: [edge]\nhttp:\n"
                                                       "- route: [{destination: {host: ratings}}]"))
    assert routes(result) == {} and clusters(result) == {}


def test_an_exact_host_wins_over_a_wildcard_and_the_other_is_warned_about():
    to_ratings = "- route: [{destination: {host: ratings, port: {number: 8080}}}]"
    result = translation(doc("VirtualService", "all", f"hosts: ['*.shop.svc.cluster.local']\nhttp:\n{to_ratings}") +
                         doc("VirtualService", "zz-reviews", "hosts: [reviews]\nhttp:\n"
                                                             "- route: [{destination: {host: reviews}}]"))
    (route,) = routes(result)[f"{REVIEWS}:9080"].virtual_hosts[0].routes
    assert route.route.cluster == f"outbound|9080||{REVIEWS}"
    assert any(f"VirtualService shop/zz-reviews also routes {REVIEWS} and wins" in str(w) for w in result.warnings)
    (wildcard,) = routes(result)[f"{RATINGS}:8080"].virtual_hosts[0].routes
    assert wildcard.route.cluster == f"outbound|8080||{RATINGS}"
