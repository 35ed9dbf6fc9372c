"""`nodeagent status --kube`: every node's agent as the Kubernetes API sees it.

Where `nodeagent status` asks one agent over its admin socket, this asks the API server
(as the user running it: a kubeconfig, or in-cluster) about the agent DaemonSet: its
counts (desired, ready, updated, available), then one row per node — the agent pod,
its phase, Ready and why not, restarts, age, image, and the Warning Events about that
pod (kubelet's probe failures, back-offs, mounts: the sum of their counts). Nodes come
from the API's Node list (those the DaemonSet's nodeSelector selects), so a node
without an agent pod shows; without permission to list Nodes, the nodes with an agent
pod and the DaemonSet's counts are all there is to go by (said in the output).

`summarise` (recorded API objects in, JSON-ready summary out) and `render_text` are pure;
`read` makes the four requests (the DaemonSet, its pods, the Nodes, the Warning
Events of its namespace). The summary's `ok` is false when a node lacks a Ready agent,
when the DaemonSet counts fewer ready than desired, or when there is no DaemonSet: the
command then exits 1.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, Mapping

from nodeagent.agent.status import table
from nodeagent.kube.client import (ClusterConfig, KubeApiError, KubeClient, NotFound, Resource, from_kubeconfig,
                                   in_cluster)

NAMESPACE, DAEMONSET = "nodeagent-system", "nodeagent"


def kube_config(kubeconfig: str | None, environ: Mapping[str, str] | None = None) -> ClusterConfig:
    """--kubeconfig, else $KUBECONFIG's first existing file, else ~/.kube/config, else in-cluster."""
    environ = os.environ if environ is None else environ
    if kubeconfig:
        return from_kubeconfig(Path(kubeconfig))
    candidates = [p for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    candidates.append(str(Path(environ.get("HOME", "~")).expanduser() / ".kube" / "config"))
    for path in candidates:
        if Path(path).is_file():
            return from_kubeconfig(Path(path))
    return in_cluster(environ)


async def read(client: KubeClient, namespace: str = NAMESPACE, name: str = DAEMONSET) -> dict[str, Any]:
    """The API objects `summarise` reads: {daemonset, pods, nodes (None: not allowed), events}."""
    path = f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"
    try:
        daemonset = await client.get(path, f"daemonset {namespace}/{name}")
    except NotFound:
        return {"daemonset": None, "pods": [], "nodes": None, "events": [], "namespace": namespace, "name": name}
    labels = ((daemonset.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    pods, _ = await client.list(Resource(f"/api/v1/namespaces/{namespace}/pods", f"pods in {namespace}"),
                                {"labelSelector": selector} if selector else {})
    try:
        nodes, _ = await client.list(Resource("/api/v1/nodes", "nodes"))
    except KubeApiError as exc:
        if exc.status != 403:
            raise
        nodes = None
    events, _ = await client.list(Resource(f"/api/v1/namespaces/{namespace}/events", f"events in {namespace}"),
                                  {"fieldSelector": "type=Warning,involvedObject.kind=Pod"})
    return {"daemonset": daemonset, "pods": pods, "nodes": nodes, "events": events,
            "namespace": namespace, "name": name}


# --- pure: API objects -> summary -> text ----------------------------------------------
def _meta(obj: Mapping[str, Any]) -> dict:
    return obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}


def _time(stamp: Any) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _owned_by(pod: Mapping[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid and r.get("controller") for r in _meta(pod).get("ownerReferences") or []
               if isinstance(r, dict))


def _selected(node: Mapping[str, Any], selector: Mapping[str, str]) -> bool:
    labels = _meta(node).get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _ready_condition(pod: Mapping[str, Any]) -> dict:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            return cond
    return {}


def not_ready_reason(pod: Mapping[str, Any], last_probe_failure: str = "") -> str:
    """Why a pod is not Ready, most telling first: terminating, a container waiting or
    ended (CrashLoopBackOff, ContainerCreating...), the newest failed probe (kubelet's
    Unhealthy Warning: the readiness probe's answer), the Ready condition."""
    if _meta(pod).get("deletionTimestamp"):
        return "terminating"
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        for kind in ("waiting", "terminated"):
            if isinstance(state.get(kind), dict) and state[kind].get("reason"):
                detail = state[kind].get("message") or ""
                return f"{status.get('name')} {kind}: {state[kind]['reason']}" + (f": {detail}" if detail else "")
    if last_probe_failure:
        return last_probe_failure
    cond = _ready_condition(pod)
    if cond:
        return ": ".join(str(p) for p in (cond.get("reason"), cond.get("message")) if p) or "not ready"
    return str((pod.get("status") or {}).get("reason") or "not ready")


PROBE_FAILED = "Unhealthy"  # kubelet's reason for a failed readiness or liveness probe


def _warnings(events: list[dict]) -> dict[str, tuple[int, float, str]]:
    """Pod name -> (occurrences of Warning Events, time and 'reason: message' of the newest failed probe)."""
    out: dict[str, tuple[int, float, str]] = {}
    for event in events:
        if event.get("type") != "Warning" or (event.get("involvedObject") or {}).get("kind") != "Pod":
            continue
        name = (event.get("involvedObject") or {}).get("name") or ""
        count = int(event.get("count") or (event.get("series") or {}).get("count") or 1)
        when = _time(event.get("lastTimestamp") or event.get("eventTime") or _meta(event).get("creationTimestamp")) or 0
        text = ": ".join(str(p) for p in (event.get("reason"), event.get("message")) if p)
        total, newest, last = out.get(name, (0, -1.0, ""))
        newer = event.get("reason") == PROBE_FAILED and when >= newest
        out[name] = (total + count, *((when, text) if newer else (newest, last)))
    return out


def summarise(objects: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The JSON `status --kube -o json` prints, from what `read` got."""
    namespace, name, ds = objects["namespace"], objects["name"], objects["daemonset"]
    if ds is None:
        return {"daemonset": None, "nodes": [], "nodes_listed": False, "note": "", "ok": False,
                "problems": [f"no DaemonSet {namespace}/{name}: is nodeagent installed (kubectl apply -k daemonset/)?"]}
    status, spec = ds.get("status") or {}, ds.get("spec") or {}
    template = (spec.get("template") or {}).get("spec") or {}
    uid = _meta(ds).get("uid")
    counts = {"desired": int(status.get("desiredNumberScheduled") or 0),
              "current": int(status.get("currentNumberScheduled") or 0),
              "ready": int(status.get("numberReady") or 0),
              "updated": int(status.get("updatedNumberScheduled") or 0),
              "available": int(status.get("numberAvailable") or 0)}
    summary_ds = {"namespace": namespace, "name": name, **counts,
                  "generation": _meta(ds).get("generation"), "observed_generation": status.get("observedGeneration"),
                  "image": ", ".join(c.get("image", "?") for c in template.get("containers") or [])}
    warnings = _warnings(objects["events"])
    rows = [_pod_row(p, warnings, now) for p in objects["pods"] if not uid or _owned_by(p, uid)]
    nodes = objects["nodes"]
    if nodes is not None:
        selector = template.get("nodeSelector") or {}
        with_pods = {r["node"] for r in rows}
        rows += [_missing_row(_meta(n).get("name") or "?") for n in nodes
                 if _selected(n, selector) and _meta(n).get("name") not in with_pods]
    rows.sort(key=lambda r: (r["node"], r["pod"] or ""))
    ready_nodes = {r["node"] for r in rows if r["ready"]}
    problems = [f"node {node}: {_why_not(node, rows)}" for node in sorted({r["node"] for r in rows} - ready_nodes)]
    if counts["ready"] < counts["desired"]:
        problems.append(f"DaemonSet {namespace}/{name}: {counts['ready']} of {counts['desired']} agents ready")
    note = "" if nodes is not None else \
        "Nodes not listed (no permission to list them): only nodes with an agent pod are shown"
    return {"daemonset": summary_ds, "nodes": rows, "nodes_listed": nodes is not None, "note": note,
            "ok": not problems, "problems": problems}


def _pod_row(pod: Mapping[str, Any], warnings: dict, now: float) -> dict[str, Any]:
    meta, spec, status = _meta(pod), pod.get("spec") or {}, pod.get("status") or {}
    name = meta.get("name") or "?"
    count, _, last = warnings.get(name, (0, 0, ""))
    ready = _ready_condition(pod).get("status") == "True" and not meta.get("deletionTimestamp")
    containers = status.get("containerStatuses") or []
    started = _time(meta.get("creationTimestamp"))
    return {"node": spec.get("nodeName") or "(unscheduled)", "pod": name, "phase": status.get("phase") or "Unknown",
            "ready": ready, "reason": "" if ready else not_ready_reason(pod, last),
            "restarts": sum(int(c.get("restartCount") or 0) for c in containers),
            "age_seconds": None if started is None else max(0, int(now - started)),
            "image": ", ".join(c.get("image", "?") for c in spec.get("containers") or []),
            "warnings": count}


def _missing_row(node: str) -> dict[str, Any]:
    return {"node": node, "pod": None, "phase": None, "ready": False, "reason": "no agent pod",
            "restarts": 0, "age_seconds": None, "image": None, "warnings": 0}


def _why_not(node: str, rows: list[dict]) -> str:
    return "; ".join(f"{r['pod'] or 'no agent pod'}" + (f": {r['reason']}" if r["pod"] else "")
                     for r in rows if r["node"] == node)


def age(seconds: int | None) -> str:
    """As kubectl shows ages, roughly: 45s, 12m, 5h, 3d."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def render_text(summary: Mapping[str, Any]) -> str:
    ds = summary["daemonset"]
    if ds is None:
        return "\n".join(f"NOT OK: {p}" for p in summary["problems"]) + "\n"
    lines = [f"DaemonSet {ds['namespace']}/{ds['name']}: desired {ds['desired']}, ready {ds['ready']}, "
             f"updated {ds['updated']}, available {ds['available']} (image {ds['image']})", ""]
    headers = ["NODE", "AGENT POD", "PHASE", "READY", "RESTARTS", "AGE", "IMAGE", "WARNINGS", "NOT READY BECAUSE"]
    lines.append(table(headers, [[r["node"], r["pod"] or "-", r["phase"] or "-", "yes" if r["ready"] else "no",
                                  r["restarts"], age(r["age_seconds"]), r["image"] or "-", r["warnings"], r["reason"]]
                                 for r in summary["nodes"]]))
    if summary.get("note"):
        lines += ["", summary["note"]]
    lines += [""] + ([f"NOT OK: {p}" for p in summary["problems"]] or ["ok: every node has a Ready agent"])
    return "\n".join(lines) + "\n"


def render(summary: Mapping[str, Any], output: str) -> str:
    if output == "json":
        return json.dumps(summary, indent=2, sort_keys=True) + "\n"
    return render_text(summary)
