"""Prometheus metrics of the HBONE tunnel, registered into a registry handed in.

Build one `TunnelMetrics(registry)` per agent and give it to both the server and the
pool (a registry refuses the same name twice). `direction` is `inbound` for the server
side and `outbound` for the pool. Per-stream byte counts live on the stream objects;
the agent turns them into Istio's `istio_tcp_*_bytes_total`. `limit_hits` counts each
connection once per flood limit it ran into (`max_concurrent_streams`, `stream_resets`,
and at accept `max_pending_handshakes`, `max_pending_handshakes_per_source`).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

DIRECTIONS = ("inbound", "outbound")


class TunnelMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.connections = Gauge(
            "nodeagent_hbone_connections", "Open HBONE connections (TLS done, peer identity accepted)",
            ["direction"], registry=registry)
        self.streams = Gauge(
            "nodeagent_hbone_streams", "Open HBONE streams", ["direction"], registry=registry)
        self.streams_opened = Counter(
            "nodeagent_hbone_streams_opened", "HBONE streams answered 200", ["direction"], registry=registry)
        self.streams_refused = Counter(
            "nodeagent_hbone_streams_refused", "HBONE streams that never opened, by reason",
            ["direction", "reason"], registry=registry)
        self.handshake_failures = Counter(
            "nodeagent_hbone_handshake_failures", "HBONE connections refused during TCP/TLS set-up, by reason",
            ["direction", "reason"], registry=registry)
        self.connection_errors = Counter(
            "nodeagent_hbone_connection_errors",
            "HBONE connections ended by an error after the handshake (protocol error, truncation, "
            "keepalive timeout), by reason", ["direction", "reason"], registry=registry)
        self.limit_hits = Counter(
            "nodeagent_hbone_limit_hits",
            "HBONE connections that ran into a flood limit, once per connection and limit "
            "(max_concurrent_streams: streams refused; stream_resets: closed with GOAWAY ENHANCE_YOUR_CALM; "
            "max_pending_handshakes, max_pending_handshakes_per_source, max_connections_per_source, "
            "max_inbound_connections, memory_limit: reset at accept, TLS never started)",
            ["direction", "limit"], registry=registry)
        self.pending_handshakes = Gauge(
            "nodeagent_hbone_pending_handshakes", "HBONE connections accepted whose TLS handshake is not done yet",
            ["direction"], registry=registry)
        self.pool_connections = Gauge(
            "nodeagent_hbone_pool_connections", "Connections held by the HBONE pool (connecting or open)",
            registry=registry)

    def handshake_failure(self, direction: str, reason: str) -> None:
        self.handshake_failures.labels(direction=direction, reason=reason).inc()

    def refused(self, direction: str, reason: str, count: int = 1) -> None:
        self.streams_refused.labels(direction=direction, reason=reason).inc(count)

    def connection_error(self, direction: str, reason: str) -> None:
        self.connection_errors.labels(direction=direction, reason=reason).inc()

    def limit_hit(self, direction: str, limit: str) -> None:
        self.limit_hits.labels(direction=direction, limit=limit).inc()
