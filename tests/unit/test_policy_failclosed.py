"""A security resource that fails validation with no last good version (created invalid,
or first seen invalid after a restart) is enforced fail-closed by its stand-in
(nodeagent/policy/failclosed.py): an AuthorizationPolicy DENY, CUSTOM or with an
unreadable action denies every connection to its workloads, an ALLOW is an ALLOW without
rules, a PeerAuthentication is STRICT on every port; its workloads are its selector's or
targetRefs', else its namespace's (the mesh's in the root namespace). Until 2026-12-07 it
was left out, which opened what it closed. With a last good version, that stays."""

from __future__ import annotations

import pytest

from nodeagent.agent.proxy.admission import DENY, DELIVER, STRICT_POLICY, admit
from nodeagent.agent.proxy.steering import NoWaypoint
from nodeagent.policy import Decision
from policy_world import build, connection, document, valid

AP, PA = "AuthorizationPolicy", "PeerAuthentication"
BAD_IP = "10.1.2.300"  # the CRD schema accepts it; validation refuses it
EVERY_POD = ["foo/httpbin", "foo/tcp-echo", "bar/httpbin", "bar/finance", "default/sleep", "istio-system/istiod"]
OPEN = Decision(True, None, None, "no ALLOW policy applies")
FATE = "the whole resource is refused; with no last good version to keep, it is enforced fail-closed"


def policy(namespace: str, name: str, spec: str, kind: str = AP, metadata: str = "") -> str:
    return document(kind, namespace, name, spec, metadata=metadata)


def deny_from_ip(selector: str = "selector: {matchLabels: {app: httpbin}}\n", action: str = "DENY") -> str:
    return f"{selector}action: {action}\nrules: [{{from: [{{source: {{ipBlocks: ['{BAD_IP}']}}}}]}}]"


def allowed(policies, destination: str, port: int = 80, source: str | None = "default/sleep") -> bool:
    return policies.authorize(connection(destination, port, source)).allowed


def denied_pods(policies, source: str | None = "default/sleep") -> list[str]:
    return [pod for pod in EVERY_POD if not allowed(policies, pod, source=source)]


# --- AuthorizationPolicy DENY ----------------------------------------------------------
def test_an_invalid_deny_on_a_fresh_set_denies_the_workloads_it_selects_and_no_others():
    """The reviewer's case: a DENY with ipBlocks "10.1.2.300" seen first invalid."""
    policies, [err] = build(policy("foo", "deny-ip", deny_from_ip()))
    assert err.where.endswith("(AuthorizationPolicy foo/deny-ip) spec.rules[0].from[0].source.ipBlocks[0]")
    assert str(err).endswith(f"{FATE}: every connection to the workloads it selects is denied)")
    for source in ("default/sleep", "bar/httpbin", None):  # mTLS or plaintext, from anywhere
        assert denied_pods(policies, source) == ["foo/httpbin"]
    for port in (80, 8000, 15008):
        decision = policies.authorize(connection("foo/httpbin", port))
        assert decision == Decision(False, "foo/deny-ip", 0, "denied by DENY policy foo/deny-ip rule 0 (the policy "
                                    "is invalid and enforced fail-closed; see the agent's policy errors)")


@pytest.mark.parametrize("selector", [
    "selector: {matchLabels: {app: '*'}}\n",  # a wildcard cannot select
    "selector: {matchExpressions: [{key: app, operator: In, values: [httpbin]}]}\n",  # not Istio's
    "selector: {matchLabels: {app: httpbin}}\ntargetRefs: [{kind: Service, name: httpbin}]\n",  # both
    "targetRefs: [{kind: Deployment, group: apps, name: httpbin}]\n",
])
def test_an_invalid_deny_whose_scope_cannot_be_read_denies_its_whole_namespace(selector):
    policies, errors = build(policy("foo", "deny-ip", deny_from_ip(selector)))
    assert all(str(e).endswith(f"{FATE}: every connection to every workload of namespace foo (its selector or "
                               "targetRefs cannot be read) is denied)") for e in errors), [str(e) for e in errors]
    assert denied_pods(policies) == ["foo/httpbin", "foo/tcp-echo"]


def test_an_invalid_deny_in_the_root_namespace_denies_the_whole_mesh():
    policies, [err] = build(policy("istio-system", "deny-ip", deny_from_ip(selector="")))
    assert str(err).endswith(f"{FATE}: every connection to every workload of the mesh (root namespace "
                             "istio-system) is denied)")
    assert denied_pods(policies) == EVERY_POD
    other_root, _ = build(policy("istio-system", "deny-ip", deny_from_ip(selector="")), root_namespace="mesh-root")
    assert denied_pods(other_root) == ["istio-system/istiod"]  # not the root namespace: its own namespace only


def test_an_invalid_deny_bound_to_a_service_denies_the_service_pods():
    service = ("apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: foo}\n"
               "spec: {selector: {app: tcp-echo}, ports: [{port: 9000}]}\n---\n")
    policies, _ = build(service + policy("foo", "deny-ip", deny_from_ip("targetRefs: [{kind: Service, name: echo}]\n")))
    assert denied_pods(policies) == ["foo/tcp-echo"]


@pytest.mark.parametrize("action, why", [("REJECT", " (its action cannot be read)"),
                                         ("deny", " (its action cannot be read)"),
                                         ("CUSTOM", " (a CUSTOM policy whose rules cannot be read either)")])
def test_an_unreadable_action_or_a_custom_policy_with_invalid_rules_denies_everything_in_scope(action, why):
    policies, errors = build(policy("foo", "odd", deny_from_ip(action=action)))
    assert str(errors[-1]).endswith(f"{FATE}{why}: every connection to the workloads it selects is denied)")
    assert denied_pods(policies) == ["foo/httpbin"]


def test_a_spec_that_is_no_map_denies_its_whole_namespace():
    policies, [err] = build(policy("foo", "odd", "[DENY]"))
    assert err.where.endswith("(AuthorizationPolicy foo/odd) spec") and "(its action cannot be read)" in str(err)
    assert denied_pods(policies) == ["foo/httpbin", "foo/tcp-echo"]


@pytest.mark.parametrize("spec, metadata", [
    (deny_from_ip(action="AUDIT"), ""),  # AUDIT decides nothing, valid or not
    (deny_from_ip(), ", annotations: {istio.io/dry-run: 'true'}"),  # a dry run is enforced never
])
def test_an_invalid_audit_or_dry_run_policy_enforces_nothing(spec, metadata):
    policies, errors = build(policy("foo", "quiet", spec, metadata=metadata))
    assert all(str(e).endswith("the whole resource is refused)") for e in errors)
    assert policies.keys() == [] and denied_pods(policies) == []


def test_a_policy_of_another_api_group_is_not_read_as_a_security_policy():
    policies, [err] = build(document(AP, "foo", "lookalike", deny_from_ip(), api_version="networking.istio.io/v1"))
    assert str(err).endswith("the whole resource is refused)") and denied_pods(policies) == []


# --- AuthorizationPolicy ALLOW ---------------------------------------------------------
SLEEP = "cluster.local/ns/default/sa/sleep"
ALLOW_SLEEP = policy("foo", "allow-sleep", "selector: {matchLabels: {app: httpbin}}\n"
                                           f"rules: [{{from: [{{source: {{principals: [{SLEEP}]}}}}]}}]")
BAD_ALLOW = policy("foo", "allow-ip", deny_from_ip(action="ALLOW"))


def test_an_invalid_allow_on_a_fresh_set_allows_nothing_by_itself():
    policies, [err] = build(BAD_ALLOW)
    assert str(err).endswith(f"{FATE} as an ALLOW policy without rules for the workloads it selects: what no other "
                             "ALLOW policy allows is denied)")
    assert denied_pods(policies) == ["foo/httpbin"]  # never allow-all; other workloads and namespaces untouched
    assert policies.authorize(connection("foo/httpbin", 80)) == Decision(
        False, None, None, "no ALLOW policy matched (1 apply)")
    assert policies.authorize(connection("bar/httpbin", 80)) == OPEN


def test_an_invalid_allow_leaves_what_another_allow_allows():
    policies, _ = build(ALLOW_SLEEP + BAD_ALLOW)
    assert allowed(policies, "foo/httpbin", source="default/sleep")
    assert denied_pods(policies, source="bar/httpbin") == ["foo/httpbin"]
    assert denied_pods(policies, source=None) == ["foo/httpbin"]


def test_an_invalid_allow_whose_selector_cannot_be_read_binds_its_whole_namespace():
    policies, _ = build(ALLOW_SLEEP + policy("foo", "allow-ip", deny_from_ip("selector: {matchLabels: {app: 1}}\n",
                                                                             action="ALLOW")))
    assert allowed(policies, "foo/httpbin", source="default/sleep")  # allow-sleep still allows it
    assert denied_pods(policies) == ["foo/tcp-echo"]  # no other ALLOW allows anything there
    assert denied_pods(policies, source="bar/httpbin") == ["foo/httpbin", "foo/tcp-echo"]


def test_an_invalid_allow_keeps_none_of_its_rules():
    """Its valid rule (from sleep) is dropped with the invalid one: read in part, a rule
    could allow more than was written (a condition whose values are all invalid drops out)."""
    policies, _ = build(policy("foo", "allow-ip", "selector: {matchLabels: {app: httpbin}}\nrules:\n"
                                                  "- from: [{source: {namespaces: [default]}}]\n"
                                                  f"- from: [{{source: {{ipBlocks: ['{BAD_IP}']}}}}]"))
    assert policies.get(AP, "foo", "allow-ip").rules == ()
    assert denied_pods(policies) == ["foo/httpbin"]


# --- PeerAuthentication ----------------------------------------------------------------
def mode(policies, destination: str, port: int = 80) -> str:
    return policies.mtls_mode(connection(destination, port).destination, port)


def modes(policies, port: int = 80) -> dict[str, str]:
    return {pod: mode(policies, pod, port) for pod in EVERY_POD if mode(policies, pod, port) != "PERMISSIVE"}


def test_an_invalid_strict_peer_authentication_refuses_plaintext_on_every_port_of_its_workloads():
    policies, errors = build(policy("foo", "strict", "selector: {matchLabels: {app: httpbin}}\nmtls: {mode: strict}\n"
                                                     "portLevelMtls: {8080: {mode: DISABLE}}", PA))
    assert str(errors[0]).endswith(f"{FATE} as mode STRICT on every port of the workloads it selects: plaintext "
                                   "is refused)")
    for port in (80, 8080, 9000):  # portLevelMtls is dropped with the rest
        assert modes(policies, port) == {"foo/httpbin": "STRICT"}
    plaintext = admit(policies, NoWaypoint(), connection("foo/httpbin", 8080, source=None), plaintext=True)
    assert (plaintext.route, plaintext.policy) == (DENY, STRICT_POLICY)
    mtls = admit(policies, NoWaypoint(), connection("foo/httpbin", 8080), plaintext=False)
    assert mtls.route == DELIVER
    assert admit(policies, NoWaypoint(), connection("foo/tcp-echo", 80, source=None), plaintext=True).route == DELIVER


def test_an_invalid_peer_authentication_whose_selector_cannot_be_read_binds_every_workload_of_its_namespace():
    """At the workload level: a namespace-level stand-in would lose to an older namespace
    policy (PERMISSIVE here), so the workloads the invalid one selected would take plaintext."""
    older = policy("foo", "default", "mtls: {mode: PERMISSIVE}", PA, ", creationTimestamp: '2020-01-01T00:00:00Z'")
    policies, errors = build(older + policy("foo", "strict", "selector: {matchLabels: {app: '*'}}\n"
                                                             "mtls: {mode: STRICT}", PA))
    assert str(errors[0]).endswith(f"{FATE} as mode STRICT on every port of every workload of namespace foo (its "
                                   "selector cannot be read): plaintext is refused)")
    assert modes(policies) == {"foo/httpbin": "STRICT", "foo/tcp-echo": "STRICT"}


def test_an_invalid_mesh_peer_authentication_is_strict_for_the_mesh():
    policies, _ = build(policy("istio-system", "default", "mtls: {mode: STRIKT}", PA))
    assert modes(policies) == {pod: "STRICT" for pod in EVERY_POD}
    with_selector, [err] = build(policy("istio-system", "db", "selector: {matchLabels: {app: finance}}\n"
                                                              "mtls: {mode: STRIKT}", PA))
    assert str(err).endswith("the whole resource is refused)")  # as istiod, it would apply at no level
    assert modes(with_selector) == {}
    unreadable, [err] = build(policy("istio-system", "db", "selector: {matchLabels: {app: '*'}}\n"
                                                           "mtls: {mode: STRICT}", PA))
    assert str(err).endswith("the whole resource is refused)")  # with a selector, read or not: no level
    assert modes(unreadable) == {}  # (the whole mesh STRICT for a typo in a selector that binds nothing)


def test_an_invalid_peer_authentication_with_an_unreadable_age_wins_its_level():
    younger = policy("foo", "open", "selector: {matchLabels: {app: httpbin}}\nmtls: {mode: DISABLE}", PA,
                     ", creationTimestamp: '2020-01-01T00:00:00Z'")
    policies, errors = build(younger + policy("foo", "strict", "selector: {matchLabels: {app: httpbin}}\n"
                                                               "mtls: {mode: STRICT}", PA, ", creationTimestamp: x"))
    assert errors[0].where.endswith("(PeerAuthentication foo/strict) metadata.creationTimestamp")
    assert modes(policies) == {"foo/httpbin": "STRICT"}


# --- a last good version stays; a stand-in is none ---------------------------------------
GOOD_DENY = policy("foo", "deny-ip", "selector: {matchLabels: {app: httpbin}}\naction: DENY\n"
                                     "rules: [{from: [{source: {ipBlocks: ['10.244.2.0/24']}}]}]")


def test_with_a_last_good_version_an_invalid_edit_keeps_it_not_the_stand_in():
    good = valid(GOOD_DENY)
    edited, [err] = build(policy("foo", "deny-ip", deny_from_ip()), previous=good)
    assert str(err).endswith("the whole resource is refused; its last good version stays in force)")
    assert edited.get(AP, "foo", "deny-ip") is good.get(AP, "foo", "deny-ip")
    assert not policies_allow(edited, "foo/httpbin", "10.244.2.10")  # the last good DENY's block
    assert policies_allow(edited, "foo/httpbin", "10.244.1.20")


def policies_allow(policies, destination: str, source_ip: str) -> bool:
    return policies.authorize(connection(destination, 80, source_ip=source_ip)).allowed


def test_a_stand_in_is_never_kept_as_a_last_good_version():
    """Each build reads the invalid resource anew: an edit moves its stand-in's scope, and
    the error keeps saying it is enforced fail-closed (it is logged once, not again)."""
    first, [err1] = build(policy("foo", "deny-ip", deny_from_ip()))
    again, [err2] = build(policy("foo", "deny-ip", deny_from_ip()), previous=first)
    assert str(err1) == str(err2) and denied_pods(again) == ["foo/httpbin"]
    moved, _ = build(policy("foo", "deny-ip", deny_from_ip("selector: {matchLabels: {app: tcp-echo}}\n")),
                     previous=again)
    assert denied_pods(moved) == ["foo/tcp-echo"]
    fixed, errors = build(GOOD_DENY, previous=moved)
    assert errors == [] and denied_pods(fixed) == []  # sleep is at 10.244.1.20: not in the good DENY's block


def test_a_custom_policy_edited_on_a_running_agent_is_read_anew():
    """Its DENY reading is a stand-in too: it was kept as a "last good version", so a
    CUSTOM policy's new rules never applied on a running agent."""
    def custom(port: str) -> str:
        return policy("foo", "ext", "action: CUSTOM\nprovider: {name: my-authz}\n"
                                    f"rules: [{{to: [{{operation: {{ports: ['{port}']}}}}]}}]")
    first, _ = build(custom("80"))
    edited, [err] = build(custom("8000"), previous=first)
    assert str(err).endswith("its rules are enforced as a DENY, as istiod enforces a CUSTOM policy whose provider "
                             "it cannot use)")
    assert allowed(edited, "foo/httpbin", 80) and not allowed(edited, "foo/httpbin", 8000)


@pytest.mark.parametrize("before, after, port, verdict", [
    # a DENY of namespace default made AUDIT: AUDIT decides nothing, so sleep is let in
    ("action: DENY\nrules: [{from: [{source: {namespaces: [default]}}]}]",
     "action: AUDIT\nrules: [{from: [{source: {namespaces: [default]}}]}]", 80, True),
    # an ALLOW of namespace bar made AUDIT: no ALLOW applies any more, so sleep is let in
    ("action: ALLOW\nrules: [{from: [{source: {namespaces: [bar]}}]}]",
     "action: AUDIT\nrules: [{from: [{source: {namespaces: [bar]}}]}]", 80, True),
    # a DENY of namespace bar made CUSTOM on port 80: its rules are a DENY, so port 80 is denied
    ("action: DENY\nrules: [{from: [{source: {namespaces: [bar]}}]}]",
     "action: CUSTOM\nprovider: {name: ext}\nrules: [{to: [{operation: {ports: ['80']}}]}]", 80, False),
])
def test_a_policy_edited_into_an_action_nodeagent_lacks_reads_as_on_a_fresh_agent(before, after, port, verdict):
    """AUDIT and CUSTOM are Istio's, refused by nodeagent for want of a provider: such an
    edit is no bad edit to ride out with the last good version, or a running agent and a
    restarted one would decide the same connection differently (the first DENY to CUSTOM
    let port 80 in on the running agent)."""
    selector = "selector: {matchLabels: {app: httpbin}}\n"
    first, errors = build(policy("foo", "p", selector + before))
    assert errors == []
    running, [err] = build(policy("foo", "p", selector + after), previous=first)
    fresh, [err_fresh] = build(policy("foo", "p", selector + after))
    assert str(err) == str(err_fresh) and "last good version" not in str(err)
    assert allowed(running, "foo/httpbin", port) is allowed(fresh, "foo/httpbin", port) is verdict
    assert allowed(running, "foo/httpbin", 8000)  # the CUSTOM one's rules name port 80 alone; the others decide nothing
