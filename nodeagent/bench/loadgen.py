"""The load generators of `nodeagent bench mesh`: Debian's `wrk` (HTTP/1.1) and `iperf3`
(one TCP stream), their command lines and what their output says. Pure: nothing here
runs a process.

wrk prints its own summary (`--latency` adds the percentile lines); `parse_wrk` reads
the p50/p99 latency, the request count, the run's length, requests/s and the errors
(socket errors and non-2xx/3xx answers). Its latency of a request starts when the
request is written, after the connection is up, so with `Connection: close` the TCP
handshake to the first hop is not in it (the connection rate is). `parse_iperf3` reads
`iperf3 -J`: the receiver's bits per second.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from nodeagent.errors import NodeagentError

TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}  # to microseconds
_TIME = r"([0-9.]+)(us|ms|s|m|h)"
_PERCENTILE = re.compile(rf"^\s*(50|75|90|99)(?:\.0+)?%\s+{_TIME}\s*$", re.M)
_REQUESTS = re.compile(rf"^\s*(\d+) requests in {_TIME},", re.M)
_RATE = re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$", re.M)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


class LoadError(NodeagentError):
    """A load generator failed or printed what it does not print after a good run."""


@dataclass(frozen=True)
class WrkResult:
    p50_us: float
    p99_us: float
    requests: int
    seconds: float
    rps: float
    errors: int  # socket errors (connect, read, write, timeout) + non-2xx/3xx answers


def wrk_argv(url: str, connections: int, seconds: float, close: bool = False, threads: int | None = None) -> list[str]:
    """wrk with `connections` connections for `seconds` (whole seconds, at least 1);
    `close` sends `Connection: close`, so every request has a new connection."""
    threads = threads or min(connections, 2)
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s", "--latency",
            "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    return argv + [url]


def to_us(value: str, unit: str) -> float:
    return float(value) * TIME_UNITS[unit]


def parse_wrk(text: str) -> WrkResult:
    percentiles = {int(m.group(1)): to_us(m.group(2), m.group(3)) for m in _PERCENTILE.finditer(text)}
    requests, rate = _REQUESTS.search(text), _RATE.search(text)
    if 50 not in percentiles or 99 not in percentiles or requests is None or rate is None:
        raise LoadError("wrk printed no latency distribution or request count (was --latency given?)",
                        f"its output: {text.strip()[:400]!r}")
    errors = sum(int(n) for n in _SOCKET_ERRORS.search(text).groups()) if _SOCKET_ERRORS.search(text) else 0
    non_2xx = _NON_2XX.search(text)
    errors += int(non_2xx.group(1)) if non_2xx else 0
    return WrkResult(percentiles[50], percentiles[99], int(requests.group(1)),
                     to_us(requests.group(2), requests.group(3)) / 1e6, float(rate.group(1)), errors)


def iperf3_argv(host: str, port: int, seconds: float) -> list[str]:
    """One TCP stream from the client to `host:port` for `seconds`, JSON out."""
    return ["iperf3", "-c", host, "-p", str(port), "-t", str(max(1, round(seconds))), "-P", "1", "-J"]


def parse_iperf3(text: str) -> float:
    """Gbit/s the receiver got, from `iperf3 -J`."""
    try:
        data = json.loads(text)
    except ValueError:
        raise LoadError("iperf3 printed no JSON", f"its output: {text.strip()[:400]!r}") from None
    if data.get("error"):
        raise LoadError(f"iperf3 failed: {data['error']}")
    try:
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    except (KeyError, TypeError, ValueError):
        raise LoadError("iperf3's JSON has no end.sum_received.bits_per_second") from None
