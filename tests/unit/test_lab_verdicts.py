"""lab/verdicts.py: what the agents made of applied Istio resources, read from their
status: in force (digest among the resources in force) or refused (an error names it),
only once an agent has read the applied state and its Envoy is in sync."""

from __future__ import annotations

from nodeagent.digests import spec_digest
from nodeagent.kube.objects import KubeObject
from nodeagent.lab.verdicts import Verdict, judged, wait

SPEC = {"hosts": ["backend"], "http": [{"route": [{"destination": {"host": "backend"}}]}]}
VS = KubeObject("networking.istio.io/v1", "VirtualService", "backend", "mesh",
                {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "spec": SPEC})
PA = KubeObject("security.istio.io/v1", "PeerAuthentication", "strict", "mesh",
                {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                 "spec": {"mtls": {"mode": "STRICT"}}})
SVC = KubeObject("v1", "Service", "backend", "mesh", {"spec": {}})
ERROR = "x.yaml#1 (VirtualService mesh/backend) spec.http[0].timeout: 'soon' is not a duration"


def status(changed_at: float = 100.0, in_sync: bool = True, waypoint_resources=None, errors=(),
           policy_resources=None) -> dict:
    return {"source": {"model_changed_at": changed_at, "errors": {}},
            "policy": {"built_at": changed_at, "resources": policy_resources or {}, "errors": []},
            "waypoint": {"built_at": changed_at, "xds": {"in_sync": in_sync}, "resources": waypoint_resources or {},
                         "errors": list(errors)}}


def test_a_verdict_counts_only_once_the_agent_read_the_apply_and_envoy_is_in_sync():
    good = {"VirtualService mesh/backend": spec_digest(SPEC)}
    assert judged(VS, "node1", None, 50.0) is None  # agent down
    assert judged(VS, "node1", status(changed_at=40.0, waypoint_resources=good), 50.0) is None  # older build
    stale = status(waypoint_resources=good, errors=[ERROR])
    stale["waypoint"]["built_at"] = 40.0  # policies rebuilt, the waypoint's errors still the last model's
    assert judged(VS, "node1", stale, 50.0) is None
    assert judged(VS, "node1", status(in_sync=False, waypoint_resources=good), 50.0) is None
    assert judged(VS, "node1", status(waypoint_resources=good), 50.0) == Verdict(VS, ("node1",), None)
    old = {"VirtualService mesh/backend": "0123456789ab"}
    assert judged(VS, "node1", status(waypoint_resources=old), 50.0) is None  # not yet: wait
    assert judged(VS, "node1", status(waypoint_resources=old, errors=[ERROR]), 50.0) == \
        Verdict(VS, ("node1",), ERROR)


def test_wait_merges_nodes_and_reports_the_silent_ones():
    statuses = {"node1": status(errors=[ERROR], policy_resources={"PeerAuthentication mesh/strict":
                                                                  spec_digest({"mtls": {"mode": "STRICT"}})}),
                "node2": status(errors=[ERROR]), "node3": status(changed_at=10.0)}
    clock = iter(range(1000))
    found, silent = wait([VS, PA, SVC], ["node1", "node2", "node3"], statuses.get, 50.0, timeout=3,
                         clock=lambda: next(clock), sleep=lambda s: None)
    assert [v.line() for v in found] == [
        f"VirtualService mesh/backend refused by the agent of node1, node2: {ERROR}",
        "PeerAuthentication mesh/strict in force"]
    assert sorted((str(o), n) for o, n in silent) == [
        ("PeerAuthentication mesh/strict", "node2"),
        ("PeerAuthentication mesh/strict", "node3"),
        ("VirtualService mesh/backend", "node3")]  # a Service gets no verdict


def test_every_problem_of_a_refused_resource_is_shown_one_per_line():
    """Issue 14: apply shows all the agents found wrong with a resource, not only the first."""
    second = "x.yaml#1 (VirtualService mesh/backend) spec.http[0].retries.retryOn: 'bogus' is not a retryOn policy"
    verdict = judged(VS, "node1", status(errors=[ERROR, second, ERROR]), 50.0)
    assert verdict == Verdict(VS, ("node1",), f"{ERROR}\n{second}")
    assert verdict.line() == f"VirtualService mesh/backend refused by the agent of node1:\n  {ERROR}\n  {second}"
