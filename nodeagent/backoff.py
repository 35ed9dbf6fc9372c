"""Exponential backoff: how long to wait before trying again after failures in a row.

`Backoff(first, maximum).delay(n)` is the wait after the n-th failure in a row: `first`,
doubling each time, never more than `maximum`. `jittered` spreads it over [d/2, d]
(equal jitter) for clients of one server that fail together. The caller counts its
failures and starts the count over when it succeeds (or, for a supervised process, once
a run lasted long enough), and waits on its own clock, so tests step that clock. Used by
the CA and JWKS retries, pod enrolment, and the Envoy and lab process restarts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# 2**1000 still converts to a float: however many failures, no OverflowError.
MAX_DOUBLINGS = 1000


@dataclass(frozen=True)
class Backoff:
    first: float  # seconds, after the first failure
    maximum: float  # seconds, the cap

    def delay(self, attempt: int) -> float:
        """The wait after failure number `attempt` (1 for the first) in a row."""
        doublings = min(max(attempt - 1, 0), MAX_DOUBLINGS)
        return min(self.maximum, self.first * 2 ** doublings)

    def jittered(self, attempt: int, rng: random.Random) -> float:
        """`delay(attempt)` = d with equal jitter, uniform in [d/2, d]: agents that lost a
        server together do not all come back in the same second."""
        ceiling = self.delay(attempt)
        return ceiling / 2 + rng.uniform(0, ceiling / 2)
