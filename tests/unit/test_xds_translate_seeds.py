"""The Istio YAML users bring (tests/unit/xds_seeds, from /work/shared/seeds) validates
without an error and translates, for every node, into a consistent snapshot of exactly
the listeners, clusters, endpoints and route tables the seed calls for, which the real
Envoy accepts (`envoy --mode validate` on them as static resources, envoy_validate.py);
a few resources are checked for what the seed meant."""

from __future__ import annotations

import pathlib

import pytest

from nodeagent.kube.objects import parse_documents
from nodeagent.model import Model
from nodeagent.xds import resources as rt
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.snapshot import Snapshot
from nodeagent.xds.translate.build import translate
from envoy_validate import static_bootstrap, validate
from xds_world import OPTIONS

SEEDS = pathlib.Path(__file__).parent / "xds_seeds"
FILES = sorted(p.name for p in SEEDS.glob("[0-9]*.yaml"))


def load(name: str) -> Model:
    text = (SEEDS / name).read_text()
    if name.startswith("002_"):  # the scenarios of seeds/002 share one world
        text = (SEEDS / "_api_world.yaml").read_text() + "\n---\n" + text
    return Model.build(parse_documents(text, name))


def translated(name: str, node: str = "node1"):
    model = load(name)
    config = IstioConfig.build(model)
    assert [e.where for e in config.errors] == ERRORS.get(name, []), [str(e) for e in config.errors]
    result = translate(model, node, config, OPTIONS)
    Snapshot.build("1", result.messages(), result.dataplane)  # consistent, or raises
    return config, result


# The one error of the seeds: nodeagent runs no gateway (xds/istio/kinds.py).
ERRORS = {"002_gateway_and_rate_limit.yaml": ["002_gateway_and_rate_limit.yaml#7 (Gateway default/api-gateway) kind"]}


def test_every_seed_scenario_is_here():
    assert len(FILES) == 10


UPSTREAM = "nodeagent|upstream"  # the agent's upstream socket, behind every outbound endpoint
CLIENT_SIDE = ["nodeagent_upstream", "outbound"]


def outbound(*clusters: str, static: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """cds/eds/lds of a seed that only routes: its EDS clusters (and `static` ones without
    endpoints), the agent's upstream cluster, the client-side listeners."""
    return {"cds": sorted([UPSTREAM, *clusters, *static]), "eds": sorted(clusters), "lds": CLIENT_SIDE}


API = "api-service.default.svc.cluster.local"
# Each seed translates to the same names on node1 and node2.
EXPECTED = {
    "000_backend.yaml": {
        "istio": [("DestinationRule", "default", "backend"), ("VirtualService", "default", "backend")],
        **outbound("outbound|5000||backend.default.svc.cluster.local"),
        "rds": ["backend.default.svc.cluster.local:5000"]},
    "001_reviews_and_payments.yaml": {
        "istio": [("AuthorizationPolicy", "default", "payment-protection"), ("DestinationRule", "default", "myservice"),
                  ("VirtualService", "default", "myservice"), ("VirtualService", "default", "payments-delay"),
                  ("VirtualService", "default", "reviews-route")],
        **outbound("outbound|8080||payments.default.svc.cluster.local",
                   "outbound|80|v1|myservice.default.svc.cluster.local",
                   "outbound|80|v2|myservice.default.svc.cluster.local",
                   static=("BlackHoleCluster",)),  # where reviews' dangling subsets go
        "rds": ["myservice.default.svc.cluster.local:80", "payments.default.svc.cluster.local:8080",
                "reviews.default.svc.cluster.local:9080"]},
    "002_canary.yaml": {
        "istio": [("DestinationRule", "default", "api-service"), ("VirtualService", "default", "api-service")],
        **outbound(f"outbound|8080|v1|{API}", f"outbound|8080|v2|{API}"), "rds": [f"{API}:8080"]},
    "002_circuit_breaking.yaml": {
        "istio": [("DestinationRule", "default", "api-service")],
        **outbound(f"outbound|8080||{API}"), "rds": [f"{API}:8080"]},
    "002_fault_injection.yaml": {
        "istio": [("VirtualService", "default", "api-service")],
        **outbound(f"outbound|8080||{API}"), "rds": [f"{API}:8080"]},
    "002_gateway_and_rate_limit.yaml": {  # gateway-only: nothing in the mesh, the VirtualService not in force
        "istio": [("EnvoyFilter", "istio-system", "rate-limit")],
        "cds": [], "eds": [], "lds": [], "rds": []},
    "002_security.yaml": {  # server side only: the api pod behind JWT and RBAC
        "istio": [("AuthorizationPolicy", "default", "api-access"), ("AuthorizationPolicy", "default", "deny-all"),
                  ("AuthorizationPolicy", "default", "require-jwt"), ("RequestAuthentication", "default", "jwt-auth")],
        "cds": ["inbound|8080||"], "eds": [], "lds": ["inbound"], "rds": ["inbound|8080"]},
    "002_timeouts_retries.yaml": {
        "istio": [("VirtualService", "default", "api-service")],
        **outbound(f"outbound|8080||{API}"), "rds": [f"{API}:8080"]},
    "003_backend_split.yaml": {
        "istio": [("DestinationRule", "default", "backend"), ("VirtualService", "default", "backend")],
        **outbound("outbound|8080|v1|backend.default.svc.cluster.local",
                   "outbound|8080|v2|backend.default.svc.cluster.local"),
        "rds": ["backend.default.svc.cluster.local:8080"]},
    "004_orders_route.yaml": {
        "istio": [("DestinationRule", "default", "payments"), ("VirtualService", "default", "orders-route")],
        **outbound("outbound|8080|v1|payments.default.svc.cluster.local"),
        "rds": ["orders.default.svc.cluster.local:8080"]},
}


def produced(config, result) -> dict[str, list]:
    names = {rt.SHORT[t]: [rt.name_of(m) for m in result.resources.get(t, ())] for t in rt.PUSH_ORDER}
    return {"istio": sorted(config.entries), **names}


def test_every_seed_has_its_expectation():
    assert sorted(EXPECTED) == FILES


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("node", ["node1", "node2"])
def test_seed_translates_without_error_into_exactly_the_expected_resources(name, node):
    config, result = translated(name, node)
    assert produced(config, result) == EXPECTED[name]


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("node", ["node1", "node2"])
def test_envoy_accepts_the_seed_translation(name, node, tmp_path):
    _, result = translated(name, node)
    check = validate(static_bootstrap(result, node, OPTIONS.sockets), tmp_path)
    assert (check.returncode, "OK" in check.output) == (0, True), check.output


def of(result, type_url):
    return {rt.name_of(m): m for m in result.resources[type_url]}


def test_canary_header_goes_to_v2_and_the_rest_is_split_90_10():
    _, result = translated("002_canary.yaml")
    canary, split = of(result, rt.ROUTE)["api-service.default.svc.cluster.local:8080"].virtual_hosts[0].routes
    assert canary.match.headers[0].name == "x-canary" and canary.match.headers[0].string_match.exact == "true"
    assert canary.route.cluster == "outbound|8080|v2|api-service.default.svc.cluster.local"
    assert [c.weight.value for c in split.route.weighted_clusters.clusters] == [90, 10]


def test_security_seed_puts_the_api_pod_behind_jwt_and_rbac():
    _, result = translated("002_security.yaml")
    (chain,) = of(result, rt.LISTENER)["inbound"].filter_chains
    names = [f.name for f in rt.unpack(chain.filters[-1].typed_config).http_filters]
    assert names == ["envoy.filters.http.jwt_authn", "envoy.filters.http.rbac", "envoy.filters.http.router"]
    assert any("jwksUri https://auth.example.com/.well-known/jwks.json is not fetched" in str(w)
               for w in result.warnings)


def test_gateway_only_resources_change_nothing_in_the_mesh():
    config, result = translated("002_gateway_and_rate_limit.yaml")
    assert result.messages() == []
    assert any("context GATEWAY" in str(w) for w in config.warnings)
    (bound,) = [w for w in config.warnings if "(VirtualService default/api-external)" in w.where]
    assert str(bound) == ("002_gateway_and_rate_limit.yaml#8 (VirtualService default/api-external) spec.gateways: "
                          "binds this VirtualService to gateways api-gateway only, and nodeagent runs no gateway: it "
                          'is not in force for mesh traffic (add "mesh" to spec.gateways to route meshed clients '
                          "with it, or remove it)")


def test_reviews_subsets_without_a_rule_dangle_with_warnings():
    _, result = translated("001_reviews_and_payments.yaml")
    assert sum("is not defined by any DestinationRule" in str(w) for w in result.warnings) == 2
