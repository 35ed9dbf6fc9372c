"""Names of the Envoy resources the translation makes, in one place.

Outbound clusters carry Istio's names (`outbound|<port>|<subset>|<host>`), so stats and
`proxy-config` read as they do with Istio; a cluster for the clients of one namespace
whose own DestinationRule takes precedence (services.py) has that namespace appended
(`outbound|<port>|<subset>|<host>|<client namespace>`), and one for the routes that
enforce its endpoints' HTTP policy the digest of that policy
(`outbound|<port>|<subset>|<host>|<client namespace or empty>|enforced-<digest>-<pod port>`). Route tables are named
`<host>:<port>` (client side) and `inbound|<port>` (server side).
"""

from __future__ import annotations

OUTBOUND_LISTENER = "outbound"  # client-side L7, on outbound.sock
INBOUND_LISTENER = "inbound"  # server-side L7, on inbound.sock
UPSTREAM_LISTENER = "nodeagent_upstream"  # internal listener: Envoy's picked endpoint → agent
AGENT_UPSTREAM = "nodeagent|upstream"  # static cluster: upstream.sock
BLACKHOLE = "BlackHoleCluster"  # no endpoints: what a dangling reference routes to
PASSTHROUGH_ENDPOINT = "passthrough"


def outbound_cluster(host: str, port: int, subset: str = "", client_namespace: str = "", enforced: str = "") -> str:
    """`enforced`: the cluster of the routes that enforce its endpoints' HTTP policy of that
    digest (translate/outbound.py), `...|<client namespace>|enforced-<digest>`."""
    name = f"outbound|{port}|{subset}|{host}" + (f"|{client_namespace}" if client_namespace or enforced else "")
    return name + (f"|enforced-{enforced}" if enforced else "")


def inbound_cluster(port: int) -> str:
    return f"inbound|{port}||"


def outbound_routes(host: str, port: int) -> str:
    return f"{host}:{port}"


def inbound_routes(port: int) -> str:
    return f"inbound|{port}"


def parse_outbound_cluster(name: str) -> tuple[str, int, str] | None:
    """(host, port, subset) of an outbound cluster name, None for any other name."""
    parts = name.split("|")
    if len(parts) not in (4, 5, 6) or parts[0] != "outbound" or not parts[1].isdigit() or \
            (len(parts) == 6 and not parts[5].startswith("enforced-")):
        return None
    return parts[3], int(parts[1]), parts[2]
