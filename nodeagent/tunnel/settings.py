"""Tuning of HBONE connections, shared by the server and the pool.

Defaults follow ztunnel (4 MiB stream window, 16 MiB connection window, PING every 10 s
and give up after 20 s without an answer, 100 streams per pooled connection, unused
pooled connections released after 5 minutes), except frames: 128 KiB rather than 1 MiB,
because h2 and TLS copy each frame several times in Python and 128 KiB copies stay in
cache (loopback, one stream: ~350 MB/s against ~240 MB/s with 1 MiB frames). The agent's config
module maps its own settings onto these; values are checked here so a bad one fails
at start-up naming the field.

Two limits per server connection stand against HTTP/2 floods such as rapid reset
(CVE-2023-44487: open a stream, reset it at once, repeat), as Envoy's and ztunnel's do:
`max_concurrent_streams` (200, ztunnel's inbound value) is advertised in SETTINGS and also
counts a stream the client already reset until its handler has returned, so resets cannot
pile up work behind it; more than `max_stream_resets` client resets within
`stream_reset_window` seconds end the connection with GOAWAY ENHANCE_YOUR_CALM. Our pool
keeps at most 100 streams on a connection, so 200 resets in 10 s means every stream it
could hold was cancelled twice over — not what a client of the mesh does.

Three more stand against unauthenticated connections to :15008 that never finish TLS
(issue 9.4: 5000 silent ones held 1.6 GB), as Envoy's and ztunnel's accept budgets do. A
connection counts as a pending handshake from accept until TLS is done, for at most
`server_handshake_timeout` (5 s: a TLS 1.3 handshake is one round trip, milliseconds in a
cluster, and a handshake the agent cannot finish in 5 s is a peer not talking or a node
too loaded to serve it anyway; the pool, which also connects, keeps `handshake_timeout`;
the agent's setting `hbone_handshake_timeout`, which the kernel lab's sandbox scales as
its waits: under software emulation the agent takes longer than 5 s to answer a flood).
`max_pending_handshakes` (1024) bounds them for the whole agent, all pods' tunnel
listeners together: the agent completes ~500 handshakes a second on two vCPUs, so that
is ~2 s of work, well inside the timeout, and at most ~60 MB mid-handshake. And
`max_pending_handshakes_per_source` (128) per client IP: a mesh client holds at most one
handshake per (source pod, destination pod) at a time and a node runs at most 110 pods
(kubelet's default), so more from one address is a flood, and one source cannot take the
budget of all. Connections over either are reset at once, before any TLS state exists.
Once through TLS, a connection costs ~80 KiB until it closes (OpenSSL's connection, the
peer's certificates, nghttp2's session; measured with the native engine), and every one
takes a slot of the engine's max_conns, which the agent's outbound connections share:
a peer with one stolen certificate opening thousands would exhaust the agent's memory or
its slots. `max_connections_per_source` (512) bounds what one client IP keeps open: a
mesh client's pool opens one connection per destination pod (a node runs at most 110),
plus one per 100 streams beyond, so 512 is far above what one pod needs; over it the
connection is reset at accept. And `max_inbound_connections` (12288) bounds them from all
sources together: the native engine has 16384 slots (nodeagent/native/hbone.py), so 4096
stay for the agent's own outbound connections, which many sources together could
otherwise take.

The windows bound what one connection can make the agent hold for an app that does not
read (a stream window per stream, a connection window per connection), not what many
can: a peer with one stolen certificate could open thousands of connections, each
sending its 16 MiB towards such an app. `receive_budget` (128 MiB; the DaemonSet's limit
is 512 MiB) bounds what all streams hold together: once they would hold half of it, DATA
for a stream that would hold its share of that half resets that stream (RST_STREAM
CANCEL), as Envoy's overload manager resets the streams using the most memory. Both
engines keep it (native/hbone.h, Back-pressure; budget.py). The other way, a peer that
never opens its window (a slow or stopped reader) keeps what the app wrote: up to
stream_buffer (256 KiB) per stream, 200 streams a connection, 512 connections a source.
`send_budget` (128 MiB) bounds that: past half of it a stream takes its app's bytes
only up to its share, and stops there (the app's writes wait in the kernel) until its
peer reads.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from nodeagent.errors import ConfigError

MIB = 1024 * 1024
SERVER_HANDSHAKE_TIMEOUT_MAX = 300.0  # the agent's hbone_handshake_timeout setting: at most this many seconds
H2_MAX_WINDOW = 2**31 - 1
H2_MIN_FRAME, H2_MAX_FRAME = 16384, 2**24 - 1


@dataclass(frozen=True)
class TunnelSettings:
    stream_window: int = 4 * MIB  # bytes a peer may send on one stream before we read them
    connection_window: int = 16 * MIB  # the same for all streams of a connection together
    max_frame_size: int = 128 * 1024  # largest DATA frame we accept (ztunnel: 1 MiB; see below)
    write_buffer: int = 256 * 1024  # bytes an app may queue on a stream before writes pause
    keepalive_interval: float = 10.0  # PING after this long without hearing from the peer
    keepalive_timeout: float = 20.0  # close when a PING is not answered within this
    handshake_timeout: float = 10.0  # pool: TCP connect + TLS + the peer's first SETTINGS
    server_handshake_timeout: float = 5.0  # server: accept -> TLS done, the wait for a ClientHello included
    max_pending_handshakes: int = 1024  # server: connections accepted, TLS not done, all listeners together
    max_pending_handshakes_per_source: int = 128  # server: the same from one client IP
    max_connections_per_source: int = 512  # server: connections open from one client IP (see below)
    max_inbound_connections: int = 12288  # server: connections open from all sources (see below)
    open_timeout: float = 10.0  # CONNECT sent -> response headers
    max_concurrent_streams: int = 200  # server: streams one connection may have served at once
    max_stream_resets: int = 200  # server: client resets allowed within stream_reset_window...
    stream_reset_window: float = 10.0  # ...seconds; one more is GOAWAY ENHANCE_YOUR_CALM
    receive_budget: int = 128 * MIB  # received bytes all streams together hold (see below)
    send_budget: int = 128 * MIB  # bytes the apps wrote that all streams hold together, waiting for windows

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ConfigError(f"tunnel.{f.name}", f"must be positive, got {getattr(self, f.name)!r}")
        if not self.stream_window <= H2_MAX_WINDOW or not self.connection_window <= H2_MAX_WINDOW:
            raise ConfigError("tunnel.stream_window/connection_window", f"HTTP/2 windows are at most {H2_MAX_WINDOW}")
        if self.connection_window < self.stream_window:
            raise ConfigError("tunnel.connection_window", "must be at least stream_window, else one stream "
                              "cannot use its whole window")
        if not H2_MIN_FRAME <= self.max_frame_size <= H2_MAX_FRAME:
            raise ConfigError("tunnel.max_frame_size", f"HTTP/2 allows {H2_MIN_FRAME}..{H2_MAX_FRAME}, "
                              f"got {self.max_frame_size}")
        if self.max_connections_per_source > self.max_inbound_connections:
            raise ConfigError("tunnel.max_connections_per_source",
                              f"{self.max_connections_per_source} is more than max_inbound_connections "
                              f"({self.max_inbound_connections}), the budget of all sources together")
        if self.max_pending_handshakes_per_source > self.max_connections_per_source:
            raise ConfigError("tunnel.max_pending_handshakes_per_source",
                              f"{self.max_pending_handshakes_per_source} is more than max_connections_per_source "
                              f"({self.max_connections_per_source}), which pending handshakes count in")
        if self.max_pending_handshakes_per_source > self.max_pending_handshakes:
            raise ConfigError("tunnel.max_pending_handshakes_per_source",
                              f"{self.max_pending_handshakes_per_source} is more than max_pending_handshakes "
                              f"({self.max_pending_handshakes}), the budget of all sources together")


def check_positive(where: str, value: float) -> float:
    if value <= 0:
        raise ConfigError(where, f"must be positive, got {value!r}")
    return value
