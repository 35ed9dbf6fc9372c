"""Reading security.istio.io specs field by field, naming the path of every error.

Istio's CRDs are structural schemas: an API server refuses an unknown field, a number
where a string belongs or a misspelt enum. `Field` applies the same checks to resources
read from files and builds the place every ConfigError names: the resource
(`source (Kind ns/name)`) and the field path (`spec.rules[0].from[1].source.ipBlocks[0]`).
Every problem of a resource is reported at once: `all_errors(read)` runs a reader with a
collector in force, in which `Field.fields` records an unknown field and goes on, and
each `attempt(...)` the readers place around a field, a list element or a component
records its error and goes on to the next; without a collector (a reader called on its
own) the first error raises, as before. Pure: no I/O.
"""

from __future__ import annotations

import difflib
from datetime import datetime, timezone
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject, string_map


T = TypeVar("T")
# The errors of the resource being read by all_errors(), or None outside it. A context
# variable, not state of an object: readers are plain functions called deep inside one
# another, and each thread (the agent's config work, tests) reads its own resources.
_COLLECTED: ContextVar[list[ConfigError] | None] = ContextVar("nodeagent_config_errors", default=None)


class ConfigErrors(ConfigError):
    """Every problem found in one resource (at least one); str() is the first."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = tuple(errors)
        first = errors[0]
        super().__init__(first.where, first.message, first.hint)


def _record(sink: list[ConfigError], err: ConfigError) -> None:
    sink.extend(err.errors if isinstance(err, ConfigErrors) else [err])


@contextmanager
def _collecting() -> Iterator[list[ConfigError]]:
    token = _COLLECTED.set([])
    try:
        yield _COLLECTED.get()
    finally:
        _COLLECTED.reset(token)


def all_errors(read: Callable[[], T], where: str = "") -> T:
    """read() with every error it finds collected; raises ConfigErrors with all of them.
    Any other exception a reader raises (a value no check foresaw: a URL the parser
    refuses, JSON nested past the recursion limit, a duration past what a timedelta
    holds) refuses the resource `where` names, as an error of it: one resource the
    readers choke on must never stop the others from being read (a build that raised
    kept every policy of the node at its old version, or none after a restart)."""
    with _collecting() as found:
        try:
            value = read()
        except ConfigError as err:
            _record(found, err)
        except (ArithmeticError, LookupError, RecursionError, TypeError, ValueError) as exc:
            _record(found, ConfigError(where or "resource", f"cannot be read ({type(exc).__name__}: {exc})",
                                       "nodeagent's reader failed on a value it did not foresee; the "
                                       "resource is refused, please report it"))
        errors = list({str(e): e for e in found}.values())  # in the order found, once each
    if errors:
        raise ConfigErrors(errors)
    return value


def attempt(read: Callable[[], T], default: Any = None) -> T:
    """read(); while all_errors() collects, its error is recorded and `default` returned so
    the reader goes on with the next field. Outside all_errors() errors raise."""
    sink = _COLLECTED.get()
    if sink is None:
        return read()
    try:
        return read()
    except ConfigError as err:
        _record(sink, err)
        return default


def report(err: ConfigError) -> None:
    """A problem that does not stop reading: recorded while collecting, else raised."""
    sink = _COLLECTED.get()
    if sink is None:
        raise err
    _record(sink, err)


def created(obj: KubeObject) -> datetime | None:
    """metadata.creationTimestamp (Istio's tie-break between resources: the oldest wins),
    None when absent; ConfigError when it is not an RFC 3339 time."""
    value = (obj.body.get("metadata") or {}).get("creationTimestamp")
    if value is None:
        return None
    when = value if isinstance(value, datetime) else None  # YAML reads unquoted times
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
    if when is None:
        raise Field(resource_name(obj), "metadata.creationTimestamp", value).error(
            f"{value!r} is not an RFC 3339 time", 'for example "2024-05-01T10:00:00Z"')
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def describe(value: Any) -> str:
    """`int 8080`, `list`, `map`: what a wrong value is, for messages."""
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def resource_name(obj: KubeObject) -> str:
    """`file.yaml#2 (AuthorizationPolicy foo/bar)`, as model.py names objects."""
    return f"{obj.source} ({obj})" if obj.source else str(obj)


@dataclass(frozen=True)
class Field:
    """One value of a resource together with its path, for reading and for errors."""

    where: str  # the resource, see resource_name
    path: str  # spec.rules[0].from[1]
    value: Any

    @classmethod
    def spec_of(cls, obj: KubeObject) -> "Field":
        return cls(resource_name(obj), "spec", obj.body.get("spec"))

    def error(self, message: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{self.where} {self.path}", message, hint)

    @property
    def present(self) -> bool:
        return self.value is not None

    def fields(self, known: Sequence[str]) -> dict[str, "Field"]:
        """This map's children by name (absent ones hold None); refuses unknown names."""
        value = {} if self.value is None else self.value
        if not isinstance(value, dict):
            raise self.error(f"must be a map, not {describe(value)}")
        for key in value:
            if key not in known:
                report(Field(self.where, f"{self.path}.{key}", value[key]).error(
                    "unknown field", _suggest(str(key), known)))
        return {k: Field(self.where, f"{self.path}.{k}", value.get(k)) for k in known}

    def items(self) -> list["Field"]:
        """The elements of this list (none when absent)."""
        if self.value is None:
            return []
        if not isinstance(self.value, list):
            raise self.error(f"must be a list, not {describe(self.value)}")
        return [Field(self.where, f"{self.path}[{i}]", v) for i, v in enumerate(self.value)]

    def each(self, read: Callable[["Field"], T]) -> list[T]:
        """read(item) of every element, each attempted on its own (see attempt); an
        element that failed is left out of the result."""
        results = [attempt(lambda item=item: (read(item),)) for item in self.items()]
        return [r[0] for r in results if r is not None]

    def string(self, default: str = "") -> str:
        if self.value is None:
            return default
        if not isinstance(self.value, str):
            raise self.error(f"must be a string, not {describe(self.value)}", _quote_hint(self.value))
        return self.value

    def string_items(self) -> list[tuple["Field", str]]:
        """A list of non-empty strings (Istio refuses empty values), each with its Field."""
        out = []
        for item in self.items():
            text = attempt(lambda item=item: _non_empty(item))
            if text is not None:
                out.append((item, text))
        return out

    def strings(self) -> tuple[str, ...]:
        return tuple(text for _, text in self.string_items())

    def enum(self, allowed: Sequence[str], default: str) -> str:
        text = self.string(default)
        if text not in allowed:
            hint = f"write {text.upper()}" if text.upper() in allowed else None
            raise self.error(f"{text!r} is not one of {', '.join(allowed)}", hint)
        return text

    def boolean(self, default: bool = False) -> bool:
        if self.value is None:
            return default
        if not isinstance(self.value, bool):
            raise self.error(f"must be true or false, not {describe(self.value)}")
        return self.value

    def labels(self) -> dict[str, str]:
        """A map of label strings (a selector's matchLabels)."""
        return string_map(self.value, f"{self.where} {self.path}", "labels")


def _non_empty(item: Field) -> str:
    text = item.string()
    if not text:
        raise item.error("must not be empty", "remove the empty entry")
    return text


def _quote_hint(value: Any) -> str | None:
    if isinstance(value, bool):  # YAML 1.1 reads unquoted yes/no/on/off as booleans
        return "quote it: YAML reads unquoted yes, no, on, off, true, false as booleans"
    return f'quote it: "{value}"' if isinstance(value, (int, float)) else None


def _suggest(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    fields = ", ".join(known)
    return f"did you mean {close[0]}? known fields: {fields}" if close else f"known fields: {fields}"
