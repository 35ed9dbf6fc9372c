"""The Istio YAML users bring (tests/unit/xds_seeds, from /work/shared/seeds) validates
without an error and translates, for every node, into a consistent snapshot; a few
resources are checked for what the seed meant."""

from __future__ import annotations

import pathlib

import pytest

from nodeagent.kube.objects import parse_documents
from nodeagent.model import Model
from nodeagent.xds import resources as rt
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.snapshot import Snapshot
from nodeagent.xds.translate.build import translate
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
    assert config.errors == (), [str(e) for e in config.errors]
    result = translate(model, node, config, OPTIONS)
    Snapshot.build("1", result.messages(), result.dataplane)  # consistent, or raises
    return config, result


def test_every_seed_scenario_is_here():
    assert len(FILES) == 10


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("node", ["node1", "node2"])
def test_seed_translates_without_error(name, node):
    config, result = translated(name, node)
    assert config.entries, "the scenario holds Istio resources"
    assert result.messages() or name.startswith("002_gateway")


def of(result, type_url):
    return {rt.name_of(m): m for m in result.resources[type_url]}


def test_canary_header_goes_to_v2_and_the_rest_is_split_90_10():
    _, result = translated("002_canary.yaml")
    canary, split = of(result, rt.ROUTE)["api-service.default.svc.cluster.local:8080"].virtual_hosts[0].routes
    assert canary.match.headers[0].name == "x-canary" and canary.match.headers[0].string_match.exact == "true"
    assert canary.route.cluster == "outbound|8080|v2|api-service.default.svc.cluster.local"
    assert [c.weight for c in split.route.weighted_clusters.clusters] == [90, 10]


def test_security_seed_puts_the_api_pod_behind_jwt_and_rbac():
    _, result = translated("002_security.yaml")
    (chain,) = of(result, rt.LISTENER)["inbound"].filter_chains
    names = [f.name for f in chain.filters[-1].typed_config.unpack().http_filters]
    assert names == ["envoy.filters.http.jwt_authn", "envoy.filters.http.rbac", "envoy.filters.http.router"]
    assert any("jwksUri https://auth.example.com/.well-known/jwks.json is not fetched" in str(w)
               for w in result.warnings)


def test_gateway_only_resources_change_nothing_in_the_mesh():
    config, result = translated("002_gateway_and_rate_limit.yaml")
    assert result.messages() == []
    assert any("context GATEWAY" in str(w) for w in config.warnings)


def test_reviews_subsets_without_a_rule_dangle_with_warnings():
    _, result = translated("001_reviews_and_payments.yaml")
    assert sum("is not defined by any DestinationRule" in str(w) for w in result.warnings) == 2
