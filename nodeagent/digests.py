"""Which version of each Istio resource is in force, as a short digest of its spec:
the agent's policies, its waypoint's configuration and the lab's verdicts (`lab apply`)
name the same version the same way, so a user can see that what they applied is what
runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

from nodeagent.model import Model


def spec_digest(spec: object) -> str:
    """A short digest of a resource's spec, to tell which version is in force."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def digests_in_force(model: Model, kinds, current: Callable, previous: Callable,
                     digests: dict[str, str]) -> dict[str, str]:
    """Digest of the spec in force per resource ("Kind ns/name"): the model's, or the
    previous one where the model's version was refused and the last good version stays
    (the builders keep the very object they had). `current(key)` / `previous(key)` give
    the built object of (kind, namespace, name) or None."""
    out = {}
    for kind in kinds:
        for obj in model.resources.get(kind, ()):
            key, name = (kind, obj.namespace, obj.name), f"{kind} {obj.namespace}/{obj.name}"
            built = current(key)
            if built is None or name in out:
                continue  # not in force, or a second definition (the first one is used)
            kept = built is previous(key)
            out[name] = digests.get(name, "?") if kept else spec_digest(obj.spec)
    return out
