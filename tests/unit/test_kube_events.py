"""Events for refused or unsupported Istio resources (nodeagent/kube/events.py): which
resource gets which reason and message, the Event's deterministic name, and the
Reporter's decisions (write once per problem, again only when re-reported, forget a
fixed one, per-resource and global token buckets). Pure: no API server."""

from __future__ import annotations

import asyncio

from nodeagent.kube import events
from nodeagent.kube.events import Problem, Ref, Reporter
from nodeagent.kube.objects import object_from_dict
from nodeagent.xds.istio.problems import problems
from nodeagent.model import Model
from nodeagent.agent.proxy.policies import kind_verdicts
from nodeagent.xds.istio.config import IstioConfig


def obj(kind: str, name: str, spec: dict, api: str = "networking.istio.io/v1", rv: str = "1", uid: str = ""):
    return object_from_dict({"apiVersion": api, "kind": kind,
                             "metadata": {"name": name, "namespace": "shop", "uid": uid or f"uid-{name}",
                                          "resourceVersion": rv},
                             "spec": spec}, "kube")


GATEWAY = obj("Gateway", "gw", {"servers": []})
SIDECAR = obj("Sidecar", "default", {})
BAD_REGEX = obj("VirtualService", "web", {"hosts": ["web"], "http": [
    {"match": [{"uri": {"regex": "(unclosed"}}], "route": [{"destination": {"host": "web"}}]}]})
GOOD = obj("VirtualService", "ok", {"hosts": ["ok"], "http": [{"route": [{"destination": {"host": "ok"}}]}]})
POD = object_from_dict({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
                        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]}}, "kube")


def verdicts(objects):
    """The texts the agent's status holds for `objects` (its policies' kinds and the waypoint's validation)."""
    model = Model.build(objects)
    config = IstioConfig.build(model)
    kinds = kind_verdicts(model)
    errors = [*kinds["errors"], *(str(e) for e in config.errors)]
    warnings = [w for w in [*kinds["warnings"], *(str(w) for w in config.warnings)]
                if "not in force" in w or "not applicable" in w]
    return errors, warnings


def test_each_resource_gets_one_problem_with_its_reason_and_the_verdicts_message():
    objects = [GATEWAY, SIDECAR, BAD_REGEX, GOOD, POD]
    found = {p.ref.label: p for p in problems(objects, *verdicts(objects))}
    assert sorted(found) == ["Gateway shop/gw", "Sidecar shop/default", "VirtualService shop/web"]
    assert found["Gateway shop/gw"].reason == "NotSupportedInAmbient"
    assert found["Gateway shop/gw"].message.startswith("kube (Gateway shop/gw) kind: not supported in ambient mode")
    assert found["Sidecar shop/default"].reason == "NotApplicable"
    vs = found["VirtualService shop/web"]
    assert vs.reason == "Refused"
    assert "kube (VirtualService shop/web)" in vs.message and "regex" in vs.message and "\n" not in vs.message
    assert vs.ref == Ref("networking.istio.io/v1", "VirtualService", "shop", "web", "uid-web", "1")


def test_texts_of_one_resource_and_reason_are_joined_on_one_line_and_clipped():
    texts = ["kube (VirtualService shop/ok) spec.a: bad", "kube (VirtualService shop/ok) spec.b: worse\n  why"]
    [p] = problems([GOOD], texts)
    assert p.message == "kube (VirtualService shop/ok) spec.a: bad; kube (VirtualService shop/ok) spec.b: worse; why"
    [p] = problems([GOOD], ["kube (VirtualService shop/ok) " + "x" * 5000])
    assert len(p.message) == events.MAX_MESSAGE and p.message.endswith("...")


def test_a_refused_objects_identity_from_the_source_is_enough():
    ref = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
           "metadata": {"namespace": "shop", "name": "broken", "uid": "u1", "resourceVersion": "7"}}
    [p] = problems([ref], ["kube (VirtualService shop/broken): spec must be a map"])
    assert (p.ref.uid, p.ref.resource_version, p.reason) == ("u1", "7", "Refused")


def test_the_event_name_is_deterministic_per_object_and_reason():
    ref = events.ref_of(BAD_REGEX)
    name = events.event_name(ref, "Refused")
    assert name == events.event_name(events.ref_of(obj("VirtualService", "web", {}, rv="9")), "Refused")
    assert name.startswith("web.") and len(name) == len("web.") + 16
    others = {events.event_name(ref, "NotInForce"),
              events.event_name(events.ref_of(obj("VirtualService", "web", {}, uid="other")), "Refused"),
              events.event_name(events.ref_of(obj("DestinationRule", "web", {})), "Refused")}
    assert name not in others and len(others) == 3
    long = events.event_name(Ref("networking.istio.io/v1", "Sidecar", "ns", "n" * 253), "NotApplicable")
    assert len(long) <= 253


def test_the_event_body_names_the_object_and_the_reporting_node():
    [p] = problems([BAD_REGEX], ["kube (VirtualService shop/web) spec: bad"])
    body = events.event_body(p, "node-1", 0.0)
    assert body["metadata"] == {"name": events.event_name(p.ref, "Refused"), "namespace": "shop"}
    assert body["involvedObject"] == {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                                      "namespace": "shop", "name": "web", "uid": "uid-web", "resourceVersion": "1"}
    assert (body["type"], body["reason"], body["count"]) == ("Warning", "Refused", 1)
    assert body["source"] == {"component": "nodeagent", "host": "node-1"}
    assert (body["reportingComponent"], body["reportingInstance"]) == ("nodeagent", "node-1")
    assert body["firstTimestamp"] == body["lastTimestamp"] == "1970-01-01T00:00:00Z"


def problem(name: str = "web", rv: str = "1", message: str = "bad", reason: str = "Refused") -> Problem:
    return Problem(Ref("networking.istio.io/v1", "VirtualService", "shop", name, f"uid-{name}", rv), reason, message)


def test_a_problem_is_written_once_and_again_only_when_re_reported():
    r = Reporter()
    assert r.report([problem()], 0) == [problem()]
    assert r.report([problem()], 1) == []  # the same verdict on the same version: nothing
    assert r.report([problem(rv="2")], 2) == [problem(rv="2")]  # changed, still bad: re-reported
    assert r.report([problem(rv="2", message="worse")], 3) == [problem(rv="2", message="worse")]
    assert r.report([], 4) == []  # fixed: nothing written, and forgotten
    assert r.reported == {}
    assert r.report([problem(rv="3")], 200) == [problem(rv="3")]  # broken again: reported again


def test_one_resource_cannot_write_more_than_its_bucket():
    r = Reporter(per_object=(3, 1 / 60))
    written = [r.report([problem(rv=str(i))], i) for i in range(10)]  # a new bad version every second
    assert [len(w) for w in written] == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert r.counts == {"reported": 3, "dropped_rate": 7}
    assert r.report([problem(rv="9")], 70) == [problem(rv="9")]  # a token back after a minute: the latest


def test_a_flood_of_bad_resources_is_bounded_by_the_global_bucket_and_the_rest_tried_later():
    r = Reporter(overall=(25, 1.0))
    flood = [problem(name=f"vs{i}") for i in range(100)]
    assert len(r.report(flood, 0)) == 25
    assert r.counts["dropped_rate"] == 75
    assert len(r.report(flood, 10)) == 10  # ten tokens in ten seconds; the written ones are not written again
    assert len(r.report(flood, 1000)) == 25
    assert len(r.reported) == 60


def test_the_token_bucket_refills_at_its_rate_up_to_its_burst():
    b = events.TokenBucket(2, 0.5)
    assert [b.take(0), b.take(0), b.take(0)] == [True, True, False]
    assert b.take(2) and not b.take(2)
    assert not b.full(2) and b.full(100)


def test_submit_never_waits_a_full_queue_drops_and_counts_and_the_problem_is_tried_again():
    async def main():
        writer = events.EventWriter(client=None, node="n1", queue_size=2, clock=lambda: 0.0)
        writer.bind(asyncio.get_running_loop())  # nobody drains it here
        writer.submit([problem(name=f"vs{i}") for i in range(5)])
        await asyncio.sleep(0)  # the puts run on the loop
        return writer

    writer = asyncio.run(main())
    assert writer.describe() == {"open": 2, "reported": 5, "dropped_rate": 0, "created": 0, "patched": 0,
                                 "dropped_queue": 3, "failures": 0}
    assert len(writer.reporter.reported) == 2  # the three dropped are written with the next verdicts


def test_submit_without_a_running_writer_drops_and_counts():
    writer = events.EventWriter(client=None, node="n1")
    writer.submit([problem()])
    assert writer.describe()["dropped_queue"] == 1 and writer.reporter.reported == {}



def test_an_object_the_kube_source_refuses_gets_its_event_until_fixed_or_deleted():
    from nodeagent.sources.kube import KINDS, Store
    store = Store(next(k for k in KINDS if k.kind == "VirtualService"))
    meta = {"name": "r", "namespace": "shop", "uid": "u1", "resourceVersion": "5"}
    store.apply({"type": "ADDED", "object": {"metadata": {**meta, "labels": "x"}, "spec": {}}})
    refused = [(store.refused[name], store.errors[name]) for name in store.refused]
    [p] = problems([], [], [], refused)  # its message names it without its namespace
    assert p == Problem(Ref("networking.istio.io/v1", "VirtualService", "shop", "r", "u1", "5"), "Refused",
                        "kube (VirtualService r): metadata.labels must be a map of strings, not str")
    store.apply({"type": "MODIFIED", "object": {"metadata": {**meta, "resourceVersion": "6"}, "spec": {}}})
    assert store.refused == {} and store.errors == {}
    store.apply({"type": "MODIFIED", "object": {"metadata": {**meta, "labels": 1, "resourceVersion": "7"}}})
    assert list(store.refused) == ["VirtualService shop/r"]
    store.apply({"type": "DELETED", "object": {"metadata": {**meta, "resourceVersion": "8"}}})
    assert store.refused == {}
