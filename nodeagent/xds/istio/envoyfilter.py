"""EnvoyFilter (networking.istio.io v1alpha3): the one supported patch, a local rate limit.

Supported: `applyTo: HTTP_FILTER`, context SIDECAR_INBOUND or ANY (the server-side
waypoint, in front of the selected pods), optionally `listener.portNumber`, a match on
the http_connection_manager (optionally its `envoy.filters.http.router` sub-filter),
operation INSERT_BEFORE (before the router when the sub-filter is named, else first, as
istiod does) or INSERT_FIRST, and a value `envoy.filters.http.local_ratelimit` whose
typed_config is a LocalRateLimit or a TypedStruct of one (read as protobuf's JSON mapping
reads it); every regex in it (rate_limits actions' header matches) is compiled as Envoy's
RE2 compiles it, and a negative duration is refused. Patches for GATEWAY are valid but
apply to no waypoint (a warning). Anything else is refused naming the field. Pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

from envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2 import LocalRateLimit
from envoy.type.matcher.v3.regex_pb2 import RegexMatcher
from google.protobuf import json_format
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject
from nodeagent.policy.schema import Field, attempt, report, describe
from nodeagent.xds.istio import fields as f
from nodeagent.xds.istio.virtualservice import UNSUPPORTED

HCM = "envoy.filters.network.http_connection_manager"
ROUTER = "envoy.filters.http.router"
LOCAL_RATELIMIT = "envoy.filters.http.local_ratelimit"
LOCAL_RATELIMIT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
TYPED_STRUCTS = ("type.googleapis.com/udpa.type.v1.TypedStruct", "type.googleapis.com/xds.type.v3.TypedStruct")
CONTEXTS = ("ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY")
Warn = Callable[[ConfigError], None]


@dataclass(frozen=True)
class RateLimitPatch:
    path: str  # spec.configPatches[i]
    port: int | None  # listener.portNumber: only this pod port
    first: bool  # at the head of the HTTP filters, else just before the router
    config: LocalRateLimit


@dataclass(frozen=True)
class EnvoyFilter:
    namespace: str
    name: str
    where: str
    selector: Mapping[str, str] | None  # workloadSelector.labels; None: every workload in scope
    patches: tuple[RateLimitPatch, ...]
    priority: int = 0  # lower applies first, as istiod orders EnvoyFilters

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def envoy_filter(obj: KubeObject, warn: Warn) -> EnvoyFilter:
    spec = Field.spec_of(obj)
    p = spec.fields(("workloadSelector", "targetRefs", "configPatches", "priority"))
    if p["targetRefs"].present:
        report(p["targetRefs"].error(f"targetRefs {UNSUPPORTED}", "use workloadSelector"))
    priority = attempt(lambda: f.integer(p["priority"], -2**31, 2**31 - 1) or 0, 0)
    selector = None
    if p["workloadSelector"].present:
        selector = attempt(lambda: p["workloadSelector"].fields(("labels",))["labels"].labels(), {})
    patches = p["configPatches"].each(lambda item: _patch(item, warn))
    if not p["configPatches"].items():
        raise p["configPatches"].error("must list at least one patch")
    return EnvoyFilter(obj.namespace, obj.name, spec.where, selector,
                       tuple(patch for patch in patches if patch is not None), priority)


def _patch(field: Field, warn: Warn) -> RateLimitPatch | None:
    p = field.fields(("applyTo", "match", "patch"))
    apply_to = p["applyTo"].string()
    if apply_to != "HTTP_FILTER":
        raise p["applyTo"].error(f"applyTo {apply_to or '(unset)'} {UNSUPPORTED}",
                                 "only HTTP_FILTER patches inserting envoy.filters.http.local_ratelimit are")
    m = p["match"].fields(("context", "proxy", "listener", "routeConfiguration", "cluster"))
    for name in ("proxy", "routeConfiguration", "cluster"):
        if m[name].present:
            raise m[name].error(f"match.{name} {UNSUPPORTED}")
    context = m["context"].enum(CONTEXTS, "ANY")
    if context == "SIDECAR_OUTBOUND":
        raise m["context"].error(f"context SIDECAR_OUTBOUND {UNSUPPORTED}: rate limits run on the "
                                 "server-side waypoint", "use SIDECAR_INBOUND")
    port, router = _listener(m["listener"])
    first = _operation(p["patch"], router)
    config = _value(p["patch"].fields(("operation", "value", "filterClass"))["value"], warn)
    if context == "GATEWAY":
        warn(m["context"].error("context GATEWAY applies to gateways; nodeagent runs none, so this "
                                "patch changes nothing", "use SIDECAR_INBOUND to limit a workload"))
        return None
    return RateLimitPatch(field.path, port, first, config)


def _listener(field: Field) -> tuple[int | None, bool]:
    """(portNumber, whether the router sub-filter is named)."""
    p = field.fields(("portNumber", "portName", "filterChain", "name", "listenerFilter"))
    for name in ("portName", "name", "listenerFilter"):
        if p[name].present:
            raise p[name].error(f"match.listener.{name} {UNSUPPORTED}", "use portNumber")
    chain = p["filterChain"].fields(("name", "sni", "transportProtocol", "applicationProtocols",
                                     "filter", "destinationPort"))
    for name in ("name", "sni", "transportProtocol", "applicationProtocols", "destinationPort"):
        if chain[name].present:
            raise chain[name].error(f"filterChain.{name} {UNSUPPORTED}")
    filt = chain["filter"].fields(("name", "subFilter"))
    if filt["name"].present and filt["name"].string() != HCM:
        raise filt["name"].error(f"{filt['name'].string()!r} {UNSUPPORTED}", f"match {HCM}")
    sub = filt["subFilter"].fields(("name",))["name"]
    if sub.present and sub.string() != ROUTER:
        raise sub.error(f"subFilter {sub.string()!r} {UNSUPPORTED}", f"match {ROUTER} or no subFilter")
    return f.integer(p["portNumber"], 1, 65535), sub.present


def _operation(field: Field, router: bool) -> bool:
    """True when the filter goes first (INSERT_FIRST, or INSERT_BEFORE with no sub-filter)."""
    op = field.fields(("operation", "value", "filterClass"))["operation"]
    name = op.string()
    if name not in ("INSERT_BEFORE", "INSERT_FIRST"):
        raise op.error(f"operation {name or '(unset)'} {UNSUPPORTED}", "use INSERT_BEFORE")
    return name == "INSERT_FIRST" or not router


def _value(field: Field, warn: Warn) -> LocalRateLimit:
    p = field.fields(("name", "typed_config", "typedConfig"))
    if p["name"].string() != LOCAL_RATELIMIT:
        raise p["name"].error(f"filter {p['name'].string() or '(unset)'!r} {UNSUPPORTED}",
                              f"only {LOCAL_RATELIMIT} can be inserted")
    typed = p["typed_config"] if p["typed_config"].present else p["typedConfig"]
    if not isinstance(typed.value, dict):
        raise typed.error(f"must be a map with @type, not {describe(typed.value)}")
    body, where = _unwrap(typed)
    try:
        config = json_format.ParseDict(body, LocalRateLimit())
    except json_format.ParseError as exc:
        reason = str(exc).partition("\n")[0].rstrip(".")  # names the field; then protobuf lists every field
        raise where.error(f"is not a valid LocalRateLimit: {reason}") from None
    if not config.stat_prefix:
        raise where.error("stat_prefix must be set")
    for path, message in _messages(config, ""):
        if isinstance(message, RegexMatcher):
            f.regex(Field(where.where, f"{where.path}{path}.regex", message.regex), message.regex)
        elif isinstance(message, Duration) and (message.seconds < 0 or message.nanos < 0):
            # protobuf's parser takes "-1s"; Envoy needs a positive fill_interval.
            raise Field(where.where, f"{where.path}{path}", message.ToJsonString()).error(
                f"{message.ToJsonString()} is negative", "give a duration such as 1s")
    for name, effect in (("filter_enabled", "never runs"), ("filter_enforced", "only counts, never enforces")):
        if not config.HasField(name):
            warn(where.error(f"{name} is not set, so Envoy {effect} this rate limit",
                             f"set {name}.default_value to 100%"))
    return config


def _messages(message: Message, path: str) -> Iterator[tuple[str, Message]]:
    """(field path, message) of every message set within `message`, lists and maps included."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for key, one in value.items():
                    yield from _nested(one, f"{path}.{field.name}[{key}]")
        elif field.is_repeated:
            for i, one in enumerate(value):
                yield from _nested(one, f"{path}.{field.name}[{i}]")
        else:
            yield from _nested(value, f"{path}.{field.name}")


def _nested(message: Message, path: str) -> Iterator[tuple[str, Message]]:
    yield path, message
    yield from _messages(message, path)


def _unwrap(typed: Field) -> tuple[dict, Field]:
    body = dict(typed.value)
    kind = body.pop("@type", None)
    if kind in TYPED_STRUCTS:
        inner = Field(typed.where, f"{typed.path}.value", body.get("value"))
        if body.get("type_url") != LOCAL_RATELIMIT_TYPE:
            raise typed.error(f"type_url {body.get('type_url')!r} {UNSUPPORTED}", f"use {LOCAL_RATELIMIT_TYPE}")
        if not isinstance(inner.value, dict):
            raise inner.error("must be a map")
        return inner.value, inner
    if kind != LOCAL_RATELIMIT_TYPE:
        raise typed.error(f"@type {kind!r} {UNSUPPORTED}", f"use {LOCAL_RATELIMIT_TYPE} or a TypedStruct of it")
    return body, typed
