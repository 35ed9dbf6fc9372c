"""The agent's config thread: where source scans, model builds and the policy and
waypoint rebuilds run, one at a time, off the relays' event loop.

A 10k-object model takes seconds to read and translate; on the loop that was seconds
during which no connection was accepted or relayed (new-connection p99 12.6 → 1288 ms
in the probe of issue 9). Here the loop only awaits the result and swaps it in. One
worker thread: config steps never race each other (a Waypoint's state is only touched
from it, see waypoint.py), and they keep their order. The loop still shares the GIL
with it, so a rebuild costs the relays time slices (the interpreter switches every
5 ms), not a stall.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from typing import Any, Callable


class ConfigWork:
    def __init__(self, log: logging.Logger):
        self.log = log
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nodeagent-config")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` in the config thread; the caller's loop awaits its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)` from any thread, nobody waiting; its failure is logged."""
        try:
            future = self._executor.submit(fn, *args)
        except RuntimeError:  # shut down: the agent is stopping, the work no longer matters
            return
        future.add_done_callback(self._logged)

    def _logged(self, future: concurrent.futures.Future) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is not None:
            self.log.error("config work failed; the configuration in force stays", exc_info=exc)

    def close(self) -> None:
        """Drop queued work and wait for the step under way."""
        self._executor.shutdown(wait=True, cancel_futures=True)
