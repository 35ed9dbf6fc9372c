"""One waypoint per request (translate/outbound.py `_enforce`, inbound.py ServerSide): a
client-side route whose endpoints all have the same server-side HTTP policy, one a
routing waypoint can enforce, enforces it (RBAC per route) and goes to its clusters'
enforced variants, whose connections carry the policy's digest (TLV 0xE4); the node of
the endpoints names the same digest for them (DataPlane.enforceable), so its agent
delivers there straight to the pod. Every other route is left as it was."""

from __future__ import annotations

from envoy.config.rbac.v3.rbac_pb2 import RBAC
from google.protobuf.json_format import MessageToDict

from nodeagent.xds import dataplane
from nodeagent.xds.resources import unpack
from xds_world import REVIEWS, clusters, doc, routes, translation

SECURITY = "security.istio.io/v1"
VS = doc("VirtualService", "reviews", "hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews}}]")
GET_ONLY = doc("AuthorizationPolicy", "get", "selector: {matchLabels: {app: reviews}}\n"
                                             "rules: [{to: [{operation: {methods: [GET]}}]}]", SECURITY)
NO_ADMIN = doc("AuthorizationPolicy", "no-admin", "selector: {matchLabels: {app: reviews}}\naction: DENY\n"
                                                  "rules: [{to: [{operation: {paths: [/admin*]}}]}]", SECURITY)
VIP = ("10.96.1.10", 9080)
NEVER = {"notRule": {"any": True}}
REVIEWS_PODS = {("10.244.1.6", 9080), ("10.244.2.6", 9080), ("10.244.2.7", 9080)}


def table(result, name: str = f"{REVIEWS}:9080"):
    return routes(result)[name]


def only_route(result):
    (route,) = [r for vh in table(result).virtual_hosts for r in vh.routes]
    return route


def rbac(route, name: str) -> RBAC | None:
    config = route.typed_per_filter_config.get(name)
    return unpack(config).rbac if config is not None else None


def test_a_route_to_pods_of_one_http_policy_enforces_it_and_says_so_on_its_connections():
    result = translation(VS + GET_ONLY + NO_ADMIN)
    route = only_route(result)
    digest = result.dataplane.enforced[VIP][("10.244.1.6", 9080)]
    assert result.dataplane.enforced == {VIP: dict.fromkeys(REVIEWS_PODS, digest)}
    assert route.route.cluster == f"outbound|9080||{REVIEWS}||enforced-{digest}" and digest.endswith("-9080")
    allow, deny = rbac(route, "nodeagent.rbac.allow"), rbac(route, "nodeagent.rbac.deny")
    assert (allow.rules.action, list(allow.rules.policies)) == (RBAC.ALLOW, ["ns[shop]-policy[get]-rule[0]"])
    assert (deny.rules.action, list(deny.rules.policies)) == (RBAC.DENY, ["ns[shop]-policy[no-admin]-rule[0]"])
    cluster = clusters(result)[route.route.cluster]
    proxy = unpack(cluster.transport_socket.typed_config).config
    assert [(t.type, t.value) for t in proxy.added_tlvs] == [(dataplane.TLV_ENFORCED, digest.encode())]
    # node1 serves reviews-v1, node2 v2 and v3: each names the same digest for its own
    assert result.dataplane.enforceable == {("10.244.1.6", 9080): digest}
    assert translation(VS + GET_ONLY + NO_ADMIN, node="node2").dataplane.enforceable == {
        ("10.244.2.6", 9080): digest, ("10.244.2.7", 9080): digest}


def test_the_digest_follows_the_policies():
    first = translation(VS + GET_ONLY).dataplane.enforced[VIP][("10.244.1.6", 9080)]
    again = translation(GET_ONLY + VS).dataplane.enforced[VIP][("10.244.1.6", 9080)]
    edited = translation(VS + GET_ONLY.replace("[GET]", "[GET, HEAD]")).dataplane.enforced[VIP][("10.244.1.6", 9080)]
    more = translation(VS + GET_ONLY + NO_ADMIN).dataplane.enforced[VIP][("10.244.1.6", 9080)]
    assert first == again and len({first, edited, more}) == 3


def unenforced(result) -> None:
    route = only_route(result)
    assert result.dataplane.enforced == {}
    assert "enforced" not in route.route.cluster and not route.route.weighted_clusters.clusters or all(
        "enforced" not in w.name for w in route.route.weighted_clusters.clusters)
    assert rbac(route, "nodeagent.rbac.allow") is None and rbac(route, "nodeagent.rbac.deny") is None


def test_a_route_that_changes_what_the_policy_reads_or_copies_the_request_is_left_to_the_destination():
    for http in ("- route: [{destination: {host: reviews}}]\n  rewrite: {uri: /v2}",
                 "- route: [{destination: {host: reviews}}]\n  rewrite: {authority: other}",
                 "- route: [{destination: {host: reviews}}]\n  headers: {request: {set: {x-user: admin}}}",
                 "- route: [{destination: {host: reviews}}]\n  headers: {request: {remove: [authorization]}}",
                 "- route: [{destination: {host: reviews}, headers: {request: {add: {x-a: b}}}}]",
                 "- route: [{destination: {host: reviews}}]\n  mirror: {host: ratings}"):
        unenforced(translation(doc("VirtualService", "reviews", f"hosts: [reviews]\nhttp:\n{http}") + GET_ONLY))


def test_endpoints_of_other_policies_or_policies_a_router_cannot_enforce_are_left_to_the_destination():
    v1_only = doc("AuthorizationPolicy", "v1", "selector: {matchLabels: {version: v1}}\n"
                                               "rules: [{to: [{operation: {methods: [GET]}}]}]", SECURITY)
    unenforced(translation(VS + v1_only))  # v2 and v3 have none: their waypoint is not on their path either
    when_ip = doc("AuthorizationPolicy", "ip", "selector: {matchLabels: {app: reviews}}\n"
                                               "rules: [{to: [{operation: {methods: [GET]}}],\n"
                                               "  when: [{key: destination.ip, values: [10.244.0.0/16]}]}]", SECURITY)
    unenforced(translation(VS + when_ip))
    jwt = doc("RequestAuthentication", "jwt", "selector: {matchLabels: {app: reviews}}\n"
                                              "jwtRules: [{issuer: https://issuer.example, jwks: '{\"keys\": []}'}]",
              SECURITY)
    unenforced(translation(VS + GET_ONLY + jwt))
    assert translation(VS).dataplane.enforced == {}  # no HTTP policy at all: nothing to enforce


def test_rules_on_the_pods_port_are_decided_for_the_endpoints_port():
    """The router sees the Service's port; the policy's ports are the pod's. Every endpoint
    of the route has the same one (9080): a rule on it matches any request, a rule on
    another none, in the RBAC the route enforces."""
    by_port = doc("AuthorizationPolicy", "port", "selector: {matchLabels: {app: reviews}}\nrules:\n"
                                                 "- to: [{operation: {methods: [GET], ports: ['9080']}}]\n"
                                                 "- to: [{operation: {ports: ['5201']}}]\n"
                                                 "- to: [{operation: {notPorts: ['9080']}}]\n"
                                                 "- when: [{key: destination.port, values: ['9080']}]", SECURITY)
    result = translation(VS + by_port)
    assert set(result.dataplane.enforced[VIP]) == REVIEWS_PODS
    rules = rbac(only_route(result), "nodeagent.rbac.allow").rules.policies
    assert [MessageToDict(rules[f"ns[shop]-policy[port]-rule[{i}]"].permissions[0]) for i in range(4)] == [
        {"andRules": {"rules": [{"header": {"name": ":method", "stringMatch": {"exact": "GET"}}}, {"any": True}]}},
        NEVER, NEVER, {"any": True}]  # ports 9080; ports 5201; notPorts 9080; when destination.port 9080


def test_a_subset_of_one_policy_is_enforced_while_a_split_over_two_is_not():
    rule = doc("DestinationRule", "reviews", "host: reviews\nsubsets:\n- {name: v1, labels: {version: v1}}\n"
                                             "- {name: v2, labels: {version: v2}}")
    v1_only = doc("AuthorizationPolicy", "v1", "selector: {matchLabels: {version: v1}}\n"
                                               "rules: [{to: [{operation: {methods: [GET]}}]}]", SECURITY)
    vs = doc("VirtualService", "reviews", "hosts: [reviews]\nhttp:\n"
                                          "- match: [{uri: {prefix: /one}}]\n"
                                          "  route: [{destination: {host: reviews, subset: v1}}]\n"
                                          "- route: [{destination: {host: reviews, subset: v1}, weight: 50},\n"
                                          "          {destination: {host: reviews, subset: v2}, weight: 50}]")
    result = translation(rule + v1_only + vs)
    one, split = [r for vh in table(result).virtual_hosts for r in vh.routes]
    digest = result.dataplane.enforced[VIP][("10.244.1.6", 9080)]
    assert result.dataplane.enforced == {VIP: {("10.244.1.6", 9080): digest}}
    assert one.route.cluster.endswith(f"|enforced-{digest}") and rbac(one, "nodeagent.rbac.allow") is not None
    assert [w.name for w in split.route.weighted_clusters.clusters] == [
        f"outbound|9080|v1|{REVIEWS}", f"outbound|9080|v2|{REVIEWS}"]
    assert rbac(split, "nodeagent.rbac.allow") is None
