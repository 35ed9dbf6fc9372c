"""Log set-up for `nodeagent run`: level and format (text, or one JSON object per line
for log collectors) from the agent config, applied to the `nodeagent` logger only, and
rate-limited: a peer can make the agent log per connection or per stream (a reset, a
refused handshake), so a flood must not become a flood of log lines. Each message
template (per logger and level) passes `burst` times per `interval`; the rest are
counted, and the next line of that template says how many were suppressed.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

BURST = 20  # lines of one template per interval
INTERVAL = 10.0  # seconds


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


class RateLimit(logging.Filter):
    """At most `burst` records of one (logger, level, template) per `interval` seconds."""

    def __init__(self, burst: int = BURST, interval: float = INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.interval, self.clock = burst, interval, clock
        self._windows: dict[tuple[str, int, str], list] = {}  # key -> [window start, passed, suppressed]
        self.suppressed = 0  # in total, for tests and status

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.interval:
            held = window[2] if window is not None else 0
            window = self._windows[key] = [now, 0, 0]
            if len(self._windows) > 10_000:  # templates are few; bound it anyway
                self._windows = {key: window}
            if held:
                record.msg = f"{record.msg} [{held} similar lines suppressed in the last {self.interval:g}s]"
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        self.suppressed += 1
        return False


def configure(level: str, fmt: str, limit: RateLimit | None = None) -> logging.Logger:
    """Send `nodeagent.*` logs to stderr at `level` in `fmt`, rate-limited by `limit`
    (default RateLimit()); returns the agent's logger."""
    handler = logging.StreamHandler()
    handler.addFilter(limit or RateLimit())
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("nodeagent")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    return logging.getLogger("nodeagent.agent")
