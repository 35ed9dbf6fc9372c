"""The factor by which the tests' waits for a condition stretch on a slow machine
(NODEAGENT_TEST_TIME_SCALE: the kernel lab's VMs under software emulation run Python
~30x slower). Light on purpose: `probe` imports it inside each pod."""

from __future__ import annotations

import math
import os
from typing import Mapping

from nodeagent.errors import ConfigError

# A factor for every wait for a condition (readiness, an answer, an exit) — never for a
# latency the test asserts: tests/vm/run sets it in a VM under emulation (its --time-scale).
TIME_SCALE_ENV = "NODEAGENT_TEST_TIME_SCALE"


def time_scale(environ: Mapping[str, str] = os.environ) -> float:
    """The factor of NODEAGENT_TEST_TIME_SCALE (a number >= 1; 1 when unset or empty)."""
    raw = environ.get(TIME_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ConfigError(TIME_SCALE_ENV, f"{raw!r} is not a number >= 1",
                          "unset it, or give the factor by which this machine is slower (30 under qemu TCG)")
    return value


def scaled(seconds: float) -> float:
    """`seconds` of a wait for a condition, on this machine: times `time_scale()`."""
    return seconds * time_scale()
