"""Typed values of networking.istio.io specs: numbers, durations, percentages, string
matches, destinations and header operations, read from a `Field` (nodeagent.policy's
schema reader, which names the resource and field path of every error).

Durations are Go/Istio style ("10s", "1.5s", "100ms", "1h2m"); percentages are
`{value: 12.5}` (0-100); a StringMatch is one of exact/prefix/regex. Regexes are checked
for what RE2, Envoy's engine, refuses (look-around, back-references). Pure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from nodeagent.policy.schema import Field, describe
from nodeagent.policy.validate import DURATION

UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
NOT_RE2 = re.compile(r"\(\?[=!<]|\\[1-9]")  # look-around, named look-behind, back-references
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
MILLISECOND = timedelta(milliseconds=1)


def integer(field: Field, low: int = 0, high: int = 2**32 - 1) -> int | None:
    """An integer in [low, high], or None when absent."""
    value = field.value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise field.error(f"must be an integer, not {describe(value)}")
    if not low <= value <= high:
        raise field.error(f"{value} is out of range {low}-{high}")
    return value


def number(field: Field, low: float, high: float) -> float | None:
    value = field.value
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise field.error(f"must be a number, not {describe(value)}")
    if not low <= value <= high:
        raise field.error(f"{value} is out of range {low}-{high}")
    return float(value)


def duration(field: Field, minimum: timedelta = MILLISECOND) -> timedelta | None:
    """A duration of at least `minimum` (Istio's webhook refuses shorter ones)."""
    text = field.string()
    if not text:
        return None
    if not DURATION.match(text):
        raise field.error(f"{text!r} is not a duration", 'write for example "10s", "1.5s" or "250ms"')
    seconds = sum(float(n) * UNITS[unit] for n, unit in DURATION_PART.findall(text))
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
    """`text` as an RE2 pattern (checked to compile and to use nothing RE2 refuses)."""
    if NOT_RE2.search(text):
        raise field.error(f"{text!r} uses look-around or a back-reference, which RE2 does not support")
    try:
        re.compile(text)
    except re.error as exc:
        raise field.error(f"{text!r} is not a valid regular expression: {exc}") from None
    return text


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
