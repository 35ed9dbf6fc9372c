"""`nodeagent analyze` on the YAML of every seed article (tests/unit/seed_yaml: the blocks
of shared/seeds as the articles give them) says of each resource "ok" or a precise
reason, and of each document that cannot be read why; this keeps that list exactly
(issue 14). The scenarios completed to run (tests/unit/xds_seeds) are
test_xds_translate_seeds.py's."""

from __future__ import annotations

import pathlib

import pytest

from nodeagent.cli import main

SEEDS = pathlib.Path(__file__).parent / "seed_yaml"
ONE_LINE = ("the document is on one line: its line breaks were lost (copied from a page?); put each field on a line "
            "of its own, indented as the resource's structure needs")
FLAT = ("every line starts at column 0, so nothing nests: the YAML lost its indentation (copied from a page?); indent "
        "it as the resource's structure needs")
NO_SERVICE = "(name a Service: <name> in this resource's namespace, or <name>.<namespace>.svc.cluster.local)"
TWICE = "defined twice; the first one ({f}#{n}) is used (remove or rename one of them)"

# file → (exit code, every line analyze prints; {f} stands for the file's path)
EXPECTED = {
    "000.yaml": (0, [
        "ok: {f}#4 (VirtualService default/backend)",
        "ok: {f}#5 (DestinationRule default/backend)",
        "info: {f}#5 (DestinationRule default/backend) spec.trafficPolicy.tls.mode: ISTIO_MUTUAL is what the mesh "
        "always does: traffic between meshed pods is mutual TLS (HBONE, done by the agents) whatever the "
        "DestinationRule says (remove tls; it changes nothing)"]),
    "001.yaml": (1, [
        f"error: {{f}}:4 ({{f}}#1): malformed YAML: mapping values are not allowed here ({ONE_LINE})",
        f"error: {{f}}:14 ({{f}}#2): malformed YAML: expected <block end>, but found '-' ({FLAT})",
        f"error: {{f}}#3 (VirtualService): missing metadata ({FLAT})",
        f"error: {{f}}#4 (AuthorizationPolicy): missing metadata ({FLAT})"]),
    "002.yaml": (1, [
        "ok: {f}#1 (VirtualService default/api-service)",
        "ok: {f}#2 (DestinationRule default/api-service)",
        "error: {f}#3 (VirtualService default/api-service): " + TWICE.replace("{n}", "1"),
        "error: {f}#4 (DestinationRule default/api-service): " + TWICE.replace("{n}", "2"),
        "error: {f}#5 (VirtualService default/api-service): " + TWICE.replace("{n}", "1"),
        "ok: {f}#6 (PeerAuthentication istio-system/default)",
        "ok: {f}#7 (AuthorizationPolicy default/api-access)",
        "ok: {f}#8 (AuthorizationPolicy default/deny-all)",
        "ok: {f}#9 (RequestAuthentication default/jwt-auth)",
        "ok: {f}#10 (AuthorizationPolicy default/require-jwt)",
        "error: {f}#11 (IstioOperator): missing metadata (add metadata.name)",
        "error: {f}#12 (Gateway default/api-gateway) kind: not supported in ambient mode: nodeagent runs no ingress "
        "or egress gateway, so nothing serves this Gateway (reach the service through a Kubernetes Service "
        "(NodePort or LoadBalancer) or an ingress controller; meshed pods reach it directly, with no Gateway)",
        "warning: {f}#13 (VirtualService default/api-external) spec.gateways: binds this VirtualService to gateways "
        "api-gateway only, and nodeagent runs no gateway: it is not in force for mesh traffic (add \"mesh\" to "
        "spec.gateways to route meshed clients with it, or remove it)",
        "warning: {f}#14 (EnvoyFilter istio-system/rate-limit) spec.configPatches[0].patch.value.typed_config.value: "
        "filter_enforced is not set, so Envoy only counts, never enforces this rate limit (set "
        "filter_enforced.default_value to 100%)",
        "warning: {f}#14 (EnvoyFilter istio-system/rate-limit) spec.configPatches[0].match.context: context GATEWAY "
        "applies to gateways; nodeagent runs none, so this patch changes nothing (use SIDECAR_INBOUND to limit a "
        "workload)"]),
    "003.yaml": (0, [
        "warning: {f}#3 (VirtualService default/backend) spec.hosts[0]: host 'backend' matches no Service "
        f"(backend.default.svc.cluster.local): this VirtualService applies to no traffic for it {NO_SERVICE}",
        "warning: {f}#4 (DestinationRule default/backend) spec.host: host 'backend' matches no Service "
        f"(backend.default.svc.cluster.local): this DestinationRule applies to no traffic for it {NO_SERVICE}"]),
    "004.yaml": (1, [
        f"error: {{f}}#1 (VirtualService): missing metadata ({FLAT})"]),
}


def test_every_seed_file_has_its_expectation():
    assert sorted(p.name for p in SEEDS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_analyze_says_ok_or_why_of_every_resource_of_the_seed(name, capsys):
    path = SEEDS / name
    code, lines = EXPECTED[name]
    assert main(["analyze", "-f", str(path)]) == code
    assert capsys.readouterr().out.splitlines() == [line.replace("{f}", str(path)) for line in lines]


def test_documents_are_numbered_as_the_agents_number_them():
    """analyze reads every document on its own (objects.parse_each) and names each as the
    files source does (parse_documents), leading comments and `---` included."""
    from nodeagent.kube.objects import parse_documents, parse_each

    texts = [p.read_text() for p in sorted((SEEDS.parent / "xds_seeds").glob("*.yaml")) + [SEEDS / "000.yaml"]]
    texts.append("# a comment\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\n"
                 "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n---\n")
    for text in texts:
        assert [o.source for o in parse_each(text, "f")] == [o.source for o in parse_documents(text, "f")]
