"""The lab file's objects in the API (`--kube`), as far as the lab has moved them there.

So far its Namespaces and Services. Each namespace the file declares or implies is
created (or, when it exists, such as `default`, given the file's labels and annotations
by merge patch), so `kubectl apply` into the file's namespaces works and their labels
(e.g. `istio.io/dataplane-mode`) are the same in the API as in the files source. Each
Service is created with the ClusterIP the lab gave it, so the API never hands that
address to another Service and `kubectl get svc` shows it; the lab serves it from its
own pods (kube-proxy's view skips it: kube/proxy.py). The file's Pods and Deployments
still run from the file (lab.json), not through the API.
"""

from __future__ import annotations

from nodeagent.kube.objects import KubeObject
from nodeagent.lab.ipam import Allocations
from nodeagent.lab.kube.api import MERGE_PATCH, ApiClient, ApiError
from nodeagent.lab.spec import DesiredState

SERVICE_FIELDS = ("ports", "selector", "type", "sessionAffinity", "publishNotReadyAddresses")


def metadata(name: str, obj: KubeObject | None) -> dict:
    """`name` with the file object's labels and annotations, when it has any."""
    meta: dict = {"name": name}
    if obj is not None and obj.labels:
        meta["labels"] = dict(obj.labels)
    if obj is not None and obj.annotations:
        meta["annotations"] = dict(obj.annotations)
    return meta


def sync_namespaces(client: ApiClient, desired: DesiredState) -> list[str]:
    """Create or label every namespace of the file; returns the names created."""
    created = []
    for name, obj in sorted(desired.namespaces.items()):
        meta = metadata(name, obj)
        status, answer = client.request("POST", "/api/v1/namespaces",
                                        {"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        if status in (200, 201):
            created.append(name)
        elif status == 409:
            if len(meta) > 1:
                client.call("PATCH", f"/api/v1/namespaces/{name}",
                            {"metadata": {k: v for k, v in meta.items() if k != "name"}}, MERGE_PATCH)
        else:
            message = answer.get("message") if isinstance(answer, dict) else answer
            raise ApiError(f"creating namespace {name}: {status} {message}", status)
    return created


def sync_services(client: ApiClient, desired: DesiredState, alloc: Allocations) -> list[str]:
    """Create every Service of the file not yet in the API, at its lab ClusterIP;
    returns the keys created. One that exists is left as it is (a ClusterIP cannot change)."""
    created = []
    for key, svc in sorted(desired.services.items()):
        obj = next(o for o in desired.objects if o.kind == "Service" and f"{o.namespace}/{o.name}" == key)
        spec = {k: v for k, v in obj.spec.items() if k in SERVICE_FIELDS}
        meta = {**metadata(svc.name, obj), "namespace": svc.namespace}
        request = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
                   "spec": {**spec, "clusterIP": alloc.services[key], "clusterIPs": [alloc.services[key]]}}
        status, answer = client.request("POST", f"/api/v1/namespaces/{svc.namespace}/services", request)
        if status in (200, 201):
            created.append(key)
        elif status != 409:
            message = answer.get("message") if isinstance(answer, dict) else answer
            raise ApiError(f"creating service {key}: {status} {message}", status)
    return created

