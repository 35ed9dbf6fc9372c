"""The labs `nodeagent bench mesh` brings up, as lab YAML, and where each set-up sends.

Main lab (two nodes): the same client and servers twice, in namespace `plain` (not
meshed: the direct set-up, and the pods the Envoy sidecars run in) and in `mesh`
(istio.io/dataplane-mode=ambient). A server pod runs the static app (an Envoy answering
every request, bench/sidecars.py) on 8080 and `iperf3 -s` on 5201; `server` is on node2
(cross-node), `local` on node1 (same-node), next to the clients. In `mesh`, `server7` and
`local7` are the same again behind Services with a VirtualService (so the client node's
waypoint takes their traffic: HTTP through its HTTP connection manager, the iperf3 port
through its tcp_proxy) and an AuthorizationPolicy with HTTP fields, which that waypoint
enforces for them (one waypoint per request: the server node's is on the path only of
what reaches the pods otherwise). Services `web7s` and `web7s-local` select the
same two pods without a VirtualService: only the server node's waypoint is on their
path (the policy's). Every set-up reaches its server through a
Service's ClusterIP, as a Kubernetes client would; the sidecar pair sends to the server
pod's IP, as a sidecar does after its own endpoint pick.

Memory lab: a meshed client on node1 and an L7 server (`server7`) on node2, then more
meshed pods (idle, each with its own service account, so its own certificate) until
each node holds N.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

HTTP_PORT, IPERF_PORT = 8080, 5201
PLACEMENT_SERVER = {"cross": ("server", "node2"), "same": ("local", "node1")}
CLIENT_NODE = "node1"
# client sidecar, per target: (http, tcp for iperf3, tcp to the app's HTTP port)
SIDECAR_PORTS = {"cross": (15001, 15011, 15021), "same": (15002, 15012, 15022)}
L7_LABEL = {"l7": "on"}
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


@dataclass(frozen=True)
class Target:
    """Where one set-up sends from which pod: wrk's URL and iperf3's address."""

    client: str  # pod key ns/name
    url: str
    iperf: tuple[str, int]
    server: str  # the server pod's key
    tcp_url: str | None = None  # the anchor's: the same app through the sidecars' tcp_proxy (L4)


def _doc(obj: dict) -> str:
    return json.dumps(obj, sort_keys=False)


def _node(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


def _namespace(name: str, labels: dict | None = None) -> dict:
    metadata = {"name": name, **({"labels": labels} if labels else {})}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata}


def _pod(ns: str, name: str, node: str, containers: list[list[str]], labels: dict | None = None,
         account: str | None = None) -> dict:
    spec = {"nodeName": node, "serviceAccountName": account or name,
            "containers": [{"name": f"c{i}", "command": c} for i, c in enumerate(containers)]}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, **({"labels": labels} if labels else {})}, "spec": spec}


def _server(ns: str, name: str, node: str, app: list[str], labels: dict | None = None) -> dict:
    return _pod(ns, name, node, [app, ["iperf3", "-s", "-p", str(IPERF_PORT)]], {"app": name, **(labels or {})})


def _service(ns: str, name: str, app: str) -> dict:
    ports = [{"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT},
             {"name": "tcp-iperf", "port": IPERF_PORT, "targetPort": IPERF_PORT}]
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": app}, "ports": ports}}


def _virtual_service(ns: str, host: str) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": host, "namespace": ns},
            "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host}}]}]}}


def _l7_policy(ns: str) -> dict:
    # HTTP fields on 8080 put the pods' HTTP traffic through their node's waypoint; the
    # second rule keeps iperf3's TCP port allowed (the agent enforces it at L4).
    rules = [{"to": [{"operation": {"ports": [str(HTTP_PORT)], "methods": ["GET"]}}]},
             {"to": [{"operation": {"ports": [str(IPERF_PORT)]}}]}]
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "l7", "namespace": ns},
            "spec": {"selector": {"matchLabels": L7_LABEL}, "action": "ALLOW", "rules": rules}}


def main_lab(app: list[str]) -> str:
    docs = [_node("node1"), _node("node2"), _namespace("plain"), _namespace("mesh", AMBIENT)]
    for ns in ("plain", "mesh"):
        docs.append(_pod(ns, "client", CLIENT_NODE, [["sleep", "infinity"]]))
        for placement, (server, node) in PLACEMENT_SERVER.items():
            service = "web" if placement == "cross" else "web-local"
            docs += [_server(ns, server, node, app), _service(ns, service, server)]
    for placement, (server, node) in PLACEMENT_SERVER.items():
        service = service_name(placement, "l7")
        docs += [_server("mesh", f"{server}7", node, app, L7_LABEL), _service("mesh", service, f"{server}7"),
                 _virtual_service("mesh", service), _service("mesh", service_name(placement, "l7s"), f"{server}7")]
    docs.append(_l7_policy("mesh"))
    return "\n---\n".join(_doc(d) for d in docs) + "\n"


def service_name(placement: str, setup: str) -> str:
    base = {"l7": "web7", "l7s": "web7s"}.get(setup, "web")
    return base if placement == "cross" else f"{base}-local"


def target(placement: str, setup: str, vips: dict[str, str]) -> Target:
    """`vips`: ns/service -> ClusterIP."""
    server = PLACEMENT_SERVER[placement][0]
    if setup == "envoy":
        http, tcp, tcp_http = SIDECAR_PORTS[placement]
        return Target("plain/client", f"http://127.0.0.1:{http}/", ("127.0.0.1", tcp), f"plain/{server}",
                      f"http://127.0.0.1:{tcp_http}/")
    ns = "plain" if setup == "direct" else "mesh"
    vip = vips[f"{ns}/{service_name(placement, setup)}"]
    pod = f"mesh/{server}7" if setup in ("l7", "l7s") else f"{ns}/{server}"
    return Target(f"{ns}/client", f"http://{vip}:{HTTP_PORT}/", (vip, IPERF_PORT), pod)


def memory_lab(app: list[str]) -> str:
    docs = [_node("node1"), _node("node2"), _namespace("mesh", AMBIENT),
            _pod("mesh", "client", "node1", [["sleep", "infinity"]]),
            _server("mesh", "server7", "node2", app, L7_LABEL), _service("mesh", "web7", "server7"),
            _virtual_service("mesh", "web7"), _l7_policy("mesh")]
    return "\n---\n".join(_doc(d) for d in docs) + "\n"


def fillers(node_index: int, start: int, stop: int) -> list[dict]:
    """Idle meshed pods fill<node>-<i> for i in [start, stop), each its own service account."""
    return [_pod("mesh", f"fill{node_index}-{i}", f"node{node_index}", [["sleep", "infinity"]])
            for i in range(start, stop)]


def fillers_yaml(per_node_before: int, per_node_after: int) -> str:
    """The pods that take each node from `per_node_before` meshed pods to `per_node_after`
    (every node starts with one: the client, the server)."""
    docs = fillers(1, per_node_before, per_node_after) + fillers(2, per_node_before, per_node_after)
    return "\n---\n".join(_doc(d) for d in docs) + "\n"
