"""One node's waypoint: Model + IstioConfig → Envoy resources → a Snapshot.

`translate` builds the client side (outbound listener, route tables), the server side
(inbound listener for this node's pods, route tables), then exactly the clusters and
endpoints those reference, the clusters back to the agent and the internal upstream
listener. `build_snapshot` wraps the result in a consistency-checked Snapshot together
with the DataPlane map the agent steers connections by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from google.protobuf.message import Message

from nodeagent.errors import ConfigError
from nodeagent.model import Model
from nodeagent.xds import resources as rt
from nodeagent.xds.dataplane import DataPlane
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.snapshot import Snapshot
from nodeagent.xds.translate import clusters, inbound, listeners, outbound
from nodeagent.xds.translate.context import Context
from nodeagent.xds.translate.options import WaypointOptions


@dataclass(frozen=True)
class Translation:
    resources: Mapping[str, tuple[Message, ...]]  # type URL → messages, by name
    dataplane: DataPlane
    warnings: tuple[ConfigError, ...]  # dangling references, unresolved ports, unfetched keys

    def messages(self) -> list[Message]:
        return [m for t in rt.PUSH_ORDER for m in self.resources.get(t, ())]


def translate(model: Model, node: str, config: IstioConfig, options: WaypointOptions) -> Translation:
    ctx = Context(model, config, options, node)
    client, client_routes, client_served, enforced = outbound.build(ctx)
    server, server_routes, server_ports, server_served, enforceable = inbound.build(ctx)
    eds_clusters, assignments = clusters.outbound(ctx)
    all_clusters = eds_clusters + clusters.static(ctx, server_ports)
    all_listeners = [x for x in (client, server) if x is not None]
    if ctx.clusters:
        all_listeners.append(listeners.upstream_listener())
    found = {
        rt.CLUSTER: all_clusters, rt.ENDPOINT: assignments, rt.LISTENER: all_listeners,
        rt.ROUTE: client_routes + server_routes,
    }
    ordered = {t: tuple(sorted(ms, key=rt.name_of)) for t, ms in found.items()}
    warnings = tuple({str(w): w for w in ctx.warnings}.values())
    return Translation(ordered, DataPlane(options.sockets, client_served, server_served, enforced, enforceable),
                       warnings)


def build_snapshot(version: str, model: Model, node: str, config: IstioConfig,
                   options: WaypointOptions) -> tuple[Snapshot, Translation]:
    """The checked snapshot of `node` (raises InconsistentSnapshot) and its translation."""
    translation = translate(model, node, config, options)
    return Snapshot.build(version, translation.messages(), translation.dataplane), translation
