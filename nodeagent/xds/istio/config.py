"""The Istio configuration the waypoint translates: every supported resource of a Model,
validated one by one.

`IstioConfig.build(model, previous)` reads VirtualService, DestinationRule, EnvoyFilter,
AuthorizationPolicy and RequestAuthentication. An invalid resource is reported as a
ConfigError naming it (`source (Kind ns/name)`) and the field; if `previous` held a good
version of it, that version stays in force (as Istio's webhook would have refused the
bad write), otherwise it is left out. The rest always apply. Warnings (deprecated
fields, patches that apply nowhere) do not reject anything. `withheld` lists server-side
resources held out of the waypoint because Envoy or its checks refused them
(refusals.py, `_held_out`), each as the L4 engine enforces it (for one the L4 engine
refuses too, its last good version or its fail-closed stand-in): the translation leaves
the pods they select to the agent's L4 enforcement. Immutable; pure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject
from nodeagent.model import Model
from nodeagent.policy import failclosed
from nodeagent.policy.policyset import with_fate  # the same wording as the L4 engine's
from nodeagent.policy.scope import DEFAULT_ROOT_NAMESPACE
from nodeagent.policy import validate as l4
from nodeagent.policy.schema import Field, all_errors, resource_name
from nodeagent.xds.istio.destinationrule import destination_rule
from nodeagent.xds.istio import kinds
from nodeagent.xds.istio.envoyfilter import envoy_filter
from nodeagent.xds.istio.security import Authentication, Authorization, authentication, authorization
from nodeagent.xds.istio.virtualservice import virtual_service

NETWORKING = "networking.istio.io"
SECURITY = "security.istio.io"
NETWORKING_VERSIONS = ("v1", "v1beta1", "v1alpha3")
# kind → (group, accepted versions, reader); security versions are checked by nodeagent.policy.
READERS: dict[str, tuple[str, tuple[str, ...], Callable]] = {
    "VirtualService": (NETWORKING, NETWORKING_VERSIONS, virtual_service),
    "DestinationRule": (NETWORKING, NETWORKING_VERSIONS, destination_rule),
    "EnvoyFilter": (NETWORKING, ("v1alpha3",), envoy_filter),
    "AuthorizationPolicy": (SECURITY, (), authorization),
    "RequestAuthentication": (SECURITY, (), authentication),
}
Key = tuple[str, str, str]  # (kind, namespace, name)


@dataclass(frozen=True)
class IstioConfig:
    entries: Mapping[Key, Any] = field(default_factory=dict)
    errors: tuple[ConfigError, ...] = ()
    warnings: tuple[ConfigError, ...] = ()
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    withheld: tuple = ()  # Authorization / Authentication entries Envoy or the waypoint's checks refused,
    # with no version in force: the pods they select are left to the L4 engine

    def of_kind(self, kind: str) -> tuple:
        """The resources in force of `kind`, ordered by (namespace, name)."""
        return tuple(v for (k, _, _), v in self.entries.items() if k == kind)

    @property
    def virtual_services(self) -> tuple:
        return self.of_kind("VirtualService")

    @property
    def destination_rules(self) -> tuple:
        return self.of_kind("DestinationRule")

    @property
    def envoy_filters(self) -> tuple:
        return self.of_kind("EnvoyFilter")

    @property
    def authorizations(self) -> tuple:
        return self.of_kind("AuthorizationPolicy")

    @property
    def authentications(self) -> tuple:
        return self.of_kind("RequestAuthentication")

    @classmethod
    def build(cls, model: Model, previous: "IstioConfig | None" = None,
              root_namespace: str = DEFAULT_ROOT_NAMESPACE) -> "IstioConfig":
        entries: dict[Key, Any] = {}
        first: dict[Key, str] = {}  # where each resource is defined first
        errors: list[ConfigError] = []
        warnings: list[ConfigError] = []
        withheld: list = []
        for objects in model.resources.values():
            for obj in objects:
                found_kind = kinds.problem(obj)
                if found_kind is not None:
                    (errors if found_kind[0] == kinds.ERROR else warnings).append(found_kind[1])
        for kind, (group, _, _) in READERS.items():
            for obj in model.resources.get(kind, ()):
                if obj.group != group:
                    continue
                key = (kind, obj.namespace, obj.name)
                if key in entries:
                    errors.append(ConfigError(resource_name(obj), f"defined twice; the first one "
                                              f"({first[key]}) is used", "remove or rename one of them"))
                    try:  # its own problems too: the one removed may be the one meant
                        read(obj, lambda _: None)
                    except ConfigError as err:
                        errors.extend(getattr(err, "errors", (err,)))
                    continue
                first.setdefault(key, obj.source or str(obj))
                found: list[ConfigError] = []
                try:
                    entry = read(obj, found.append)
                    warnings.extend(found)
                    if not _for_mesh(entry, obj, warnings):
                        continue
                    entries[key] = entry
                except ConfigError as err:
                    kept = previous.entries.get(key) if previous is not None else None
                    if kept is not None and getattr(getattr(kept, "policy", None), "fail_closed", False):
                        kept = None  # a stand-in is no version of it: the resource is read again
                    if kept is not None:
                        entries[key] = kept
                        errors.extend(with_fate(err, failclosed.KEPT))
                        continue
                    if kind not in SERVER_SIDE:
                        errors.extend(with_fate(err, failclosed.REFUSED))
                        continue
                    fate, held, stand_in = _held_out(obj, key, previous, root_namespace)
                    errors.extend(with_fate(err, fate))
                    withheld.extend(held)
                    if stand_in is not None:
                        entries[key] = stand_in
        ordered = dict(sorted(entries.items()))
        return cls(MappingProxyType(ordered), tuple(errors), tuple(warnings), root_namespace, tuple(withheld))


SERVER_SIDE = ("AuthorizationPolicy", "RequestAuthentication")  # refused: their pods go to the L4 engine


def _held_out(obj: KubeObject, key: Key, previous: "IstioConfig | None",
              root_namespace: str) -> tuple[str, list, Any]:
    """The fate of a security resource the waypoint refuses with no version of its own in
    force, and what the L4 engine enforces of it instead, to be `withheld`: the pods it
    selects must not go to a waypoint enforcing their other policies without it (a DENY
    was enforced nowhere on their HTTP ports, an ALLOW let everybody in). That is its L4
    form when the L4 engine accepts it (an `experimental.*` condition key, a
    requestPrincipals wildcard the waypoint cannot express); when the L4 engine refuses it
    too, the L4 form withheld before (the L4 engine keeps that last good version), else
    its fail-closed stand-in (failclosed.py: a DENY of everything, an ALLOW without rules),
    with the L4 engine's fate, so both report it alike. The stand-in is not withheld but
    enforced by the waypoint too (the third value, an entry): withheld, its pods left for
    the L4 engine, where another ALLOW's HTTP rules match nothing (fail safe), so a broken
    ALLOW denied even what a valid one allowed. A RequestAuthentication refused by both has
    none: without it a request has no verified principal or claims, as one without a token
    has under a valid one, which the policies already decide."""
    try:
        typed = l4.validate(obj)
    except ConfigError:
        before = [w for w in (previous.withheld if previous is not None else ())
                  if _key_of(w) == key and not getattr(w.policy, "fail_closed", False)]
        if before:
            return failclosed.KEPT, before, None
        stand_in = failclosed.stand_in(obj, root_namespace)
        if stand_in is None:
            return failclosed.REFUSED, [], None
        return stand_in.fate, [], Authorization(obj, stand_in.policy)
    return failclosed.REFUSED, [Authorization(obj, typed) if obj.kind == "AuthorizationPolicy"
                                else Authentication(obj, typed, ())], None


def _key_of(entry: Any) -> Key:
    return (entry.obj.kind, entry.obj.namespace, entry.obj.name)


def _for_mesh(entry: Any, obj: KubeObject, warnings: list[ConfigError]) -> bool:
    """False (with a warning) for a VirtualService bound only to gateways: nodeagent runs
    no gateway, so it is not in force for any traffic."""
    if getattr(entry, "mesh", True):
        return True
    gateways = Field(resource_name(obj), "spec.gateways", obj.spec.get("gateways"))
    warnings.append(gateways.error(
        f"binds this VirtualService to gateways {', '.join(gateways.strings())} only, and nodeagent runs no "
        "gateway: it is not in force for mesh traffic", 'add "mesh" to spec.gateways to route meshed '
        "clients with it, or remove it"))
    return False


def read(obj: KubeObject, warn: Callable[[ConfigError], None]) -> Any:
    """The typed form of one supported resource; raises ConfigErrors with every problem of
    it if it is invalid."""
    group, versions, reader = READERS[obj.kind]
    version = obj.api_version.split("/", 1)[-1]
    if versions and version not in versions:
        accepted = " or ".join(f"{group}/{v}" for v in versions)
        raise Field(resource_name(obj), "apiVersion", obj.api_version).error(
            f"{obj.api_version} {obj.kind} is not supported", f"use {accepted}")
    return all_errors(lambda: reader(obj, warn), resource_name(obj))
