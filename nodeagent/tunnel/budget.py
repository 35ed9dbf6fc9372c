"""What all HBONE streams together may hold, both ways (the Python path's side of the
native engine's receive and send budgets: native/hbone.h, Back-pressure; settings.py says
why). The agent shares one between its server and its pools.

Received DATA waits in a stream's inbox until its reader or protocol takes it; the HTTP/2
windows bound that per stream and per connection, `receive_budget` over all of them. Once
the streams would hold half of it, DATA for a stream that would hold its share of that
half (the half over the streams holding any), or that would take the total past the
whole budget, resets the stream (HboneStream._overloaded: RST_STREAM CANCEL, its bytes
dropped and acknowledged), as Envoy's overload manager resets the streams using the most
memory. Connections are always read: one not read would hear no WINDOW_UPDATE, and an
app that writes as it reads would wait on it for good.

What an app writes waits in its stream's outbox until the peer's window lets it out; a
peer that never opens it keeps write_buffer per stream. Once the outboxes hold half of
`send_budget`, a stream holding its share of that half (or writing past the whole) pauses
its writer (the relay stops reading the app's socket) until it is under half its share
and its outbox is down to its low-water mark, or until all together hold under half again
(`waiting`: the streams paused for it).
"""

from __future__ import annotations

from typing import Protocol

from nodeagent.tunnel.settings import TunnelSettings


class Waiting(Protocol):
    def _budget_released(self) -> None: ...


class Tally:
    """One budget's count (native/hbone.c's struct tally): what all streams hold, the most
    ever, and how many hold any."""

    def __init__(self) -> None:
        self.held = self.peak = self.holding = 0

    def add(self, stream_held: int, n: int) -> int:
        """`n` bytes more (or fewer) held by a stream holding `stream_held`; its new holding."""
        now = stream_held + n
        self.held += n
        self.peak = max(self.peak, self.held)
        if (stream_held == 0) != (now == 0):
            self.holding += 1 if stream_held == 0 else -1
        return now


class StreamBudget:
    def __init__(self, settings: TunnelSettings = TunnelSettings()):
        self.limit = settings.receive_budget
        self.received = Tally()  # DATA in every stream's inbox
        self.overloaded = 0  # streams reset for it
        self.send_limit = settings.send_budget
        self.sent = Tally()  # bytes in every stream's outbox
        self.waiting: set[Waiting] = set()  # streams whose writer the send budget paused

    # --- received ---------------------------------------------------------------------
    def over(self, stream_held: int, n: int) -> bool:
        """Whether `n` more bytes for a stream holding `stream_held` are over the budget: its
        share of the half-used budget, or more than the whole (shares taken while fewer
        streams held were larger: alone they let the sum grow with the log of the count)."""
        half, held = self.limit // 2, self.received.held
        holding = self.received.holding + (stream_held == 0)
        return held + n >= half and ((stream_held + n) * holding >= half or held + n > self.limit)

    def add(self, stream_held: int, n: int) -> int:
        """`n` bytes more (or fewer) received by a stream holding `stream_held`; its new holding."""
        return self.received.add(stream_held, n)

    # --- sent -------------------------------------------------------------------------
    def send_full(self, stream_held: int) -> bool:
        """Whether a stream whose outbox holds `stream_held` is to pause its writer."""
        half = self.send_limit // 2
        if self.sent.held < half or not stream_held:
            return False
        return stream_held * self.sent.holding >= half or self.sent.held > self.send_limit

    def send_eased(self, stream_held: int) -> bool:
        """Whether a stream the send budget paused may write again: under half its share,
        or all together under half the budget."""
        half = self.send_limit // 2
        return self.sent.held < half or stream_held * self.sent.holding * 2 < half

    def send_add(self, stream_held: int, n: int) -> int:
        """`n` bytes more (or fewer) in an outbox holding `stream_held`; its new holding.
        Fewer, once all hold under half: the waiting streams are told."""
        now = self.sent.add(stream_held, n)
        if n < 0 and self.waiting and self.sent.held < self.send_limit // 2:
            for stream in list(self.waiting):
                stream._budget_released()
        return now

    def describe(self) -> dict:
        return {"received_held": self.received.held, "received_held_peak": self.received.peak,
                "receive_budget": self.limit, "streams_overloaded": self.overloaded,
                "send_held": self.sent.held, "send_held_peak": self.sent.peak,
                "send_budget": self.send_limit, "streams_send_waiting": len(self.waiting)}
