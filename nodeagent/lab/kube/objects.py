"""The lab file's objects in the API (`--kube`), as far as the lab has moved them there.

So far its Namespaces: each one the file declares or implies is created (or, when it
exists, such as `default`, given the file's labels and annotations by merge patch), so
`kubectl apply` into the file's namespaces works and the namespaces' labels (e.g.
`istio.io/dataplane-mode`) are the same in the API as in the files source. The file's
Pods, Deployments and Services still run from the file (lab.json), not through the API.
"""

from __future__ import annotations

from nodeagent.lab.kube.api import MERGE_PATCH, ApiClient, ApiError
from nodeagent.lab.spec import DesiredState


def namespace_metadata(name: str, obj) -> dict:
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
        meta = namespace_metadata(name, obj)
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
