"""`nodeagent analyze -f FILE…`: one line per problem naming resource and field, exit 1
on an error (or on a warning with --failure-threshold warning), 0 for clean input."""

from __future__ import annotations

import io
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
    assert out[0].startswith(f"error: {broken}:1 ({broken}#1): malformed YAML")
    assert out[1].startswith(f"error: {tmp_path / 'missing.yaml'}: cannot read")


ALL = pathlib.Path(__file__).parent / "analyze_inputs" / "all_problems.yaml"


def test_every_problem_of_a_resource_is_reported_at_once_with_its_path(capsys):
    """One VirtualService with six invalid fields, a host and a subset that do not exist,
    and a DestinationRule subset that selects none of the input's workloads (issue 14)."""
    assert main(["analyze", "-f", str(ALL)]) == 1
    vs, dr, refused = f"{ALL}#1 (VirtualService shop/reviews)", f"{ALL}#2 (DestinationRule shop/reviews)", \
        "the whole resource is refused)"
    assert capsys.readouterr().out.splitlines() == [
        f"error: {vs} spec.http[0].match[0].uri.regex: 'a(?=b)' uses look-around or a back-reference, which RE2 "
        f"does not support ({refused}",
        f'error: {vs} spec.http[0].timeout: \'soon\' is not a duration (write for example "10s", "1.5s" or "250ms"; '
        f"{refused}",
        f"error: {vs} spec.http[0].retries.perTryTimeot: unknown field (did you mean perTryTimeout? known fields: "
        f"attempts, perTryTimeout, retryOn, retryRemoteLocalities, retryIgnorePreviousHosts, backoff; {refused}",
        f"error: {vs} spec.http[0].retries.attempts: -1 is out of range: it must be from 0 to 2147483647 ({refused}",
        f"error: {vs} spec.http[0].retries.retryOn: 'bogus' is not a retryOn policy (use a comma list of 5xx, "
        "gateway-error, reset, reset-before-request, connect-failure, envoy-ratelimited, retriable-4xx, "
        "refused-stream, retriable-status-codes, retriable-headers, http3-post-connect-failure, cancelled, "
        f"deadline-exceeded, internal, resource-exhausted, unavailable or HTTP status codes; {refused}",
        f"error: {vs} spec.http[1].fault.abort.httpStatus: 700 is out of range: it must be from 200 to 599 ({refused}",
        f"warning: {vs} spec.http[0].route[0].destination: host 'reviewz' is not a known service (requests for it "
        "fail with 503 until it exists)",
        f"warning: {vs} spec.http[0].route[1].destination: subset 'v9' of reviews.shop.svc.cluster.local is not "
        "defined by any DestinationRule (requests for it fail with 503 until it exists)",
        f"warning: {dr} spec.subsets[1].labels: subset 'v2' (version=v2) selects none of the workloads of "
        "reviews.shop.svc.cluster.local in the input (requests routed to it fail with 503 (no healthy upstream) "
        "until such pods run)"]


def test_a_valid_route_to_unknown_hosts_and_a_rule_for_no_service_are_reported(tmp_path, capsys):
    path = tmp_path / "hosts.yaml"
    path.write_text(SERVICE + "---\n" + """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ghost, namespace: shop}
spec:
  hosts: [reviewz]
  http: [{route: [{destination: {host: reviews}}]}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ghost, namespace: shop}
spec: {host: ratings.shop.svc.cluster.local, subsets: [{name: v1, labels: {version: v1}}]}
""")
    assert main(["analyze", "-f", str(path)]) == 0
    hint = "(name a Service: <name> in this resource's namespace, or <name>.<namespace>.svc.cluster.local)"
    assert capsys.readouterr().out.splitlines() == [
        f"warning: {path}#2 (VirtualService shop/ghost) spec.hosts[0]: host 'reviewz' matches no Service "
        f"(reviewz.shop.svc.cluster.local): this VirtualService applies to no traffic for it {hint}",
        f"warning: {path}#3 (DestinationRule shop/ghost) spec.host: host 'ratings.shop.svc.cluster.local' matches no "
        f"Service (ratings.shop.svc.cluster.local): this DestinationRule applies to no traffic for it {hint}"]


def test_files_directories_and_standard_input_are_read_and_a_bad_document_spoils_only_itself(tmp_path, capsys,
                                                                                              monkeypatch):
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "sub" / "dr.yml").write_text(BAD_VS.split("---")[1])
    (tmp_path / "dir" / "notes.txt").write_text("not yaml: [")
    (tmp_path / "dir" / "svc.yaml").write_text(SERVICE + "---\napiVersion: v1\nkind: Service\nmetadata: {}\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(BAD_VS.split("---")[0]))
    assert main(["analyze", "-f", str(tmp_path / "dir"), "-f", "-", "-R"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"ok: {tmp_path / 'dir' / 'sub' / 'dr.yml'}#1 (DestinationRule shop/reviews)"
    assert out[1] == f"error: {tmp_path / 'dir' / 'svc.yaml'}#2 (Service): missing metadata.name"
    assert out[2].startswith("error: <stdin>#1 (VirtualService shop/reviews) spec.http[0].retries.perTryTimeot: ")
    assert len(out) == 3
    # Without -R, as kubectl and istioctl: only the directory's own files.
    assert main(["analyze", "-f", str(tmp_path / "dir")]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"error: {tmp_path / 'dir' / 'svc.yaml'}#2 (Service): missing metadata.name"]


def test_a_refused_resource_gives_every_error_to_status_too():
    """IstioConfig (what the waypoint's status lists) has every error of a resource."""
    from nodeagent.kube.objects import parse_documents
    from nodeagent.model import Model
    from nodeagent.xds.istio.config import IstioConfig

    config = IstioConfig.build(Model.build(parse_documents(ALL.read_text(), "all.yaml")))
    assert [e.where.split(") ")[1] for e in config.errors] == [
        "spec.http[0].match[0].uri.regex", "spec.http[0].timeout", "spec.http[0].retries.perTryTimeot",
        "spec.http[0].retries.attempts", "spec.http[0].retries.retryOn", "spec.http[1].fault.abort.httpStatus"]
    assert list(config.entries) == [("DestinationRule", "shop", "reviews")]
