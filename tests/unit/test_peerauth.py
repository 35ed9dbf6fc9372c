"""PeerAuthentication: the mTLS mode of a pod's port, table-driven from Istio's
documented examples and istiod's composition (mesh < namespace < workload < port,
UNSET inherits, oldest wins within a level, root-namespace selectors take no part)."""

from __future__ import annotations

import pytest

from policy_world import document, pod, valid


def pa(name: str, namespace: str, mode: str | None = None, selector: dict | None = None,
       ports: dict | None = None, created: str | None = None) -> str:
    """A PeerAuthentication document."""
    spec = [f"selector: {{matchLabels: {selector}}}"] if selector else []
    spec += [f"mtls: {{mode: {mode}}}"] if mode else []
    spec += ["portLevelMtls: {" + ", ".join(f"{p}: {{mode: {m}}}" for p, m in ports.items()) + "}"] if ports else []
    meta = f", creationTimestamp: '{created}'" if created else ""
    return document("PeerAuthentication", namespace, name, "\n".join(spec) or "{}", metadata=meta)


MESH_STRICT = pa("default", "istio-system", "STRICT")
FOO_PERMISSIVE = pa("default", "foo", "PERMISSIVE")
BAR_PERMISSIVE = pa("default", "bar", "PERMISSIVE")
FINANCE_STRICT = pa("finance", "bar", "STRICT", {"app": "finance"})

CASES = [
    # (id, policies, "ns/pod", port, mode)
    ("nothing-is-permissive", "", "foo/httpbin", 80, "PERMISSIVE"),
    ("mesh-strict", MESH_STRICT, "bar/httpbin", 80, "STRICT"),
    ("mesh-strict-root-namespace-pod", MESH_STRICT, "istio-system/istiod", 15012, "STRICT"),
    ("mesh-disable", pa("default", "istio-system", "DISABLE"), "foo/httpbin", 80, "DISABLE"),
    ("mesh-unset-is-permissive", pa("default", "istio-system", "UNSET"), "foo/httpbin", 80, "PERMISSIVE"),
    ("namespace-overrides-mesh", MESH_STRICT + FOO_PERMISSIVE, "foo/httpbin", 80, "PERMISSIVE"),
    ("namespace-only-its-own", MESH_STRICT + FOO_PERMISSIVE, "bar/httpbin", 80, "STRICT"),
    ("namespace-unset-inherits", MESH_STRICT + pa("default", "foo"), "foo/httpbin", 80, "STRICT"),
    ("workload-strict-in-permissive-namespace", BAR_PERMISSIVE + FINANCE_STRICT, "bar/finance", 80, "STRICT"),
    ("workload-selector-other-pod", BAR_PERMISSIVE + FINANCE_STRICT, "bar/httpbin", 80, "PERMISSIVE"),
    ("workload-selector-same-labels-other-namespace",
     pa("finance", "foo", "STRICT", {"app": "httpbin"}), "bar/httpbin", 80, "PERMISSIVE"),
    ("port-disable-in-strict-workload",
     pa("finance", "bar", "STRICT", {"app": "finance"}, {8080: "DISABLE"}), "bar/finance", 8080, "DISABLE"),
    ("other-port-of-strict-workload",
     pa("finance", "bar", "STRICT", {"app": "finance"}, {8080: "DISABLE"}), "bar/finance", 9000, "STRICT"),
    ("workload-unset-inherits-namespace-port-overrides",
     pa("default", "bar", "STRICT") + pa("finance", "bar", "UNSET", {"app": "finance"}, {8080: "DISABLE"}),
     "bar/finance", 8080, "DISABLE"),
    ("workload-unset-inherits-namespace",
     pa("default", "bar", "STRICT") + pa("finance", "bar", "UNSET", {"app": "finance"}, {8080: "DISABLE"}),
     "bar/finance", 9000, "STRICT"),
    ("workload-unset-inherits-mesh",
     MESH_STRICT + pa("finance", "bar", None, {"app": "finance"}, {8080: "PERMISSIVE"}),
     "bar/finance", 9000, "STRICT"),
    ("port-strict-in-permissive-namespace",
     BAR_PERMISSIVE + pa("finance", "bar", None, {"app": "finance"}, {5432: "STRICT"}),
     "bar/finance", 5432, "STRICT"),
    ("port-unset-inherits-workload",
     pa("finance", "bar", "STRICT", {"app": "finance"}, {8080: "UNSET"}), "bar/finance", 8080, "STRICT"),
    ("oldest-namespace-policy-wins",
     pa("a", "foo", "STRICT", created="2024-05-02T00:00:00Z")
     + pa("b", "foo", "DISABLE", created="2024-05-01T00:00:00Z"), "foo/httpbin", 80, "DISABLE"),
    ("same-age-name-decides",
     pa("b", "foo", "DISABLE", created="2024-05-01T00:00:00Z")
     + pa("a", "foo", "STRICT", created="2024-05-01T00:00:00Z"), "foo/httpbin", 80, "STRICT"),
    ("dated-beats-undated",
     pa("a", "foo", "STRICT") + pa("b", "foo", "DISABLE", created="2024-05-01T00:00:00Z"),
     "foo/httpbin", 80, "DISABLE"),
    ("undated-name-decides", pa("b", "foo", "DISABLE") + pa("a", "foo", "STRICT"), "foo/httpbin", 80, "STRICT"),
    ("oldest-mesh-policy-wins",
     pa("new", "istio-system", "STRICT", created="2025-01-01T00:00:00+01:00")
     + pa("old", "istio-system", "PERMISSIVE", created="2024-12-31T23:30:00Z"), "foo/httpbin", 80, "STRICT"),
    ("oldest-workload-policy-wins",
     pa("x", "bar", "STRICT", {"app": "finance"}, created="2024-05-02T00:00:00Z")
     + pa("y", "bar", "DISABLE", {"app": "finance"}, {80: "STRICT"}, created="2024-05-01T00:00:00Z"),
     "bar/finance", 81, "DISABLE"),
    ("root-namespace-selector-takes-no-part",
     pa("strict-v1", "istio-system", "STRICT", {"version": "v1"}), "foo/httpbin", 80, "PERMISSIVE"),
    ("root-namespace-selector-not-even-there",
     pa("strict-istiod", "istio-system", "STRICT", {"app": "istiod"}), "istio-system/istiod", 80, "PERMISSIVE"),
]


@pytest.mark.parametrize("policies, key, port, mode", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mtls_mode(policies: str, key: str, port: int, mode: str):
    assert valid(policies).mtls_mode(pod(key), port) == mode


def test_root_namespace_is_configurable():
    policies = valid(pa("default", "mesh-config", "STRICT") + pa("default", "istio-system", "DISABLE"),
                     root_namespace="mesh-config")
    assert policies.mtls_mode(pod("foo/httpbin"), 80) == "STRICT"
    # istio-system is an ordinary namespace now: its policy is namespace-wide there only.
    assert policies.mtls_mode(pod("istio-system/istiod"), 80) == "DISABLE"
