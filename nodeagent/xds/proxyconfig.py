"""`nodeagent proxy-config`: what the xDS server gives a node's Envoy, read back with the
Python ADS client, as a short table (like `istioctl proxy-config`) or as JSON; and
`secret`: the workload certificates the agent holds (identity, serial, validity) and the
mesh's root, read from the agent's status, as `istioctl proxy-config secret` shows a
proxy's.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from google.protobuf import json_format
from google.protobuf.message import Message

from nodeagent.xds import resources as rt
from nodeagent.xds.snapshot import action_clusters

KINDS = {"clusters": rt.CLUSTER, "endpoints": rt.ENDPOINT, "listeners": rt.LISTENER, "routes": rt.ROUTE}


def render(kind: str, resources: dict[str, Message], output: str) -> str:
    if output == "json":
        return json.dumps([json_format.MessageToDict(m) for m in resources.values()], indent=2) + "\n"
    rows = [_ROWS[kind](m) for m in resources.values()]
    return _table(_HEADERS[kind], [r for row in rows for r in row])


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    return "".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() + "\n"
                   for row in [header, *rows])


def _cluster(c) -> list[tuple[str, ...]]:
    return [(c.name, Cluster.DiscoveryType.Name(c.type), Cluster.LbPolicy.Name(c.lb_policy))]


def _endpoints(a) -> list[tuple[str, ...]]:
    rows = []
    for locality in a.endpoints:
        for lb in locality.lb_endpoints:
            address = lb.endpoint.address
            if address.HasField("envoy_internal_address"):
                where = address.envoy_internal_address.endpoint_id
            elif address.HasField("pipe"):
                where = address.pipe.path
            else:
                where = f"{address.socket_address.address}:{address.socket_address.port_value}"
            rows.append((a.cluster_name, where))
    return rows or [(a.cluster_name, "(none)")]


def _listener(listener) -> list[tuple[str, ...]]:
    where = listener.address.pipe.path if listener.address.HasField("pipe") else "(internal)"
    chains = [c.name or "(default)" for c in listener.filter_chains]
    return [(listener.name, where, chain) for chain in chains]


def _routes(table) -> list[tuple[str, ...]]:
    return [(table.name, route.name, _match(route.match), _action(route))
            for vhost in table.virtual_hosts for route in vhost.routes] or [(table.name, "", "", "")]


def _match(match) -> str:
    path = match.path or match.prefix or match.safe_regex.regex
    extra = [h.name for h in match.headers] + [f"?{q.name}" for q in match.query_parameters]
    extra += [f.key for f in match.filter_state]
    return path + (f" [{', '.join(extra)}]" if extra else "")


def _action(route) -> str:
    if route.HasField("redirect"):
        return "redirect"
    if route.HasField("direct_response"):
        return f"direct {route.direct_response.status}"
    weighted = route.route.weighted_clusters
    if len(weighted.clusters) > 1:  # a split: name each share
        total = sum(c.weight.value for c in weighted.clusters) or 1
        mirrors = [m.cluster for m in route.route.request_mirror_policies]
        return ", ".join([f"{c.name} {100 * c.weight.value / total:g}%" for c in weighted.clusters]
                         + [f"{m} (mirror)" for m in mirrors])
    return ", ".join(action_clusters(route))


def render_secrets(identity: dict, output: str, now: float) -> str:
    """The agent's certificates (status["identity"]): one row per workload identity, then
    the trust bundle's roots."""
    if output == "json":
        return json.dumps(identity, indent=2, sort_keys=True) + "\n"
    if identity.get("enabled") is False:
        return "mTLS is off on this agent (no --ca-address): it holds no certificate\n"
    rows = [(i["identity"], "Cert Chain", _state(i, now), i.get("serial") or "-", _time(i.get("not_after")),
             _time(i.get("not_before"))) for i in identity.get("identities", [])]
    rows += [("ROOTCA", "CA", _state({"valid": True, **r}, now), r["serial"], _time(r["not_after"]),
              _time(r["not_before"])) for r in identity.get("roots", [])]
    return _table(("RESOURCE NAME", "TYPE", "STATUS", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"), rows)


def _state(cert: dict, now: float) -> str:
    if not cert.get("not_after"):
        return "WAITING" + (f" ({cert['error']})" if cert.get("error") else "")
    if cert["not_after"] <= now:
        return "EXPIRED"
    return "ACTIVE" if cert.get("valid") else "NOT YET VALID"


def _time(when: float | None) -> str:
    if not when:
        return "-"
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


_HEADERS = {"clusters": ("NAME", "TYPE", "LB"), "endpoints": ("CLUSTER", "ENDPOINT"),
            "listeners": ("NAME", "ADDRESS", "CHAIN"), "routes": ("TABLE", "ROUTE", "MATCH", "TO")}
_ROWS = {"clusters": _cluster, "endpoints": _endpoints, "listeners": _listener, "routes": _routes}
