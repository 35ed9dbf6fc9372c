"""Typed values of networking.istio.io specs: numbers, durations, percentages, string
matches, destinations and header operations, read from a `Field` (nodeagent.policy's
schema reader, which names the resource and field path of every error).

Durations are Go/Istio style ("10s", "1.5s", "100ms", "1h2m"); percentages are
`{value: 12.5}` (0-100); a StringMatch is one of exact/prefix/regex. Regexes are compiled
as Envoy compiles them: by RE2 (google-re2, the same library), refused when RE2 refuses
them (look-around, back-references, `a++`, `\\Z`, `a{1001}`) or when their program is
larger than Envoy allows (MAX_PROGRAM_SIZE), so Envoy never NACKs a regex we accepted. Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

import re2

from nodeagent.errors import ConfigError
from nodeagent.policy.schema import Field, describe
from nodeagent.policy.validate import DURATION

class Note(ConfigError):
    """A remark on a valid field that works, but not as the user may think (analyze shows it as
    "info", never failing): passed to a reader's `warn` like a warning."""


UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
NOT_RE2 = re.compile(r"\(\?[=!<](?!\w+>)|\\[1-9]")  # look-around, back-references: said plainly
# Envoy refuses a regex whose RE2 program is larger than the runtime key
# re2.max_program_size.error_level, 100 unless the bootstrap sets it (the waypoint's does not).
MAX_PROGRAM_SIZE = 100
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
MILLISECOND = timedelta(milliseconds=1)
MAX_SECONDS = (2**63 - 1) / 1e9  # Go's time.Duration, about 2562047h


def integer(field: Field, low: int = 0, high: int = 2**32 - 1) -> int | None:
    """An integer in [low, high], or None when absent."""
    value = field.value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise field.error(f"must be an integer, not {describe(value)}")
    if not low <= value <= high:
        raise field.error(f"{value} is out of range: it must be from {low} to {high}")
    return value


def number(field: Field, low: float, high: float) -> float | None:
    value = field.value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise field.error(f"must be a number, not {describe(value)}")
    if not low <= value <= high:
        raise field.error(f"{value} is out of range: it must be from {low} to {high}")
    return float(value)


def duration(field: Field, minimum: timedelta = MILLISECOND, maximum: float = MAX_SECONDS) -> timedelta | None:
    """A duration of at least `minimum` (Istio's webhook refuses shorter ones) and at most
    `maximum` seconds (what Go's time.Duration holds, as istiod parses it: more overflowed
    Python's timedelta, an exception no reader expected)."""
    text = field.string()
    if not text:
        return None
    if not DURATION.match(text):
        raise field.error(f"{text!r} is not a duration", 'write for example "10s", "1.5s" or "250ms"')
    seconds = sum(float(n) * UNITS[unit] for n, unit in DURATION_PART.findall(text))
    if not seconds <= maximum:
        raise field.error(f"{text} is longer than the maximum {maximum:.0f}s")
    value = timedelta(seconds=seconds)
    if value < minimum:
        raise field.error(f"{text} is shorter than the minimum {_show(minimum)}")
    return value


def _show(value: timedelta) -> str:
    return f"{value.total_seconds() * 1000:g}ms"


def percentage(field: Field) -> float | None:
    """Istio's Percent `{value: 0-100}`."""
    if not field.present:
        return None
    return number(field.fields(("value",))["value"], 0.0, 100.0) or 0.0


def regex(field: Field, text: str) -> str:
    """`text` as Envoy's RE2 compiles it: valid RE2 syntax, program size within Envoy's limit."""
    if NOT_RE2.search(text):
        raise field.error(f"{text!r} uses look-around or a back-reference, which RE2 does not support")
    size = program_size(text)
    if isinstance(size, str):
        raise field.error(f"{text!r} is not a valid regular expression for RE2, Envoy's engine: {size}",
                          "RE2 has no look-around, back-references, possessive quantifiers (a++) or \\Z, "
                          "and repeats at most 1000 times")
    if size > MAX_PROGRAM_SIZE:
        raise field.error(f"{text!r} is too large for Envoy: its RE2 program size is {size}, over Envoy's "
                          f"limit of {MAX_PROGRAM_SIZE}", "simplify it (fewer or shorter repetitions such as "
                          "{200}), or match with exact or prefix")
    return text


def program_size(text: str) -> int | str:
    """RE2's program size of `text` as Envoy compiles it, or RE2's error. The Envoy we run
    parses and sizes a regex as RE2's Latin-1 mode does the pattern's UTF-8 bytes (`.` is
    2 instructions, not UTF-8's 8; `\\x{100}` is refused): checked against it in
    tests/unit/test_waypoint_nack.py."""
    options = re2.Options()
    options.log_errors = False  # the error goes into the ConfigError, not to stderr
    options.encoding = re2.Options.Encoding.LATIN1
    try:
        return re2.compile(text.encode(), options).programsize
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)


@dataclass(frozen=True)
class StringMatch:
    """exact / prefix / regex; `present` is Istio's `{}` or `regex: "*"` (any value)."""

    kind: str  # "exact", "prefix", "regex" or "present"
    value: str = ""


def string_match(field: Field) -> StringMatch:
    parts = field.fields(("exact", "prefix", "regex"))
    given = [k for k, f in parts.items() if f.present]
    if len(given) > 1:
        raise field.error(f"{' and '.join(given)} exclude each other", "keep one of them")
    if not given:
        return StringMatch("present")
    kind = given[0]
    text = parts[kind].string()
    if kind == "regex":
        if text == "*":  # Istio reads a bare `*` as "present", not as a regex
            return StringMatch("present")
        text = regex(parts[kind], text)
    return StringMatch(kind, text)


def header_name(field: Field, name: object) -> str:
    text = str(name)
    if not HEADER_NAME.match(text) and not text.startswith(":"):
        raise field.error(f"{text!r} is not a valid HTTP header name")
    return text.lower()


def entries(field: Field, what: str = "a map") -> list[tuple[object, Field]]:
    """A map's (key, Field of its value) pairs, sorted by key; none when absent."""
    if not field.present:
        return []
    if not isinstance(field.value, dict):
        raise field.error(f"must be {what}, not {describe(field.value)}")
    return [(name, Field(field.where, f"{field.path}.{name}", value))
            for name, value in sorted(field.value.items(), key=lambda kv: str(kv[0]))]


def string_matches(field: Field, header_names: bool = False) -> tuple[tuple[str, StringMatch], ...]:
    """A map of name → StringMatch (headers, withoutHeaders, queryParams), sorted by name."""
    return tuple((header_name(item, name) if header_names else str(name), string_match(item))
                 for name, item in entries(field))


@dataclass(frozen=True)
class Destination:
    host: str
    subset: str = ""
    port: int | None = None


def destination(field: Field) -> Destination:
    if not field.present:
        raise field.error("must be set", "name the destination host")
    parts = field.fields(("host", "subset", "port"))
    host = parts["host"].string()
    if not host:
        raise parts["host"].error("must be set")
    port = None
    if parts["port"].present:
        port = integer(parts["port"].fields(("number",))["number"], 1, 65535)
    return Destination(host, parts["subset"].string(), port)


@dataclass(frozen=True)
class HeaderOps:
    """Istio's `headers`: request/response set (overwrite), add (append), remove."""

    request_set: tuple[tuple[str, str], ...] = ()
    request_add: tuple[tuple[str, str], ...] = ()
    request_remove: tuple[str, ...] = ()
    response_set: tuple[tuple[str, str], ...] = ()
    response_add: tuple[tuple[str, str], ...] = ()
    response_remove: tuple[str, ...] = ()


def header_ops(field: Field) -> HeaderOps | None:
    if not field.present:
        return None
    parts = field.fields(("request", "response"))
    request, response = (_ops(parts["request"]), _ops(parts["response"]))
    return HeaderOps(*request, *response)


def _ops(field: Field) -> tuple:
    parts = field.fields(("set", "add", "remove"))
    return (_pairs(parts["set"]), _pairs(parts["add"]),
            tuple(header_name(f, text) for f, text in parts["remove"].string_items()))


def _pairs(field: Field) -> tuple[tuple[str, str], ...]:
    return tuple((header_name(item, name), item.string())
                 for name, item in entries(field, "a map of header names to values"))
