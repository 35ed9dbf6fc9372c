"""agent/logs.py: the agent's log lines are rate-limited per template, so a peer that
makes the agent log per stream cannot flood the log (issue 9.9)."""

from __future__ import annotations

import io
import logging

from nodeagent.agent.logs import RateLimit


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def logger_with(limit: RateLimit, name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(limit)
    log = logging.getLogger(name)
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG)
    log.propagate = False
    return log, out


def test_each_template_passes_its_burst_per_interval_then_says_how_many_it_held():
    clock = Clock()
    limit = RateLimit(burst=3, interval=10.0, clock=clock)
    log, out = logger_with(limit, "test.logs.burst")
    for n in range(100):
        log.warning("inbound HBONE from %s: stream %d reset", "spiffe://td/ns/a/sa/b", n)
    log.info("another template %d", 1)  # its own budget
    clock.now += 9.9
    log.warning("inbound HBONE from %s: stream %d reset", "x", 100)  # same window: held
    clock.now += 0.1
    log.warning("inbound HBONE from %s: stream %d reset", "x", 101)  # a new window
    assert out.getvalue().splitlines() == [
        "WARNING inbound HBONE from spiffe://td/ns/a/sa/b: stream 0 reset",
        "WARNING inbound HBONE from spiffe://td/ns/a/sa/b: stream 1 reset",
        "WARNING inbound HBONE from spiffe://td/ns/a/sa/b: stream 2 reset",
        "INFO another template 1",
        "WARNING inbound HBONE from x: stream 101 reset [98 similar lines suppressed in the last 10s]"]
    assert limit.suppressed == 98


def test_levels_and_loggers_have_budgets_of_their_own():
    limit = RateLimit(burst=1, interval=10.0, clock=Clock())
    a, out_a = logger_with(limit, "test.logs.a")
    b, out_b = logger_with(limit, "test.logs.b")
    for _ in range(3):
        a.warning("same %s", "text")
        a.error("same %s", "text")
        b.warning("same %s", "text")
    assert out_a.getvalue().splitlines() == ["WARNING same text", "ERROR same text"]
    assert out_b.getvalue().splitlines() == ["WARNING same text"]
    assert limit.suppressed == 6
