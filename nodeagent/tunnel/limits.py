"""Limits of an HBONE server against floods, as Envoy and ztunnel keep them: per
connection against HTTP/2 floods (rapid reset, CVE-2023-44487), and per server against
connections that never finish their TLS handshake (issue 9.4).

A rapid-reset client opens a stream and resets it at once: h2 forgets the stream, but
the work it started (the connect to the app) goes on. So the stream cap counts a stream
until its handler has returned, not until h2 closes it (Go's fix: handlers, not open
streams); streams over it are refused with REFUSED_STREAM. And the client's resets are
counted in a sliding window: one more than `max_stream_resets` within
`stream_reset_window` seconds ends the connection (GOAWAY ENHANCE_YOUR_CALM). Each limit is
counted in `nodeagent_hbone_limit_hits_total` and logged once per connection.

`HandshakeBudget` is the accept budget: a connection counts as pending from accept until
its TLS handshake is done or has failed, and as open from accept until it closes; one
over `max_pending_handshakes` (all pods together), `max_pending_handshakes_per_source`,
`max_connections_per_source` (from its client IP) or `max_inbound_connections` (all
sources) is refused before any TLS state exists, and so is every connection while the
agent is over its memory limit's overload mark (nodeagent/memory.py, `memory_limit`). Each refusal is counted; they are logged once per LOG_INTERVAL with how many
there were, since a flood makes thousands.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable

from nodeagent.memory import MIB, MemoryGuard
from nodeagent.throttle import LOG_INTERVAL, Throttle
from nodeagent.tunnel.metrics import TunnelMetrics
from nodeagent.tunnel.settings import TunnelSettings

STREAM_CAP = "max_concurrent_streams"
STREAM_RESETS = "stream_resets"
PENDING_HANDSHAKES = "max_pending_handshakes"
PENDING_PER_SOURCE = "max_pending_handshakes_per_source"
OPEN_PER_SOURCE = "max_connections_per_source"
OPEN_TOTAL = "max_inbound_connections"
MEMORY = "memory_limit"


class FloodGuard:
    """The limits of one server connection; `owner` names it in the log."""

    def __init__(self, settings: TunnelSettings, metrics: TunnelMetrics, log: logging.Logger, direction: str,
                 clock: Callable[[], float], owner: object):
        self.settings, self.metrics, self.log, self.direction = settings, metrics, log, direction
        self.clock = clock
        self.owner = owner
        self._resets: collections.deque[float] = collections.deque()  # times of the resets in the window
        self._hit: set[str] = set()

    def stream_allowed(self, serving: int) -> bool:
        """May one more stream be served, `serving` being served (handlers not returned)?"""
        if serving < self.settings.max_concurrent_streams:
            return True
        if self._first_hit(STREAM_CAP):
            self.log.warning("%r: %d streams still being served, refusing more (REFUSED_STREAM) until some end; "
                             "a client resetting streams faster than we finish them? (logged once per connection)",
                             self.owner, serving)
        return False

    def reset_allowed(self) -> bool:
        """Count one stream reset by the client; False once they are more than allowed in the
        window (the caller then closes with GOAWAY ENHANCE_YOUR_CALM and logs it)."""
        now = self.clock()
        self._resets.append(now)
        while self._resets[0] <= now - self.settings.stream_reset_window:
            self._resets.popleft()
        if len(self._resets) <= self.settings.max_stream_resets:
            return True
        self._first_hit(STREAM_RESETS)
        return False

    def reset_detail(self) -> str:
        return (f"the client reset more than {self.settings.max_stream_resets} streams within "
                f"{self.settings.stream_reset_window:g} s (HTTP/2 rapid reset?): GOAWAY ENHANCE_YOUR_CALM")

    def _first_hit(self, limit: str) -> bool:
        if limit in self._hit:
            return False
        self._hit.add(limit)
        self.metrics.limit_hit(self.direction, limit)
        return True


class HandshakeBudget:
    """The connections of one server that are accepted and not yet through TLS."""

    def __init__(self, settings: TunnelSettings, metrics: TunnelMetrics, log: logging.Logger, direction: str,
                 clock: Callable[[], float], memory: MemoryGuard | None = None):
        self.settings, self.metrics, self.log, self.direction = settings, metrics, log, direction
        self.clock = clock
        self.memory = memory
        self.pending = 0
        self._by_source: dict[str, int] = {}  # client IP -> its pending handshakes (no entry at 0)
        self._open: dict[str, int] = {}  # client IP -> its connections accepted and not closed (no entry at 0)
        self.open = 0  # connections accepted and not closed, all sources
        self._reports: dict[str, Throttle] = {}  # limit -> its refusals' log lines

    def admit(self, source: str, local: str | None = None) -> bool:
        """Take a slot for a connection from `source` to the local pod at `local`; False
        (counted, maybe logged) when the source or the server is at its limit, or the
        agent at its memory limit (for that pod: memory.MemoryGuard.refuses): the caller
        resets the connection."""
        if self.memory is not None and self.memory.refuses(local):
            self._refused(MEMORY, source, local)
            return False
        if self._open.get(source, 0) >= self.settings.max_connections_per_source:
            self._refused(OPEN_PER_SOURCE, source)
            return False
        if self.open >= self.settings.max_inbound_connections:
            self._refused(OPEN_TOTAL, source)
            return False
        mine = self._by_source.get(source, 0)
        if mine >= self.settings.max_pending_handshakes_per_source:
            self._refused(PENDING_PER_SOURCE, source)
            return False
        if self.pending >= self.settings.max_pending_handshakes:
            self._refused(PENDING_HANDSHAKES, source)
            return False
        self._by_source[source] = mine + 1
        self._open[source] = self._open.get(source, 0) + 1
        self.open += 1
        self.pending += 1
        self.metrics.pending_handshakes.labels(direction=self.direction).inc()
        return True

    def release(self, source: str) -> None:
        """The handshake of a connection `admit` let in is over (done, failed or timed out)."""
        left = self._by_source.pop(source) - 1
        if left:
            self._by_source[source] = left
        self.pending -= 1
        self.metrics.pending_handshakes.labels(direction=self.direction).dec()

    def closed(self, source: str) -> None:
        """A connection `admit` let in has closed (whether its handshake succeeded or not)."""
        left = self._open.pop(source) - 1
        if left:
            self._open[source] = left
        self.open -= 1

    def open_from(self, source: str) -> int:
        return self._open.get(source, 0)

    def _refused(self, limit: str, source: str, local: str | None = None) -> None:
        self.metrics.limit_hit(self.direction, limit)
        report = self._reports.get(limit)
        if report is None:
            report = self._reports[limit] = Throttle(LOG_INTERVAL, self.clock)
        refused = report.due()
        if not refused:
            return
        if limit == MEMORY:
            to = ("the pod at %s, which holds %d of the %d connections the agent relays"
                  % (local, self.memory.holdings.of(local), self.memory.holdings.total) if local else "an unknown address")
            self.log.warning("HBONE: %d connection(s) reset at accept since the last report: the agent holds %d MiB "
                             "of its %d MiB memory limit (memory_limit); the last from %s, which has %d open, to %s. "
                             "Reported at most every %g s", refused, (self.memory.usage or 0) // MIB,
                             (self.memory.limit or 0) // MIB, source, self._open.get(source, 0), to, LOG_INTERVAL)
            return
        if limit == OPEN_TOTAL:
            self.log.warning("HBONE: %d connection(s) reset at accept since the last report: %d are open, at most "
                             "%d (max_inbound_connections: the native engine's slots less those kept for the "
                             "agent's own outbound connections); the last from %s, which has %d. Reported at most "
                             "every %g s", refused, self.open, self.settings.max_inbound_connections, source,
                             self._open.get(source, 0), LOG_INTERVAL)
            return
        if limit == OPEN_PER_SOURCE:
            self.log.warning("HBONE: %d connection(s) from %s reset at accept since the last report: it has %d "
                             "open (at most %d per source; a mesh client needs one per destination pod, and "
                             "a node runs at most 110). Reported at most every %g s", refused, source,
                             self._open.get(source, 0), self.settings.max_connections_per_source, LOG_INTERVAL)
            return
        self.log.warning("HBONE: %d connection(s) reset at accept since the last report (%s): %d TLS handshakes "
                         "pending, %d of them from %s (at most %d, %d per source); clients connecting to port 15008 "
                         "without finishing TLS (a flood?), or many behind one address (NAT: raise the per-source "
                         "limit). Reported at most every %g s",
                         refused, limit, self.pending, self._by_source.get(source, 0), source,
                         self.settings.max_pending_handshakes, self.settings.max_pending_handshakes_per_source,
                         LOG_INTERVAL)
