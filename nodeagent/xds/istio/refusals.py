"""Istio resources Envoy refused, held out of the waypoint's configuration.

Validation cannot know everything Envoy refuses (a limit of its build, a translation
bug), and one refused resource must not freeze every later change. When Envoy NACKs the
configuration the waypoint published, the resources whose change is to blame are found
among those that differ from the last configuration Envoy accepted: one such resource
is refused at once; among several, by bisection, as a delta debugger does — a trial
configuration applies the first half of the suspects and holds every other change at
its accepted version; an ACK clears that half (the culprit is in the rest), a NACK keeps
the suspicion on it. A refused resource keeps its last accepted version (or is left out)
until its spec changes, and its error carries Envoy's message; everything else flows.

A server-side resource (AuthorizationPolicy, RequestAuthentication) held out with no
accepted version is `withheld`: the pods it selects are left out of the waypoint, so
the agent enforces their policies at L4 (fail-safe) instead of Envoy enforcing all but
that one. Pure: the Waypoint publishes what `compose` gives and reports Envoy's answers
with `rejected` and `accepted`.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from nodeagent.errors import ConfigError
from nodeagent.xds.istio.config import SERVER_SIDE, IstioConfig, Key  # SERVER_SIDE held out: their pods go L4


def label(key: Key) -> str:
    """"Kind ns/name", as digests and status name a resource."""
    kind, namespace, name = key
    return f"{kind} {namespace}/{name}"


@dataclass(frozen=True)
class Build:
    """One configuration given to the translation: the resources in it and the digest of
    the spec each one is at; `trial` is the bisection step it tests (None: not a trial)."""

    config: IstioConfig
    digests: Mapping[str, str] = field(default_factory=dict)  # label → spec digest
    trial: int | None = None

    def changed(self, accepted: "Build | None") -> list[str]:
        """The resources this configuration has at another version than `accepted`."""
        before = accepted.digests if accepted is not None else {}
        return sorted(name for name, digest in self.digests.items() if before.get(name) != digest)


@dataclass(frozen=True)
class Refusal:
    digest: str  # the spec Envoy refused
    message: str  # Envoy's
    where: str  # the resource, as validation errors name it
    cause: str = "Envoy refused it"  # or "nodeagent cannot translate it" (publisher._untranslatable)


@dataclass(frozen=True)
class Search:
    suspects: Mapping[str, str]  # label → digest: the culprit is among these
    trial: tuple[str, ...]  # the suspects the trial of `step` applies
    step: int
    message: str  # Envoy's, of the last NACK


class Refusals:
    def __init__(self) -> None:
        self.refused: dict[str, Refusal] = {}
        self.search: Search | None = None
        self._steps = itertools.count(1)

    # --- what to publish -------------------------------------------------------------
    def compose(self, config: IstioConfig, digests: Mapping[str, str], accepted: Build | None) -> Build:
        """`config` (validated; `digests` of its resources' specs) with every refused
        resource, and during a search every change outside the trial, at its accepted
        version or left out."""
        self._forget(config, digests)
        before = accepted.digests if accepted is not None else {}
        entries, out, withheld = {}, {}, []
        for key, entry in config.entries.items():
            name = label(key)
            if not self._held(name, digests.get(name), before.get(name)):
                entries[key], out[name] = entry, digests.get(name, "?")
            elif name in before:
                entries[key], out[name] = accepted.config.entries[key], before[name]
            elif key[0] in SERVER_SIDE:
                withheld.append(entry)
        composed = dataclasses.replace(config, entries=MappingProxyType(dict(sorted(entries.items()))),
                                       withheld=config.withheld + tuple(withheld))
        return Build(composed, MappingProxyType(out), self.search.step if self.search else None)

    def _held(self, name: str, digest: str | None, accepted: str | None) -> bool:
        refusal = self.refused.get(name)
        if refusal is not None and refusal.digest == digest:
            return True
        search = self.search
        return search is not None and digest != accepted and name not in search.trial

    def _forget(self, config: IstioConfig, digests: Mapping[str, str]) -> None:
        """A refusal ends when its resource is gone or its spec changed: try it again."""
        present = {label(key) for key in config.entries}
        for name, refusal in list(self.refused.items()):
            if name not in present or digests.get(name) != refusal.digest:
                del self.refused[name]

    # --- Envoy's answers ---------------------------------------------------------------
    def rejected(self, build: Build, accepted: Build | None, message: str,
                 where: Mapping[str, str]) -> list[str] | None:
        """Envoy NACKed `build` (the one published last). Returns the resources refused
        now ([] while a search goes on: publish its next trial), or None when no changed
        resource can be blamed (nothing to publish)."""
        search = self.search
        if search is not None and build.trial == search.step:
            suspects = {n: d for n, d in search.suspects.items() if n in search.trial}
        else:
            suspects = {n: build.digests[n] for n in build.changed(accepted)}
        self.search = None
        if not suspects:
            return None
        return self._narrow(suspects, message, where)

    def accepted(self, build: Build, where: Mapping[str, str]) -> list[str] | None:
        """Envoy ACKed `build`. When it was the current trial, its half is cleared:
        returns the resources refused now ([] while the search goes on); None when
        nothing changed (no trial of the search)."""
        search = self.search
        if search is None or build.trial != search.step:
            return None
        self.search = None
        rest = {n: d for n, d in search.suspects.items() if n not in search.trial}
        return self._narrow(rest, search.message, where) if rest else []

    def _narrow(self, suspects: Mapping[str, str], message: str, where: Mapping[str, str]) -> list[str]:
        names = sorted(suspects)
        if len(names) == 1:
            (name,) = names
            self.refused[name] = Refusal(suspects[name], message, where.get(name, name))
            return names
        self.search = Search(MappingProxyType(dict(suspects)), tuple(names[:len(names) // 2]),
                             next(self._steps), message)
        return []

    # --- status --------------------------------------------------------------------------
    def errors(self, accepted: Build | None) -> list[ConfigError]:
        kept = accepted.digests if accepted is not None else {}
        return [ConfigError(r.where, f"{r.cause}: {r.message}",
                            "fix it; " + ("its last accepted version stays in force" if name in kept
                                          else "it is left out") + " until its spec changes")
                for name, r in sorted(self.refused.items())]
