"""The lab file's pods in the API (`--kube`) as mirror pods, as kubelet shows static pods.

The file's pods (and the pods of its Deployments) run from lab.json, not from the API, as
a kubelet runs the static pods of its manifest directory. So each node, with its own
credentials, creates a mirror pod for each file pod on it, as kubelet's mirror client
does: the pod's name, namespace, labels and annotations, `spec.nodeName`, its containers
and restart policy, the annotations `kubernetes.io/config.mirror` (= `config.hash`, a
hash of what the file says) and `kubernetes.io/config.source: file`, and one controller
ownerReference to its Node (with the Node's UID, which NodeRestriction checks). Then it
keeps the pod's status — phase, podIP, hostIP, conditions, container states with restart
counts — from what the supervisor runs, by the lab kubelet's own rules
(`kubelet.pod_status`), so `kubectl get pods` lists them and the real EndpointSlice
controller makes the file's Services' slices from them.

As for kubelet, a mirror pod is only a view: one that differs from the file (labels or
containers changed by `lab apply`; a node may not update a pod's spec or metadata), one
whose pod left the lab, and one deleted through the API are deleted (grace 0, on its UID)
and, while the file still has the pod, created again. What NodeRestriction and the
ServiceAccount admission refuse in a mirror pod is left out: `serviceAccountName` (kept in
the annotation `nodeagent.io/service-account`), volumes, and env taken from Secrets or
ConfigMaps (the lab's file pods have none). A container without `image` shows NO_IMAGE.

Threads: the supervisor's loop computes the statuses (`observe`, it owns the units); the
thread `run` talks to the API each second.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

from nodeagent.errors import NodeagentError
from nodeagent.lab import spec
from nodeagent.lab.kube import kubelet
from nodeagent.lab.kube.api import STRATEGIC_PATCH, ApiClient, ApiError
from nodeagent.lab.state import LabRecord

MIRROR = "kubernetes.io/config.mirror"
SOURCE = "kubernetes.io/config.source"
HASH = "kubernetes.io/config.hash"
SERVICE_ACCOUNT = "nodeagent.io/service-account"
NO_IMAGE = "nodeagent-lab/host"  # the lab runs the command on the machine: there is no image
CONTAINER_FIELDS = ("name", "image", "command", "args", "env", "ports", "workingDir")
POLL = 1.0


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def is_mirror(item: dict) -> bool:
    return MIRROR in (item.get("metadata", {}).get("annotations") or {})


def _container(raw: dict) -> dict:
    out = {k: copy.deepcopy(v) for k, v in raw.items() if k in CONTAINER_FIELDS}
    out["image"] = out.get("image") or NO_IMAGE
    return out


def mirror_spec(pod: spec.PodSpec) -> tuple[dict, dict]:
    """(metadata without name/namespace/owner, spec) of the mirror pod of `pod`."""
    raw = pod.body.get("spec") or {}
    annotations = dict(pod.annotations)
    if pod.service_account != "default":
        annotations[SERVICE_ACCOUNT] = pod.service_account
    meta = {"labels": dict(pod.labels), "annotations": annotations}
    body = {"containers": [_container(c) for c in raw.get("containers", [])], "restartPolicy": pod.restart_policy}
    grace = raw.get("terminationGracePeriodSeconds")
    if isinstance(grace, int) and not isinstance(grace, bool):
        body["terminationGracePeriodSeconds"] = grace
    return meta, body


def pod_hash(pod: spec.PodSpec) -> str:
    """What `config.hash`/`config.mirror` say: a hash of what the file gives the pod."""
    meta, body = mirror_spec(pod)
    text = json.dumps([pod.namespace, pod.name, meta, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def mirror_pod(pod: spec.PodSpec, node: str, node_uid: str) -> dict:
    """The mirror pod node `node` creates for file pod `pod`."""
    meta, body = mirror_spec(pod)
    digest = pod_hash(pod)
    meta["annotations"].update({HASH: digest, MIRROR: digest, SOURCE: "file"})
    meta.update(name=pod.name, namespace=pod.namespace,
                ownerReferences=[{"apiVersion": "v1", "kind": "Node", "name": node, "uid": node_uid,
                                  "controller": True}])
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": {**body, "nodeName": node}}


def why_replace(item: dict, pod: spec.PodSpec | None) -> str | None:
    """Why mirror pod `item` must be deleted (None: it shows `pod` as it is)."""
    meta = item["metadata"]
    if pod is None:
        return "its pod left the lab"
    if meta.get("deletionTimestamp"):
        return "deleted through the API"
    if (meta.get("annotations") or {}).get(MIRROR) != pod_hash(pod):
        return "the file's pod changed"
    return None


@dataclass
class MirrorPods:
    """The mirror pods of every node of the lab; see the module docstring."""

    record: LabRecord
    clients: dict[str, ApiClient]  # node -> as that node
    log: logging.Logger
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: dict[str, dict] = field(default_factory=dict)  # file pod key -> its status (under lock)
    pods: dict[str, kubelet.KubePod] = field(default_factory=dict)  # the supervisor's loop only
    node_uids: dict[str, str] = field(default_factory=dict)
    reported: dict[str, dict[str, dict]] = field(default_factory=dict)  # node -> mirror uid -> status patched
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    said: dict[str, str] = field(default_factory=dict)

    # --- the supervisor's loop ---------------------------------------------------------
    def observe(self, record: LabRecord, units: dict, phase_of: Callable[[list], str]) -> None:
        """The status of every file pod from its units (`pod:<ns>/<name>/<container>`)."""
        wall, statuses, pods = _now(), {}, {}
        for key, pod in record.desired.pods.items():
            mine = {c.name: units.get(f"pod:{key}/{c.name}") for c in pod.containers}
            if None in mine.values():
                continue
            known = self.pods.get(key)
            if known is None or any(known.units.get(n) is not u for n, u in mine.items()):
                alloc = record.alloc.pods[key]
                images = {c.get("name"): c.get("image") or NO_IMAGE for c in (pod.body.get("spec") or {})
                          .get("containers", [])}
                known = kubelet.KubePod(alloc.uid, pod, alloc.node, alloc.ip, record.alloc.nodes[alloc.node].fabric_ip,
                                        False, mine, images)
            known.pod = pod  # relabelled by `apply`: the same processes, so the same history
            kubelet.observe_units(known, wall)
            pods[key] = known
            statuses[key] = kubelet.pod_status(known, phase_of(list(mine.values())))
        self.pods = pods
        with self.lock:
            self.record, self.statuses = record, statuses

    # --- the thread ----------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="mirror-pods", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def run(self) -> None:
        while not self.stop_event.is_set():
            with self.lock:
                record, statuses = self.record, dict(self.statuses)
            for node, client in self.clients.items():
                try:
                    self.sync_node(node, client, record, statuses)
                    self.said.pop(node, None)
                except (ApiError, NodeagentError, OSError) as exc:
                    self._warn(node, f"mirror pods of {node}: {exc} (retrying)")
            self.stop_event.wait(POLL)

    def _warn(self, key: str, message: str) -> None:
        if self.said.get(key) != message:
            self.log.warning("%s", message)
            self.said[key] = message

    def _node_uid(self, node: str, client: ApiClient) -> str | None:
        if node not in self.node_uids:
            status, answer = client.request("GET", f"/api/v1/nodes/{node}")
            if status != 200 or not isinstance(answer, dict):
                return None  # not registered yet: the heartbeat thread does it
            self.node_uids[node] = answer["metadata"]["uid"]
        return self.node_uids[node]

    def sync_node(self, node: str, client: ApiClient, record: LabRecord, statuses: dict[str, dict]) -> None:
        node_uid = self._node_uid(node, client)
        if node_uid is None:
            return
        wanted = {k: p for k, p in record.desired.pods.items() if record.alloc.pods[k].node == node}
        live = {}
        for item in client.call("GET", kubelet.pods_path(node)).get("items", []):
            if not is_mirror(item):
                continue
            meta = item["metadata"]
            key = f"{meta['namespace']}/{meta['name']}"
            why = why_replace(item, wanted.get(key))
            if why is None:
                live[key] = item
                continue
            body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                    "preconditions": {"uid": meta["uid"]}}
            client.call("DELETE", kubelet.pod_path(meta["namespace"], meta["name"]), body, ok=(200, 202, 404, 409))
            self.log.info("mirror pod %s (uid %s) deleted: %s", key, meta["uid"], why)
        reported = self.reported.setdefault(node, {})
        for uid in set(reported) - {i["metadata"]["uid"] for i in live.values()}:
            reported.pop(uid)  # deleted: a new one is reported afresh
        for key, pod in wanted.items():
            item = live.get(key) or self._create(node, client, pod, node_uid)
            if item is None:
                continue
            uid, status = item["metadata"]["uid"], statuses.get(key)
            if status is not None and reported.get(uid) != status:
                client.call("PATCH", kubelet.pod_path(pod.namespace, pod.name) + "/status",
                            {"metadata": {"uid": uid}, "status": status}, STRATEGIC_PATCH)
                reported[uid] = status

    def _create(self, node: str, client: ApiClient, pod: spec.PodSpec, node_uid: str) -> dict | None:
        status, answer = client.request("POST", f"/api/v1/namespaces/{pod.namespace}/pods",
                                        mirror_pod(pod, node, node_uid))
        if status == 201 and isinstance(answer, dict):
            self.log.info("mirror pod %s (uid %s) created on %s", pod.key, answer["metadata"]["uid"], node)
            self.said.pop(pod.key, None)
            return answer
        message = answer.get("message") if isinstance(answer, dict) else str(answer).strip()
        if status == 403 and "UID mismatch" in str(message):
            self.node_uids.pop(node, None)  # the Node was registered again
        if status == 409:
            message = "a pod of the API holds its name"
        line = f"mirror pod {pod.key} not created on {node} yet: {status} {message}"
        if status == 404 and self.said.get(pod.key) != line:  # its namespace: `up` applies it next
            self.log.info("%s", line)
            self.said[pod.key] = line
        self._warn(pod.key, line)
        return None
