"""When an HBONE connection should end although nobody closed it.

Keepalive (as ztunnel's ping-pong): after `keepalive_interval` without hearing from the
peer, PING it; with no answer within `keepalive_timeout` the peer is gone (a cable cut,
a frozen node) and the connection is closed, so its streams fail instead of hanging.
Idle: with no streams for `idle_timeout`, the connection is closed with GOAWAY (the pool
releases unused connections; the server drops abandoned ones).
Once stopped (the connection is lost) it arms nothing again: a timer holds the session,
its TLS transport and read buffer (~350 KB) until it fires, so a stream ending after its
connection (a handler still connecting to the app, as under rapid reset) must not re-arm
the idle timer for another `idle_timeout`.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from nodeagent.tunnel.settings import TunnelSettings


class Liveness:
    def __init__(self, loop: asyncio.AbstractEventLoop, settings: TunnelSettings, idle_timeout: float, *,
                 ping: Callable[[], None], dead: Callable[[], None], idle: Callable[[], None]):
        self.loop = loop
        self.interval, self.timeout = settings.keepalive_interval, settings.keepalive_timeout
        self.idle_timeout = idle_timeout
        self._ping, self._dead, self._idle = ping, dead, idle
        self._last_heard = loop.time()
        self._ping_sent_at: float | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._stopped = False

    def start(self) -> None:
        if self._stopped:
            return
        self._tick_handle = self.loop.call_later(min(self.interval, self.timeout) / 2, self._tick)

    def stop(self) -> None:
        """For good: the connection is gone."""
        self._stopped = True
        for handle in (self._tick_handle, self._idle_handle):
            if handle is not None:
                handle.cancel()
        self._tick_handle = self._idle_handle = None

    def heard(self) -> None:
        self._last_heard = self.loop.time()

    def pong(self) -> None:
        self._ping_sent_at = None

    def busy(self, busy: bool) -> None:
        """Streams exist (or are promised): no idle timer; none: start it."""
        if self._stopped:
            return
        if not busy and self._idle_handle is None:
            self._idle_handle = self.loop.call_later(self.idle_timeout, self._idle_expired)
        elif busy and self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None

    def _tick(self) -> None:
        now = self.loop.time()
        if self._ping_sent_at is not None and now - self._ping_sent_at >= self.timeout:
            self._tick_handle = None
            self._dead()
            return
        if self._ping_sent_at is None and now - self._last_heard >= self.interval:
            self._ping_sent_at = now
            self._ping()
        self.start()

    def _idle_expired(self) -> None:
        self._idle_handle = None
        self._idle()
