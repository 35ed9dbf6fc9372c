"""PolicyState: the agent's policies follow the model with last-good semantics, each
error is logged once per change, and status names what is in force."""

from __future__ import annotations

import logging

from policy_world import document, model

from nodeagent.agent.proxy.policies import PolicyState
from nodeagent.digests import spec_digest
from nodeagent.model import Model
from nodeagent.policy import Connection

LOG = logging.getLogger("test.policies")
ALLOW_SLEEP = document("AuthorizationPolicy", "foo", "allow-sleep", """
selector: {matchLabels: {app: httpbin}}
action: ALLOW
rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]}]
""")
BROKEN = document("AuthorizationPolicy", "foo", "allow-sleep", """
selector: {matchLabels: {app: httpbin}}
action: ALLOWED
""")
STRICT = document("PeerAuthentication", "foo", "strict", "mtls: {mode: STRICT}")


def decide(state: PolicyState, world: Model, principal: str | None) -> bool:
    httpbin = world.pods[("foo", "httpbin")]
    return state.current.authorize(Connection("10.244.1.20", principal, None, httpbin, httpbin.ip, 80)).allowed


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_change_applies_to_the_next_decision():
    state, world = PolicyState("istio-system", LOG), model()
    state.update(world)
    assert decide(state, world, None) is True and state.describe()["resources"] == {}
    state.update(model(ALLOW_SLEEP + STRICT))
    assert decide(state, world, None) is False
    assert decide(state, world, "spiffe://cluster.local/ns/default/sa/sleep") is True
    assert state.current.mtls_mode(world.pods[("foo", "httpbin")], 80) == "STRICT"
    resources = state.describe()["resources"]
    assert set(resources) == {"AuthorizationPolicy foo/allow-sleep", "PeerAuthentication foo/strict"}
    assert resources["PeerAuthentication foo/strict"] == spec_digest({"mtls": {"mode": "STRICT"}})


def test_a_broken_edit_keeps_the_last_good_version_and_is_logged_once(caplog):
    state, world = PolicyState("istio-system", LOG), model()
    state.update(model(ALLOW_SLEEP))
    good = state.describe()["resources"]["AuthorizationPolicy foo/allow-sleep"]
    with caplog.at_level(logging.WARNING):
        state.update(model(BROKEN))
        state.update(model(BROKEN + STRICT))  # another change: the same error is not logged again
    assert len(warnings(caplog)) == 1 and "policy refused" in warnings(caplog)[0]
    assert "spec.action" in warnings(caplog)[0] and "the whole resource is refused; its last good version stays in force" in warnings(caplog)[0]
    assert decide(state, world, None) is False  # the ALLOW still applies
    described = state.describe()
    assert described["resources"]["AuthorizationPolicy foo/allow-sleep"] == good
    assert len(described["errors"]) == 1 and "spec.action" in described["errors"][0]
    state.update(model(STRICT))  # deleted: gone, and so is its error
    assert decide(state, world, None) is True and state.describe()["errors"] == []


def test_a_new_invalid_policy_is_enforced_fail_closed(caplog):
    """Its action cannot be read: a DENY of everything it selects, not left out (until
    2026-12-07 httpbin was open to everybody). It is no version of the resource: status
    lists it under errors, saying how it is enforced, not among the resources in force."""
    state, world = PolicyState("istio-system", LOG), model()
    with caplog.at_level(logging.WARNING):
        state.update(model(BROKEN))
        state.update(model(BROKEN + STRICT))  # another change: the same error is not logged again
    assert decide(state, world, None) is False
    assert decide(state, world, "spiffe://cluster.local/ns/default/sa/sleep") is False
    assert len(warnings(caplog)) == 1 and warnings(caplog)[0].endswith(
        "the whole resource is refused; with no last good version to keep, it is enforced fail-closed (its action "
        "cannot be read): every connection to the workloads it selects is denied)")
    assert list(state.describe()["resources"]) == ["PeerAuthentication foo/strict"]
    assert state.describe()["errors"] == [warnings(caplog)[0].removeprefix("policy refused: ")]
    tcp_echo = world.pods[("foo", "tcp-echo")]
    assert state.current.authorize(Connection("10.244.1.20", None, None, tcp_echo, tcp_echo.ip, 80)).allowed


def test_a_restarted_agent_enforces_an_invalid_policy_as_closed_as_the_running_one_did():
    """The review's case: a good DENY, edited invalid on the running agent, stays denied
    (last good); the same invalid DENY on a fresh agent (a restart) was allowed."""
    good = document("AuthorizationPolicy", "foo", "deny-ip", """
selector: {matchLabels: {app: httpbin}}
action: DENY
rules: [{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}]
""")
    running, world = PolicyState("istio-system", LOG), model()
    running.update(model(good))
    running.update(model(good.replace("10.244.1.0/24", "10.1.2.300")))
    restarted = PolicyState("istio-system", LOG)
    restarted.update(model(good.replace("10.244.1.0/24", "10.1.2.300")))
    assert decide(running, world, None) is False and decide(restarted, world, None) is False
    assert "its last good version stays in force" in running.describe()["errors"][0]
    closed = "enforced fail-closed: every connection to the workloads it selects is denied"
    assert closed in restarted.describe()["errors"][0]


def test_a_failing_build_keeps_the_policies_in_force(monkeypatch, caplog):
    state, world = PolicyState("istio-system", LOG), model()
    state.update(model(ALLOW_SLEEP))

    def broken(*_args, **_kw):
        raise RuntimeError("bug")
    monkeypatch.setattr("nodeagent.agent.proxy.policies.PolicySet.build", broken)
    with caplog.at_level(logging.ERROR):
        state.update(model(STRICT))
    assert decide(state, world, None) is False  # the ALLOW stays
    assert "keeping the ones in force" in caplog.records[-1].getMessage()


def test_kinds_the_agents_do_not_read_get_their_verdict_without_a_waypoint():
    """Issue 14: an L4-only agent (--no-waypoint) shows the same kind verdicts as a
    waypoint's configuration problems: not supported, not applicable, unknown kind."""
    state = PolicyState("istio-system", LOG)
    gateway = document("Gateway", "foo", "ingress", "servers: []", api_version="networking.istio.io/v1")
    sidecar = document("Sidecar", "foo", "default", "egress: []", api_version="networking.istio.io/v1")
    typo = document("VirtualServce", "foo", "typo", "hosts: [x]", api_version="networking.istio.io/v1")
    state.update(model(gateway + sidecar + typo + STRICT))
    kinds = state.describe()["kinds"]
    assert [e.split(" kind: ")[0] for e in kinds["errors"]] == [
        "policies.yaml#10 (Gateway foo/ingress)", "policies.yaml#12 (VirtualServce foo/typo)"]
    assert "not supported in ambient mode" in kinds["errors"][0]
    assert "unknown kind VirtualServce in networking.istio.io (did you mean VirtualService?)" in kinds["errors"][1]
    assert kinds["warnings"] == [next(w for w in kinds["warnings"] if w.startswith(
        "policies.yaml#11 (Sidecar foo/default) kind: not applicable to ambient (sidecar-only)"))]
    assert state.describe()["errors"] == []  # the policies themselves are fine
    state.update(model(STRICT))  # gone from the model: gone from the status
    assert state.describe()["kinds"] == {"errors": [], "warnings": []}
