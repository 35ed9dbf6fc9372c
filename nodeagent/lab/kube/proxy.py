"""The API's Services as kube-proxy serves them (`--kube`): rules and names for the lab.

Read with kube-proxy's own identity (`system:kube-proxy`, bound to `system:node-proxier`
by the API server's default RBAC): every ClusterIP Service and its EndpointSlices (from
the real EndpointSlice controller) become `services.Rule`s — ClusterIP:port to the ready
endpoints at the slice's port of the same name — which the supervisor loads into every
node's table beside the file's services, and `dns.Name`s for every pod's hosts file.
`default/kubernetes` and the file's Services (created in the API with the lab's
ClusterIPs, kube/fileobjects.py) are left out: the lab serves them already.
Pure but for `fetch`.
"""

from __future__ import annotations

from nodeagent.lab import dns, services
from nodeagent.lab.kube.api import ApiClient

SERVICE_LABEL = "kubernetes.io/service-name"
SKIP = {("default", "kubernetes")}


def fetch(client: ApiClient) -> tuple[list[dict], list[dict]]:
    """Every Service and EndpointSlice in the API."""
    svcs = client.call("GET", "/api/v1/services").get("items", [])
    slices = client.call("GET", "/apis/discovery.k8s.io/v1/endpointslices").get("items", [])
    return svcs, slices


def _cluster_services(svcs: list[dict], skip: set[str]) -> list[dict]:
    out = []
    for svc in svcs:
        meta, spec = svc["metadata"], svc.get("spec", {})
        ip = spec.get("clusterIP")
        if (meta["namespace"], meta["name"]) in SKIP or f"{meta['namespace']}/{meta['name']}" in skip \
                or not ip or ip == "None" or ":" in ip:
            continue
        if spec.get("type", "ClusterIP") not in ("ClusterIP", "NodePort", "LoadBalancer"):
            continue
        out.append(svc)
    return out


def rules(svcs: list[dict], slices: list[dict], skip: set[str] = frozenset()) -> tuple[services.Rule, ...]:
    """The lab's service rules for the API's Services but those in `skip` ("ns/name":
    the file's, which the lab serves from its own pods), sorted for a stable table."""
    by_service: dict[tuple[str, str], list[dict]] = {}
    for s in slices:
        name = s["metadata"].get("labels", {}).get(SERVICE_LABEL)
        if name and s.get("addressType", "IPv4") == "IPv4":
            by_service.setdefault((s["metadata"]["namespace"], name), []).append(s)
    out = []
    for svc in _cluster_services(svcs, skip):
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        for port in svc["spec"].get("ports", []):
            protocol = port.get("protocol", "TCP")
            if protocol not in ("TCP", "UDP"):
                continue
            endpoints = set()
            for s in by_service.get((ns, name), []):
                for sp in s.get("ports") or []:
                    if sp.get("name", "") == port.get("name", "") and sp.get("protocol", "TCP") == protocol:
                        for ep in s.get("endpoints") or []:
                            if ep.get("conditions", {}).get("ready", True):
                                endpoints.update(services.Endpoint(a, sp["port"]) for a in ep.get("addresses", []))
            out.append(services.Rule(f"{ns}/{name}", svc["spec"]["clusterIP"], port["port"], protocol,
                                     tuple(sorted(endpoints, key=lambda e: (e.ip, e.port)))))
    return tuple(sorted(out, key=lambda r: (r.service, r.protocol, r.port)))


def names(svcs: list[dict], skip: set[str] = frozenset()) -> tuple[dns.Name, ...]:
    return tuple(sorted((dns.Name(s["metadata"]["namespace"], s["metadata"]["name"], s["spec"]["clusterIP"])
                         for s in _cluster_services(svcs, skip)), key=lambda n: (n.namespace, n.name)))
