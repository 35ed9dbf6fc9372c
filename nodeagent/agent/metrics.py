"""The agent's Prometheus metrics, registered into a registry handed in (never global).

These are the agent's own counters (`nodeagent_` prefix); Istio's per-connection TCP
metrics live in telemetry.py, in the same registry. `snapshot()` reads the `nodeagent_`
values back from the registry for `/debug/status`, so status and /metrics can never
disagree.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

PREFIX = "nodeagent_"
DIRECTIONS = ("outbound", "inbound")
FLOWS = ("sent", "received")  # towards the upstream / back to the client


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.outbound = Counter(
            "nodeagent_outbound_connections", "Captured outbound connections accepted from meshed pods",
            registry=registry)
        self.inbound = Counter(
            "nodeagent_inbound_connections", "Inbound connections to meshed pods accepted by the agent",
            registry=registry)
        self.probes = Counter(
            "nodeagent_probe_connections",
            "Plaintext connections from the node to a port a meshed pod's probes name (kubelet's probes), "
            "delivered around PeerAuthentication and AuthorizationPolicy", registry=registry)
        self.passthrough = Counter(
            "nodeagent_passthrough_connections",
            "Outbound connections relayed as plain TCP to their original destination", registry=registry)
        self.failures = Counter(
            "nodeagent_connection_failures", "Connections the agent could not relay, by direction and reason",
            ["direction", "reason"], registry=registry)
        self.active = Gauge(
            "nodeagent_active_connections", "Connections being relayed now", ["direction"], registry=registry)
        self.bytes = Counter(
            "nodeagent_relayed_bytes", "Bytes relayed, by direction of the connection and of the bytes",
            ["direction", "flow"], registry=registry)
        self.enrolled = Gauge("nodeagent_enrolled_pods", "Pods enrolled in capture on this node",
                              registry=registry)
        self.enrol_errors = Counter(
            "nodeagent_enrolment_failures", "Failed attempts to enrol a pod, by reason", ["reason"],
            registry=registry)

        # Labelled children of the per-connection metrics, looked up once (labels() is slow).
        self.active_by = {d: self.active.labels(direction=d) for d in DIRECTIONS}
        self.bytes_by = {(d, f): self.bytes.labels(direction=d, flow=f) for d in DIRECTIONS for f in FLOWS}

    def failure(self, direction: str, reason: str) -> None:
        self.failures.labels(direction=direction, reason=reason).inc()

    def snapshot(self) -> dict[str, float]:
        """{'outbound_connections_total': 100.0, 'connection_failures_total{direction=...}': 2.0, ...}"""
        out: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                if not sample.name.startswith(PREFIX) or sample.name.endswith("_created"):
                    continue
                name = sample.name[len(PREFIX):]
                if sample.labels:
                    name += "{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}"
                out[name] = sample.value
        return out
