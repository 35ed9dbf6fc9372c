"""The enrolment decision as a pure function (model + node + enrolled -> plan), and how
the reconciler retries pods it cannot enrol yet."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from nodeagent.agent.inpod.enrolment import Enroller, Handlers, Plan, Ports, Wanted, plan, wanted_pods
from nodeagent.agent.metrics import AgentMetrics
from nodeagent.agent.inpod.podns import PodNotFound
from nodeagent.kube.objects import parse_documents
from nodeagent.model import Model

NODE = "n1"


def ns(name: str, mode: str | None = "ambient") -> str:
    labels = f"\n  labels: {{istio.io/dataplane-mode: {mode}}}" if mode else ""
    return f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n"


def pod(name: str, namespace: str = "app", *, uid: str | None = None, node: str = NODE,
        ip: str | None = "10.244.1.2", phase: str = "Running", labels: str = "", annotations: str = "") -> str:
    meta = f"  name: {name}\n  namespace: {namespace}\n"
    if uid != "":
        meta += f"  uid: {uid or 'uid-' + name}\n"
    if labels:
        meta += f"  labels: {{{labels}}}\n"
    if annotations:
        meta += f"  annotations: {{{annotations}}}\n"
    status = f"  phase: {phase}\n" + (f"  podIP: {ip}\n" if ip else "")
    return f"apiVersion: v1\nkind: Pod\nmetadata:\n{meta}spec:\n  nodeName: {node}\nstatus:\n{status}"


def model(*docs: str) -> Model:
    return Model.build(parse_documents("---\n".join(docs), "test.yaml"))


def enrolled(m: Model) -> dict[str, Wanted]:
    return wanted_pods(m, NODE)[0]


def test_meshed_local_running_pods_are_enrolled():
    m = model(ns("app"), pod("a", ip="10.244.1.2"), pod("b", ip="10.244.1.3"))
    p = plan(m, NODE, {})
    assert sorted(w.name for w in p.enrol) == ["a", "b"]
    assert p.remove == () and p.update == () and p.waiting == ()
    assert {w.uid for w in p.enrol} == {"uid-a", "uid-b"}


def test_nothing_to_do_when_in_sync():
    m = model(ns("app"), pod("a"))
    assert plan(m, NODE, enrolled(m)) == Plan()


def test_unlabelled_namespace_is_not_meshed():
    m = model(ns("app", None), pod("a"))
    assert plan(m, NODE, {}) == Plan()


def test_namespace_label_change_enrols_then_removes():
    off = model(ns("app", None), pod("a"))
    on = model(ns("app"), pod("a"))
    p = plan(on, NODE, enrolled(off))
    assert [w.name for w in p.enrol] == ["a"]
    p = plan(off, NODE, enrolled(on))
    assert p.remove == ("uid-a",) and p.enrol == ()


def test_pod_opt_out_label():
    m = model(ns("app"), pod("a", labels="istio.io/dataplane-mode: none"), pod("b", ip="10.244.1.3"))
    assert [w.name for w in plan(m, NODE, {}).enrol] == ["b"]
    before = model(ns("app"), pod("a"))
    assert plan(m, NODE, enrolled(before)).remove == ("uid-a",)


def test_pod_on_other_node_is_ignored():
    m = model(ns("app"), pod("a", node="n2"))
    assert plan(m, NODE, {}) == Plan()


def test_pod_without_ip_uid_or_not_pending_or_running_waits():
    """A Pending pod with its status.podIP (its sandbox up: init containers may run) is
    enrolled, as a Running one; without the IP, or finished or Unknown, it waits."""
    m = model(ns("app"), pod("noip", ip=None), pod("nouid", uid="", ip="10.244.1.4"),
              pod("pending", phase="Pending", ip="10.244.1.5"), pod("starting", phase="Pending", ip=None),
              pod("lost", phase="Unknown", ip="10.244.1.6"), pod("done", phase="Succeeded", ip="10.244.1.7"))
    p = plan(m, NODE, {})
    assert [w.name for w in p.enrol] == ["pending"]
    reasons = {w.name: w.reason for w in p.waiting}
    assert "podIP" in reasons["noip"] and "podIP" in reasons["starting"]
    assert "uid" in reasons["nouid"]
    assert (reasons["lost"], reasons["done"]) == ("phase is Unknown, not Pending or Running",
                                                  "phase is Succeeded, not Pending or Running")


def test_pod_that_stops_running_is_removed():
    running = model(ns("app"), pod("a"))
    done = model(ns("app"), pod("a", phase="Succeeded"))
    p = plan(done, NODE, enrolled(running))
    assert p.remove == ("uid-a",) and [w.name for w in p.waiting] == ["a"]


def test_deleted_pod_is_removed():
    before = model(ns("app"), pod("a"))
    assert plan(model(ns("app")), NODE, enrolled(before)).remove == ("uid-a",)


def test_recreated_pod_same_name_new_uid():
    before = model(ns("app"), pod("a", uid="old"))
    after = model(ns("app"), pod("a", uid="new"))
    p = plan(after, NODE, enrolled(before))
    assert p.remove == ("old",) and [w.uid for w in p.enrol] == ["new"]


def test_new_ip_is_remove_then_enrol():
    before = model(ns("app"), pod("a", ip="10.244.1.2"))
    after = model(ns("app"), pod("a", ip="10.244.1.9"))
    p = plan(after, NODE, enrolled(before))
    assert p.remove == ("uid-a",) and [w.ip for w in p.enrol] == ["10.244.1.9"] and p.update == ()


def test_a_dual_stack_pods_other_address_is_wanted_and_a_change_of_it_is_remove_then_enrol():
    dual = pod("a", ip="10.244.1.2").replace("  podIP: 10.244.1.2\n",
                                             "  podIP: 10.244.1.2\n  podIPs: [{ip: 10.244.1.2}, {ip: 'fd00::2'}]\n")
    before, after = model(ns("app"), pod("a", ip="10.244.1.2")), model(ns("app"), dual)
    assert [w.ips for w in enrolled(after).values()] == [["10.244.1.2", "fd00::2"]]
    p = plan(after, NODE, enrolled(before))  # the refusal of the new address goes in with a new enrolment
    assert p.remove == ("uid-a",) and [w.other_ips for w in p.enrol] == [("fd00::2",)] and p.update == ()
    back = plan(before, NODE, enrolled(after))
    assert back.remove == ("uid-a",) and [w.other_ips for w in back.enrol] == [()]


def test_excluded_ports_change_is_an_update():
    before = model(ns("app"), pod("a"))
    after = model(ns("app"), pod("a", annotations='traffic.sidecar.istio.io/excludeOutboundPorts: "5432, 6379"'))
    p = plan(after, NODE, enrolled(before))
    assert p.enrol == () and p.remove == ()
    assert [w.exclude_outbound for w in p.update] == [frozenset({5432, 6379})]


def test_label_change_other_than_mode_changes_nothing():
    before = model(ns("app"), pod("a", labels="app: web"))
    after = model(ns("app"), pod("a", labels="app: api"))
    assert plan(after, NODE, enrolled(before)) == Plan()


def test_duplicate_uid_waits():
    m = model(ns("app"), pod("a", uid="same"), pod("b", uid="same", ip="10.244.1.3"))
    p = plan(m, NODE, {})
    assert [w.name for w in p.enrol] == ["a"]
    assert [w.name for w in p.waiting] == ["b"]


# --- the reconciler's handling of pods it cannot enrol yet (no kernel needed) --------


class NoPodsResolver:
    def __init__(self):
        self.asked: list[list[str]] = []

    def resolve_many(self, uids, ips=None):
        uids = list(uids)
        self.asked.append(uids)
        return {u: PodNotFound(f"no process of pod {u}", "retrying") for u in uids}

    def forget(self, uid):
        pass

    def close(self):
        pass


def test_a_pending_pod_without_netns_is_tried_again_at_once_when_it_runs():
    """The lab gives a pod its IP while Pending, before it has a process: the attempt
    finds no netns and backs off, and the pod's move to Running is worth a try at once
    (else its enrolment lagged up to the backoff's 2 s behind its start)."""
    now = [100.0]
    resolver = NoPodsResolver()
    enroller = Enroller(node=NODE, capture=None, resolver=resolver, ports=Ports(15001, 15006, 15008),
                        handlers=Handlers(None, None, None), delivery_mark=0x1539,
                        metrics=AgentMetrics(CollectorRegistry()), log=logging.getLogger("test"),
                        clock=lambda: now[0])
    pending = model(ns("app"), pod("a", phase="Pending"))
    asyncio.run(enroller.reconcile(pending))
    asyncio.run(enroller.reconcile(pending))  # nothing changed, backing off: not asked again
    assert resolver.asked == [["uid-a"]] and enroller.failures["uid-a"].phase == "Pending"
    asyncio.run(enroller.reconcile(model(ns("app"), pod("a"))))  # Running now, still within the backoff
    assert resolver.asked == [["uid-a"], ["uid-a"]]


def test_pod_without_netns_is_retried_with_backoff_and_shown():
    now = [100.0]
    resolver = NoPodsResolver()
    metrics = AgentMetrics(CollectorRegistry())
    enroller = Enroller(node=NODE, capture=None, resolver=resolver, ports=Ports(15001, 15006, 15008),
                        handlers=Handlers(None, None, None), delivery_mark=0x1539, metrics=metrics,
                        log=logging.getLogger("test"), clock=lambda: now[0])
    m = model(ns("app"), pod("a"), pod("noip", ip=None))

    asyncio.run(enroller.reconcile(m))
    assert resolver.asked == [["uid-a"]] and enroller.enrolled == {}
    waiting = {w["name"]: w["reason"] for w in enroller.describe()["waiting"]}
    assert "no process of pod uid-a" in waiting["a"] and "podIP" in waiting["noip"]
    assert metrics.snapshot()["enrolment_failures_total{reason=netns_not_found}"] == 1

    assert not enroller.retry_due()  # backoff: not before 0.1 s
    asyncio.run(enroller.reconcile(m))
    assert resolver.asked == [["uid-a"]]
    now[0] += 0.1
    assert enroller.retry_due()
    asyncio.run(enroller.reconcile(m))
    assert resolver.asked == [["uid-a"], ["uid-a"]]
    assert enroller.failures["uid-a"].attempts == 2
    now[0] += 0.15
    assert not enroller.retry_due()  # doubled to 0.2 s
    now[0] += 0.05
    assert enroller.retry_due()

    asyncio.run(enroller.reconcile(model(ns("app", None), pod("a"))))  # left the mesh
    assert enroller.failures == {} and enroller.describe()["waiting"] == []


def test_refresh_gives_an_enrolled_pod_its_own_labels_never_a_new_pods_of_the_same_name():
    """A StatefulSet's pod deleted and made again keeps its name with a new UID (and
    account, labels, IP): until the reconcile swaps the enrolments, the old pod's netns
    must go on being read as the old pod, not take the new one's identity and labels."""
    from nodeagent.agent.inpod.enrolment import Enrolment
    from nodeagent.agent.inpod.sockets import PodContext

    enroller = Enroller(node=NODE, capture=None, resolver=None, ports=Ports(15001, 15006, 15008),
                        handlers=Handlers(None, None, None), delivery_mark=0x1539,
                        metrics=AgentMetrics(CollectorRegistry()), log=logging.getLogger("test"))
    first = model(ns("app"), pod("db-0", uid="u1"))
    old = first.pods[("app", "db-0")]
    ctx = PodContext(old, -1, 7)
    enroller.enrolled["u1"] = Enrolment(Wanted.of(old), ctx, 1, [], 0.0)
    enroller.refresh(model(ns("app"), pod("db-0", uid="u1", labels="tier: db")))
    assert ctx.pod.labels == {"tier": "db"}  # its own new labels
    enroller.refresh(model(ns("app"), pod("db-0", uid="u2", ip="10.244.1.9", labels="tier: other")))
    assert (ctx.pod.uid, ctx.pod.labels) == ("u1", {"tier": "db"})  # not the new pod's


def test_a_hostnetwork_pod_of_a_meshed_namespace_waits_with_the_reason_and_is_not_meshed():
    """Its IP is the node's: it cannot be enrolled (its netns is the agent's), and a client
    that tunnelled to it as a meshed pod reached no pod's agent (a connection that failed
    every time). Not meshed, so reached plaintext, and listed where the user looks."""
    m = model(ns("app"), pod("a"), pod("hn", ip="172.30.0.2").replace("nodeName: n1", "nodeName: n1\n  hostNetwork: true"))
    wanted, waiting = wanted_pods(m, NODE)
    assert list(wanted) == ["uid-a"] and not m.is_meshed(m.pods[("app", "hn")])
    assert [(w.name, w.reason) for w in waiting] == [
        ("hn", "a hostNetwork pod shares the node's network namespace and cannot be meshed: label it "
               "istio.io/dataplane-mode=none")]
    opted_out = model(ns("app"), pod("hn", ip="172.30.0.2", labels="istio.io/dataplane-mode: none").replace(
        "nodeName: n1", "nodeName: n1\n  hostNetwork: true"))
    assert wanted_pods(opted_out, NODE) == ({}, [])


def test_a_pod_that_goes_leaves_the_capture_entries_another_pod_holds():
    """Capture entries are keyed by IP alone: removing stale state, ending a refusal or
    removing a pod must leave the IPs (a dual-stack pod's other one included) that an
    adopted pod (a rolling update's old agent still serves it), a refused replacement or
    an enrolled pod needs, or that pod's app would take plaintext around the mesh."""
    from agent_world import CaptureMaps
    from nodeagent.agent.inpod.enrolment import Failure
    from nodeagent.agent.inpod.sockets import PodContext

    capture = CaptureMaps(left={901: [], 902: []})
    enroller = Enroller(node=NODE, capture=capture, resolver=None, ports=Ports(15001, 15006, 15008),
                        handlers=Handlers(None, None, None), delivery_mark=0x1539,
                        metrics=AgentMetrics(CollectorRegistry()), log=logging.getLogger("test"))
    dual = pod("a", ip="10.244.1.2").replace("  podIP: 10.244.1.2\n",
                                             "  podIP: 10.244.1.2\n  podIPs: [{ip: 10.244.1.2}, {ip: 'fd00::2'}]\n")
    m = model(ns("app"), dual, pod("b", ip="10.244.1.3"), pod("c", ip="10.244.1.4", namespace="plain"))
    a, b = (Wanted.of(m.pods[("app", n)]) for n in ("a", "b"))
    enroller.failures["uid-a"] = Failure(a, "listeners held by the old agent", adopted_cookie=901)
    assert enroller.remove_stale(m) == [902]
    assert capture.named("unsteer_inbound") == [("unsteer_inbound", 902, ["10.244.1.3", "10.244.1.4"])]
    # b's IP given to a replacement b2 whose enrolment failed too: both refused
    b2 = Wanted("uid-b2", "app", "b2", b.ip)
    enroller.failures["uid-b"] = Failure(b, "x", refused_cookie=7)
    enroller.failures["uid-b2"] = Failure(b2, "x", refused_cookie=8)
    enroller._stop_refusing(enroller.failures.pop("uid-b"))
    enroller._stop_capture(PodContext(m.pods[("app", "b")], -1, 7), b)
    assert capture.named("unsteer_inbound")[1:] == [("unsteer_inbound", 7, []), ("unsteer_inbound", 7, [])]
    enroller._stop_refusing(enroller.failures.pop("uid-b2"))  # the last to hold it
    assert capture.named("unsteer_inbound")[-1] == ("unsteer_inbound", 8, [b.ip])


def test_the_address_the_node_reaches_a_pod_from_is_reread_at_most_every_ten_seconds(monkeypatch):
    """kubelet's probes are told by it (inbound.py); the routes rarely change, and a model
    change can come many times a second: one UDP connect per enrolled pod per refresh
    would cost the agent a share of a CPU on a busy cluster."""
    from nodeagent.agent.inpod import sockets as inpod
    from nodeagent.agent.inpod.enrolment import SOURCES_EVERY, Enrolment
    from nodeagent.agent.inpod.sockets import PodContext

    asked, answer, now = [], ["10.0.0.1"], [100.0]
    monkeypatch.setattr(inpod, "source_towards", lambda ip: asked.append(ip) or answer[0])
    enroller = Enroller(node=NODE, capture=None, resolver=None, ports=Ports(15001, 15006, 15008),
                        handlers=Handlers(None, None, None), delivery_mark=0x1539,
                        metrics=AgentMetrics(CollectorRegistry()), log=logging.getLogger("test"),
                        clock=lambda: now[0])
    m = model(ns("app"), pod("a"))
    ctx = PodContext(m.pods[("app", "a")], -1, 7, node_source="10.0.0.9")
    enroller.enrolled["uid-a"] = Enrolment(Wanted.of(ctx.pod), ctx, 1, [], 0.0)
    enroller.refresh(m)
    assert (asked, ctx.node_source) == (["10.244.1.2"], "10.0.0.1")  # the first refresh reads it
    answer[0] = "10.0.0.2"
    now[0] += SOURCES_EVERY - 0.1
    enroller.refresh(m)
    assert (len(asked), ctx.node_source) == (1, "10.0.0.1")
    now[0] += 0.1
    enroller.refresh(m)
    assert (len(asked), ctx.node_source) == (2, "10.0.0.2")
