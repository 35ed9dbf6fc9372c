"""One workload's view of a node's waypoint configuration (`proxy-config routes shop/web`),
as istioctl shows one proxy's: what applies to the traffic of a workload's pods.

A node's waypoint serves the outbound traffic of every meshed pod on the node alike (the
outbound listener, its route tables and clusters: client-side L7), and the inbound
traffic of each pod that needs server-side L7 through filter chains named
`inbound|<namespace>/<pod>|<port>`. A workload's view keeps the whole outbound side, the
inbound chains of its own pods, and exactly the route tables, clusters and endpoints
those reference. A workload's pods are the pod named NAME, or the pods NAME-* (a
Deployment's or StatefulSet's), among the pods enrolled on the node. Pure.
"""

from __future__ import annotations

from typing import Iterable

from google.protobuf.message import Message

from nodeagent.xds import resources as rt
from nodeagent.xds.snapshot import eds_name, listener_clusters, listener_routes, route_clusters
from nodeagent.xds.translate import names

Resources = dict[str, dict[str, Message]]  # type URL → name → message


def pods_of(workload: str, enrolled: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (namespace, pod) of `workload` ("namespace/name") among `enrolled`."""
    namespace, _, name = workload.rpartition("/")
    namespace = namespace or "default"
    return sorted((ns, pod) for ns, pod in enrolled
                  if ns == namespace and (pod == name or pod.startswith(f"{name}-")))


def narrow(resources: Resources, pods: Iterable[tuple[str, str]]) -> Resources:
    """`resources` less what applies to no traffic of `pods`."""
    own = {f"{names.INBOUND_LISTENER}|{ns}/{pod}|" for ns, pod in pods}
    listeners = {}
    for name, listener in resources.get(rt.LISTENER, {}).items():
        if name == names.INBOUND_LISTENER:
            chains = [c for c in listener.filter_chains if any(c.name.startswith(prefix) for prefix in own)]
            if not chains:
                continue
            narrowed = type(listener)()
            narrowed.CopyFrom(listener)
            del narrowed.filter_chains[:]
            narrowed.filter_chains.extend(chains)
            listener = narrowed
        listeners[name] = listener
    tables = {name for listener in listeners.values() for name in listener_routes(listener)}
    routes = {n: t for n, t in resources.get(rt.ROUTE, {}).items() if n in tables}
    wanted = {c for t in routes.values() for c in route_clusters(t)}
    wanted |= {c for listener in listeners.values() for c in listener_clusters(listener)}
    clusters = {n: c for n, c in resources.get(rt.CLUSTER, {}).items() if n in wanted}
    assignments = {eds_name(c) for c in clusters.values()}
    endpoints = {n: a for n, a in resources.get(rt.ENDPOINT, {}).items() if n in assignments}
    return {rt.CLUSTER: clusters, rt.ENDPOINT: endpoints, rt.LISTENER: listeners, rt.ROUTE: routes}
