"""What all HBONE streams together may hold of received DATA (the Python path's side of
the native engine's receive budget: native/hbone.h, Back-pressure; settings.py says why).

A stream's received DATA waits in its inbox until its reader or protocol takes it; the
HTTP/2 windows bound that per stream and per connection, this bounds it over all of them.
Once the streams would hold half of `receive_budget`, DATA for a stream that would hold
its share of that half (the half over the streams holding any) resets the stream
(HboneStream._overloaded: RST_STREAM CANCEL, its bytes dropped and acknowledged), as
Envoy's overload manager resets the streams using the most memory. Connections are
always read: one not read would hear no WINDOW_UPDATE, and an app that writes as it
reads would wait on it for good. The agent shares one budget between its server and its
pools.
"""

from __future__ import annotations

from nodeagent.tunnel.settings import TunnelSettings


class ReceiveBudget:
    def __init__(self, settings: TunnelSettings = TunnelSettings()):
        self.limit = settings.receive_budget
        self.held = 0  # received DATA in every stream's inbox
        self.peak = 0
        self.holding = 0  # streams holding any
        self.overloaded = 0  # streams reset for it

    def over(self, stream_held: int, n: int) -> bool:
        """Whether `n` more bytes for a stream holding `stream_held` are over the budget: its
        share of the half-used budget, or more than the whole (shares taken while fewer
        streams held were larger: alone they let the sum grow with the log of the count)."""
        half = self.limit // 2
        holding = self.holding + (stream_held == 0)
        return self.held + n >= half and ((stream_held + n) * holding >= half or self.held + n > self.limit)

    def add(self, stream_held: int, n: int) -> int:
        """`n` bytes more (or fewer) held by a stream holding `stream_held`; its new holding."""
        now = stream_held + n
        self.held += n
        self.peak = max(self.peak, self.held)
        if (stream_held == 0) != (now == 0):
            self.holding += 1 if stream_held == 0 else -1
        return now

    def describe(self) -> dict:
        return {"received_held": self.held, "received_held_peak": self.peak, "receive_budget": self.limit,
                "streams_overloaded": self.overloaded}
