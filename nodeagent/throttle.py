"""Reports of repeated trouble, rate-limited: the first at once, then at most one per
interval, each saying how many happened since the one before. A flood makes thousands
a second of what it floods (refused connections, failed accepts); a log line for each
would be a second flood, of the agent's own log."""

from __future__ import annotations

import time
from typing import Callable

LOG_INTERVAL = 10.0  # seconds between two reports of one kind of trouble


class Throttle:
    """Counts occurrences of one kind of trouble and says when to report them."""

    def __init__(self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.interval, self.clock = interval, clock
        self._unreported = 0
        self._reported_at: float | None = None

    def due(self) -> int:
        """Count one occurrence; how many to report now, this one included (the first
        ever, or the first `interval` after the last report), else 0."""
        self._unreported += 1
        now = self.clock()
        if self._reported_at is not None and now - self._reported_at < self.interval:
            return 0
        self._reported_at, count, self._unreported = now, self._unreported, 0
        return count
