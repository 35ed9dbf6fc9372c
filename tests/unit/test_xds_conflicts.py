"""Several VirtualServices or DestinationRules for one host, resolved as istiod resolves
them (issue 14): DestinationRules of a host merge (the oldest is the base, younger ones
add subsets of new names and a trafficPolicy only where none was); of two VirtualServices
the most specific host, then the oldest, wins. Checked through the translation: the
clusters and routes Envoy gets. And the files source gives an object without a
creationTimestamp the time it first read it (its order of first appearance)."""

from __future__ import annotations

import time

from nodeagent.sources.files import FilesSource
from xds_world import REVIEWS, clusters, routes, translation

SPLIT = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 50}
    - {destination: {host: reviews, subset: v2}, weight: 50}
---
"""
V1, V2 = f"outbound|9080|v1|{REVIEWS}", f"outbound|9080|v2|{REVIEWS}"


def rule(name: str, created: str, spec: str, kind: str = "DestinationRule") -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return (f"apiVersion: networking.istio.io/v1\nkind: {kind}\nmetadata: {{name: {name}, namespace: shop, "
            f"creationTimestamp: '{created}'}}\nspec:\n{body}\n---\n")


SUBSETS = rule("reviews", "2026-01-01T10:00:00Z", """
host: reviews
subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
""")
# The case: a second rule for the host, younger, named so that it sorts first,
# with a connection pool and no subsets. Picking one rule by name dropped v1 and v2, and
# every request went to BlackHoleCluster (300/300 503s).
POOL = rule("a-reviews-pool", "2026-01-02T10:00:00Z", """
host: reviews.shop.svc.cluster.local
trafficPolicy: {connectionPool: {tcp: {maxConnections: 7}}}
""")


def split_clusters(result) -> list[str]:
    (route,) = routes(result)[f"{REVIEWS}:9080"].virtual_hosts[0].routes
    return [c.name for c in route.route.weighted_clusters.clusters]


def max_connections(cluster) -> int:
    (threshold,) = cluster.circuit_breakers.thresholds
    return threshold.max_connections.value


def test_a_second_rule_without_subsets_merges_instead_of_dropping_the_first_ones():
    result = translation(SPLIT + SUBSETS + POOL)
    assert split_clusters(result) == [V1, V2]
    found = clusters(result)
    assert "BlackHoleCluster" not in found
    assert [max_connections(found[name]) for name in (V1, V2)] == [7, 7]  # the younger rule's policy: the first had none
    assert not any("is not defined by any DestinationRule" in str(w) for w in result.warnings)


def test_the_merge_is_the_same_whichever_rule_is_older():
    older_pool = POOL.replace("2026-01-02", "2025-12-31")
    result = translation(SPLIT + SUBSETS + older_pool)
    assert split_clusters(result) == [V1, V2]
    assert [max_connections(clusters(result)[name]) for name in (V1, V2)] == [7, 7]


def test_the_older_rule_keeps_its_subset_definitions_and_its_traffic_policy():
    younger = rule("reviews-canary", "2026-01-03T10:00:00Z", """
host: reviews
trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
subsets: [{name: v1, labels: {version: v3}}, {name: v3, labels: {version: v3}}]
""")
    older = SUBSETS.replace("subsets:", "trafficPolicy: {connectionPool: {tcp: {maxConnections: 9}}}\n  subsets:")
    result = translation(SPLIT + older + younger)
    found = clusters(result)
    assert max_connections(found[V1]) == 9
    messages = sorted(str(w) for w in result.warnings if "reviews-canary" in w.where)
    assert messages == [
        "test.yaml#14 (DestinationRule shop/reviews-canary) spec.subsets[0]: subset 'v1' of "
        f"{REVIEWS} is defined by the older test.yaml#13 (DestinationRule shop/reviews) too: this definition "
        "is ignored, as istiod does (give the subset another name, or remove it here)",
        "test.yaml#14 (DestinationRule shop/reviews-canary) spec.trafficPolicy: an older DestinationRule for "
        f"{REVIEWS} has a trafficPolicy, so this one is ignored, as istiod does (only subsets are merged) "
        "(move the trafficPolicy into the oldest rule, or remove it here)",
        "test.yaml#14 (DestinationRule shop/reviews-canary): merged into the older DestinationRule shop/reviews for "
        f"{REVIEWS}: istiod merges the rules of one host (subsets of new names are added)"]
    # v1 keeps the older rule's labels: its endpoints are reviews-v1's, not v3's
    v3_route = SPLIT.replace("subset: v2", "subset: v3")
    assert split_clusters(translation(v3_route + older + younger)) == [V1, f"outbound|9080|v3|{REVIEWS}"]


def test_a_rule_in_the_services_namespace_wins_over_one_elsewhere():
    elsewhere = rule("reviews", "2020-01-01T00:00:00Z", "host: reviews.shop.svc.cluster.local\nsubsets: "
                     "[{name: v9, labels: {version: v9}}]").replace("namespace: shop", "namespace: other")
    result = translation(SPLIT + SUBSETS + elsewhere)
    assert split_clusters(result) == [V1, V2]  # no pod of namespace other on the node: no routes of its own
    assert [str(w) for w in result.warnings if w.where.endswith("(DestinationRule other/reviews)")] == [
        f"test.yaml#14 (DestinationRule other/reviews): applies to {REVIEWS} for the clients in namespace other, "
        "whose own rules take precedence as istiod's do; other clients get DestinationRule shop/reviews"]


OTHER = """apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: other}
spec: {nodeName: node1}
status: {podIP: 10.244.1.99, phase: Running}
---
"""
OTHER_RULE = rule("reviews", "2026-01-03T00:00:00Z", """
host: reviews.shop.svc.cluster.local
trafficPolicy: {connectionPool: {tcp: {maxConnections: 3}}}
subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
""").replace("namespace: shop", "namespace: other")


def test_a_rule_in_the_clients_namespace_takes_precedence_for_its_clients():
    """istiod looks in the client's namespace first: a node's meshed clients of namespace
    other get routes of their own (matched by their principal's namespace) to clusters
    with other's rule; every other client keeps the service namespace's rule."""
    result = translation(OTHER + SPLIT + SUBSETS + OTHER_RULE)
    first, default = routes(result)[f"{REVIEWS}:9080"].virtual_hosts[0].routes
    (matcher,) = first.match.filter_state
    assert (matcher.key, matcher.string_match.safe_regex.regex) == (
        "nodeagent.source_principal", "spiffe://[^/]+/ns/other/.*")
    assert [c.name for c in first.route.weighted_clusters.clusters] == [f"{V1}|other", f"{V2}|other"]
    assert list(default.match.filter_state) == []
    assert [c.name for c in default.route.weighted_clusters.clusters] == [V1, V2]
    found = clusters(result)
    assert [max_connections(found[f"{V1}|other"]), max_connections(found[V1])] == [3, 2**32 - 1]
    # node2 runs no pod of namespace other: its waypoint has the routes of every client only.
    (only,) = routes(translation(OTHER + SPLIT + SUBSETS + OTHER_RULE, node="node2"))[f"{REVIEWS}:9080"] \
        .virtual_hosts[0].routes
    assert only.match.filter_state == [] and f"{V1}|other" not in clusters(translation(
        OTHER + SPLIT + SUBSETS + OTHER_RULE, node="node2"))


def test_envoy_accepts_the_routes_and_clusters_of_a_client_namespace(tmp_path):
    from envoy_validate import static_bootstrap, validate
    from xds_world import OPTIONS

    check = validate(static_bootstrap(translation(OTHER + SPLIT + SUBSETS + OTHER_RULE), "node1", OPTIONS.sockets),
                     tmp_path)
    assert (check.returncode, "OK" in check.output) == (0, True), check.output


def test_a_rule_in_a_third_namespace_is_only_its_own_clients_even_when_no_nearer_one_exists():
    """istiod looks in the client's namespace, the service's, the root's, and no further: a
    rule in namespace other never applies to shop's clients (it did when shop had none, so
    any namespace could rate-limit or re-balance every service of the mesh)."""
    result = translation(OTHER + SPLIT + OTHER_RULE)
    first, default = routes(result)[f"{REVIEWS}:9080"].virtual_hosts[0].routes
    assert [c.name for c in first.route.weighted_clusters.clusters] == [f"{V1}|other", f"{V2}|other"]
    assert max_connections(clusters(result)[f"{V1}|other"]) == 3
    # every other client: no rule defines the subsets the VirtualService names
    assert [c.name for c in default.route.weighted_clusters.clusters] == ["BlackHoleCluster", "BlackHoleCluster"]
    assert [str(w) for w in result.warnings if w.where.endswith("(DestinationRule other/reviews)")] == [
        f"test.yaml#15 (DestinationRule other/reviews): applies to {REVIEWS} for the clients in namespace other, "
        "whose own rules take precedence as istiod's do; other clients get none (a rule in a namespace other than "
        "the service's or the root's applies to its own clients only, as istiod's)"]
    pool_only = OTHER_RULE.replace(
        "\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]", "")
    assert pool_only != OTHER_RULE
    node2 = clusters(translation(OTHER + pool_only, node="node2"))  # no client of namespace other there
    assert max_connections(node2[f"outbound|9080||{REVIEWS}"]) == 2**32 - 1  # not other's 3


def route_to(name: str, created: str, host: str, target: str) -> str:
    return rule(name, created, f"hosts: ['{host}']\nhttp:\n- route: [{{destination: {target}}}]",
                kind="VirtualService")


def only_cluster(result) -> str:
    (route,) = routes(result)[f"{REVIEWS}:9080"].virtual_hosts[0].routes
    return route.route.cluster


def test_of_two_virtual_services_for_a_host_the_oldest_wins_not_the_first_by_name():
    older = route_to("zz-old", "2026-01-01T00:00:00Z", "reviews", "{host: ratings, port: {number: 8080}}")
    younger = route_to("aa-new", "2026-02-01T00:00:00Z", "reviews", "{host: reviews}")
    result = translation(older + younger)
    assert only_cluster(result) == "outbound|8080||ratings.shop.svc.cluster.local"
    (conflict,) = [w for w in result.warnings if "also routes" in str(w)]
    assert str(conflict) == (
        f"test.yaml#13 (VirtualService shop/aa-new): VirtualService shop/zz-old also routes {REVIEWS} and wins (a "
        "more specific host, or older): this one is ignored for it, as istiod does (merge them into one "
        "VirtualService)")
    same_age = older.replace("2026-01-01", "2026-02-01")  # a tie: by name, as istiod
    assert only_cluster(translation(same_age + younger)) == f"outbound|9080||{REVIEWS}"


def test_an_exact_host_wins_over_an_older_wildcard():
    wildcard = route_to("all", "2020-01-01T00:00:00Z", "*.shop.svc.cluster.local", "{host: ratings, port: {number: 8080}}")
    exact = route_to("reviews", "2026-01-01T00:00:00Z", "reviews", "{host: reviews}")
    assert only_cluster(translation(wildcard + exact)) == f"outbound|9080||{REVIEWS}"


def test_the_files_source_dates_an_object_by_its_first_appearance(tmp_path):
    (tmp_path / "a.yaml").write_text(POOL.replace("creationTimestamp: '2026-01-02T10:00:00Z'", "labels: {}"))
    source = FilesSource(tmp_path)
    first = source.poll().resources["DestinationRule"][0]
    stamp = first.body["metadata"]["creationTimestamp"]
    time.sleep(0.01)
    (tmp_path / "b.yaml").write_text(SUBSETS.replace("creationTimestamp: '2026-01-01T10:00:00Z'", "labels: {}"))
    model = source.poll()
    dated = {o.name: o.body["metadata"]["creationTimestamp"] for o in model.resources["DestinationRule"]}
    assert dated["a-reviews-pool"] == stamp and dated["reviews"] > stamp  # kept, and later
    (tmp_path / "c.yaml").write_text(SPLIT.replace("namespace: shop}", "namespace: shop, "
                                                   "creationTimestamp: '2020-01-01T00:00:00Z'}"))
    model = source.poll()
    assert model.resources["VirtualService"][0].body["metadata"]["creationTimestamp"] == "2020-01-01T00:00:00Z"
    (tmp_path / "a.yaml").unlink()
    source.poll()
    (tmp_path / "a.yaml").write_text(POOL.replace("creationTimestamp: '2026-01-02T10:00:00Z'", "labels: {}"))
    again = {o.name: o for o in source.poll().resources["DestinationRule"]}["a-reviews-pool"]
    assert again.body["metadata"]["creationTimestamp"] > dated["reviews"]  # deleted and created again: young
