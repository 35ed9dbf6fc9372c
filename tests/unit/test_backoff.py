"""nodeagent/backoff.py: the delays after failures in a row (first, doubling, capped),
starting over from `first` when the caller's count does, and equal jitter within [d/2, d];
and the schedule each user keeps."""

from __future__ import annotations

import logging
import random

import pytest

from nodeagent.agent.inpod.enrolment import RETRY
from nodeagent.agent.waypoint.jwks import JwksFetcher
from nodeagent.backoff import Backoff
from nodeagent.identity.workload.manager import CA_RETRY
from nodeagent.lab.supervisor import RESTART_BACKOFF
from nodeagent.xds.envoy import EnvoySupervisor


class EdgeRng:
    """A random source whose uniform(a, b) is always a (low) or always b (high)."""

    def __init__(self, high: bool):
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


@pytest.mark.parametrize("backoff, delays", [
    (Backoff(1.0, 60.0), [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]),
    (Backoff(0.1, 2.0), [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]),
    (Backoff(1.0, 30.0), [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]),
    (Backoff(0.5, 30.0), [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
    (Backoff(5.0, 1200.0), [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0]),
])
def test_delays_double_from_the_first_up_to_the_maximum(backoff, delays):
    assert [backoff.delay(attempt) for attempt in range(1, 9)] == delays


def test_each_user_keeps_its_schedule(tmp_path):
    assert CA_RETRY == Backoff(1.0, 60.0)  # the certificate manager, jittered
    assert JwksFetcher(tmp_path, logging.getLogger("test.backoff")).retry == Backoff(5.0, 1200.0)  # jittered
    assert RETRY == Backoff(0.1, 2.0)  # pod enrolment
    assert EnvoySupervisor("/b.json", binary="/bin/true").backoff == Backoff(0.5, 30.0)
    assert RESTART_BACKOFF == Backoff(1.0, 30.0)  # the lab's processes


def test_the_cap_holds_however_many_failures_there_were():
    backoff = Backoff(0.1, 2.0)
    assert [backoff.delay(n) for n in (6, 100, 1024, 1025, 10**6)] == [2.0] * 5  # no OverflowError


def test_a_count_started_over_gives_the_first_delay_again():
    backoff = Backoff(1.0, 30.0)
    before = [backoff.delay(n) for n in range(1, 5)]
    after = [backoff.delay(n) for n in range(1, 4)]  # the caller reset its count: a success, a long run
    assert (before, after) == ([1.0, 2.0, 4.0, 8.0], [1.0, 2.0, 4.0])
    assert backoff.delay(0) == backoff.delay(-3) == 1.0  # no failure counted yet: the first delay


def test_jitter_is_equal_jitter_between_half_and_all_of_the_delay():
    backoff = Backoff(1.0, 60.0)
    assert [backoff.jittered(n, EdgeRng(high=False)) for n in (1, 3, 8)] == [0.5, 2.0, 30.0]
    assert [backoff.jittered(n, EdgeRng(high=True)) for n in (1, 3, 8)] == [1.0, 4.0, 60.0]
    rng, twin = random.Random(1), random.Random(1)
    for attempt in range(1, 20):
        ceiling = backoff.delay(attempt)
        delays = [backoff.jittered(attempt, rng) for _ in range(50)]
        assert delays == [ceiling / 2 + twin.uniform(0, ceiling / 2) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(set(delays)) == 50
