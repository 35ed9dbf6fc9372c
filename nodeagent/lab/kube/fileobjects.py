"""The lab file's objects in the API (`--kube`): applied at `lab up` and `lab apply`,
deleted once they leave the lab.

The kinds the API serves without CRDs — Namespace, ServiceAccount, Secret, ConfigMap,
Service and RBAC's Role, RoleBinding, ClusterRole, ClusterRoleBinding — are sent by
server-side apply as the admin with field manager `nodeagent-lab` (forced: the file is
the truth for the fields it sets; a field the file no longer sets is dropped by the API
unless another manager owns it). Each object the lab applies carries the annotation
`nodeagent.io/managed-by: nodeagent-lab` (an annotation, not a label, so the labels are
the file's in both sources and no selector sees an extra one); an object so marked that
is no longer in the lab's desired state is deleted, objects first, namespaces last. The
API server's own namespaces are never marked nor deleted. Services keep the ClusterIP the
lab gave them, so the API's allocator never hands it to another Service; the lab serves
them from its own pods (kube-proxy's view skips them: kube/proxy.py). Pods and the pods of
Deployments appear as mirror pods (kube/mirror.py); Deployments themselves stay out of the
API, whose controller would run a second set of pods. Istio's kinds are applied too, after
the Services, at the version the file gives when their CRD (kube/crds.py, installed by
`lab up --kube`) serves it: the API then judges them by Istio's schema, as a cluster
would, and a refusal names the object and the schema's message. The lab's agents still
read the file's Istio objects from the `files` source. Pure but for `sync`.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import urllib.parse
from dataclasses import dataclass, field

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject
from nodeagent.lab.ipam import Allocations
from nodeagent.lab.kube import crds
from nodeagent.lab.kube.api import ApiClient, ApiError
from nodeagent.lab.spec import DesiredState

FIELD_MANAGER = "nodeagent-lab"
MANAGED_BY = "nodeagent.io/managed-by"  # annotation on every object the lab applied
APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML
SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")  # the API server's own
SERVICE_FIELDS = ("ports", "selector", "type", "sessionAffinity", "publishNotReadyAddresses")
RBAC = "rbac.authorization.k8s.io"


@dataclass(frozen=True)
class Kind:
    """A kind the lab applies: where its objects live in the API."""

    group: str
    kind: str
    plural: str
    namespaced: bool
    version: str = "v1"
    served: tuple[str, ...] = ()  # a CRD's kind: the versions a file may give (else only `version`)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def collection(self, namespace: str = "") -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        return f"{base}/namespaces/{namespace}/{self.plural}" if namespace else f"{base}/{self.plural}"

    def path(self, namespace: str, name: str) -> str:
        return f"{self.collection(namespace if self.namespaced else '')}/{name}"


# In the order they are applied (what others refer to first); deleted in reverse.
KINDS = (Kind("", "Namespace", "namespaces", False), Kind("", "ServiceAccount", "serviceaccounts", True),
         Kind("", "Secret", "secrets", True), Kind("", "ConfigMap", "configmaps", True),
         Kind(RBAC, "ClusterRole", "clusterroles", False),
         Kind(RBAC, "ClusterRoleBinding", "clusterrolebindings", False),
         Kind(RBAC, "Role", "roles", True), Kind(RBAC, "RoleBinding", "rolebindings", True),
         Kind("", "Service", "services", True))


@functools.lru_cache(maxsize=1)
def istio_kinds() -> tuple[Kind, ...]:
    """The kinds of Istio's CRDs, as the lab installs them: listed at their storage
    version, applied at the version the file gives if the CRD serves it."""
    out = []
    for crd in crds.load():
        spec = crd["spec"]
        versions = [v for v in spec["versions"] if v.get("served")]
        storage = next(v["name"] for v in versions if v.get("storage"))
        out.append(Kind(spec["group"], spec["names"]["kind"], spec["names"]["plural"],
                        spec["scope"] == "Namespaced", storage, tuple(v["name"] for v in versions)))
    return tuple(sorted(out, key=lambda k: (k.group, k.kind)))


def all_kinds() -> tuple[Kind, ...]:
    """In the order they are applied (Istio's last: they name Services); deleted in reverse."""
    return KINDS + istio_kinds()


def _by_kind() -> dict[tuple[str, str], Kind]:
    return {(k.group, k.kind): k for k in all_kinds()}


@dataclass(frozen=True)
class Applied:
    """One object as the lab applies it."""

    kind: Kind
    namespace: str  # "" for cluster-scoped kinds
    name: str
    body: dict

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.kind.group, self.kind.kind, self.namespace, self.name)

    def __str__(self) -> str:
        return f"{self.kind.kind.lower()} {self.namespace}/{self.name}" if self.namespace \
            else f"{self.kind.kind.lower()} {self.name}"


@dataclass
class Changes:
    """What `sync` did, as "kind ns/name" strings."""

    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def _metadata(name: str, namespace: str, obj: KubeObject | None, mark: bool) -> dict:
    meta: dict = {"name": name, **({"namespace": namespace} if namespace else {})}
    if obj is not None and obj.labels:
        meta["labels"] = dict(obj.labels)
    annotations = dict(obj.annotations) if obj is not None else {}
    if mark:
        annotations[MANAGED_BY] = FIELD_MANAGER
    if annotations:
        meta["annotations"] = annotations
    return meta


def _secret_fields(body: dict) -> dict:
    """`stringData` folded into `data` (base64), as the API would store it: applying
    `stringData` itself would leave keys the file drops in the Secret."""
    out = {k: v for k, v in body.items() if k not in ("stringData", "data")}
    data = dict(body.get("data") or {})
    data.update({k: base64.b64encode((v or "").encode()).decode() for k, v in (body.get("stringData") or {}).items()})
    if data:
        out["data"] = data
    return out


def applied(obj: KubeObject, kind: Kind, alloc: Allocations) -> Applied:
    """The object as the lab applies it: the file's fields (no status, and only name,
    namespace, labels and annotations of its metadata), marked as the lab's."""
    version = obj.api_version.rpartition("/")[2]
    if kind.served and version in kind.served:
        kind = dataclasses.replace(kind, version=version)  # the CRD converts: all versions are one schema
    elif kind.served:
        raise ConfigError(f"{obj.source} ({obj.key}) apiVersion",
                          f"{obj.kind} is served as {', '.join(f'{kind.group}/{v}' for v in kind.served)}, "
                          f"not {obj.api_version}", "use one of those versions")
    elif kind.group and obj.api_version != kind.api_version:
        raise ConfigError(f"{obj.source} ({obj.key}) apiVersion",
                          f"{obj.kind} must be {kind.api_version} in a --kube lab, not {obj.api_version}",
                          "the API server serves that version only")
    fields = {k: v for k, v in obj.body.items() if k not in ("apiVersion", "kind", "metadata", "status")}
    if kind.kind == "Service":
        ip = alloc.services[f"{obj.namespace}/{obj.name}"]
        fields = {"spec": {**{k: v for k, v in obj.spec.items() if k in SERVICE_FIELDS},
                           "clusterIP": ip, "clusterIPs": [ip]}}
    elif kind.kind == "Secret":
        fields = _secret_fields(fields)
    namespace = obj.namespace if kind.namespaced else ""
    body = {"apiVersion": kind.api_version, "kind": kind.kind,
            "metadata": _metadata(obj.name, namespace, obj, not _system(kind, obj.name)), **fields}
    return Applied(kind, namespace, obj.name, body)


def wanted(desired: DesiredState, alloc: Allocations) -> list[Applied]:
    """Every object of the lab the API should hold, in all_kinds() order: the file's objects
    of those kinds, and a bare Namespace for each one the file only implies."""
    out = []
    by_kind = _by_kind()
    namespace = by_kind[("", "Namespace")]
    for name, obj in desired.namespaces.items():
        if obj is None:
            body = {"apiVersion": "v1", "kind": "Namespace",
                    "metadata": _metadata(name, "", None, name not in SYSTEM_NAMESPACES)}
            out.append(Applied(namespace, "", name, body))
    for obj in desired.objects:
        kind = by_kind.get((obj.group, obj.kind))
        if kind is not None:
            out.append(applied(obj, kind, alloc))
    order = {(k.group, k.kind): i for i, k in enumerate(all_kinds())}
    return sorted(out, key=lambda a: (order[(a.kind.group, a.kind.kind)], a.namespace, a.name))


def _system(kind: Kind, name: str) -> bool:
    return kind.kind == "Namespace" and name in SYSTEM_NAMESPACES


def managed(kind: Kind, item: dict) -> bool:
    """Whether an API object is one the lab applied (and so may delete)."""
    meta = item.get("metadata", {})
    return (meta.get("annotations") or {}).get(MANAGED_BY) == FIELD_MANAGER and not _system(kind, meta.get("name"))


def stale(keep: list[Applied], live: dict[Kind, list[dict]]) -> list[tuple[Kind, str, str]]:
    """(kind, namespace, name) of the lab's objects in the API that `keep` no longer
    holds, in deletion order: the reverse of all_kinds(), so namespaces go last."""
    kept = {a.key for a in keep}
    out = []
    for kind in reversed(all_kinds()):
        for item in live.get(kind, []):
            meta = item["metadata"]
            namespace = meta.get("namespace", "") if kind.namespaced else ""
            if managed(kind, item) and (kind.group, kind.kind, namespace, meta["name"]) not in kept:
                out.append((kind, namespace, meta["name"]))
    return out


def apply_path(item: Applied) -> str:
    query = urllib.parse.urlencode({"fieldManager": FIELD_MANAGER, "force": "true"})
    return f"{item.kind.path(item.namespace, item.name)}?{query}"


def sync(client: ApiClient, desired: DesiredState, alloc: Allocations) -> Changes:
    """Apply every object of the lab to the API and delete the lab's objects it no longer
    holds. ConfigError for an object the lab cannot apply; ApiError naming every object
    the API refused and the server's message (e.g. Istio's schema), raised once the
    others are applied and the stale ones deleted."""
    changes = Changes()
    keep = wanted(desired, alloc)
    refused = []
    for item in keep:
        status, answer = client.request("PATCH", apply_path(item), item.body, APPLY_PATCH)
        if status == 201:
            changes.created.append(str(item))
        elif status != 200:
            message = answer.get("message") if isinstance(answer, dict) else str(answer).strip()
            refused.append((status, f"applying {item}: {status} {message}"))
    live = {kind: client.call("GET", kind.collection()).get("items", []) for kind in all_kinds()}
    for kind, namespace, name in stale(keep, live):
        client.call("DELETE", kind.path(namespace, name), ok=(200, 202, 404))
        changes.deleted.append(f"{kind.kind.lower()} {namespace}/{name}" if namespace
                               else f"{kind.kind.lower()} {name}")
    if refused:
        raise ApiError("; ".join(text for _, text in refused), refused[0][0])
    return changes
