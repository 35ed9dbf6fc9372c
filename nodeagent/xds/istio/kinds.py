"""What each Istio kind is to this mesh: implemented, or the verdict a user gets for it.

Users bring Istio YAML written for sidecars, for gateways and for Istio's own ambient
mode. Every kind of an Istio API group (and of the Gateway API, which Istio's ambient
mode routes with) is either read by the agents (VirtualService, DestinationRule,
EnvoyFilter, AuthorizationPolicy, PeerAuthentication, RequestAuthentication) or answered
here, never silently accepted:
- "not supported in ambient mode": a kind Istio's ambient mode acts on but nodeagent does
  not implement (Gateway, ServiceEntry, Telemetry, WasmPlugin, ...), with what to use
  instead. An error: the user expects an effect and gets none.
- "not applicable to ambient (sidecar-only)": a kind Istio's ambient mode itself ignores
  (Sidecar); IstioOperator is "not applicable" too: it installs Istio, it does not
  configure a mesh. Warnings: nothing the user meant for ambient traffic is lost.
- "unknown kind": a misspelt or made-up kind in an Istio group. An error, as an API
  server without that CRD refuses it.
Pure.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject
from nodeagent.policy.schema import resource_name

NETWORKING, SECURITY = "networking.istio.io", "security.istio.io"
TELEMETRY, EXTENSIONS, INSTALL = "telemetry.istio.io", "extensions.istio.io", "install.istio.io"
GATEWAY_API = "gateway.networking.k8s.io"
ERROR, WARNING = "error", "warning"
NOT_SUPPORTED = "not supported in ambient mode"
NOT_APPLICABLE = "not applicable to ambient (sidecar-only)"
NOT_MESH_CONFIG = "not applicable to ambient (installation, not mesh configuration)"

IMPLEMENTED = {
    NETWORKING: ("VirtualService", "DestinationRule", "EnvoyFilter"),
    SECURITY: ("AuthorizationPolicy", "PeerAuthentication", "RequestAuthentication"),
}


@dataclass(frozen=True)
class Answer:
    severity: str  # ERROR or WARNING
    message: str
    hint: str


def _unsupported(what: str, instead: str) -> Answer:
    return Answer(ERROR, f"{NOT_SUPPORTED}: {what}", instead)


# (group, kind) → the answer for a kind the agents do not read.
ANSWERS: dict[tuple[str, str], Answer] = {
    (NETWORKING, "Gateway"): _unsupported(
        "nodeagent runs no ingress or egress gateway, so nothing serves this Gateway",
        "reach the service through a Kubernetes Service (NodePort or LoadBalancer) or an ingress "
        "controller; meshed pods reach it directly, with no Gateway"),
    (NETWORKING, "ServiceEntry"): _unsupported(
        "the mesh's registry is the Kubernetes Services; hosts outside it are reached directly "
        "(passthrough, no mTLS, no L7 policy)",
        "give the external host a Kubernetes Service: type ExternalName, or one with its Endpoints"),
    (NETWORKING, "WorkloadEntry"): _unsupported(
        "only Kubernetes pods are workloads of this mesh (no VMs)", "run the workload as a Pod"),
    (NETWORKING, "WorkloadGroup"): _unsupported(
        "only Kubernetes pods are workloads of this mesh (no VMs)", "run the workload as a Pod"),
    (NETWORKING, "ProxyConfig"): _unsupported(
        "the waypoint Envoy's settings come from the agent's configuration, not from ProxyConfig",
        "remove it; see nodeagent run --help for the waypoint's settings"),
    (NETWORKING, "Sidecar"): Answer(
        WARNING, f"{NOT_APPLICABLE}: a Sidecar scopes a sidecar proxy's configuration, and ambient pods "
                 "have no sidecar; Istio's ambient mode ignores it too",
        "remove it; to limit which services a workload may reach, use an AuthorizationPolicy on "
        "the destinations"),
    (TELEMETRY, "Telemetry"): _unsupported(
        "metrics, access logs and tracing are not configurable: the agent always exports Istio's "
        "standard metrics on :15020/metrics and writes its flow log",
        "remove it"),
    (EXTENSIONS, "WasmPlugin"): _unsupported(
        "the waypoint loads no Wasm modules",
        "use an EnvoyFilter local rate limit or an AuthorizationPolicy for what they cover, or remove it"),
    (INSTALL, "IstioOperator"): Answer(
        WARNING, f"{NOT_MESH_CONFIG}: IstioOperator configures the installation of Istio's control plane "
                 "and sidecars (read by istioctl or the operator), not the mesh's traffic",
        "remove it from the mesh configuration; nodeagent installs with kubectl apply -k daemonset/"),
}
GATEWAY_API_ANSWER = _unsupported(
    "nodeagent reads Istio's networking.istio.io API, not the Kubernetes Gateway API",
    "write the route as a VirtualService and the backend's policy as a DestinationRule")


def is_istio(obj: KubeObject) -> bool:
    """Whether `obj` belongs to an API group this module answers for."""
    return obj.group.endswith(".istio.io") or obj.group == GATEWAY_API


def implemented(obj: KubeObject) -> bool:
    return obj.kind in IMPLEMENTED.get(obj.group, ())


def answer(obj: KubeObject) -> Answer | None:
    """The verdict on `obj`'s kind; None for a kind the agents read, or one outside the
    Istio and Gateway API groups (Kubernetes' own kinds)."""
    if not is_istio(obj) or implemented(obj):
        return None
    if obj.group == GATEWAY_API:
        return GATEWAY_API_ANSWER
    known = ANSWERS.get((obj.group, obj.kind))
    if known is not None:
        return known
    kinds = [k for g, k in ANSWERS if g == obj.group] + list(IMPLEMENTED.get(obj.group, ()))
    close = difflib.get_close_matches(obj.kind, kinds, n=1)
    if close:
        hint = f"did you mean {close[0]}?"
    elif kinds:
        hint = f"{obj.group} kinds: {', '.join(sorted(kinds))}"
    else:
        hint = "known Istio groups: " + ", ".join(sorted({*IMPLEMENTED, *(g for g, _ in ANSWERS)}))
    return Answer(ERROR, f"unknown kind {obj.kind} in {obj.group}", hint)


def problem(obj: KubeObject) -> tuple[str, ConfigError] | None:
    """(severity, error naming the resource and its `kind`) for a kind not read, or None."""
    found = answer(obj)
    if found is None:
        return None
    return found.severity, ConfigError(f"{resource_name(obj)} kind", found.message, found.hint)
