"""Listener pieces shared by both sides of the waypoint.

Each waypoint listener is a unix socket whose connections start with the agent's PROXY
v2 header: the `proxy_protocol` listener filter restores the original addresses (so
filter chains match on destination IP and port) and stores the TLVs in dynamic
metadata; a `set_filter_state` network filter then copies them into connection filter
state, the only place HTTP filters (route matches, RBAC) can read them from. The
internal listener `nodeagent_upstream` receives every connection Envoy opens to an
outbound endpoint and pipes it, PROXY header included, to the agent's upstream socket.
Every HTTP connection manager logs each request as a line (nodeagent/xds/logline.py,
with the listener's name, which tells the client side from the server side, and the
source principal and workload from filter state) into the FIFO the agent reads: the
agent turns the lines into Istio's request metrics (see nodeagent/xds/accesslog.py).
"""

from __future__ import annotations

from envoy.config.accesslog.v3.accesslog_pb2 import AccessLog
from envoy.config.core.v3.address_pb2 import Address, Pipe
from envoy.config.core.v3.base_pb2 import DataSource
from envoy.config.core.v3.proxy_protocol_pb2 import ProxyProtocolPassThroughTLVs
from envoy.config.core.v3.substitution_format_string_pb2 import SubstitutionFormatString
from envoy.config.listener.v3.listener_components_pb2 import Filter, FilterChain, ListenerFilter
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.access_loggers.file.v3.file_pb2 import FileAccessLog
from envoy.extensions.filters.common.set_filter_state.v3.value_pb2 import FilterStateValue
from envoy.extensions.filters.http.router.v3.router_pb2 import Router
from envoy.extensions.filters.listener.proxy_protocol.v3.proxy_protocol_pb2 import ProxyProtocol
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager, HttpFilter, Rds)
from envoy.extensions.filters.network.set_filter_state.v3.set_filter_state_pb2 import Config
from envoy.extensions.filters.network.tcp_proxy.v3.tcp_proxy_pb2 import TcpProxy

from nodeagent.xds import dataplane, logline
from nodeagent.xds.resources import pack
from nodeagent.xds.translate import names
from nodeagent.xds.translate.primitives import ADS, PASSED_TLVS, boolean, http_filter, network_filter, struct

HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
ROUTER = "envoy.filters.http.router"
FILE_ACCESS_LOG = "envoy.access_loggers.file"


def listener(name: str, path: str, tlvs: tuple[int, ...], chains: list[FilterChain]) -> Listener:
    # 0666: the waypoint directory (01770) keeps others out; Envoy runs as its own user, so
    # 0660 would keep out the agent too, root without CAP_DAC_OVERRIDE in the DaemonSet
    return Listener(name=name, address=Address(pipe=Pipe(path=path, mode=0o666)),
                    listener_filters=[_proxy_protocol(tlvs)], filter_chains=chains)


def _proxy_protocol(tlvs: tuple[int, ...]) -> ListenerFilter:
    config = ProxyProtocol(
        rules=[ProxyProtocol.Rule(tlv_type=t, on_tlv_present=ProxyProtocol.KeyValuePair(
            metadata_namespace=dataplane.METADATA_NAMESPACE, key=dataplane.TLV_KEYS[t])) for t in tlvs],
        pass_through_tlvs=ProxyProtocolPassThroughTLVs(
            match_type=ProxyProtocolPassThroughTLVs.PassTLVsMatchType.INCLUDE,
            tlv_type=[t for t in PASSED_TLVS if t in tlvs]))
    return ListenerFilter(name="envoy.filters.listener.proxy_protocol", typed_config=pack(config))


def set_filter_state(tlvs: tuple[int, ...]) -> Filter:
    """Copy the TLVs from the connection's dynamic metadata into filter state. An absent
    TLV sets nothing: omit_empty_values renders it "" (not "-"), which skip_if_empty skips."""
    values = [FilterStateValue(
        object_key=dataplane.FILTER_STATE[t], factory_key="envoy.string", skip_if_empty=True,
        format_string=SubstitutionFormatString(omit_empty_values=True, text_format_source=DataSource(
            inline_string=f"%DYNAMIC_METADATA({dataplane.METADATA_NAMESPACE}:{dataplane.TLV_KEYS[t]})%")))
        for t in tlvs]
    return network_filter("envoy.filters.network.set_filter_state", Config(on_new_connection=values))


def stat_prefix(name: str) -> str:
    """A stat prefix without dots, which would split it into several stat name segments."""
    return name.replace(".", "_")


def http_connection_manager(prefix: str, route_config: str, filters: list[HttpFilter], log_name: str,
                            log_path: str) -> Filter:
    """An HTTP connection manager, on either side a place where policy is enforced (the
    server side's chains; the client side's routes that enforce their endpoints' policy,
    outbound.py): paths are normalized before authorization looks at them, as istiod does
    inbound, and the client's address is the connection's (the PROXY header's source,
    which the agent verified), never what a request's X-Forwarded-For says, and no such
    header is added: RBAC's source.ip and remote.ip (`remote_ip`) are the client, as the L4
    engine reads them. (RBAC's `direct_remote_ip` is the unix socket's peer, never a pod: a
    DENY of ipBlocks matched nobody, and remote.ip followed a header the client writes.)
    The client side's chains are so too, every one of them (a chain's settings stay what
    they were for the connections it holds until they end, where a route's change reaches
    every request at once)."""
    hcm = HttpConnectionManager(
        stat_prefix=stat_prefix(prefix), rds=Rds(config_source=ADS, route_config_name=route_config),
        http_filters=filters + [http_filter(ROUTER, Router())],
        upgrade_configs=[HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
        access_log=[access_log(log_name, log_path)],
        normalize_path=boolean(True), use_remote_address=boolean(True), skip_xff_append=True)
    return network_filter(HCM, hcm)


def access_log(log_name: str, path: str) -> AccessLog:
    """Every request's line (logline.py) into the FIFO `path` the agent reads."""
    config = FileAccessLog(path=path, log_format=SubstitutionFormatString(
        json_format=struct(logline.json_format(log_name))))
    return AccessLog(name=FILE_ACCESS_LOG, typed_config=pack(config))


def tcp_proxy(prefix: str, proxy: TcpProxy) -> Filter:
    proxy.stat_prefix = stat_prefix(prefix)
    return network_filter(TCP_PROXY, proxy)


def upstream_listener() -> Listener:
    """Internal listener every outbound endpoint address points at: bytes (the PROXY
    header the cluster wrote, then the request) go on to the agent's upstream socket."""
    return Listener(name=names.UPSTREAM_LISTENER, internal_listener=Listener.InternalListenerConfig(),
                    filter_chains=[FilterChain(filters=[tcp_proxy(names.UPSTREAM_LISTENER,
                                                                  TcpProxy(cluster=names.AGENT_UPSTREAM))])])
