"""`$(VAR)` references in a container's command, args and env, expanded as kubelet does.

A copy of Kubernetes' `third_party/forked/golang/expansion` (`Expand`, `MappingFuncFor`):
`$(NAME)` becomes NAME's value when a mapping defines it and stays as written when none
does; `$$` is an escaped `$` (so `$$(NAME)` gives the literal `$(NAME)`); any other `$`
is kept. kubelet expands `command` and `args` with the container's environment (the
Services' variables and the container's `env`), and each literal `env` value with the
variables defined before it (then the Services'); values from `valueFrom` and `envFrom`
are never expanded (`escape` keeps them literal through `expand`). Pure.
"""

from __future__ import annotations

from typing import Callable, Mapping

Lookup = Callable[[str], "str | None"]  # a variable's value, None when it is not defined


def expand(text: str, *mappings: Mapping[str, str]) -> str:
    """`text` with each `$(NAME)` replaced by NAME's value in the first mapping that has it."""
    def lookup(name: str) -> str | None:
        return next((m[name] for m in mappings if name in m), None)
    return expand_with(text, lookup)


def expand_with(text: str, lookup: Lookup) -> str:
    """`expand` with the values from `lookup` (kubelet's Expand with its mapping)."""
    out, checkpoint, cursor = [], 0, 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            read, advance = _reference(text[cursor + 1:], lookup)
            out.append(read)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


def _reference(rest: str, lookup: Lookup) -> tuple[str, int]:
    """What `$` followed by `rest` expands to, and how many characters of `rest` it used
    (kubelet's tryReadVariableName)."""
    if rest[0] == "$":
        return "$", 1
    if rest[0] == "(":
        end = rest.find(")", 1)
        if end == -1:
            return "$(", 1  # an unterminated reference is kept as written
        name = rest[1:end]
        value = lookup(name)
        return (f"$({name})" if value is None else value), end + 1
    return "$" + rest[0], 1


def references(text: str) -> list[str]:
    """The names `expand` looks up in `text`, in order."""
    seen: list[str] = []

    def record(name: str) -> None:
        seen.append(name)
    expand_with(text, record)
    return seen


def escape(value: str) -> str:
    """`value` written so that `expand` gives it back unchanged (for values kubelet does
    not expand, once they are stored as plain `value`s)."""
    return value.replace("$", "$$")
