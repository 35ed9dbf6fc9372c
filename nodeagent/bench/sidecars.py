"""The anchor of `nodeagent bench mesh`: an Envoy sidecar pair, as a sidecar mesh runs one
per pod, from the same `envoy` binary the waypoints run; and the static HTTP app every
set-up talks to.

- `app_config`: the app, an Envoy answering every request with a fixed body
  (`direct_response`), so the server is fast and its cost the same in every set-up.
- `client_sidecar`: in the client pod, per target an HTTP listener (HTTP connection
  manager, router: the outbound side of a sidecar), a TCP listener (tcp_proxy, for the
  throughput run) and a TCP listener for the app's HTTP port (tcp_proxy: how a sidecar
  carries a port it does not read, one upstream mTLS connection per client connection;
  the L4 anchor of the new-connection figures), each to the server pod's sidecar over
  mutual TLS 1.3, checking that the server presents the SPIFFE ID of the server's
  service account.
- `server_sidecar`: in the server pod, the same three listeners terminating mutual TLS
  1.3 (the client must present a certificate of the trust domain), to the app on
  127.0.0.1.
- `issue`: a workload key (EC P-256, what ztunnel uses) and certificate for a pod's
  SPIFFE ID, signed with the lab's own mesh CA keys (`nodeagent ca`'s signer), so both
  meshes use the same kind of certificate, chain and trust anchor.
Every sidecar's admin is a unix socket in its directory (read with curl --unix-socket);
they run with --disable-hot-restart, as Istio's pilot-agent starts sidecars.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.identity import pemfiles
from nodeagent.identity.ca import keys as cakeys
from nodeagent.identity.ca.signer import CertificateAuthority
from nodeagent.identity.spiffe import Identity

APP_BODY = "a static answer from the app of nodeagent bench mesh\n"
SERVER_HTTP_PORT, SERVER_TCP_PORT = 15443, 15444  # the server sidecar's mTLS listeners
SERVER_TCP_HTTP_PORT = 15445  # ... and its tcp_proxy to the app's HTTP port (the L4 anchor)
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
TLS = "envoy.transport_sockets.tls"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


@dataclass(frozen=True)
class TlsFiles:
    chain: str  # the leaf, then the CA's chain
    key: str
    root: str  # the trust anchor


@dataclass(frozen=True)
class Target:
    """One server a client sidecar sends to: its local listener ports, where the server
    pod's sidecar is, and the SPIFFE ID it must present."""

    name: str
    http_port: int
    tcp_port: int
    tcp_http_port: int  # tcp_proxy to the app's HTTP port
    address: str
    spiffe_id: str


def issue(ca_dir: str, identity: Identity, directory: Path) -> TlsFiles:
    """Key and certificate chain for `identity`, signed by the CA keys in `ca_dir`."""
    now = dt.datetime.now(dt.timezone.utc)
    ca = CertificateAuthority(identity.trust_domain, cakeys.load(Path(ca_dir), now))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca.issue(key.public_key(), identity)
    pemfiles.private_dir(directory)
    files = TlsFiles(str(directory / "cert-chain.pem"), str(directory / "key.pem"), str(directory / "root-cert.pem"))
    pemfiles.write_private(Path(files.chain), pemfiles.certs_pem([leaf, *ca.material.chain]), 0o644)
    pemfiles.write_private(Path(files.root), pemfiles.certs_pem([ca.material.root]), 0o644)
    pemfiles.write_private(Path(files.key), pemfiles.key_pem(key))
    return files


def envoy_argv(config_path: str, concurrency: int) -> list[str]:
    return ["envoy", "-c", config_path, "--concurrency", str(concurrency), "--disable-hot-restart",
            "--log-level", "warning"]


def app_argv(http_port: int) -> list[str]:
    """The app container's command (config inline: it exists before any file does)."""
    return ["envoy", "--config-yaml", json.dumps(app_config(http_port), separators=(",", ":")),
            "--concurrency", "1", "--disable-hot-restart", "--log-level", "warning"]


def app_config(http_port: int) -> dict:
    route = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": APP_BODY}}}
    hcm = _hcm("app", {"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": [route]}]})
    return {"static_resources": {"listeners": [_listener("app", "0.0.0.0", http_port, [hcm])]}}


def client_sidecar(admin_socket: str, targets: list[Target], tls: TlsFiles) -> dict:
    listeners, clusters = [], []
    for t in targets:
        http, tcp, tcp_http = f"{t.name}_http", f"{t.name}_tcp", f"{t.name}_tcp_http"
        listeners.append(_listener(f"outbound_{http}", "127.0.0.1", t.http_port, [_hcm(http, _route_to(http))]))
        listeners.append(_listener(f"outbound_{tcp}", "127.0.0.1", t.tcp_port, [_tcp_proxy(tcp)]))
        listeners.append(_listener(f"outbound_{tcp_http}", "127.0.0.1", t.tcp_http_port, [_tcp_proxy(tcp_http)]))
        clusters.append(_cluster(http, t.address, SERVER_HTTP_PORT, _upstream_tls(tls, t.spiffe_id)))
        clusters.append(_cluster(tcp, t.address, SERVER_TCP_PORT, _upstream_tls(tls, t.spiffe_id)))
        clusters.append(_cluster(tcp_http, t.address, SERVER_TCP_HTTP_PORT, _upstream_tls(tls, t.spiffe_id)))
    return _bootstrap(admin_socket, listeners, clusters)


def server_sidecar(admin_socket: str, tls: TlsFiles, trust_domain: str, app_http_port: int,
                   app_tcp_port: int) -> dict:
    peers = f"spiffe://{trust_domain}/"
    listeners = [
        _listener("inbound_http", "0.0.0.0", SERVER_HTTP_PORT, [_hcm("inbound_http", _route_to("app_http"))],
                  _downstream_tls(tls, peers)),
        _listener("inbound_tcp", "0.0.0.0", SERVER_TCP_PORT, [_tcp_proxy("app_tcp")], _downstream_tls(tls, peers)),
        _listener("inbound_tcp_http", "0.0.0.0", SERVER_TCP_HTTP_PORT, [_tcp_proxy("app_http")],
                  _downstream_tls(tls, peers))]
    clusters = [_cluster("app_http", "127.0.0.1", app_http_port), _cluster("app_tcp", "127.0.0.1", app_tcp_port)]
    return _bootstrap(admin_socket, listeners, clusters)


def _bootstrap(admin_socket: str, listeners: list[dict], clusters: list[dict]) -> dict:
    return {"admin": {"address": {"pipe": {"path": admin_socket}}},
            "static_resources": {"listeners": listeners, "clusters": clusters}}


def _listener(name: str, ip: str, port: int, filters: list[dict], tls: dict | None = None) -> dict:
    chain: dict = {"filters": filters}
    if tls is not None:
        chain["transport_socket"] = tls
    return {"name": name, "address": {"socket_address": {"address": ip, "port_value": port}},
            "filter_chains": [chain]}


def _hcm(name: str, route_config: dict) -> dict:
    router = {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
    return {"name": "envoy.filters.network.http_connection_manager",
            "typed_config": {"@type": HCM, "stat_prefix": name, "codec_type": "AUTO", "route_config": route_config,
                             "http_filters": [router]}}


def _route_to(cluster: str) -> dict:
    return {"virtual_hosts": [{"name": cluster, "domains": ["*"],
                               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]}


def _tcp_proxy(cluster: str) -> dict:
    return {"name": "envoy.filters.network.tcp_proxy",
            "typed_config": {"@type": TCP_PROXY, "stat_prefix": cluster, "cluster": cluster}}


def _cluster(name: str, ip: str, port: int, tls: dict | None = None) -> dict:
    endpoint = {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}
    out = {"name": name, "type": "STATIC", "connect_timeout": "5s",
           "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [endpoint]}]}}
    if tls is not None:
        out["transport_socket"] = tls
    return out


def _common_tls(tls: TlsFiles, san: dict) -> dict:
    return {"tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"},
            "tls_certificates": [{"certificate_chain": {"filename": tls.chain}, "private_key": {"filename": tls.key}}],
            "validation_context": {"trusted_ca": {"filename": tls.root},
                                   "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": san}]}}


def _upstream_tls(tls: TlsFiles, server_id: str) -> dict:
    return {"name": TLS, "typed_config": {"@type": UPSTREAM_TLS,
                                          "common_tls_context": _common_tls(tls, {"exact": server_id})}}


def _downstream_tls(tls: TlsFiles, peers_prefix: str) -> dict:
    return {"name": TLS, "typed_config": {"@type": DOWNSTREAM_TLS, "require_client_certificate": True,
                                          "common_tls_context": _common_tls(tls, {"prefix": peers_prefix})}}
