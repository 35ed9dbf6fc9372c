"""Every Istio kind gets an answer (xds/istio/kinds.py): the kinds the agents read are
validated; the others are "not supported in ambient mode" (an error), "not applicable to
ambient" (a warning) or an "unknown kind" (an error) — in analyze, in the waypoint's
status (IstioConfig's errors and warnings) and in lab apply's verdicts. A VirtualService
bound to gateways only is not in force; AUDIT is refused; a DestinationRule's tls mode is
reported for what it does in ambient mode."""

from __future__ import annotations

import pytest

from nodeagent.cli import main
from nodeagent.kube.objects import parse_documents
from nodeagent.lab.verdicts import Verdict, judged, of_kind, wait
from nodeagent.model import Model
from nodeagent.xds.istio import kinds
from nodeagent.xds.istio.config import IstioConfig
from xds_world import doc, model

# (apiVersion, kind) → (severity, the start of the message)
ANSWERED = [
    ("networking.istio.io/v1", "Gateway", "error",
     "not supported in ambient mode: nodeagent runs no ingress or egress gateway"),
    ("networking.istio.io/v1beta1", "ServiceEntry", "error",
     "not supported in ambient mode: the mesh's registry is the Kubernetes Services"),
    ("networking.istio.io/v1", "WorkloadEntry", "error", "not supported in ambient mode: only Kubernetes pods"),
    ("networking.istio.io/v1", "WorkloadGroup", "error", "not supported in ambient mode: only Kubernetes pods"),
    ("networking.istio.io/v1beta1", "ProxyConfig", "error",
     "not supported in ambient mode: the waypoint Envoy's settings come from the agent's configuration"),
    ("networking.istio.io/v1", "Sidecar", "warning",
     "not applicable to ambient (sidecar-only): a Sidecar scopes a sidecar proxy's configuration, and ambient "
     "pods have no sidecar; Istio's ambient mode ignores it too"),
    ("telemetry.istio.io/v1", "Telemetry", "error", "not supported in ambient mode: metrics, access logs"),
    ("extensions.istio.io/v1alpha1", "WasmPlugin", "error", "not supported in ambient mode: the waypoint loads no Wasm"),
    ("install.istio.io/v1alpha1", "IstioOperator", "warning",
     "not applicable to ambient (installation, not mesh configuration)"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute", "error",
     "not supported in ambient mode: nodeagent reads Istio's networking.istio.io API, not the Kubernetes Gateway API"),
    ("networking.istio.io/v1beta1", "VirtualServce", "error", "unknown kind VirtualServce in networking.istio.io"),
    ("security.istio.io/v1", "AuthPolicy", "error", "unknown kind AuthPolicy in security.istio.io"),
    ("foo.istio.io/v1", "Bar", "error", "unknown kind Bar in foo.istio.io"),
]


def obj(api: str, kind: str, name: str = "x", namespace: str = "shop"):
    (found,) = parse_documents(f"apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\n"
                               "spec: {}\n", "in.yaml")
    return found


@pytest.mark.parametrize("api, kind, severity, message", ANSWERED, ids=[a[1] for a in ANSWERED])
def test_every_kind_the_agents_do_not_read_is_answered(api, kind, severity, message):
    answer = kinds.answer(obj(api, kind))
    assert (answer.severity, answer.message[:len(message)]) == (severity, message)
    config = IstioConfig.build(Model.build([obj(api, kind)]))
    found = config.errors if severity == "error" else config.warnings
    assert [e.where for e in found] == [f"in.yaml#1 ({kind} shop/x) kind"]
    assert config.entries == {}


def test_a_misspelt_kind_suggests_the_right_one():
    assert kinds.answer(obj("networking.istio.io/v1", "VirtualServce")).hint == "did you mean VirtualService?"
    assert kinds.answer(obj("networking.istio.io/v1", "DestinationRules")).hint == "did you mean DestinationRule?"


def test_kinds_the_agents_read_and_kubernetes_kinds_get_no_answer():
    for api, kind in [("networking.istio.io/v1", "VirtualService"), ("security.istio.io/v1", "PeerAuthentication"),
                      ("networking.istio.io/v1alpha3", "EnvoyFilter"), ("v1", "ConfigMap"), ("apps/v1", "Deployment")]:
        assert kinds.answer(obj(api, kind)) is None


def test_analyze_gives_each_resource_its_verdict_and_fails_on_errors_only(tmp_path, capsys):
    sidecar = tmp_path / "sidecar.yaml"
    sidecar.write_text("apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: default, namespace: shop}\n"
                       "spec: {egress: [{hosts: ['./*']}]}\n")
    assert main(["analyze", "-f", str(sidecar)]) == 0
    assert main(["analyze", "--failure-threshold", "warning", "-f", str(sidecar)]) == 1
    typo = tmp_path / "typo.yaml"
    typo.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualServce\nmetadata: {name: reviews, namespace: shop}\n"
                    "spec: {hosts: [reviews]}\n")
    capsys.readouterr()
    assert main(["analyze", "-f", str(typo)]) == 1
    assert capsys.readouterr().out == (
        f"error: {typo}#1 (VirtualServce shop/reviews) kind: unknown kind VirtualServce in networking.istio.io "
        "(did you mean VirtualService?)\n")


GATEWAY_VS = doc("VirtualService", "external", """
hosts: [reviews.example.com]
gateways: [istio-system/ingress]
http:
- route: [{destination: {host: reviews}}]
""")
BOTH_VS = doc("VirtualService", "reviews", """
hosts: [reviews]
gateways: [istio-system/ingress, mesh]
http:
- route: [{destination: {host: reviews}}]
""")


def test_a_virtual_service_bound_to_gateways_only_is_not_in_force():
    config = IstioConfig.build(model(GATEWAY_VS + BOTH_VS))
    assert list(config.entries) == [("VirtualService", "shop", "reviews")]
    (warning,) = config.warnings
    assert str(warning) == ("test.yaml#12 (VirtualService shop/external) spec.gateways: binds this VirtualService to "
                            "gateways istio-system/ingress only, and nodeagent runs no gateway: it is not in force for "
                            'mesh traffic (add "mesh" to spec.gateways to route meshed clients with it, or remove it)')


def dr_with_tls(mode: str) -> str:
    return doc("DestinationRule", "reviews", f"host: reviews\ntrafficPolicy: {{tls: {{mode: {mode}}}}}\n")


def test_tls_modes_are_reported_for_what_they_do_in_ambient(tmp_path, capsys):
    disable = IstioConfig.build(model(dr_with_tls("DISABLE")))
    assert disable.errors == () and [str(w) for w in disable.warnings] == [
        "test.yaml#12 (DestinationRule shop/reviews) spec.trafficPolicy.tls.mode: DISABLE has no effect in ambient "
        "mode: traffic between meshed pods is always mutual TLS (HBONE, done by the agents), and a DestinationRule "
        "cannot turn it off (to let a destination accept plaintext, use a PeerAuthentication with mode PERMISSIVE "
        "or DISABLE on it; remove tls here)"]
    mutual = tmp_path / "mutual.yaml"
    mutual.write_text(dr_with_tls("ISTIO_MUTUAL"))
    assert main(["analyze", "--failure-threshold", "warning", "-f", str(mutual)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"ok: {mutual}#1 (DestinationRule shop/reviews)",
        f"info: {mutual}#1 (DestinationRule shop/reviews) spec.trafficPolicy.tls.mode: ISTIO_MUTUAL is what the mesh "
        "always does: traffic between meshed pods is mutual TLS (HBONE, done by the agents) whatever the "
        "DestinationRule says (remove tls; it changes nothing)"]
    (simple,) = IstioConfig.build(model(doc("DestinationRule", "r", "host: reviews\ntrafficPolicy: {tls: {mode: SIMPLE}}"
                                            ))).errors
    assert simple.message.endswith("spec.trafficPolicy.tls.mode: TLS origination (SIMPLE) is not supported by "
                                   "nodeagent's waypoint: the agent does all TLS")


def test_an_audit_policy_is_refused_not_silently_accepted():
    config = IstioConfig.build(model(doc("AuthorizationPolicy", "audit", "action: AUDIT\nrules: [{}]",
                                         api="security.istio.io/v1")))
    (error,) = config.errors
    assert error.where == "test.yaml#12 (AuthorizationPolicy shop/audit) spec.action"
    assert error.message.endswith("AUDIT only marks requests for an audit log provider (Istio's Stackdriver), and "
                                  "nodeagent has none: the policy would decide nothing and record nothing")
    assert config.entries == {}


def test_lab_apply_answers_kinds_at_once_and_a_gateway_route_as_not_in_force():
    gateway, sidecar = obj("networking.istio.io/v1", "Gateway", "ingress"), obj("networking.istio.io/v1", "Sidecar")
    assert of_kind(gateway).refused and not of_kind(sidecar).refused
    assert of_kind(gateway).line().startswith("Gateway shop/ingress not supported in ambient mode: nodeagent runs no")
    (vs,) = parse_documents(GATEWAY_VS, "vs.yaml")
    warning = "vs.yaml#1 (VirtualService shop/external) spec.gateways: binds ... it is not in force for mesh traffic"
    status = {"source": {"errors": {}}, "policy": {"built_at": 100.0, "resources": {}, "errors": []},
              "waypoint": {"built_at": 100.0, "xds": {"in_sync": True}, "resources": {}, "errors": [],
                           "warnings": [warning]}}
    verdict = judged(vs, "node1", status, 50.0)
    assert verdict == Verdict(vs, ("node1",), warning, "warning") and not verdict.refused
    assert verdict.line() == f"VirtualService shop/external not in force (agent of node1): {warning}"
    found, silent = wait([gateway, sidecar, vs], ["node1", "node2"], lambda n: status, 50.0, timeout=5,
                         clock=iter(range(100)).__next__, sleep=lambda s: None)
    assert [v.line().split(":")[0] for v in found] == [
        "Gateway shop/ingress not supported in ambient mode", "Sidecar shop/x not applicable to ambient (sidecar-only)",
        "VirtualService shop/external not in force (agent of node1, node2)"]
    assert silent == []
