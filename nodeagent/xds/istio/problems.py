"""The agent's verdicts on Istio resources as Problems for Kubernetes Events (issues 13
and 14): the one-line texts the agent's status gives (naming a resource "(Kind
ns/name)", the way lab/verdicts.py matches them) turned into one Problem per resource
and reason, which kube/events.py's writer reports. Pure.
"""

from __future__ import annotations

from typing import Iterable

from nodeagent.kube import events
from nodeagent.kube.objects import KubeObject
from nodeagent.xds.istio import kinds


def reason_of(obj: KubeObject | events.Ref, severity: str, text: str) -> str:
    """The Event reason of one verdict on `obj`."""
    if severity == kinds.WARNING and kinds.NOT_APPLICABLE.split(" (")[0] in text:
        return events.NOT_APPLICABLE
    if kinds.NOT_SUPPORTED in text:
        return events.NOT_SUPPORTED
    if severity == kinds.WARNING:
        return events.NOT_IN_FORCE
    return events.REFUSED


def problems(objects: Iterable[KubeObject | dict], errors: Iterable[str], warnings: Iterable[str] = (),
             refused: Iterable[tuple[dict, str]] = ()) -> list[events.Problem]:
    """One Problem per (Istio resource, reason) named by the verdicts `errors` (refused,
    not supported, unknown kind) or `warnings` (not applicable, not in force), and one
    `Refused` per object the source refused outright (`refused`: its identity and why,
    as KubeSource.refused gives them: its message may not name it in full); several texts
    of one resource and reason are joined. Objects no verdict names get none;
    Kubernetes' own kinds (Pods, Services) get none here."""
    texts = [(kinds.ERROR, t) for t in dict.fromkeys(errors)] + [(kinds.WARNING, t) for t in dict.fromkeys(warnings)]
    out: dict[tuple, tuple[events.Ref, str, list[str]]] = {}
    for obj in objects:
        ref = events.ref_of(obj)
        if not _istio(ref):
            continue
        mark = f"({ref.label})"
        for severity, text in texts:
            if mark in text:
                reason = reason_of(ref, severity, text)
                entry = out.setdefault((ref.label, reason), (ref, reason, []))
                entry[2].append(events.one_line(text))
    for identity, why in refused:
        ref = events.ref_of(identity)
        if _istio(ref):
            entry = out.setdefault((ref.label, events.REFUSED), (ref, events.REFUSED, []))
            if events.one_line(why) not in entry[2]:
                entry[2].append(events.one_line(why))
    return [events.Problem(ref, reason, events.clip("; ".join(lines))) for ref, reason, lines in out.values()]


def _istio(ref: events.Ref) -> bool:
    group = ref.api_version.split("/")[0] if "/" in ref.api_version else ""
    return group.endswith(".istio.io") or group == kinds.GATEWAY_API
