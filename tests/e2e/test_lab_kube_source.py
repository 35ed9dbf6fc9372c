"""The agent's `kube` source against the lab's real API server (`lab up --kube`).

A KubeSource runs in a child process inside a lab node's netns, as the agent would on
that node, with the lab's admin kubeconfig (this file run as `python -m
tests.e2e.test_lab_kube_source KUBECONFIG WATCH_SECONDS` is that child: it prints one JSON
line per new model, error change or counter change until its stdin closes). Checked:
the model after kubectl applied Namespaces, Pods, Services (and a VirtualService when
the Istio CRDs are served) equals the files source's model of the same objects as
`kubectl get -o json` prints them; a namespace label, a Service added and deleted, an
AuthorizationPolicy applied and deleted each arrive as the next model; the real server's
410 for a compacted resourceVersion is a Gone; a restarted API server breaks every watch
and the source lists again, losing no change made meanwhile; a kind whose CRD is not
installed is reported and the others are read; `nodeagent run --source kube` agents on
both nodes report a Gateway and a VirtualService whose regex does not compile as one
Warning Event each (kube/events.py), counted across agents, and nothing once fixed.

Needs the control plane built (`controlplane/build`, run by scripts/setup): without it
the test is skipped on a developer machine and fails under CI."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.e2e.conftest import ROOT, cgroup2_root
from tests.e2e.kubelab import get, kubectl, nodes_yaml, poll

WATCH_SECONDS = 5  # short watches: the server ends them often, the source watches on

LAB_YAML = nodes_yaml("kn1", "kn2")

OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: a}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  nodeName: kn1
  serviceAccountName: default
  containers:
  - {name: main, image: lab, command: [sleep, infinity], ports: [{name: http, containerPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec:
  nodeName: kn2
  containers:
  - {name: main, image: lab, command: [sleep, infinity]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"""

VIRTUAL_SERVICE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web}}], timeout: 3s}]
"""

POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-other, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}
"""


# --- the child: a KubeSource printing what it reads ----------------------------------------
def plain(value: Any) -> Any:
    """JSON-ready: dataclasses and mappings to dicts, tuples to lists."""
    if is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(plain(v) for v in value)
    return value


def summary(model) -> dict:
    """What a Model holds (objects' `source` and the server's managedFields aside; of a
    kind other than Pod what the kube source keeps: `trimmed`, no status, the metadata read)."""
    from nodeagent.sources.kube import KINDS, trimmed
    kinds = {(k.kind, k.group): k for k in KINDS}

    def body(o):
        kind = kinds.get((o.kind, o.group))
        if kind is not None:
            return trimmed(kind, o.body)
        meta = {k: v for k, v in o.body["metadata"].items() if k != "managedFields"}
        return {**o.body, "metadata": meta}
    return json.loads(json.dumps({
        "namespaces": plain(model.namespaces),
        "pods": {f"{ns}/{name}": plain(p) for (ns, name), p in model.pods.items()},
        "services": {f"{ns}/{name}": plain(s) for (ns, name), s in model.services.items()},
        "resources": {kind: [[o.api_version, o.namespace, o.name, body(o)] for o in objs]
                      for kind, objs in model.resources.items()},
    }, sort_keys=True))


async def probe(kubeconfig: str, watch_seconds: int) -> None:
    from nodeagent.kube.client import from_kubeconfig
    from nodeagent.sources.kube import KubeSource

    source = KubeSource(from_kubeconfig(Path(kubeconfig)), watch_seconds=(watch_seconds, watch_seconds),
                        rediscover_seconds=1.0)
    wake = source.wakeup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 4096) else None)
    models, last = 0, None
    try:
        while not stop.is_set():
            model = source.poll()
            if model is not None:
                models += 1
            said = {"errors": source.errors, "scan_error": source.scan_error, "counts": dict(source.counts)}
            if model is not None or said != last:
                print(json.dumps({"models": models, "model": summary(model) if model else None, **said}),
                      flush=True)
                last = said
            await wake.wait(stop, 0.2)
    finally:
        wake.close()


# --- the test side ---------------------------------------------------------------------------
class Probe:
    """The child process and the lines it printed (read by a thread)."""

    def __init__(self, netns: str, kubeconfig: str):
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.e2e.test_lab_kube_source", kubeconfig,
             str(WATCH_SECONDS)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.lines: list[dict] = []
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_errors, daemon=True)]
        for t in self._threads:
            t.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def _read_errors(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    @property
    def latest(self) -> dict:
        return self.lines[-1] if self.lines else {"models": 0, "errors": {}, "scan_error": "nothing yet",
                                                  "counts": {}}

    def model(self) -> dict | None:
        """The last model printed."""
        return next((line["model"] for line in reversed(self.lines) if line["model"] is not None), None)

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = condition()
            if found:
                return found
            assert self.proc.poll() is None, f"the probe exited {self.proc.returncode}: {''.join(self.stderr)[-3000:]}"
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last line: {json.dumps(self.latest)[:3000]}\n"
                             f"stderr: {''.join(self.stderr)[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(timeout=5)


@pytest.fixture(scope="module")
def probe_on_kn1(kube_lab):
    kubeconfig = kube_lab.run("kubeconfig").stdout.strip()
    child = Probe(f"{kube_lab.name}-n-kn1", kubeconfig)
    try:
        yield child
    finally:
        child.close()


def istio_served(lab) -> bool:
    groups = kubectl(lab, "api-versions").stdout.split()
    return "networking.istio.io/v1" in groups and "security.istio.io/v1" in groups


def files_summary(lab, tmp_path: Path) -> dict:
    """The files source's model of the API's objects, as `kubectl get -o json` prints them."""
    from nodeagent.sources.files import FilesSource
    from nodeagent.sources.kube import KINDS
    kinds = "namespaces,pods,services"
    if istio_served(lab):
        kinds += "".join(f",{k.plural}.{k.group}" for k in KINDS if k.group)
    listed = kubectl(lab, "get", kinds, "-A", "-o", "json").stdout
    directory = tmp_path / f"files-{time.monotonic_ns()}"
    directory.mkdir()
    (directory / "all.json").write_text(listed)
    source = FilesSource(directory)
    model = source.poll()
    assert model is not None and not source.errors, source.errors
    return summary(model)


def next_model(probe: Probe, after: int, holds: Callable[[dict], bool], what: str) -> dict:
    """The first model printed after model number `after`, which must already show `what`."""
    line = probe.wait(lambda: next((l for l in probe.lines if l["models"] > after and l["model"]), None),
                      f"a model after number {after}")
    assert line["models"] == after + 1
    assert holds(line["model"]), f"the next model does not show {what}: {json.dumps(line['model'])[:2000]}"
    return line


def quiet(probe: Probe) -> int:
    """The number of the last model, once no new one came for a second (the lab's pods settled)."""
    def settled():
        n = probe.latest["models"]
        time.sleep(1.0)
        return n if probe.latest["models"] == n and n > 0 else None
    return probe.wait(settled, "the models to settle")


# --- tests ------------------------------------------------------------------------------------
def test_the_first_model_waits_for_every_kind_and_equals_the_files_sources(kube_lab, probe_on_kn1, tmp_path):
    probe = probe_on_kn1
    probe.wait(lambda: probe.model(), "the first model")
    first = next(l for l in probe.lines if l["model"] is not None)
    assert first["scan_error"] is None and first["models"] == 1
    assert all(l["model"] is None and l["scan_error"] for l in probe.lines[:probe.lines.index(first)])
    documents = OBJECTS + ("---" + VIRTUAL_SERVICE if istio_served(kube_lab) else "")
    kubectl(kube_lab, "apply", "-f", "-", input=documents)
    for pod in ("web", "db"):
        kubectl(kube_lab, "wait", "-n", "shop", f"pod/{pod}", "--for=jsonpath={.status.phase}=Running",
                "--timeout=60s")
    expected: dict = {}

    def same() -> bool:
        expected.update(files_summary(kube_lab, tmp_path))
        return probe.model() == expected

    probe.wait(same, "the kube source's model to equal the files source's", timeout=60)
    model = probe.model()
    assert model["pods"]["shop/web"]["node"] == "kn1" and model["pods"]["shop/db"]["node"] == "kn2"
    assert model["pods"]["shop/web"]["ports"] == {"http": 8080} and model["pods"]["shop/web"]["ip"]
    assert model["namespaces"]["shop"] == {"name": "shop",
                                           "labels": {"team": "a", "kubernetes.io/metadata.name": "shop"}}
    if istio_served(kube_lab):
        assert [r[2] for r in model["resources"]["VirtualService"]] == ["web"]


def test_a_namespace_label_arrives_as_the_next_model(kube_lab, probe_on_kn1):
    n = quiet(probe_on_kn1)
    kubectl(kube_lab, "label", "namespace", "shop", "istio.io/dataplane-mode=ambient")
    next_model(probe_on_kn1, n, lambda m: m["namespaces"]["shop"]["labels"].get("istio.io/dataplane-mode")
               == "ambient", "the label")


def test_a_service_added_and_deleted_arrive_as_one_model_each(kube_lab, probe_on_kn1):
    n = quiet(probe_on_kn1)
    kubectl(kube_lab, "create", "service", "clusterip", "extra", "-n", "shop", "--tcp=9090:9090")
    next_model(probe_on_kn1, n, lambda m: "shop/extra" in m["services"], "the new Service")
    kubectl(kube_lab, "delete", "service", "extra", "-n", "shop")
    next_model(probe_on_kn1, n + 1, lambda m: "shop/extra" not in m["services"], "the Service gone")


def test_an_authorization_policy_applied_and_deleted(kube_lab, probe_on_kn1):
    if not istio_served(kube_lab):
        pytest.skip("the lab serves no Istio CRDs yet (lab up --kube installs them with nodeagent/lab/kube/crds.py)")
    n = quiet(probe_on_kn1)
    kubectl(kube_lab, "apply", "-f", "-", input=POLICY)
    line = next_model(probe_on_kn1, n, lambda m: [r[2] for r in m["resources"].get("AuthorizationPolicy", [])]
                      == ["deny-other"], "the policy")
    assert line["model"]["resources"]["AuthorizationPolicy"][0][0] == "security.istio.io/v1"
    kubectl(kube_lab, "delete", "authorizationpolicy", "deny-other", "-n", "shop")
    next_model(probe_on_kn1, n + 1, lambda m: not m["resources"].get("AuthorizationPolicy"), "the policy gone")


def apiserver_pid(lab) -> int:
    """The lab's kube-apiserver: a process of its control plane cgroup."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"nodeagent-{lab.name}/" in cgroup and (exe == "kube-apiserver" or any(
                a.endswith(b"kube-apiserver") for a in cmdline[:2])):
            return int(pid)
    raise AssertionError(f"no kube-apiserver process of lab {lab.name}")


def test_a_restarted_api_server_is_watched_again_and_a_compacted_version_listed_again(kube_lab, probe_on_kn1):
    """The API server killed (its supervisor starts it again) after etcd was compacted past
    every version the source has seen: each broken watch is watched again from its last
    version, which the new server answers with 410, so each kind is listed again; a
    Service made once the server is back is in the next models, and none is lost."""
    probe = probe_on_kn1
    from nodeagent.sources.kube import KINDS
    quiet(probe)
    kinds = len(KINDS) - len(probe.latest["errors"])  # the kinds not served are looked up, never listed
    before = dict(probe.latest["counts"])
    # The server gone first, then a write straight to etcd compacted away: every version the
    # source has seen is older. (Compacting first raced the watches' bookmarks: a watch
    # ending between the compaction's read and the kill carried the newest version, and
    # that kind was watched again without a 410; a fresh-clone run failed on it.)
    os.kill(apiserver_pid(kube_lab), signal.SIGKILL)
    bump = {"key": base64.b64encode(b"/nodeagent-e2e/bump").decode(), "value": base64.b64encode(b"1").decode()}
    revision = int(etcd(kube_lab, "/v3/kv/put", bump)["header"]["revision"])
    etcd(kube_lab, "/v3/kv/compaction", {"revision": str(revision), "physical": True})
    probe.wait(lambda: probe.latest["scan_error"], "the source to see the API server gone", timeout=60)
    probe.wait(lambda: kubectl(kube_lab, "get", "--raw", "/readyz", check=False).returncode == 0,
               "the API server back", timeout=120)
    kubectl(kube_lab, "create", "service", "clusterip", "after-restart", "-n", "shop", "--tcp=7070:7070")
    probe.wait(lambda: "shop/after-restart" in (probe.model() or {}).get("services", {}),
               "the Service made after the restart", timeout=120)
    probe.wait(lambda: probe.latest["scan_error"] is None and probe.latest["counts"]["gone"] - before["gone"] == kinds,
               "every kind listed again after its 410", timeout=120)
    counts = probe.latest["counts"]
    assert counts["failures"] > before["failures"]
    assert counts["lists"] - before["lists"] == kinds, (before, counts)  # one list per kind, after its 410
    assert "shop/after-restart" in probe.model()["services"] and "shop/web" in probe.model()["pods"]
    kubectl(kube_lab, "delete", "service", "after-restart", "-n", "shop")
    probe.wait(lambda: "shop/after-restart" not in probe.model()["services"], "the Service deleted")


def etcd(lab, path: str, body: dict) -> dict:
    """A call to the lab's etcd (plain HTTP, JSON gateway) from the control plane's netns."""
    code = ("import json, sys, urllib.request\n"
            f"r = urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:2379{path}', "
            f"data={json.dumps(body).encode()!r}, method='POST'), timeout=30)\n"
            "sys.stdout.write(r.read().decode())\n")
    out = subprocess.run(["ip", "netns", "exec", f"{lab.name}-cp", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_the_real_server_answers_a_compacted_resource_version_with_gone(kube_lab):
    """The client, in a node's netns: once etcd is compacted past a resourceVersion, a
    watch from it is a 410 the client types as Gone, which makes a reflector list again.
    (Version 1, older than the API server's watch cache, is served from etcd: before the
    compaction it replays every namespace's history, after it the server says 410.)"""
    kubeconfig = kube_lab.run("kubeconfig").stdout.strip()
    revision = int(etcd(kube_lab, "/v3/kv/range", {"key": "AA=="})["header"]["revision"])
    kubectl(kube_lab, "create", "configmap", "bump", "-n", "shop")  # the compacted revision is not the newest
    etcd(kube_lab, "/v3/kv/compaction", {"revision": str(revision + 1), "physical": True})
    code = ("import asyncio, pathlib\n"
            "from nodeagent.kube.client import KubeClient, Resource, from_kubeconfig, Gone\n"
            "from nodeagent.sources.kube import next_step\n"
            "async def main():\n"
            f"    c = KubeClient(from_kubeconfig(pathlib.Path({kubeconfig!r})))\n"
            "    items, rv = await c.list(Resource('/api/v1/namespaces', 'namespaces'), limit=2)\n"
            "    print(len(items) >= 5, int(rv) > 1)\n"
            "    try:\n"
            "        async for e in c.watch(Resource('/api/v1/namespaces', 'namespaces'), '1', timeout_seconds=5):\n"
            "            print('event', e['type'])\n"
            "    except Gone as exc:\n"
            "        print('gone', exc.status, next_step(exc))\n"
            "asyncio.run(main())\n")
    out = subprocess.run(["ip", "netns", "exec", f"{kube_lab.name}-n-kn2", sys.executable, "-c", code],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["True True", "gone 410 relist"], out.stdout


def test_a_kind_whose_crd_is_not_installed_is_reported_and_the_others_read(kube_lab, probe_on_kn1):
    probe = probe_on_kn1
    if istio_served(kube_lab):
        kubectl(kube_lab, "delete", "crd", "envoyfilters.networking.istio.io", "--wait=true")
        wanted = ["EnvoyFilter (networking.istio.io)"]
    else:
        from nodeagent.sources.kube import KINDS
        wanted = [str(k) for k in KINDS if k.group]
    # A watch's 404 first shows the kind failing (its objects kept); discovery then says it is not served.
    errors = probe.wait(lambda: (e := probe.latest["errors"])
                        and all("is its CRD installed?" in e.get(w, "") for w in wanted) and e,
                        "the missing kinds reported")
    assert sorted(errors) == sorted(wanted), errors
    assert all("is its CRD installed?" in errors[w] for w in wanted), errors
    assert probe.latest["scan_error"] is None  # a cluster without these CRDs has none of them
    assert "shop/web" in probe.model()["pods"]


# --- agents on the kube source ------------------------------------------------------------
def start_agent(lab, node: str) -> tuple[subprocess.Popen, Path]:
    """`nodeagent run --source kube:KUBECONFIG` on `node`, as the lab would run its agent."""
    from nodeagent.lab.layout import Layout
    from nodeagent.lab.processes import in_node
    layout = Layout(lab.name, cgroup_root=cgroup2_root())
    kubeconfig = lab.run("kubeconfig").stdout.strip()
    argv = in_node(layout, node, [
        sys.executable, "-m", "nodeagent", "run", "--node", node, "--source", f"kube:{kubeconfig}",
        "--cgroup", layout.kubepods_cgroup(node), "--bpffs", layout.node_bpffs(node),
        "--admin-socket", layout.agent_socket(node), "--waypoint-dir", layout.waypoint_dir(node),
        "--no-waypoint", "--no-keep-on-exit", "--flow-log", "off"])
    log = lab.workdir / f"{lab.name}-agent-{node}.log"
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT), log


def stop_agent(agent: subprocess.Popen) -> None:
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def agent_status(lab, node: str, agent: subprocess.Popen, log: Path) -> dict | None:
    assert agent.poll() is None, f"the agent of {node} exited {agent.returncode}: {log.read_text()[-3000:]}"
    proc = subprocess.run([sys.executable, "-m", "nodeagent", "status", "--lab", lab.name, "--node", node,
                           "--output", "json"], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def test_the_agent_runs_on_the_kube_source_and_enrols_an_api_pod(kube_lab):
    """`nodeagent run --source kube:KUBECONFIG` on kn1, as the lab would run its agent:
    it reads the API, enrols the ambient namespace's pod the lab's kubelet runs there
    and shows the source and its errors (the CRD the test before deleted) in status."""
    kubeconfig = kube_lab.run("kubeconfig").stdout.strip()
    kubectl(kube_lab, "label", "namespace", "shop", "istio.io/dataplane-mode=ambient", "--overwrite")
    agent, log = start_agent(kube_lab, "kn1")
    try:
        deadline, found = time.monotonic() + 240, None
        while time.monotonic() < deadline:
            found = agent_status(kube_lab, "kn1", agent, log)
            if found and found["ready"] and [p["name"] for p in found["pods"]] == ["web"]:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the agent did not enrol shop/web: {json.dumps(found)[:2000]}\n"
                                 f"{log.read_text()[-3000:]}")
        assert found["source"]["location"] == f"kube ({kubeconfig}, https://172.30.0.1:6443)"
        assert found["source"]["pods_on_node"] == 1
        errors = found["source"]["errors"]
        if istio_served(kube_lab):
            assert errors == {"EnvoyFilter (networking.istio.io)": "not served: networking.istio.io v1alpha3 has no "
                              "envoyfilters: is its CRD installed?"}
        assert errors and all(e.endswith("is its CRD installed?") for e in errors.values()), errors
        assert found["pods"][0]["namespace"] == "shop"
    finally:
        stop_agent(agent)
    assert agent.returncode == 0, log.read_text()[-3000:]


# --- Events for refused or unsupported Istio resources (kube/events.py) -----------------
EVENTS_NAMESPACE = """
apiVersion: v1
kind: Namespace
metadata: {name: evt}
"""

GATEWAY = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw, namespace: evt}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
"""


def bad_route(regex: str) -> str:
    """A VirtualService the CRD schema takes and the agents' validation refuses (`regex` does not compile)."""
    return f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: route, namespace: evt}}
spec:
  hosts: [web.shop.svc.cluster.local]
  http:
  - match: [{{uri: {{regex: {json.dumps(regex)}}}}}]
    route: [{{destination: {{host: web.shop.svc.cluster.local}}}}]
"""


GOOD_ROUTE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: route, namespace: evt}
spec:
  hosts: [web.shop.svc.cluster.local]
  http: [{route: [{destination: {host: web.shop.svc.cluster.local}}]}]
"""


def warnings_in(lab, namespace: str) -> dict[str, dict]:
    """The namespace's Events, by the name of the object they are on."""
    listed = get(lab, "events", "-n", namespace)["items"]
    out: dict[str, list] = {}
    for event in listed:
        out.setdefault(event["involvedObject"]["name"], []).append(event)
    return out


def test_refused_and_unsupported_istio_resources_get_one_warning_event_each_from_every_agent(kube_lab):
    """Agents on kn1 and kn2 (the kube source) find a Gateway (not supported in ambient
    mode) and a VirtualService whose regex does not compile (the CRD schema takes it):
    each gets exactly one Warning Event, named for the object and reason, created by one
    agent and counted up by the other (count 2). A new broken version is re-reported on
    the same Event (count 3-4: two agents' concurrent count patches may lose one); after
    the VirtualService is fixed and the Gateway deleted no Event is added or counted."""
    lab = kube_lab
    if not istio_served(lab):
        pytest.fail("the Istio CRDs are not served on lab up --kube")
    kubectl(lab, "apply", "-f", "-", input=EVENTS_NAMESPACE)
    kubectl(lab, "apply", "-f", "-", input=GATEWAY + "---" + bad_route("(unclosed"))
    uids = {name: kubectl(lab, "get", kind, name, "-n", "evt", "-o", "jsonpath={.metadata.uid}").stdout
            for kind, name in (("gateways.networking.istio.io", "gw"),
                               ("virtualservices.networking.istio.io", "route"))}
    agents = {}
    try:
        for node in ("kn1", "kn2"):
            agents[node] = start_agent(lab, node)

        def counted(wanted: Callable[[int], bool]) -> dict | None:
            found = warnings_in(lab, "evt")
            ok = set(found) == {"gw", "route"} and all(len(v) == 1 and wanted(v[0]["count"]) for v in found.values())
            return {name: v[0] for name, v in found.items()} if ok else None

        events = poll(lambda: counted(lambda c: c == 2), "one Event per object, counted by both agents", 240)
        gw, route = events["gw"], events["route"]
        assert (gw["type"], gw["reason"]) == ("Warning", "NotSupportedInAmbient")
        assert gw["message"].startswith("kube (Gateway evt/gw) kind: not supported in ambient mode: "), gw["message"]
        assert (route["type"], route["reason"]) == ("Warning", "Refused")
        assert route["message"].startswith("kube (VirtualService evt/route) spec.http[0].match[0].uri.regex"), \
            route["message"]
        assert "(unclosed" in route["message"] and "\n" not in route["message"]
        for name, event in events.items():
            ref = event["involvedObject"]
            assert (ref["namespace"], ref["name"], ref["uid"]) == ("evt", name, uids[name])
            assert event["source"]["component"] == event["reportingComponent"] == "nodeagent"
            assert event["source"]["host"] in ("kn1", "kn2")
        first_name = route["metadata"]["name"]

        kubectl(lab, "apply", "-f", "-", input=bad_route("[still"))  # re-reported: a new broken version
        again = poll(lambda: (e := counted(lambda c: c >= 2)) and "[still" in e["route"]["message"]
                     and e["route"]["count"] in (3, 4) and e, "the re-report counted on the same Event")
        assert again["route"]["metadata"]["name"] == first_name
        assert again["gw"]["count"] == 2  # the Gateway did not change: not re-reported

        kubectl(lab, "apply", "-f", "-", input=GOOD_ROUTE)
        kubectl(lab, "delete", "gateways.networking.istio.io", "gw", "-n", "evt", "--wait=true")
        for node, (agent, log) in agents.items():  # every agent's problems fixed
            poll(lambda: (st := agent_status(lab, node, agent, log)) and st["source"]["events"]["open"] == 0,
                 f"the agent of {node} to see the fixes")
        settled = {name: {k: e[k] for k in ("count", "lastTimestamp", "message")}
                   for name, e in counted(lambda c: True).items()}
        touched = time.time()  # one more model on each agent after the fixes: it writes nothing
        kubectl(lab, "label", "namespace", "evt", "touched=1", "--overwrite")
        statuses = {node: poll(lambda: (st := agent_status(lab, node, agent, log))
                               and (st["source"]["model_changed_at"] or 0) > touched and st,
                               f"the agent of {node} to read the next model")
                    for node, (agent, log) in agents.items()}
        for node, st in statuses.items():
            counts = st["source"]["events"]
            assert counts["failures"] == counts["dropped_rate"] == counts["dropped_queue"] == 0, (node, counts)
        assert sum(st["source"]["events"]["created"] for st in statuses.values()) == 2
        later = {name: {k: e[k] for k in ("count", "lastTimestamp", "message")}
                 for name, e in counted(lambda c: True).items()}
        assert later == settled  # nothing new once fixed
        assert settled["route"]["count"] in (3, 4) and settled["gw"]["count"] == 2
    finally:
        for agent, _ in agents.values():
            stop_agent(agent)
        kubectl(lab, "delete", "namespace", "evt", "--wait=false", check=False)
    for node, (agent, log) in agents.items():
        assert agent.returncode == 0, (node, log.read_text()[-3000:])


if __name__ == "__main__":
    asyncio.run(probe(sys.argv[1], int(sys.argv[2])))
