"""Listener pieces shared by both sides of the waypoint.

Each waypoint listener is a unix socket whose connections start with the agent's PROXY
v2 header: the `proxy_protocol` listener filter restores the original addresses (so
filter chains match on destination IP and port) and stores the TLVs in dynamic
metadata; a `set_filter_state` network filter then copies them into connection filter
state, the only place HTTP filters (route matches, RBAC) can read them from. The
internal listener `nodeagent_upstream` receives every connection Envoy opens to an
outbound endpoint and pipes it, PROXY header included, to the agent's upstream socket.
"""

from __future__ import annotations

from envoy_data_plane.envoy.config.core.v3 import (Address, DataSource, Pipe, ProxyProtocolPassThroughTlVs,
                                                  ProxyProtocolPassThroughTlVsPassTlVsMatchType,
                                                  SubstitutionFormatString)
from envoy_data_plane.envoy.config.listener.v3 import (Filter, FilterChain, Listener, ListenerFilter,
                                                      ListenerInternalListenerConfig)
from envoy_data_plane.envoy.extensions.filters.common.set_filter_state.v3 import FilterStateValue
from envoy_data_plane.envoy.extensions.filters.listener.proxy_protocol.v3 import (ProxyProtocol,
                                                                                  ProxyProtocolKeyValuePair,
                                                                                  ProxyProtocolRule)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager, HttpConnectionManagerUpgradeConfig, HttpFilter, Rds)
from envoy_data_plane.envoy.extensions.filters.network.set_filter_state.v3 import Config as SetFilterState
from envoy_data_plane.envoy.extensions.filters.network.tcp_proxy.v3 import TcpProxy
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router

from nodeagent.xds import dataplane
from nodeagent.xds.resources import pack
from nodeagent.xds.translate import names
from nodeagent.xds.translate.primitives import ADS, PASSED_TLVS, http_filter, network_filter

HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
ROUTER = "envoy.filters.http.router"


def listener(name: str, path: str, tlvs: tuple[int, ...], chains: list[FilterChain]) -> Listener:
    return Listener(name=name, address=Address(pipe=Pipe(path=path, mode=0o660)),
                    listener_filters=[_proxy_protocol(tlvs)], filter_chains=chains)


def _proxy_protocol(tlvs: tuple[int, ...]) -> ListenerFilter:
    config = ProxyProtocol(
        rules=[ProxyProtocolRule(tlv_type=t, on_tlv_present=ProxyProtocolKeyValuePair(
            metadata_namespace=dataplane.METADATA_NAMESPACE, key=dataplane.TLV_KEYS[t])) for t in tlvs],
        pass_through_tlvs=ProxyProtocolPassThroughTlVs(
            match_type=ProxyProtocolPassThroughTlVsPassTlVsMatchType.INCLUDE,
            tlv_type=[t for t in PASSED_TLVS if t in tlvs]))
    return ListenerFilter(name="envoy.filters.listener.proxy_protocol", typed_config=pack(config))


def set_filter_state(tlvs: tuple[int, ...]) -> Filter:
    """Copy the TLVs from the connection's dynamic metadata into filter state."""
    values = [FilterStateValue(
        object_key=dataplane.FILTER_STATE[t], factory_key="envoy.string", skip_if_empty=True,
        format_string=SubstitutionFormatString(text_format_source=DataSource(
            inline_string=f"%DYNAMIC_METADATA({dataplane.METADATA_NAMESPACE}:{dataplane.TLV_KEYS[t]})%")))
        for t in tlvs]
    return network_filter("envoy.filters.network.set_filter_state", SetFilterState(on_new_connection=values))


def stat_prefix(name: str) -> str:
    """A stat prefix without dots, which would split it into several stat name segments."""
    return name.replace(".", "_")


def http_connection_manager(prefix: str, route_config: str, filters: list[HttpFilter],
                            normalize: bool = False) -> Filter:
    hcm = HttpConnectionManager(
        stat_prefix=stat_prefix(prefix), rds=Rds(config_source=ADS, route_config_name=route_config),
        http_filters=filters + [http_filter(ROUTER, Router())],
        upgrade_configs=[HttpConnectionManagerUpgradeConfig(upgrade_type="websocket")])
    if normalize:  # paths are normalized before authorization looks at them, as istiod does inbound
        hcm.normalize_path = True
    return network_filter(HCM, hcm)


def tcp_proxy(prefix: str, proxy: TcpProxy) -> Filter:
    proxy.stat_prefix = stat_prefix(prefix)
    return network_filter(TCP_PROXY, proxy)


def upstream_listener() -> Listener:
    """Internal listener every outbound endpoint address points at: bytes (the PROXY
    header the cluster wrote, then the request) go on to the agent's upstream socket."""
    return Listener(name=names.UPSTREAM_LISTENER, internal_listener=ListenerInternalListenerConfig(),
                    filter_chains=[FilterChain(filters=[tcp_proxy(names.UPSTREAM_LISTENER,
                                                                  TcpProxy(cluster=names.AGENT_UPSTREAM))])])
