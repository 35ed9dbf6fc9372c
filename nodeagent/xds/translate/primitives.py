"""Envoy building blocks the translators share: the ADS config source, filters wrapped
with their typed config, the PROXY v2 transport sockets, string matchers and fractions,
and the google.protobuf wrappers and Struct as values of fields (protobuf's constructors
take a message there, not the Python value).
"""

from __future__ import annotations

from envoy.config.core.v3.base_pb2 import TransportSocket
from envoy.config.core.v3.config_source_pb2 import AggregatedConfigSource, ApiVersion, ConfigSource
from envoy.config.core.v3.proxy_protocol_pb2 import ProxyProtocolConfig, ProxyProtocolPassThroughTLVs, TlvEntry
from envoy.config.listener.v3.listener_components_pb2 import Filter
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import HttpFilter
from envoy.extensions.transport_sockets.internal_upstream.v3.internal_upstream_pb2 import InternalUpstreamTransport
from envoy.extensions.transport_sockets.proxy_protocol.v3.upstream_proxy_protocol_pb2 import (
    ProxyProtocolUpstreamTransport)
from envoy.extensions.transport_sockets.raw_buffer.v3.raw_buffer_pb2 import RawBuffer
from envoy.type.matcher.v3.regex_pb2 import RegexMatcher
from envoy.type.matcher.v3.string_pb2 import StringMatcher
from envoy.type.v3.percent_pb2 import FractionalPercent
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import BoolValue, UInt32Value

from nodeagent.xds import dataplane
from nodeagent.xds.istio.fields import StringMatch
from nodeagent.xds.istio.virtualservice import Fraction
from nodeagent.xds.resources import pack

ADS = ConfigSource(ads=AggregatedConfigSource(), resource_api_version=ApiVersion.V3)
# TLVs the agent sends that Envoy hands on to the agent's upstream socket.
PASSED_TLVS = (dataplane.TLV_PRINCIPAL, dataplane.TLV_SOURCE_WORKLOAD)


def u32(value: int | None) -> UInt32Value | None:
    """A UInt32Value field's value; None leaves the field unset."""
    return None if value is None else UInt32Value(value=value)


def boolean(value: bool | None) -> BoolValue | None:
    """A BoolValue field's value; None leaves the field unset."""
    return None if value is None else BoolValue(value=value)


def struct(values: dict) -> Struct:
    """A Struct of JSON-like `values`."""
    out = Struct()
    out.update(values)
    return out


def http_filter(name: str, config: Message) -> HttpFilter:
    return HttpFilter(name=name, typed_config=pack(config))


def network_filter(name: str, config: Message) -> Filter:
    return Filter(name=name, typed_config=pack(config))


def transport_socket(name: str, config: Message) -> TransportSocket:
    return TransportSocket(name=name, typed_config=pack(config))


def raw_buffer() -> TransportSocket:
    return transport_socket("envoy.transport_sockets.raw_buffer", RawBuffer())


def proxy_protocol_transport(internal: bool, added: tuple[tuple[int, bytes], ...] = ()) -> TransportSocket:
    """PROXY v2 on every upstream connection, passing PASSED_TLVS through and adding
    `added`; over the internal upstream listener (client side) or straight to a unix
    socket (server side)."""
    inner = raw_buffer()
    if internal:
        inner = transport_socket("envoy.transport_sockets.internal_upstream",
                                 InternalUpstreamTransport(transport_socket=inner))
    config = ProxyProtocolConfig(version=ProxyProtocolConfig.Version.V2, pass_through_tlvs=ProxyProtocolPassThroughTLVs(
        match_type=ProxyProtocolPassThroughTLVs.PassTLVsMatchType.INCLUDE, tlv_type=list(PASSED_TLVS)),
        added_tlvs=[TlvEntry(type=kind, value=value) for kind, value in added])
    return transport_socket("envoy.transport_sockets.upstream_proxy_protocol",
                            ProxyProtocolUpstreamTransport(config=config, transport_socket=inner))


def string_matcher(match: StringMatch, ignore_case: bool = False) -> StringMatcher:
    """exact/prefix/regex; "present" becomes a regex for any non-empty value."""
    if match.kind == "exact":
        return StringMatcher(exact=match.value, ignore_case=ignore_case)
    if match.kind == "prefix":
        return StringMatcher(prefix=match.value, ignore_case=ignore_case)
    return regex_matcher(match.value if match.kind == "regex" else ".+")


def regex_matcher(pattern: str) -> StringMatcher:
    return StringMatcher(safe_regex=RegexMatcher(regex=pattern))


def istio_pattern(text: str, prefix: str = "", ignore_case: bool = False) -> StringMatcher:
    """Istio's policy string match: exact, `prefix*`, `*suffix`, `*` (any non-empty);
    `prefix` is prepended (the `spiffe://` of principals)."""
    if text == "*":
        return StringMatcher(prefix=prefix, ignore_case=ignore_case) if prefix else regex_matcher(".+")
    if text.endswith("*"):
        return StringMatcher(prefix=prefix + text[:-1], ignore_case=ignore_case)
    if text.startswith("*"):
        return StringMatcher(suffix=text[1:], ignore_case=ignore_case)
    return StringMatcher(exact=prefix + text, ignore_case=ignore_case)


def fraction(value: Fraction) -> FractionalPercent:
    """Istio's translation: `percentage` in millionths, the deprecated integer in hundredths."""
    if value.legacy_integer:
        return FractionalPercent(numerator=int(value.value), denominator=FractionalPercent.DenominatorType.HUNDRED)
    return FractionalPercent(numerator=int(round(value.value * 10000)),
                             denominator=FractionalPercent.DenominatorType.MILLION)
