"""Whether an agent's stop is an uninstall (nodeagent/kube/owner.py), issue 13: the pure
decision over everything it can have seen, and how recorded API objects and watch events
(plain dicts, as the API server sends them) become what it has seen. The API's real
answers and a real `kubectl delete -k` are the e2e tier's (the lab's API server)."""

from __future__ import annotations

import itertools

import pytest

from nodeagent.kube.client import KubeApiError
from nodeagent.kube.owner import (ExitDecision, Owner, OwnerWatch, Seen, controller_of, daemonset_ending,
                                  decide, namespace_ending)

NS, POD = "nodeagent-system", "nodeagent-x1"
OWNER = Owner("DaemonSet", "nodeagent", "ds-1")


def pod(*refs: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": POD, "namespace": NS, "uid": "pod-1", "ownerReferences": list(refs)}}


def ref(kind="DaemonSet", name="nodeagent", uid="ds-1", controller=True) -> dict:
    return {"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": uid, "controller": controller,
            "blockOwnerDeletion": True}


def daemonset(uid="ds-1", deleting: str | None = None) -> dict:
    meta = {"name": "nodeagent", "namespace": NS, "uid": uid, "resourceVersion": "7"}
    if deleting:
        meta.update(deletionTimestamp=deleting, finalizers=["foregroundDeletion"])
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": meta}


def namespace(phase="Active", deleting: str | None = None) -> dict:
    meta = {"name": NS, "uid": "ns-1", **({"deletionTimestamp": deleting} if deleting else {})}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta, "status": {"phase": phase}}


# --- the decision, every combination ------------------------------------------------

OWNERS = {"unread": None, "none": None, "daemonset": OWNER, "other uid": Owner("DaemonSet", "nodeagent", "ds-2"),
          "replicaset": Owner("ReplicaSet", "x", "ds-1")}
ENDED = {"nothing": {}, "owner deleted": {"ds-1": "was deleted"},
         "another deleted": {"ds-0": "was deleted"}}


@pytest.mark.parametrize("owner, ended, ns_ending, absent, error", list(itertools.product(
    OWNERS, ENDED, ("", "Namespace nodeagent-system is Terminating"), ("", "ds-1"), ("", "403 Forbidden"))))
def test_capture_is_removed_only_on_evidence_the_installation_is_going(owner, ended, ns_ending, absent, error):
    seen = Seen(NS, POD, pod_read=owner != "unread", owner=OWNERS[owner], namespace_ending=ns_ending,
                ended=dict(ENDED[ended]), confirmed_absent=absent, error=error)
    got = decide(seen)
    owned = owner == "daemonset"  # the pod's controller is the DaemonSet ds-1
    expected = bool(ns_ending) or (owned and (ended == "owner deleted" or absent == "ds-1"))
    assert got.remove is expected, got
    if ns_ending:
        assert got.reason == ns_ending
    elif got.remove:
        assert got.reason.startswith("DaemonSet nodeagent-system/nodeagent (uid ds-1) ")
    elif error:
        assert got.reason.endswith(f"(last API error: {error})")  # doubt keeps, and says why


@pytest.mark.parametrize("seen, reason", [
    (Seen(NS, POD), "own pod nodeagent-system/nodeagent-x1 never read from the API"),
    (Seen(NS, POD, pod_read=True), "pod nodeagent-system/nodeagent-x1 has no controlling owner"),
    (Seen(NS, POD, pod_read=True, owner=Owner("ReplicaSet", "x", "r")),
     "pod nodeagent-system/nodeagent-x1 is owned by ReplicaSet x, not a DaemonSet"),
    (Seen(NS, POD, pod_read=True, owner=OWNER),
     "DaemonSet nodeagent-system/nodeagent (uid ds-1) is in place (a rolling update, or the pod deleted by hand)"),
    (Seen(NS, POD, pod_read=True, owner=OWNER, ended={"ds-1": "was deleted"}),
     "DaemonSet nodeagent-system/nodeagent (uid ds-1) was deleted"),
    (Seen(NS, POD, pod_read=True, owner=OWNER, confirmed_absent="ds-1"),
     "DaemonSet nodeagent-system/nodeagent (uid ds-1) was deleted (absent from a list read after the pod)"),
])
def test_each_decision_says_why(seen, reason):
    assert decide(seen).reason == reason


def test_the_decision_reads_as_a_log_line():
    assert str(ExitDecision(True, "Namespace x is Terminating")) == \
        "removing capture (as `nodeagent uninstall`): Namespace x is Terminating"
    assert str(ExitDecision(False, "r")) == "keeping capture for the next agent: r"


# --- objects and events -------------------------------------------------------------

def test_the_controller_reference_is_the_owner():
    assert controller_of(pod(ref(controller=False, uid="x"), ref())) == OWNER
    assert controller_of(pod(ref(controller=False))) is None
    assert controller_of(pod()) is None
    assert controller_of({"metadata": {}}) is None


def test_how_a_namespace_and_a_daemonset_are_seen_ending():
    assert namespace_ending(namespace()) == ""
    assert namespace_ending(namespace("Terminating")) == "Namespace nodeagent-system is Terminating"
    assert namespace_ending(namespace(deleting="2026-12-02T16:00:00Z")) == "Namespace nodeagent-system is Terminating"
    assert namespace_ending(namespace(), deleted=True) == "Namespace nodeagent-system was deleted"
    assert daemonset_ending(daemonset()) == ""
    assert daemonset_ending(daemonset(deleting="2026-12-02T16:00:00Z")) == \
        "is being deleted (deletionTimestamp 2026-12-02T16:00:00Z)"
    assert daemonset_ending(daemonset(), deleted=True) == "was deleted"


def watch() -> OwnerWatch:
    return OwnerWatch(client=None, namespace=NS, pod=POD)


def test_a_rolling_update_keeps_capture():
    w = watch()
    w._pods([pod(ref())])
    w._daemonsets([daemonset()])
    w._namespaces([namespace()])
    w._daemonset_event("MODIFIED", daemonset())  # template changed: a new generation, same UID
    w._pod_event("MODIFIED", {**pod(ref()), "metadata": {**pod(ref())["metadata"],
                                                        "deletionTimestamp": "2026-12-02T16:00:00Z"}})
    assert not w.decision().remove


def test_a_background_delete_of_the_daemonset_removes_capture():
    w = watch()
    w._pods([pod(ref())])
    w._daemonsets([daemonset()])
    w._daemonset_event("DELETED", daemonset())
    w._pod_event("DELETED", pod(ref()))  # the pod going keeps its last owner
    assert w.decision() == ExitDecision(True, "DaemonSet nodeagent-system/nodeagent (uid ds-1) was deleted")


def test_a_foreground_delete_is_seen_by_its_deletion_timestamp():
    w = watch()
    w._pods([pod(ref())])
    w._daemonset_event("MODIFIED", daemonset(deleting="2026-12-02T16:00:00Z"))
    assert w.decision().remove


def test_a_relist_without_the_daemonset_means_it_was_deleted():
    w = watch()
    w._pods([pod(ref())])
    w._daemonsets([daemonset()])
    w._daemonsets([daemonset(uid="ds-2")])  # after a 410: deleted and applied again while not watching
    assert w.decision() == ExitDecision(True, "DaemonSet nodeagent-system/nodeagent (uid ds-1) was deleted "
                                              "(absent from a later list)")


def test_a_first_list_without_the_owner_proves_nothing():
    """The DaemonSets' list may have been read before the pod named its owner (orphaned and
    adopted by a new DaemonSet): only a UID seen present and then absent ended."""
    w = watch()
    w._daemonsets([])
    w._pods([pod(ref(uid="ds-new"))])
    assert not w.decision().remove


def test_an_orphaned_pod_adopted_by_a_new_daemonset_follows_its_new_owner():
    w = watch()
    w._pods([pod(ref())])
    w._daemonsets([daemonset()])
    w._daemonset_event("DELETED", daemonset())  # kubectl delete --cascade=orphan
    w._pod_event("MODIFIED", pod())  # the garbage collector removed the reference
    w._daemonset_event("ADDED", daemonset(uid="ds-2"))
    w._pod_event("MODIFIED", pod(ref(uid="ds-2")))  # adopted
    assert w.decision() == ExitDecision(False, "DaemonSet nodeagent-system/nodeagent (uid ds-2) is in place "
                                               "(a rolling update, or the pod deleted by hand)")


def test_the_namespace_terminating_removes_capture_even_if_nothing_else_was_read():
    w = watch()
    w._namespace_event("MODIFIED", namespace("Terminating"))
    w._namespace_event("MODIFIED", namespace())  # cannot come back; the first evidence stays
    assert w.decision() == ExitDecision(True, "Namespace nodeagent-system is Terminating")


def test_an_api_error_is_the_reason_of_a_kept_capture():
    w = watch()
    w._pods([pod(ref())])
    w._failed(KubeApiError("daemonsets.apps in nodeagent-system", "403 Forbidden: daemonsets.apps is forbidden",
                           403))
    decision = w.decision()
    assert not decision.remove and decision.reason.endswith(
        "(last API error: daemonsets.apps in nodeagent-system: 403 Forbidden: daemonsets.apps is forbidden)")
    assert w.describe() == {"owner": "DaemonSet nodeagent (uid ds-1)", "at_exit": str(decision)}


def test_an_error_is_forgotten_once_its_resource_answers_again():
    w = watch()
    w._pods([pod(ref())])
    w._failed(KubeApiError("daemonsets.apps in nodeagent-system", "no answer"))
    w._failed(KubeApiError("namespace nodeagent-system", "403 Forbidden"))
    assert w.seen.error == "daemonsets.apps in nodeagent-system: no answer; namespace nodeagent-system: 403 Forbidden"
    w._answered("daemonsets.apps in nodeagent-system")
    assert w.seen.error == "namespace nodeagent-system: 403 Forbidden"
    w._answered("namespace nodeagent-system")
    assert w.decision().reason == ("DaemonSet nodeagent-system/nodeagent (uid ds-1) is in place "
                                   "(a rolling update, or the pod deleted by hand)")


def test_the_watches_select_the_agents_own_objects():
    w = watch()
    assert (w.pods[0].path, w.pods[1]) == (f"/api/v1/namespaces/{NS}/pods", {"fieldSelector": f"metadata.name={POD}"})
    assert (w.namespaces[0].path, w.namespaces[1]) == ("/api/v1/namespaces", {"fieldSelector": f"metadata.name={NS}"})
    assert (w.daemonsets[0].path, w.daemonsets[1]) == (f"/apis/apps/v1/namespaces/{NS}/daemonsets", {})
