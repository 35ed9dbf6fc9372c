"""VirtualService HTTPMatchRequest → Envoy RouteMatch, as istiod translates it: uri
exact/prefix/regex as the path specifier, headers (sorted) and withoutHeaders
(inverted), method/authority/scheme as `:method`/`:authority`/`:scheme` headers, query
parameters, and `regex: "*"` or `{}` as "present".

Per-source conditions are where the per-node waypoint differs from a sidecar, which
simply leaves out routes whose sourceLabels do not match its own pod: here one route
table serves every pod of the node, so `sourceLabels` and `sourceNamespace` become
filter-state matches on what the agent sent for the connection (PROXY TLVs
SOURCE_LABELS and PRINCIPAL, copied to filter state by the listener).
"""

from __future__ import annotations

from envoy.config.route.v3.route_components_pb2 import HeaderMatcher, QueryParameterMatcher, RouteMatch
from envoy.type.matcher.v3.filter_state_pb2 import FilterStateMatcher
from envoy.type.matcher.v3.regex_pb2 import RegexMatcher

from nodeagent.xds import dataplane
from nodeagent.xds.istio.fields import StringMatch
from nodeagent.xds.istio.virtualservice import HttpMatch
from nodeagent.xds.translate.primitives import boolean, regex_matcher, string_matcher

SPIFFE_ANY_TRUST_DOMAIN = "spiffe://[^/]+"


def route_match(match: HttpMatch | None) -> RouteMatch:
    if match is None:
        return RouteMatch(prefix="/")
    headers = [header(n, m) for n, m in match.headers]
    headers += [header(n, m, invert=True) for n, m in match.without_headers]
    headers.sort(key=lambda h: h.name)
    for name, value in ((":method", match.method), (":authority", match.authority), (":scheme", match.scheme)):
        if value is not None:
            headers.append(header(name, value))
    return RouteMatch(**_path(match.uri), case_sensitive=boolean(not match.ignore_uri_case), headers=headers,
                      query_parameters=[_query(n, m) for n, m in match.query_params],
                      filter_state=source_matchers(match))


def _path(uri: StringMatch | None) -> dict:
    """The path specifier (a oneof) as RouteMatch's keyword: every path without a uri."""
    if uri is None or uri.kind == "present":
        return {"prefix": "/"}
    if uri.kind == "exact":
        return {"path": uri.value}
    if uri.kind == "prefix":
        return {"prefix": uri.value}
    return {"safe_regex": RegexMatcher(regex=uri.value)}


def header(name: str, match: StringMatch, invert: bool = False) -> HeaderMatcher:
    if match.kind == "present":
        return HeaderMatcher(name=name, present_match=True, invert_match=invert)
    return HeaderMatcher(name=name, string_match=string_matcher(match), invert_match=invert,
                         treat_missing_header_as_empty=invert)


def _query(name: str, match: StringMatch) -> QueryParameterMatcher:
    if match.kind == "present":
        return QueryParameterMatcher(name=name, present_match=True)
    return QueryParameterMatcher(name=name, string_match=string_matcher(match))


def source_matchers(match: HttpMatch) -> list[FilterStateMatcher]:
    out = []
    if match.source_labels:
        out.append(FilterStateMatcher(key=dataplane.FILTER_STATE[dataplane.TLV_SOURCE_LABELS],
                                      string_match=regex_matcher(dataplane.labels_regex(match.source_labels))))
    if match.source_namespace:
        out.append(FilterStateMatcher(key=dataplane.FILTER_STATE[dataplane.TLV_PRINCIPAL],
                                      string_match=regex_matcher(namespace_regex(match.source_namespace))))
    return out


def client_namespace_matcher(namespace: str) -> FilterStateMatcher:
    """Only the clients of `namespace` (their SPIFFE principal, as the agent sent it)."""
    return FilterStateMatcher(key=dataplane.FILTER_STATE[dataplane.TLV_PRINCIPAL],
                              string_match=regex_matcher(namespace_regex(namespace)))


def namespace_regex(namespace: str, pattern: str = "exact") -> str:
    """RE2 fully matching a SPIFFE principal of `namespace` (exact, prefix, suffix or any)."""
    escaped = dataplane.re2_escape(namespace)
    ns = {"exact": escaped, "prefix": escaped + "[^/]*", "suffix": "[^/]*" + escaped, "any": "[^/]+"}[pattern]
    return f"{SPIFFE_ANY_TRUST_DOMAIN}/ns/{ns}/.*"


def is_catch_all(match: RouteMatch) -> bool:
    """A route nothing after it can be reached past (istiod's IsCatchAllRoute, plus
    the per-source conditions only this waypoint has)."""
    return (match.prefix == "/" and not match.headers and not match.query_parameters
            and not match.filter_state and not match.dynamic_metadata)
