"""Istio's CustomResourceDefinitions in the lab's API server, as `daemonset/` installs them.

The definitions are Istio's own: `daemonset/crds/customresourcedefinitions.gen.yaml` is
the file the `istio.io/api` Go module pinned by `daemonset/crds/go.mod` publishes,
byte for byte (tests/unit/test_daemonset_manifests.py checks it against the module,
checksum-verified by that folder's go.sum). `lab up --kube` applies them once the control
plane serves and the nodes are Ready (server-side apply as the admin, field manager
`nodeagent-lab`; an apply that gets no answer from a loaded API server is retried) and
waits until each is Established and its objects can be listed (an Established CRD's
storage may still be initializing: 429), so a VirtualService given to the API is checked by
Istio's schema from the first `kubectl apply` on.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import yaml

from nodeagent.errors import EnvironmentProblem
from nodeagent.kube.objects import load_all
from nodeagent.lab.kube.api import ApiClient, ApiError

CRD_FILE = Path(__file__).resolve().parents[3] / "daemonset" / "crds" / "customresourcedefinitions.gen.yaml"
API = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
APPLY_PATCH = "application/apply-patch+yaml"  # JSON is YAML: the body goes as JSON
FIELD_MANAGER = "nodeagent-lab"
RETRIED = (0, 429, 500, 502, 503, 504)  # 0: no answer (timeout, connection refused or reset)


def load(path: Path = CRD_FILE) -> list[dict]:
    """The CustomResourceDefinitions of `path`; EnvironmentProblem if it is missing or
    holds anything else (it is generated from a pinned module, never hand-edited)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise EnvironmentProblem(f"Istio's CRDs are not beside this nodeagent ({path}: {exc.strerror})",
                                 "run from a clone of the repository") from None
    try:
        docs = [d for d in load_all(text) if d is not None]  # libyaml: 0.4 s for the 850 kB file, not 3.6 s
    except yaml.YAMLError as exc:
        raise EnvironmentProblem(f"{path} is not valid YAML: {exc}",
                                 "restore it from git (it is Istio's generated file)") from None
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition" \
                or not (doc.get("metadata") or {}).get("name"):
            raise EnvironmentProblem(f"{path}: document {i + 1} is not a named CustomResourceDefinition",
                                     "restore it from git (it is Istio's generated file)")
    return docs


def apply(client: ApiClient, crd: dict) -> None:
    """Server-side apply of one CRD, forced (the lab's copy of Istio's definition wins)."""
    name = crd["metadata"]["name"]
    client.call("PATCH", f"{API}/{quote(name)}?fieldManager={FIELD_MANAGER}&force=true",
                crd, content_type=APPLY_PATCH)


def _apply_until(client: ApiClient, crd: dict, deadline: float, poll: float) -> None:
    """`apply`, again after a timeout, a lost connection or a 429/5xx (a loaded API server
    takes seconds for a 150 kB schema; applying twice is harmless) until `deadline`."""
    while True:
        try:
            return apply(client, crd)
        except ApiError as exc:
            if exc.status not in RETRIED or time.monotonic() > deadline:
                raise
        time.sleep(poll)


def not_established(client: ApiClient, names: list[str]) -> dict[str, str]:
    """CRD name -> why it does not serve yet (Established not True), for those of `names`;
    one LIST of the CRDs (each GET is a TLS handshake and a CRD of up to 150 kB anyway)."""
    try:
        status, answer = client.request("GET", API)
    except ApiError as exc:  # a restarting or overloaded API server: keep waiting
        return {name: str(exc) for name in names}
    if status != 200 or not isinstance(answer, dict):
        return {name: f"listing CRDs answered {status}" for name in names}
    found = {item["metadata"]["name"]: item for item in answer.get("items") or []}
    waiting = {}
    for name in names:
        if name not in found:
            waiting[name] = "not in the API yet"
            continue
        conditions = {c.get("type"): c for c in (found[name].get("status") or {}).get("conditions") or []}
        established = conditions.get("Established") or {}
        if established.get("status") != "True":
            named = conditions.get("NamesAccepted") or {}
            reason = named.get("message") if named.get("status") == "False" else established.get("message")
            waiting[name] = reason or "not Established yet"
    return waiting


def not_serving(client: ApiClient, crds: list[dict]) -> dict[str, str]:
    """CRD name -> why its objects cannot be listed yet: an Established CRD's storage
    may still be initializing (the API answers 429 "storage is (re)initializing")."""
    waiting = {}
    for crd in crds:
        spec = crd["spec"]
        version = next(v["name"] for v in spec["versions"] if v.get("storage"))
        try:
            status, answer = client.request("GET", f"/apis/{spec['group']}/{version}/{spec['names']['plural']}?limit=1")
        except ApiError as exc:
            status, answer = 0, str(exc)
        if status != 200:
            message = answer.get("message") if isinstance(answer, dict) else str(answer).strip()
            waiting[crd["metadata"]["name"]] = f"listing answered {status} {message}"
    return waiting


def install(client: ApiClient, out: Callable[[str], None], timeout: float, poll: float = 0.2,
            path: Path = CRD_FILE) -> list[str]:
    """Apply Istio's CRDs and wait until every one is Established; their names. ApiError
    naming the CRDs that are not, with the API server's reason, after `timeout`."""
    crds = load(path)
    names = [c["metadata"]["name"] for c in crds]
    deadline = time.monotonic() + timeout
    for crd in crds:
        _apply_until(client, crd, deadline, poll)
    while True:  # Established, then serving: the lab's first apply lists every kind
        waiting = not_established(client, names) or not_serving(client, crds)
        if not waiting:
            out(f"{len(names)} Istio CRDs Established ({path.parent.name}/{path.name})")
            return names
        if time.monotonic() > deadline:
            raise ApiError(f"Istio CRDs not Established and serving after {timeout:.0f}s: "
                           + "; ".join(f"{n}: {why}" for n, why in waiting.items()))
        time.sleep(poll)
