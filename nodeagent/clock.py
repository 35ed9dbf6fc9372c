"""The wall clock the agent's asyncio schedules run on, passed in so tests can step time.

`Clock` is what a schedule needs: wall seconds (certificates and fetch times are wall
times) and a sleep; `SystemClock` is the real one. Used by the certificate manager and
the JWKS fetcher.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
