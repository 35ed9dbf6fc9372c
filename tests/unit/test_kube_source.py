"""The kube source's pure parts: what a list and each watch event do to a kind's store
(refusing an invalid object alone), when a reflector relists, the Model it builds
against the files source's for the same objects, poll()'s gating on the first complete
list, the client's credentials and its Status errors, and the agent's source settings.
A reflector's list/watch loop runs here against a scripted API server (the bytes a
server or a proxy answers, decoded by the client's own code), and against the lab's real
API server in tests/e2e/test_lab_kube_source.py."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from nodeagent.agent import config
from nodeagent.backoff import Backoff
from nodeagent.errors import ConfigError
from nodeagent.identity.ca.keys import generate_root
from nodeagent.kube import client
from nodeagent.kube.client import Gone, KubeApiError, NotFound, TokenFile, status_error
from nodeagent.model import Model
from nodeagent.sources import kube
from nodeagent.sources.files import FilesSource
from nodeagent.sources.kube import KINDS, KubeSource, NotServed, Store, admit, next_step, trimmed

KIND = {k.kind: k for k in KINDS}

OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}, creationTimestamp: "2026-01-01T00:00:00Z"}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f-abcde
  namespace: shop
  uid: 1111
  labels: {app: web, pod-template-hash: 7d9f}
  annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: "9000"}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f, controller: true, uid: r1}]
  creationTimestamp: "2026-01-01T00:00:01Z"
  resourceVersion: "11"
  managedFields: [{manager: kubectl, operation: Apply}]
spec:
  nodeName: n1
  serviceAccountName: web
  volumes: [{name: data, emptyDir: {}}]
  containers:
  - name: main
    image: echo
    command: [sleep, infinity]
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /ready, port: http, scheme: HTTP}, periodSeconds: 3}
    livenessProbe: {exec: {command: [cat, /tmp/ok]}}
  initContainers:
  - {name: sidecar, image: proxy, restartPolicy: Always, startupProbe: {tcpSocket: {port: 15021}, periodSeconds: 1}}
status: {phase: Running, podIP: 10.244.1.7, podIPs: [{ip: 10.244.1.7}, {ip: "fd00::7"}], hostIP: 172.30.0.2,
         conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, uid: "2222", creationTimestamp: "2026-01-01T00:00:02Z"}
spec:
  nodeName: n2
  containers: [{name: main, image: db}]
status: {phase: Pending}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, creationTimestamp: "2026-01-01T00:00:03Z"}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop, creationTimestamp: "2026-01-01T00:00:04Z", resourceVersion: "14"}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web}}], timeout: 2s}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: shop, creationTimestamp: "2026-01-01T00:00:05Z"}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}
"""


def docs(text: str = OBJECTS) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def api_item(doc: dict) -> dict:
    """A list item as the API server sends it: no apiVersion or kind."""
    return {k: v for k, v in doc.items() if k not in ("apiVersion", "kind")}


def stores_from(documents: list[dict]) -> list[Store]:
    """Each kind's store after one complete list of `documents`."""
    stores = []
    for kind in KINDS:
        store = Store(kind, api_version=kind.api_version(kind.versions[0]))
        store.replace([api_item(d) for d in documents if d["kind"] == kind.kind], "100")
        stores.append(store)
    return stores


def comparable(model: Model):
    """A Model's content, the objects' `source` (a file's name, or "kube") aside."""
    resources = {kind: [(o.api_version, o.namespace, o.name, o.labels, o.annotations,
                         {**o.body, "metadata": {k: v for k, v in o.body["metadata"].items()
                                                 if k != "managedFields"}})
                        for o in objs] for kind, objs in model.resources.items()}
    return dict(model.namespaces), dict(model.pods), dict(model.services), resources


def files_model(tmp_path: Path, text: str = OBJECTS) -> Model:
    (tmp_path / "cluster").mkdir(exist_ok=True)
    (tmp_path / "cluster" / "all.yaml").write_text(text)
    model = FilesSource(tmp_path / "cluster").poll()
    assert model is not None
    return model


# --- the model ----------------------------------------------------------------------
def test_the_model_of_listed_objects_is_the_files_sources_model(tmp_path: Path):
    stores = stores_from(docs())
    model = Model.build([o for s in stores for o in s.objects.values()])
    assert comparable(model) == comparable(files_model(tmp_path))
    assert sorted(model.pods) == [("shop", "db-0"), ("shop", "web-7d9f-abcde")]  # every node's pods
    web = model.pods[("shop", "web-7d9f-abcde")]
    assert (web.node, web.ip, web.service_account, web.workload, web.ports["http"]) == \
        ("n1", "10.244.1.7", "web", "web", 8080)
    assert [o.name for o in model.resources["VirtualService"]] == ["web"]
    assert model.resources["VirtualService"][0].source == "kube"


def test_a_pod_keeps_only_what_the_model_reads_and_builds_the_same_pod():
    doc = docs()[1]
    kept = trimmed(KIND["Pod"], doc)
    assert kept["spec"] == {"nodeName": "n1", "serviceAccountName": "web",
                            "containers": [{"name": "main", "ports": [{"name": "http", "containerPort": 8080}],
                                            "readinessProbe": {"httpGet": {"port": "http"}}, "livenessProbe": {}}],
                            "initContainers": [{"name": "sidecar", "startupProbe": {"tcpSocket": {"port": 15021}}}]}
    assert kept["status"] == {"phase": "Running", "podIP": "10.244.1.7",
                              "podIPs": [{"ip": "10.244.1.7"}, {"ip": "fd00::7"}]}
    assert "managedFields" not in kept["metadata"] and kept["metadata"]["resourceVersion"] == "11"
    full = Model.build([admit(KIND["Pod"], "v1", doc)]).pods
    assert full == Model.build(parse(doc)).pods



def test_a_pods_annotations_are_kept_only_when_the_model_reads_them():
    """Every pod of the cluster is kept: its other annotations (a chart's, a controller's
    last-applied configuration) were kept whole, memory any namespace could fill."""
    doc = docs()[1]
    doc = {**doc, "metadata": {**doc["metadata"], "annotations": {
        "traffic.sidecar.istio.io/excludeInboundPorts": "8081", "kubectl.kubernetes.io/last-applied-configuration":
        "x" * 100_000, "traffic.sidecar.istio.io/excludeOutboundPorts": "6379"}}}
    assert trimmed(KIND["Pod"], doc)["metadata"]["annotations"] == {
        "traffic.sidecar.istio.io/excludeInboundPorts": "8081", "traffic.sidecar.istio.io/excludeOutboundPorts": "6379"}
    pod = Model.build([admit(KIND["Pod"], "v1", doc)]).pods[("shop", "web-7d9f-abcde")]
    assert (pod.port_list("traffic.sidecar.istio.io/excludeInboundPorts"),
            pod.port_list("traffic.sidecar.istio.io/excludeOutboundPorts")) == ({8081}, {6379})


HOST_NETWORK_POD = """
apiVersion: v1
kind: Pod
metadata: {name: exporter, namespace: shop, uid: "3333", creationTimestamp: "2026-01-01T00:00:06Z", resourceVersion: "12"}
spec:
  nodeName: n1
  hostNetwork: true
  containers: [{name: main, image: exporter}]
status: {phase: Running, podIP: 172.30.0.2, hostIP: 172.30.0.2}
"""


def test_a_host_network_pod_is_the_same_pod_from_either_source(tmp_path: Path):
    """spec.hostNetwork is kept: such a pod has the node's IP, not one of its own, and the
    model leaves it out of the IP index whichever source read it."""
    [doc] = docs(HOST_NETWORK_POD)
    assert trimmed(KIND["Pod"], doc)["spec"] == {"nodeName": "n1", "hostNetwork": True,
                                                 "containers": [{"name": "main"}]}
    model = Model.build([o for s in stores_from([doc]) for o in s.objects.values()])
    assert comparable(model) == comparable(files_model(tmp_path, HOST_NETWORK_POD))
    assert model.pods[("shop", "exporter")].host_network is True
    assert model.pod_by_ip("172.30.0.2") is None


def parse(doc: dict):
    from nodeagent.kube.objects import object_from_dict
    return [object_from_dict(doc, "x")]


def test_other_kinds_keep_their_spec_and_only_the_metadata_read():
    """Every agent keeps every object of the cluster: a tenant's 250 KB annotations (a
    controller's last-applied configuration) and status were kept whole."""
    vs = docs()[4]
    vs["metadata"].update(managedFields=[{"manager": "kubectl"}], generation=3, annotations={
        "kubectl.kubernetes.io/last-applied-configuration": "x" * 250_000, "istio.io/dry-run": "true"})
    vs["status"] = {"conditions": [{"type": "Reconciled", "message": "y" * 1000}]}
    kept = trimmed(KIND["VirtualService"], vs)
    assert kept["spec"] == vs["spec"] and "status" not in kept
    assert kept["metadata"] == {"name": vs["metadata"]["name"], "namespace": vs["metadata"]["namespace"],
                                "creationTimestamp": "2026-01-01T00:00:04Z", "generation": 3,
                                "annotations": {"istio.io/dry-run": "true"},
                                **{k: vs["metadata"][k] for k in ("uid", "resourceVersion", "labels")
                                   if k in vs["metadata"]}}
    assert trimmed(KIND["VirtualService"], kept) == kept  # trimming twice is trimming once


def test_a_list_keeps_each_page_trimmed_and_an_expired_continue_restarts_in_pages_once(tmp_path: Path):
    expired = b'{"kind":"Status","code":410,"reason":"Expired","message":"continue expired"}'
    api = Answered(cluster(tmp_path), (200, pod_list("7", "a", token="next")), (410, expired),
                   (200, pod_list("8", "a", token="again")), (410, expired), (200, pod_list("9", "a", "b")))
    seen = []

    def each(body):
        seen.append(body["metadata"]["name"])
        return trimmed(KIND["Pod"], body)
    items, version = asyncio.run(api.list(PODS, each=each))
    assert (seen, version) == (["a", "a", "a", "b"], "9")
    assert api.asked == [{"limit": "500"}, {"limit": "500", "continue": "next"}, {"limit": "500"},
                         {"limit": "500", "continue": "again"}, {}]  # expired twice: whole, as client-go
    assert [item["metadata"]["name"] for item in items] == ["a", "b"] and all("phase" in i["status"] for i in items)


# --- one kind's store -------------------------------------------------------------------
def pod_event(kind: str, name: str, version: str, ip: str = "10.244.1.9", **meta) -> dict:
    return {"type": kind, "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": "shop", "uid": name, "resourceVersion": version, **meta},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]}, "status": {"phase": "Running", "podIP": ip}}}


def pod_store() -> Store:
    store = Store(KIND["Pod"], api_version="v1")
    assert store.replace([], "1") is False  # an empty list of an empty store changes nothing
    return store


def test_events_add_modify_and_delete_objects():
    store = pod_store()
    assert store.apply(pod_event("ADDED", "a", "2")) is True
    assert store.apply(pod_event("MODIFIED", "a", "3", ip="10.244.1.10")) is True
    assert store.objects["Pod shop/a"].body["status"]["podIP"] == "10.244.1.10"
    assert store.apply(pod_event("MODIFIED", "a", "3", ip="10.244.1.10")) is False  # seen already
    assert store.resource_version == "3"
    assert store.apply(pod_event("DELETED", "a", "4")) is True
    assert store.objects == {} and store.resource_version == "4"
    assert store.apply(pod_event("DELETED", "a", "5")) is False


def test_a_bookmark_moves_the_resource_version_and_changes_nothing():
    store = pod_store()
    store.apply(pod_event("ADDED", "a", "2"))
    bookmark = {"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                                              "metadata": {"resourceVersion": "90"}}}
    assert store.apply(bookmark) is False
    assert store.resource_version == "90" and list(store.objects) == ["Pod shop/a"]


def test_an_invalid_object_is_refused_alone_and_its_last_good_version_stays():
    store = pod_store()
    store.apply(pod_event("ADDED", "a", "2"))
    store.apply(pod_event("ADDED", "b", "3"))
    assert store.apply(pod_event("MODIFIED", "a", "4", ip="not-an-ip")) is False
    assert store.objects["Pod shop/a"].body["status"]["podIP"] == "10.244.1.9"
    assert store.errors == {"Pod shop/a": "kube (Pod shop/a): status.podIP 'not-an-ip' is not an IP address"}
    assert store.resource_version == "4"  # the watch goes on after it
    assert store.apply(pod_event("MODIFIED", "a", "5", ip="10.244.1.11")) is True
    assert store.errors == {}
    bad = pod_event("ADDED", "c", "6", labels={"tier": 1})
    assert store.apply(bad) is False and "Pod shop/c" not in store.objects
    assert "metadata.labels['tier'] must be a string" in store.errors["Pod shop/c"]


def test_a_list_replaces_the_kind_and_keeps_a_refused_objects_last_good_version():
    store = pod_store()
    store.apply(pod_event("ADDED", "a", "2"))
    store.apply(pod_event("ADDED", "gone", "3"))
    listed = [api_item(pod_event("ADDED", "a", "7", ip="bad")["object"]),
              api_item(pod_event("ADDED", "new", "8")["object"])]
    assert store.replace(listed, "9") is True
    assert sorted(store.objects) == ["Pod shop/a", "Pod shop/new"]
    assert store.objects["Pod shop/a"].body["status"]["podIP"] == "10.244.1.9"
    assert list(store.errors) == ["Pod shop/a"] and store.resource_version == "9"
    assert store.objects["Pod shop/new"].api_version == "v1"  # the list's, items carry none


def test_a_relist_that_finds_the_same_versions_changes_nothing():
    store = pod_store()
    item = api_item(pod_event("ADDED", "a", "2")["object"])
    assert store.replace([item], "5") is True
    assert store.replace([item], "6") is False


def test_istio_objects_take_the_served_version():
    store = Store(KIND["DestinationRule"], api_version="networking.istio.io/v1alpha3")
    store.replace([{"metadata": {"name": "dr", "namespace": "shop", "resourceVersion": "3"},
                    "spec": {"host": "web"}}], "3")
    assert store.objects["DestinationRule shop/dr"].api_version == "networking.istio.io/v1alpha3"


# --- what a reflector does after an error ------------------------------------------------
def test_410_gone_relists_404_rediscovers_and_other_errors_back_off():
    expired = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version: 5 (90)"}
    gone = status_error("pods", expired, 410)
    assert isinstance(gone, Gone) and next_step(gone) == "relist"
    assert str(gone) == "pods: 410 Expired: too old resource version: 5 (90)"
    missing = status_error("group networking.istio.io", {"reason": "NotFound"}, 404)
    assert isinstance(missing, NotFound) and next_step(missing) == "rediscover"  # back off, look it up again
    unserved = NotServed("EnvoyFilter (networking.istio.io)", "not served: the API server has no group x", 404)
    assert next_step(unserved) == "not served"  # only discovery says so
    forbidden = status_error("pods", {"reason": "Forbidden", "message": "cannot list"}, 403)
    assert next_step(forbidden) == "backoff" and "ClusterRole" in str(forbidden)
    assert next_step(KubeApiError("pods", "cannot connect to https://x:6443: timed out")) == "backoff"


def test_a_watch_error_event_raises_its_status():
    c = client.KubeClient.__new__(client.KubeClient)
    with pytest.raises(Gone):
        c._event(b'{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired"}}', "pods")
    assert c._event(b'{"type":"ADDED","object":{"metadata":{}}}', "pods")["type"] == "ADDED"
    with pytest.raises(KubeApiError, match="malformed watch event"):
        c._event(b'{"type":', "pods")


# --- the client: a 200 that is no list is an error, never an empty list ----------------------
class Answered(client.KubeClient):
    """A client whose requests get `answers` in turn, each (status, the body's bytes) as
    the API server, or a proxy in front of it, sent them; `asked` holds the queries."""

    def __init__(self, config: client.ClusterConfig, *answers: tuple[int, bytes]):
        super().__init__(config)
        self.answers, self.asked = list(answers), []

    async def send(self, method, path, resource, params=None, body=None, content_type="application/json"):
        self.asked.append(dict(params or {}))
        status, raw = self.answers.pop(0)
        return self._decoded(status, raw, resource)


PODS = client.Resource("/api/v1/pods", "pods")
NOT_JSON = "pods: 200 answer from https://172.30.0.1:6443 {} (is something other than the API server answering?)"


def pod_list(version: str, *names: str, token: str = "") -> bytes:
    items = [{"metadata": {"name": n, "namespace": "shop", "uid": n, "resourceVersion": version},
              "spec": {"nodeName": "n1"}, "status": {"phase": "Running", "podIP": "10.244.1.9"}} for n in names]
    meta = {"resourceVersion": version, **({"continue": token} if token else {})}
    return json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": items}).encode()


@pytest.mark.parametrize("raw, says", [
    (b"<html><body><h1>502 Bad Gateway</h1></body></html>",
     NOT_JSON.format("is not a JSON object: '<html><body><h1>502 Bad Gateway</h1></body></html>'")),
    (b"", NOT_JSON.format("is empty")),
    (b"[]", NOT_JSON.format("is not a JSON object: '[]'")),
    (b'{"metadata": {"resourceVersion": "7"}}', "pods: the answer is not a list: kind '', items missing"),
    (b'{"kind": "Pod", "metadata": {}, "items": []}', "pods: the answer is not a list: kind 'Pod', items list"),
    (b'{"kind": "PodList", "metadata": {}, "items": {}}', "pods: the answer is not a list: kind 'PodList', items dict"),
])
def test_a_list_answer_that_is_no_list_is_an_error_never_an_empty_list(tmp_path: Path, raw, says):
    api = Answered(cluster(tmp_path), (200, raw))
    with pytest.raises(KubeApiError) as err:
        asyncio.run(api.list(PODS))
    assert str(err.value) == says
    assert next_step(err.value) == "backoff"  # the kind keeps its objects and is listed again


def test_a_page_that_is_no_list_fails_the_whole_list_and_an_empty_list_is_empty(tmp_path: Path):
    api = Answered(cluster(tmp_path), (200, pod_list("7", "a", token="next")), (200, b"<html>timeout</html>"))
    with pytest.raises(KubeApiError, match="is not a JSON object: '<html>timeout</html>'"):
        asyncio.run(api.list(PODS))
    assert api.asked == [{"limit": "500"}, {"limit": "500", "continue": "next"}]
    assert asyncio.run(Answered(cluster(tmp_path), (200, pod_list("8"))).list(PODS)) == ([], "8")


def test_an_error_status_without_json_still_says_what_came(tmp_path: Path):
    api = Answered(cluster(tmp_path), (403, b"<html>forbidden by proxy</html>"))
    with pytest.raises(KubeApiError) as err:
        asyncio.run(api.get("/api/v1/pods", "pods"))
    assert err.value.status == 403 and str(err.value).startswith("pods: 403: <html>forbidden by proxy</html>")


# --- a reflector against a scripted API server -----------------------------------------------
class ScriptedApi(client.KubeClient):
    """The API server as a script, to drive a reflector one request at a time. Each
    request takes the next step: ("GET", path, status, body) or ("WATCH", path, status,
    lines), the bytes the server (or a proxy) sent, decoded by the client's own code; a
    watch answered 200 yields its lines' events, then ends as the server ends a watch.
    Every request first notes (method, path, what `look` sees then). When the script runs
    out, the request waits for ever and `done` is set: the test looks, then cancels."""

    def __init__(self, config: client.ClusterConfig, script: list[tuple], look):
        super().__init__(config)
        self.script, self.look, self.seen = list(script), look, []
        self.done = asyncio.Event()

    async def send(self, method, path, resource, params=None, body=None, content_type="application/json"):
        status, raw = await self._step("GET", path)
        return self._decoded(status, raw, resource)

    async def watch(self, resource, resource_version, params=None, timeout_seconds=300):
        status, lines = await self._step("WATCH", resource.path)
        if status != 200:
            self._decoded(status, b"".join(lines), resource.name)
        for line in lines:
            yield self._event(line, resource.name)

    async def _step(self, method: str, path: str) -> tuple:
        self.seen.append((method, path, self.look()))
        if not self.script:
            self.done.set()
            await asyncio.Event().wait()
        method_wanted, path_wanted, *answer = self.script.pop(0)
        assert (method, path) == (method_wanted, path_wanted)  # seen says where it went otherwise
        return tuple(answer)


class Noted(Backoff):
    """No waits, and the attempts asked for, in order."""

    def __init__(self):
        super().__init__(0.0, 0.0)
        self.asked: list[int] = []

    def jittered(self, attempt, rng):
        self.asked.append(attempt)
        return 0.0


def reflect(tmp_path: Path, kind: str, script: list[tuple], retry: Backoff | None = None) -> tuple[list, KubeSource]:
    """Run `kind`'s reflector through `script` (no waits: rediscovery and backoff take 0 s);
    what each request saw of the store's objects and the source's errors, and the final look."""
    api = ScriptedApi(cluster(tmp_path), script, lambda: (sorted(store.objects), source.errors))
    source = KubeSource(api.config, kinds=(KIND[kind],), rediscover_seconds=0.0, retry=retry or Backoff(0.0, 0.0),
                        client=api)
    store = source._stores[0]

    async def main() -> None:
        task = asyncio.create_task(source._reflect(store))
        try:
            await asyncio.wait_for(api.done.wait(), 10)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert api.script == []
    return [(method, path, *look) for method, path, look in api.seen], source


SECURITY = "/apis/security.istio.io"
GROUP = (200, json.dumps({"kind": "APIGroup", "name": "security.istio.io",
                          "versions": [{"groupVersion": "security.istio.io/v1", "version": "v1"}]}).encode())
RESOURCES = (200, json.dumps({"kind": "APIResourceList", "groupVersion": "security.istio.io/v1",
                              "resources": [{"name": "authorizationpolicies", "kind": "AuthorizationPolicy"}]}).encode())
NOT_FOUND = (404, json.dumps({"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                              "message": "the server could not find the requested resource"}).encode())
DENY = {"metadata": {"name": "deny", "namespace": "shop", "uid": "p1", "resourceVersion": "5"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["other"]}}]}]}}


def policies(version: str) -> tuple[int, bytes]:
    return 200, json.dumps({"kind": "AuthorizationPolicyList", "apiVersion": "security.istio.io/v1",
                            "metadata": {"resourceVersion": version}, "items": [DENY]}).encode()


def served(version: str) -> list[tuple]:
    """Discovery finds AuthorizationPolicy at v1 and its list holds the DENY policy."""
    return [("GET", SECURITY, *GROUP), ("GET", f"{SECURITY}/v1", *RESOURCES),
            ("GET", f"{SECURITY}/v1/authorizationpolicies", *policies(version))]


def test_a_served_kind_answering_404_keeps_its_objects_until_discovery_says_so_three_times(tmp_path: Path):
    """An API server answering before its CRD handlers are synced, or a CRD being updated,
    answers 404 for a while: dropping the policies then would fail open (STRICT becomes
    PERMISSIVE, DENY rules vanish). A watch's or list's 404 only fails the kind; discovery
    not listing it three lookups in a row (a lookup that finds it starts over) drops them."""
    kind = "AuthorizationPolicy (security.istio.io)"
    watch_404 = "authorizationpolicies.security.istio.io: 404 NotFound: the server could not find the requested resource"
    unserved = "not served: the API server has no group security.istio.io: is its CRD installed?"
    watch = ("WATCH", f"{SECURITY}/v1/authorizationpolicies", NOT_FOUND[0], [NOT_FOUND[1]])
    lookup = ("GET", SECURITY, *NOT_FOUND)
    seen, source = reflect(tmp_path, "AuthorizationPolicy",
                           [*served("5"), watch, lookup, lookup, *served("9"), watch, lookup, lookup, lookup])
    deny = ["AuthorizationPolicy shop/deny"]
    kept = [(deny, {kind: f"{unserved} ({n} of 3 lookups in a row; its objects are kept until 3)"}) for n in (1, 2)]
    assert seen == [
        ("GET", SECURITY, [], {}), ("GET", f"{SECURITY}/v1", [], {}),
        ("GET", f"{SECURITY}/v1/authorizationpolicies", [], {}),
        ("WATCH", f"{SECURITY}/v1/authorizationpolicies", deny, {}),
        ("GET", SECURITY, deny, {kind: watch_404}),  # the watch's 404: failing, looked up again
        ("GET", SECURITY, *kept[0]),
        ("GET", SECURITY, *kept[1]),  # then discovery finds it again: the count starts over
        ("GET", f"{SECURITY}/v1", *kept[1]),
        ("GET", f"{SECURITY}/v1/authorizationpolicies", *kept[1]),
        ("WATCH", f"{SECURITY}/v1/authorizationpolicies", deny, {}),  # listed: read again
        ("GET", SECURITY, deny, {kind: watch_404}),
        ("GET", SECURITY, *kept[0]),
        ("GET", SECURITY, *kept[1]),
        ("GET", SECURITY, [], {kind: unserved}),  # three in a row: not served, a cluster without them
    ]
    assert source.scan_error == "the first model is not read yet"  # not failing: listed, then known not served


def test_a_security_kind_never_served_is_looked_up_three_times_before_the_agent_goes_without_it(tmp_path: Path):
    """An API server whose CRD handlers are not synced yet answers 404 for a while: an
    agent starting then took the cluster for one without AuthorizationPolicies and became
    ready with none (STRICT read as PERMISSIVE). A security kind never read is looked up
    UNSERVED_LOOKUPS times (after the retry's short delays) before it is; found meanwhile,
    it is read. Other kinds are at once a cluster without them."""
    lookup = ("GET", SECURITY, *NOT_FOUND)
    kind = "AuthorizationPolicy (security.istio.io)"
    unserved = "not served: the API server has no group security.istio.io: is its CRD installed?"
    retry = Noted()
    seen, source = reflect(tmp_path, "AuthorizationPolicy", [lookup, lookup, lookup], retry)
    waiting = [{kind: f"{unserved} ({n} of 3 lookups in a row; not read until 3)"} for n in (1, 2)]
    assert seen == [("GET", SECURITY, [], {}), ("GET", SECURITY, [], waiting[0]), ("GET", SECURITY, [], waiting[1]),
                    ("GET", SECURITY, [], {kind: unserved})]
    assert retry.asked == [1, 2]
    model = source.poll()
    assert model is not None and model.resources == {}
    seen, source = reflect(tmp_path, "AuthorizationPolicy", [lookup, *served("5")])
    assert seen[-1] == ("WATCH", f"{SECURITY}/v1/authorizationpolicies", ["AuthorizationPolicy shop/deny"], {})
    networking = "/apis/networking.istio.io"
    seen, source = reflect(tmp_path, "VirtualService", [("GET", networking, *NOT_FOUND)])
    assert seen[-1][-1] == {"VirtualService (networking.istio.io)": "not served: the API server has no group "
                            "networking.istio.io: is its CRD installed?"}


def _deep(name: str, depth: int) -> bytes:
    """An EnvoyFilter whose patch value nests `depth` lists (the API server takes 10000)."""
    head = json.dumps({"metadata": {"name": name, "namespace": "tenant", "resourceVersion": "7"},
                       "spec": {"configPatches": [{"applyTo": "HTTP_FILTER", "patch": {"value": "x"}}]}})
    return head.replace('"x"', "[" * depth + '"[{\\"}"' + "]" * depth).encode()


def test_an_object_nested_past_the_decoders_depth_is_refused_alone():
    """Python's decoder raised RecursionError at ~1000 levels: one tenant's EnvoyFilter
    failed every list of the kind on every agent, for ever (no agent restarted got ready).
    Now what lies past client.MAX_DEPTH is cut, and the object holding it refused alone,
    its last good version kept; the others of its page, and brackets in strings, read as sent."""
    good = json.loads(_deep("deep", 2))
    page = b'{"kind":"EnvoyFilterList","metadata":{"resourceVersion":"9"},"items":[' + _deep("ok", 3) + b"," + \
        _deep("deep", 1500) + b"]}"
    with pytest.raises(RecursionError):
        json.loads(page)
    doc = client.loads(page)
    ok, cut = doc["items"]
    assert ok == json.loads(_deep("ok", 3))  # "[{\"}" inside a string is no bracket
    assert cut == {"metadata": {"name": "deep", "namespace": "tenant", "resourceVersion": "7"},
                   client.TOO_DEEP: "nested deeper than 100 levels"}
    store = kube.Store(KIND["EnvoyFilter"])
    store.replace([good], "5")
    store.replace(doc["items"], "9")
    assert sorted(store.objects) == ["EnvoyFilter tenant/deep", "EnvoyFilter tenant/ok"]
    assert store.objects["EnvoyFilter tenant/deep"].body["spec"] == good["spec"]  # the last good version
    assert store.errors == {"EnvoyFilter tenant/deep": "kube (EnvoyFilter tenant/deep): nested deeper than "
                            "100 levels, deeper than nodeagent reads (flatten it; the API server takes up to 10000 "
                            "levels, nodeagent refuses such an object)"}
    assert client.loads(_deep("alone", 1200)) == {  # one object's answer
        "metadata": {"name": "alone", "namespace": "tenant", "resourceVersion": "7"},
        client.TOO_DEEP: "nested deeper than 100 levels"}
    event = client.loads(b'{"type":"MODIFIED","object":' + _deep("ok", 2000) + b"}")
    assert store.apply(event) is False and "EnvoyFilter tenant/ok" in store.errors
    assert store.objects["EnvoyFilter tenant/ok"].body["spec"] == ok["spec"]


def _tls_server_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "api.pem", tmp_path / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_a_watch_gone_silent_is_taken_for_dead_and_its_connection_is_kept_alive(tmp_path: Path, monkeypatch):
    """A half-open watch (or a proxy holding the stream) read for timeoutSeconds + 10 s,
    300-610 s with the defaults, while a new DENY went unapplied and the agent took itself
    for in sync. A watch silent past WATCH_IDLE (a bookmark comes about every minute) ends
    as the server's end would, and the connection has TCP keepalive so the kernel notices a
    vanished peer."""
    import socket
    import ssl
    monkeypatch.setattr(client, "WATCH_IDLE", 1)
    cert_path, key_path = _tls_server_files(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert_path, key_path)
    kept_alive, keepalive, forever = [], client._keepalive, asyncio.Event()

    def recording(sock):
        keepalive(sock)
        kept_alive.append((sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                           sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                           sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                           sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)))
    monkeypatch.setattr(client, "_keepalive", recording)

    async def api(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        bookmark = b'{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"8"}}}\n'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + b"%x\r\n" % len(bookmark) + bookmark + b"\r\n")
        await writer.drain()
        await forever.wait()  # then silence, the connection open: only the client's idle limit ends it

    async def main():
        server = await asyncio.start_server(api, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        config = client.ClusterConfig("127.0.0.1", port, ssl.create_default_context(cafile=str(cert_path)), "t",
                                      "test")
        kube_client = client.KubeClient(config, timeout=1)
        events = []
        try:  # it ends as the server's end of a watch would: watched again at once, no failure reported
            async for event in kube_client.watch(client.Resource("/api/v1/pods", "pods"), "7", timeout_seconds=300):
                events.append(event["type"])
        finally:
            forever.set()
            server.close()
        return events

    assert asyncio.run(asyncio.wait_for(main(), 60)) == ["BOOKMARK"]  # (with 310 s, the 60 s guard would fire)
    assert kept_alive == [(1, *client.KEEPALIVE)]


def test_a_starting_security_kinds_lookups_span_the_rediscovery_interval(tmp_path: Path):
    """An API server answering 404 for 2 s at start (its CRD handlers syncing) had the
    agent without AuthorizationPolicies for the next 30 s: the lookups were 0.25-1.5 s apart."""
    source = KubeSource(ScriptedApi(cluster(tmp_path), [], lambda: None).config, kinds=(KIND["AuthorizationPolicy"],),
                        rediscover_seconds=30.0, retry=Backoff(1.0, 60.0), client=None)
    store = source._stores[0]
    why = "not served: the API server has no group security.istio.io"
    assert [source._not_served(store, why) for _ in range(3)] == [15.0, 15.0, 30.0]  # then without it
    assert source.poll() is not None and source.errors == {"AuthorizationPolicy (security.istio.io)": why}


def test_a_list_answer_that_is_no_list_keeps_the_kind_as_last_read_and_is_reported(tmp_path: Path):
    """A proxy's page, an empty body or an object that is no list, answered 200 to a
    relist, is an error: the pods stay as last read (an empty list would un-enrol every
    pod) and the kind is listed again; an event that does not parse is an error too."""
    expired = b'{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old"}}'
    pods = "/api/v1/pods"
    seen, _ = reflect(tmp_path, "Pod", [
        ("GET", pods, 200, pod_list("5", "a")), ("WATCH", pods, 200, [expired]),
        ("GET", pods, 200, b"<html>502 Bad Gateway</html>"), ("GET", pods, 200, b""),
        ("GET", pods, 200, b'{"metadata": {"resourceVersion": "8"}}'),
        ("GET", pods, 200, pod_list("9", "a")), ("WATCH", pods, 200, [b"<html>not an event</html>"])])
    a = ["Pod shop/a"]
    assert seen == [
        ("GET", pods, [], {}), ("WATCH", pods, a, {}),
        ("GET", pods, a, {}),  # 410: listed again at once
        ("GET", pods, a, {"Pod": NOT_JSON.format("is not a JSON object: '<html>502 Bad Gateway</html>'")}),
        ("GET", pods, a, {"Pod": NOT_JSON.format("is empty")}),
        ("GET", pods, a, {"Pod": "pods: the answer is not a list: kind '', items missing"}),
        ("WATCH", pods, a, {}),
        ("WATCH", pods, a, {"Pod": "pods: malformed watch event: b'<html>not an event</html>'"}),  # watched again
    ]


def test_a_discovery_answer_that_is_no_discovery_document_is_a_failure_not_a_kind_not_served(tmp_path: Path):
    """A proxy's JSON error page answered 200 to discovery has no versions: read as the
    group's document it would count towards dropping the kind's objects."""
    watch = ("WATCH", f"{SECURITY}/v1/authorizationpolicies", NOT_FOUND[0], [NOT_FOUND[1]])
    seen, _ = reflect(tmp_path, "AuthorizationPolicy",
                      [*served("5"), watch, ("GET", SECURITY, 200, b'{"message": "upstream unavailable"}')])
    kind, deny = "AuthorizationPolicy (security.istio.io)", ["AuthorizationPolicy shop/deny"]
    assert seen[-2:] == [
        ("GET", SECURITY, deny, {kind: "authorizationpolicies.security.istio.io: 404 NotFound: "
                                       "the server could not find the requested resource"}),
        ("GET", SECURITY, deny, {kind: "group security.istio.io: the answer is not an APIGroup: kind ''"}),
    ]


# --- poll(): none before every kind was listed, one model per change ---------------------
def cluster(tmp_path: Path) -> client.ClusterConfig:
    return client.from_kubeconfig(kubeconfig(tmp_path, user={"token": "t0"}))


def test_poll_waits_for_every_kinds_first_list_then_returns_one_model_per_change(tmp_path: Path):
    source = KubeSource(cluster(tmp_path), kinds=KINDS)
    stores = {s.kind.kind: s for s in source._stores}
    for kind in KINDS[:-1]:
        source._update(stores[kind.kind], stores[kind.kind].replace, [], "1", synced=True)
        assert source.poll() is None
    last = KINDS[-1]
    assert source.scan_error == f"waiting for the first list of {last}"
    source._not_served(stores[last.kind], "not served: is its CRD installed?")
    assert source.scan_error == "the first model is not read yet"  # unreadable until poll() hands it out
    assert source.errors == {str(last): "not served: is its CRD installed?"}
    first = source.poll()
    assert first is not None and first.pods == {}
    assert source.scan_error is None
    assert source.poll() is None
    source._update(stores["Pod"], stores["Pod"].apply, pod_event("ADDED", "a", "2"))
    source._update(stores["Pod"], stores["Pod"].apply, pod_event("ADDED", "b", "3"))
    second = source.poll()
    assert sorted(second.pods) == [("shop", "a"), ("shop", "b")]
    assert source.poll() is None


def test_a_failing_kind_keeps_its_objects_and_is_the_scan_error(tmp_path: Path):
    source = KubeSource(cluster(tmp_path), kinds=KINDS[1:2])
    store = source._stores[0]
    source._update(store, store.replace, [api_item(pod_event("ADDED", "a", "2")["object"])], "2", synced=True)
    assert sorted(source.poll().pods) == [("shop", "a")] and source.scan_error is None
    source._fail(store.kind, "pods: cannot connect to https://10.0.0.1:443: timed out", 1.0)
    assert source.scan_error == "Pod: pods: cannot connect to https://10.0.0.1:443: timed out"
    assert source.poll() is None and list(store.objects) == ["Pod shop/a"]
    source._update(store, store.replace, [api_item(pod_event("ADDED", "a", "2")["object"])], "7", synced=True)
    assert source.scan_error is None and source.errors == {}


# --- credentials --------------------------------------------------------------------------
def pem_pair() -> tuple[bytes, bytes]:
    root = generate_root("cluster.local", dt.datetime.now(dt.timezone.utc))
    key = root.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return root.cert.public_bytes(serialization.Encoding.PEM), key


def kubeconfig(tmp_path: Path, user: dict, server: str = "https://172.30.0.1:6443", name: str = "kc") -> Path:
    cert, _key = pem_pair()
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "lab",
           "clusters": [{"name": "lab", "cluster": {"server": server,
                                                    "certificate-authority-data": base64.b64encode(cert).decode()}}],
           "users": [{"name": "admin", "user": user}],
           "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "admin"}}]}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_kubeconfig_with_a_client_certificate_or_a_token(tmp_path: Path):
    cert, key = pem_pair()
    with_cert = client.from_kubeconfig(kubeconfig(tmp_path, {
        "client-certificate-data": base64.b64encode(cert).decode(),
        "client-key-data": base64.b64encode(key).decode()}))
    assert (with_cert.host, with_cert.port, with_cert.url, with_cert.bearer()) == \
        ("172.30.0.1", 6443, "https://172.30.0.1:6443", None)
    (tmp_path / "token").write_text("abc\n")
    with_file = client.from_kubeconfig(kubeconfig(tmp_path, {"tokenFile": "token"}, name="kc2"))
    assert with_file.bearer() == "abc"  # relative to the kubeconfig's directory


@pytest.mark.parametrize("user, server, message", [
    ({"exec": {"command": "aws"}}, "https://h:6443", "user exec credential plugins are not supported"),
    ({}, "https://h:6443", "the user has neither a client certificate nor a token"),
    ({"token": "t"}, "http://h:8080", "cluster server 'http://h:8080' is not an https:// URL"),
    ({"client-certificate-data": "!!", "client-key-data": "!!"}, "https://h:6443",
     "client-certificate-data is not base64"),
])
def test_a_kubeconfig_the_agent_cannot_use_is_named(tmp_path: Path, user, server, message):
    path = kubeconfig(tmp_path, user, server)
    with pytest.raises(ConfigError) as err:
        client.from_kubeconfig(path)
    assert str(err.value).startswith(f"kubeconfig {path}: {message}")


def test_in_cluster_needs_the_service_environment_and_the_token(tmp_path: Path):
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set"):
        client.in_cluster({}, tmp_path)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    with pytest.raises(ConfigError, match=f"cannot read {tmp_path / 'token'}"):
        client.in_cluster(env, tmp_path)
    cert, _ = pem_pair()
    (tmp_path / "ca.crt").write_bytes(cert)
    (tmp_path / "token").write_text("one")
    cfg = client.in_cluster(env, tmp_path)
    assert (cfg.url, cfg.bearer(), cfg.origin) == ("https://10.96.0.1:443", "one", "in-cluster")


def test_a_rotated_token_file_is_read_again(tmp_path: Path):
    path = tmp_path / "token"
    path.write_text("first")
    token = TokenFile(path)
    assert token.get() == "first"
    new = tmp_path / "token.new"
    new.write_text("second")
    os.replace(new, path)  # kubelet swaps a projected token's file: a new inode
    assert token.get() == "second"
    path.unlink()
    assert token.get() == "second"  # caught mid-rotation: the previous token, not a crash


# --- settings -------------------------------------------------------------------------------
@pytest.fixture
def base(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "cg").mkdir()
    return {"node": "n1", "cgroup": str(tmp_path / "cg")}


def test_source_kube_with_a_kubeconfig(base, tmp_path: Path):
    path = kubeconfig(tmp_path, {"token": "t"})
    for given in ({"source": f"kube:{path}"}, {"source": "kube", "kubeconfig": str(path)},
                  {"source": f"kube:{path}", "kubeconfig": str(path)}):
        cfg = config.load({**base, **given}, {})
        assert (cfg.source_kind, cfg.kubeconfig, cfg.source_dir) == ("kube", path, None)


def test_source_kube_in_a_pod_reads_the_service_environment(base):
    with pytest.raises(ConfigError) as err:
        config.load({**base, "source": "kube"}, {})
    assert "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set" in str(err.value)


@pytest.mark.parametrize("given, message", [
    ({"source": "kube:"}, "kube:KUBECONFIG needs the kubeconfig's path"),
    ({"source": "kube:/nonexistent/kc"}, "kubeconfig /nonexistent/kc is not a file"),
    ({"source": "etcd:x"}, "or kube (in a pod), or kube:KUBECONFIG"),
])
def test_bad_kube_sources_are_named(base, given, message):
    with pytest.raises(ConfigError) as err:
        config.load({**base, **given}, {})
    assert str(err.value).startswith("setting source") and message in str(err.value)


def test_a_kubeconfig_needs_the_kube_source_and_is_given_once(base, tmp_path: Path):
    path = kubeconfig(tmp_path, {"token": "t"})
    other = kubeconfig(tmp_path, {"token": "t"}, name="other")
    (tmp_path / "cluster").mkdir()
    with pytest.raises(ConfigError, match="setting kubeconfig: is for the kube source, not files:"):
        config.load({**base, "source": f"files:{tmp_path / 'cluster'}", "kubeconfig": str(path)}, {})
    with pytest.raises(ConfigError, match="setting kubeconfig: .* differs from the source's"):
        config.load({**base, "source": f"kube:{path}", "kubeconfig": str(other)}, {})


def test_the_daemon_picks_the_kube_source(base, tmp_path: Path):
    from nodeagent.agent.daemon import new_source
    import logging
    cfg = config.load({**base, "source": f"kube:{kubeconfig(tmp_path, {'token': 't'})}"}, {})
    source = new_source(cfg, logging.getLogger("t"))
    assert isinstance(source, KubeSource)
    assert source.location == f"kube ({cfg.kubeconfig}, https://172.30.0.1:6443)"
    assert source.scan_error.startswith("waiting for the first list of Namespace, Pod, Service")
    assert source.poll() is None  # never an empty cluster before the first list


def test_kinds_are_what_the_model_and_the_translators_read():
    from nodeagent.xds.istio.kinds import ANSWERS, IMPLEMENTED
    istio = {(k.group, k.kind) for k in KINDS if k.group}
    answered = {key for key in ANSWERS if key[0] != "install.istio.io"}  # IstioOperator installs, it is no mesh config
    assert istio == {(g, k) for g, kinds in IMPLEMENTED.items() for k in kinds} | answered
    assert {k.kind for k in KINDS if not k.group} == {"Namespace", "Pod", "Service"}
    assert KIND["VirtualService"].versions == ("v1", "v1beta1", "v1alpha3")
    assert KIND["EnvoyFilter"].resource("v1alpha3").path == "/apis/networking.istio.io/v1alpha3/envoyfilters"
    assert KIND["Pod"].resource("v1").name == "pods"
    assert kube.BURST_QUIET < kube.BURST_MAX


def test_a_burst_of_changes_wakes_the_agent_once(tmp_path: Path):
    """Events in a row (kubectl apply of several objects; the notifier runs between them)
    are one wake-up; a change after a quiet gap is another."""
    import asyncio
    source = KubeSource(cluster(tmp_path), kinds=KINDS[:1])
    woken: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        source._changed = asyncio.Event()
        source._subscribers.append(lambda: woken.append(loop.time()))
        notifier = asyncio.create_task(source._notifier())
        try:
            for _ in range(5):
                source._signal()
                await asyncio.sleep(0)
            while not woken:
                await asyncio.sleep(0.005)
            await asyncio.sleep(kube.BURST_QUIET * 3)
            assert len(woken) == 1
            source._signal()
            while len(woken) < 2:
                await asyncio.sleep(0.005)
        finally:
            notifier.cancel()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert len(woken) == 2


class StuckOwner:
    """An exit watch that blocks the source's loop (a call that never returns)."""

    def __init__(self):
        import threading
        self.entered, self.release = threading.Event(), threading.Event()

    async def run(self) -> None:
        self.entered.set()
        self.release.wait(60)


def test_close_waits_for_a_stuck_source_only_its_bound(tmp_path: Path, caplog):
    """The daemon closes the source before it removes capture: a stuck source thread must
    not hold that for the DaemonSet's 30 s grace period."""
    closed_port = client.from_kubeconfig(kubeconfig(tmp_path, {"token": "t0"}, server="https://127.0.0.1:1"))
    source = KubeSource(closed_port, kinds=KINDS[:1])  # its reflector fails and backs off meanwhile
    source.owner = StuckOwner()
    source.start()
    try:
        assert source.owner.entered.wait(10)
        started = time.monotonic()
        source.close(timeout=0.5)
        assert time.monotonic() - started < 5.0  # bounded: far from the 60 s the owner would hold it
        assert "the kube source's thread did not stop within 0.5s; going on without it" in caplog.text
        assert kube.CLOSE_SECONDS < 30 / 2  # well inside the DaemonSet's terminationGracePeriodSeconds
    finally:
        source.owner.release.set()


GONE = (410, json.dumps({"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410,
                         "message": "too old resource version: 5 (9)"}).encode())


def test_a_server_answering_410_or_ending_watches_at_once_is_not_asked_in_a_tight_loop(tmp_path: Path):
    """A 410 lists again at once, as client-go does; but a server (or a proxy) that answers
    410 to every watch, or ends every watch at once with nothing in it, had every agent of
    the cluster list or watch again in a loop with no pause. From the second such answer in
    a row the reflector backs off (1, 2, ...), and starts over once a watch brings events."""
    path = f"{SECURITY}/v1/authorizationpolicies"
    gone = ("WATCH", path, GONE[0], [GONE[1]])
    empty = ("WATCH", path, 200, [])
    event = json.dumps({"type": "MODIFIED", "object": {**DENY, "metadata": {**DENY["metadata"],
                                                                            "resourceVersion": "7"}}}).encode()
    retry = Noted()
    reflect(tmp_path, "AuthorizationPolicy",
            [*served("5"), gone, *served("6"), gone, *served("6"), gone, *served("6"),
             ("WATCH", path, 200, [event]), empty, empty, empty], retry)
    assert retry.asked == [1, 2, 1, 2]  # before the 2nd and 3rd relist; before the 2nd and 3rd empty watch


def test_a_kind_found_by_discovery_but_not_listed_does_not_start_the_count_over(tmp_path: Path):
    """Discovery's "not served" counts from one again only after a list worked: a kind
    whose CRD is gone but whose discovery flaps (found, then its list 404) kept its stale
    objects for ever."""
    path = f"{SECURITY}/v1/authorizationpolicies"
    lookup = ("GET", SECURITY, *NOT_FOUND)
    seen, _ = reflect(tmp_path, "AuthorizationPolicy",
                      [*served("5"), ("WATCH", path, NOT_FOUND[0], [NOT_FOUND[1]]), lookup, ("GET", SECURITY, *GROUP),
                       ("GET", f"{SECURITY}/v1", *RESOURCES), ("GET", path, *NOT_FOUND), lookup, lookup])
    unserved = "not served: the API server has no group security.istio.io: is its CRD installed?"
    assert seen[-1] == ("GET", SECURITY, [], {"AuthorizationPolicy (security.istio.io)": unserved})
