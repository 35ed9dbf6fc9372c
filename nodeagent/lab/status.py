"""`lab status`: nodes, pods and services of a lab, as a table or as JSON.

The mesh CA (when the lab runs agents) shows where it listens and how it runs.
Pods show the phase the supervisor published (a waiting reason such as
CrashLoopBackOff wins) and whether the mesh enrols them, decided by the same
`Model.is_meshed` the agents use, on the same Kubernetes-shaped state they read.
"""

from __future__ import annotations

import json
import os

from nodeagent.admin import fetch_status
from nodeagent.errors import NodeagentError
from nodeagent.lab import meshca, services, supervisor
from nodeagent.lab.kube import controlplane, mirror
from nodeagent.lab.state import LabRecord, Runtime, lab_model


def collect(record: LabRecord, runtime: Runtime) -> dict:
    desired, alloc = record.desired, record.alloc
    model = lab_model(record, runtime)
    running = runtime.running()
    return {
        "name": record.name,
        "agents": record.agents,
        "stateDir": record.layout.state_dir,
        "supervisor": {"pid": record.supervisor_pid,
                       "running": supervisor.is_supervisor(record.supervisor_pid, record.name)},
        "ca": _ca(record, runtime),
        "controlplane": {"server": controlplane.server(), "kubeconfig": record.layout.admin_kubeconfig,
                         "components": runtime.controlplane, "pods": _api_pods(record)} if record.kube else None,
        "nodes": [{"name": name, "fabricIP": alloc.nodes[name].fabric_ip, "podCIDR": alloc.nodes[name].pod_cidr,
                   "agent": runtime.agents.get(name) if record.agents else None,
                   "waypoint": _waypoint(record, name) if record.agents else None}
                  for name in desired.node_names],
        "pods": [{"namespace": pod.namespace, "name": pod.name, "ip": alloc.pods[key].ip,
                  "node": alloc.pods[key].node, "phase": runtime.shown_phase(key),
                  "restarts": runtime.restarts(key), "meshed": model.is_meshed(model.pods[(pod.namespace, pod.name)]),
                  "uid": alloc.pods[key].uid}
                 for key, pod in sorted(desired.pods.items())],
        "services": [{"namespace": svc.namespace, "name": svc.name, "clusterIP": alloc.services[key],
                      "ports": [{"name": port.name, "port": port.port, "targetPort": port.target_port,
                                 "protocol": port.protocol, "endpoints": [f"{e.ip}:{e.port}" for e in eps]}
                                for port, eps in services.endpoints(svc, desired, alloc, running).items()]}
                     for key, svc in sorted(desired.services.items())],
    }


def _api_pods(record: LabRecord) -> list[dict] | str:
    """The API's pods on the lab's nodes (the lab's kubelet runs them), or why not known."""
    try:
        items = controlplane.admin_client(record.layout).call("GET", "/api/v1/pods").get("items", [])
    except NodeagentError as exc:
        return f"cannot list the API's pods: {exc}"
    return [{"namespace": p["metadata"]["namespace"], "name": p["metadata"]["name"],
             "ip": p.get("status", {}).get("podIP", ""), "node": p["spec"].get("nodeName", ""),
             "phase": p.get("status", {}).get("phase", ""),
             "restarts": sum(c.get("restartCount", 0) for c in p.get("status", {}).get("containerStatuses", [])),
             "uid": p["metadata"]["uid"]}
            for p in sorted(items, key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"]))
            if p["spec"].get("nodeName") in record.alloc.nodes and not mirror.is_mirror(p)]  # file pods: listed above


def _ca(record: LabRecord, runtime: Runtime) -> dict | None:
    if not record.agents:
        return None
    ip, port = meshca.address(record)
    return {"node": meshca.ca_node(record), "address": f"{ip}:{port}", "rootCert": record.layout.root_cert,
            "trustDomain": meshca.TRUST_DOMAIN, **runtime.ca}


def _waypoint(record: LabRecord, node: str) -> dict | None:
    """The node's waypoint as its agent reports it (None when the agent cannot say)."""
    try:
        status = fetch_status(record.layout.agent_socket(node), timeout=2.0)
    except (NodeagentError, OSError, ValueError):
        return None
    waypoint = status.get("waypoint")
    if not waypoint:
        return {"enabled": False}
    return {"enabled": True, "envoy": waypoint["envoy"], "inSync": waypoint["xds"]["in_sync"],
            "accepted": waypoint["xds"]["accepted"], "errors": len(waypoint["errors"])}


def _envoy(waypoint: dict | None) -> str:
    if waypoint is None:
        return "-"
    if not waypoint["enabled"]:
        return "off"
    envoy = waypoint["envoy"]
    state = f"envoy pid {envoy['pid']}" if envoy["running"] else "ENVOY NOT RUNNING"
    sync = f"config {waypoint['accepted']} in sync" if waypoint["inSync"] else "syncing"
    problems = f", {waypoint['errors']} config errors" if waypoint["errors"] else ""
    return f"{state}, {envoy['restarts']} restarts, {sync}{problems}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [headers, *rows])


def _process(proc: dict | None) -> str:
    if not proc:
        return "-"
    return f"{proc['state']} (pid {proc['pid']}, {proc['restarts']} restarts)" if proc.get("pid") \
        else proc.get("state", "waiting")


def render(data: dict) -> str:
    sup = data["supervisor"]
    head = (f"Lab {data['name']}: state in {data['stateDir']}, supervisor pid {sup['pid']} "
            f"({'running' if sup['running'] else 'NOT RUNNING'}), agents {'on' if data['agents'] else 'off'}")
    nodes = _table(["NODE", "FABRIC IP", "POD CIDR", "AGENT", "WAYPOINT"],
                   [[n["name"], n["fabricIP"], n["podCIDR"], _process(n["agent"]), _envoy(n.get("waypoint"))]
                    for n in data["nodes"]])
    pods = _table(["NAMESPACE", "POD", "IP", "NODE", "PHASE", "RESTARTS", "MESHED"],
                  [[p["namespace"], p["name"], p["ip"], p["node"], p["phase"], str(p["restarts"]),
                    "yes" if p["meshed"] else "no"] for p in data["pods"]])
    svcs = _table(["NAMESPACE", "SERVICE", "CLUSTER IP", "PORT", "ENDPOINTS"],
                  [[s["namespace"], s["name"], s["clusterIP"], f"{p['port']}/{p['protocol']}->{p['targetPort']}",
                    ",".join(p["endpoints"]) or "<none>"] for s in data["services"] for p in s["ports"]])
    ca = data.get("ca")
    if ca:
        head += (f"\nMesh CA ({ca['trustDomain']}) on {ca['node']} at {ca['address']}: {_process(ca)}; "
                 f"root {ca['rootCert']}")
    cp = data.get("controlplane")
    parts = [head, nodes, pods, svcs]
    if cp:
        head += (f"\nControl plane at {cp['server']} (kubeconfig {cp['kubeconfig']}): "
                 + ", ".join(f"{name} {_process(c)}" for name, c in cp["components"].items()))
        parts[0] = head
        parts.append(cp["pods"] if isinstance(cp["pods"], str) else _table(
            ["NAMESPACE", "POD (API)", "IP", "NODE", "PHASE", "RESTARTS"],
            [[p["namespace"], p["name"], p["ip"], p["node"], p["phase"], str(p["restarts"])] for p in cp["pods"]]))
    return "\n\n".join(parts) + "\n"


def to_json(data: dict) -> str:
    return json.dumps(data, indent=2) + os.linesep
