"""`nodeagent analyze -f FILE…`: one line per problem naming resource and field, exit 1
on an error (or on a warning with --failure-threshold warning), 0 for clean input."""

from __future__ import annotations

import pathlib

from nodeagent.cli import main
from nodeagent.kube.objects import dump_documents

SEEDS = pathlib.Path(__file__).parent / "xds_seeds"
BAD_VS = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
    retries: {attempts: 3, perTryTimeot: 2s}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec: {host: reviews, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
"""
SERVICE = dump_documents([{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": "shop"},
                           "spec": {"clusterIP": "10.96.0.9", "selector": {"app": "reviews"},
                                    "ports": [{"name": "http", "port": 9080, "targetPort": 9080}]}}])


def test_an_error_is_one_line_naming_file_resource_and_field_and_exits_1(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_VS + "---\n" + SERVICE)
    assert main(["analyze", "-f", str(path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"error: {path}#1 (VirtualService shop/reviews) spec.http[0].retries.perTryTimeot: unknown "
                     "field (did you mean perTryTimeout? known fields: attempts, perTryTimeout, retryOn, "
                     "retryRemoteLocalities, retryIgnorePreviousHosts, backoff; the whole resource is refused)",
                     f"ok: {path}#2 (DestinationRule shop/reviews)"]


def test_clean_input_exits_0_and_warnings_fail_only_when_asked(tmp_path, capsys):
    seeds = [str(SEEDS / "_api_world.yaml"), str(SEEDS / "002_security.yaml")]
    assert main(["analyze", "-f", *seeds]) == 0
    out = capsys.readouterr().out
    (warning,) = [line for line in out.splitlines() if not line.startswith("ok: ")]
    assert warning.startswith("warning: ") and "jwksUri https://auth.example.com/.well-known/jwks.json" in warning
    assert main(["analyze", "--failure-threshold", "warning", "-f", *seeds]) == 1


def test_input_without_services_is_checked_without_references(tmp_path, capsys):
    path = tmp_path / "vs.yaml"
    path.write_text(BAD_VS.split("---")[1])
    assert main(["analyze", "-f", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"ok: {path}#1 (DestinationRule shop/reviews)\n"
    assert "references to hosts and subsets were not checked" in captured.err


def test_an_unreadable_or_malformed_file_is_an_error(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: [")
    assert main(["analyze", "-f", str(broken), "-f", str(tmp_path / "missing.yaml")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"error: {broken}:1: malformed YAML")
    assert out[1].startswith(f"error: {tmp_path / 'missing.yaml'}: cannot read")
