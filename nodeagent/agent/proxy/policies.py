"""The security policies in force on this node, rebuilt from each new model.

`PolicyState.update(model)` builds a new PolicySet from the model with the current one
as `previous`, so a resource that turns invalid keeps its last good version and one with
none (new, or first seen after a restart: `current` starts empty) is enforced fail-closed
(PolicySet.build's rule). Each new error is logged once, when it first appears, not on
every model change; the errors of the current set are in `describe()` (and so in
`nodeagent status`). Relays read `current` when a connection arrives: a policy change
applies to the next connection, with nothing restarted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from nodeagent.digests import digests_in_force
from nodeagent.errors import ConfigError
from nodeagent.model import Model
from nodeagent.policy import PolicySet
from nodeagent.policy.validate import KINDS
from nodeagent.xds.istio import kinds


@dataclass(frozen=True)
class Built:
    """A PolicySet built from a model, with what status says of it."""

    policies: PolicySet
    errors: list[ConfigError]
    digests: dict[str, str]
    kinds: dict[str, list[str]]


class PolicyState:
    def __init__(self, root_namespace: str, log: logging.Logger, wall_clock: Callable[[], float] = time.time):
        self.root_namespace = root_namespace
        self.log = log
        self.wall_clock = wall_clock
        self.current = PolicySet({}, root_namespace)
        self.errors: list[ConfigError] = []
        self.digests: dict[str, str] = {}  # "Kind ns/name" -> digest of the spec in force
        self.kinds: dict[str, list[str]] = {"errors": [], "warnings": []}  # Istio kinds the agents do not read
        self.built_at: float | None = None

    def update(self, model: Model) -> None:
        built = self.build(model)
        if built is not None:
            self.install(built)

    def build(self, model: Model) -> "Built | None":
        """In the config thread: the PolicySet of `model` and what status says of it, not
        yet in force; None when building failed (logged: the policies in force stay)."""
        try:
            policies, errors = PolicySet.build(model, self.current, self.root_namespace)
        except Exception:  # a bug must not stop enrolment; the policies in force stay
            self.log.exception("cannot build the policies of the new model; keeping the ones in force")
            return None
        return Built(policies, errors, _digests(model, policies, self.current, self.digests), kind_verdicts(model))

    def install(self, built: "Built") -> None:
        """On the loop: `built` in force from the next connection on."""
        known = {str(e) for e in self.errors}
        for err in built.errors:
            if str(err) not in known:
                self.log.warning("policy refused: %s", err)
        fixed = known - {str(e) for e in built.errors}
        if fixed:
            self.log.info("%d earlier policy errors are gone", len(fixed))
        self.current, self.errors, self.digests, self.kinds = built.policies, built.errors, built.digests, built.kinds
        self.built_at = self.wall_clock()

    def describe(self) -> dict:
        return {"root_namespace": self.root_namespace, "built_at": self.built_at,
                "resources": dict(sorted(self.digests.items())),
                "errors": [str(e) for e in self.errors], "kinds": self.kinds}


def kind_verdicts(model: Model) -> dict[str, list[str]]:
    """The verdict on every resource of an Istio kind the agents do not read (kinds.py:
    not supported in ambient mode, not applicable, unknown kind), so that an agent without
    a waypoint shows them too (a waypoint's configuration problems list them as well)."""
    out: dict[str, list[str]] = {"errors": [], "warnings": []}
    for objects in model.resources.values():
        for obj in objects:
            found = kinds.problem(obj)
            if found is not None:
                out["errors" if found[0] == kinds.ERROR else "warnings"].append(str(found[1]))
    return out


def _digests(model: Model, policies: PolicySet, previous: PolicySet, digests: dict[str, str]) -> dict[str, str]:
    """(A fail-closed stand-in is no version of its resource: not listed; its errors say how it is enforced.)"""
    return digests_in_force(model, KINDS, lambda key: policies.last_good(*key),
                            lambda key: previous.last_good(*key), digests)
