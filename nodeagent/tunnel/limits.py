"""Per-connection limits of an HBONE server against HTTP/2 floods (rapid reset,
CVE-2023-44487), as Envoy and ztunnel keep them.

A rapid-reset client opens a stream and resets it at once: h2 forgets the stream, but
the work it started (the connect to the app) goes on. So the stream cap counts a stream
until its handler has returned, not until h2 closes it (Go's fix: handlers, not open
streams); streams over it are refused with REFUSED_STREAM. And the client's resets are
counted in a sliding window: one more than `max_stream_resets` within
`stream_reset_window` seconds ends the connection (GOAWAY ENHANCE_YOUR_CALM). Each limit is
counted in `nodeagent_hbone_limit_hits_total` and logged once per connection.
"""

from __future__ import annotations

import collections
import logging
from typing import Callable

from nodeagent.tunnel.metrics import TunnelMetrics
from nodeagent.tunnel.settings import TunnelSettings

STREAM_CAP = "max_concurrent_streams"
STREAM_RESETS = "stream_resets"


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
