"""The state-of-the-world ADS protocol for one stream, without any transport.

A `StreamState` takes DiscoveryRequests and snapshot changes and answers with the
DiscoveryResponses to send. Per type it tracks the subscribed names, the version and
nonce last sent and the version last ACKed (for EDS and RDS, subscribed by name, the
version of just the resources asked for). A request whose nonce is not the one last
sent is stale and ignored; the first with the current nonce is an ACK, or a NACK when
it carries error_detail (reported to `on_nack`; Envoy keeps its previous config, and the
same content is not sent again); later ones only change the subscribed names. Pushes
go in PUSH_ORDER (CDS, EDS, LDS, RDS), at most one outstanding per type: endpoints
right after the clusters (Envoy holds back the ACK of changed clusters until their
endpoints arrive, so EDS follows every CDS push even when unchanged), listeners only
once CDS is answered and the accepted clusters' endpoints were requested and sent, and
routes after the listeners, so Envoy never sees a listener or route before the clusters
it uses (go-control-plane's ADS order).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

from nodeagent.xds import resources as rt
from nodeagent.xds.adsproto import Any, ControlPlane, DiscoveryRequest, DiscoveryResponse
from nodeagent.xds.snapshot import Snapshot

CONTROL_PLANE = ControlPlane(identifier="nodeagent")


@dataclass
class TypeState:
    subscribed: bool = False
    names: frozenset[str] = frozenset()
    sent_version: str | None = None
    sent_names: frozenset[str] | None = None
    last_nonce: str = ""  # of the last response sent
    nonce: str | None = None  # awaiting the answer to this response
    acked_version: str = ""
    nacked: bool = False
    rewarm: bool = False  # EDS only: send again after a CDS push, changed or not


@dataclass
class StreamState:
    on_nack: Callable[[str, str, DiscoveryRequest], None]  # (node, type URL, request)
    on_push: Callable[[str], None]  # type URL
    node: str = ""
    types: dict[str, TypeState] = field(default_factory=lambda: {t: TypeState() for t in rt.PUSH_ORDER})
    counter: int = 0

    def request(self, req: DiscoveryRequest, snapshot_of: Callable[[str], Snapshot | None]) -> list[DiscoveryResponse]:
        if not self.node and req.HasField("node"):
            self.node = req.node.id
        state = self.types.get(req.type_url)
        if state is None:
            return []  # a type this server does not serve (e.g. SDS): leave it pending
        if req.response_nonce and req.response_nonce != state.last_nonce:
            return []  # stale: about an older response
        if req.response_nonce and state.nonce is not None:  # the answer to the last response
            state.nonce = None
            if req.HasField("error_detail") and (req.error_detail.code or req.error_detail.message):
                state.nacked = True
                self.on_nack(self.node, req.type_url, req)
            else:
                state.nacked = False
                state.acked_version = req.version_info
        state.subscribed = True
        state.names = frozenset(req.resource_names)
        return self.pump(snapshot_of(self.node) if self.node else None)

    def pump(self, snapshot: Snapshot | None) -> list[DiscoveryResponse]:
        """The responses to send now for `snapshot`, in PUSH_ORDER, as far as it allows."""
        out: list[DiscoveryResponse] = []
        for type_url in rt.PUSH_ORDER if snapshot is not None else ():
            state = self.types[type_url]
            if not state.subscribed or state.nonce is not None:
                continue  # not asked for, or awaiting the answer to the last response
            if not self._ready(type_url, snapshot):
                break  # later types wait too
            names = self._names(type_url, state, snapshot)
            if state.sent_version != version(type_url, snapshot, names) or state.rewarm:
                out.append(self._response(type_url, state, snapshot, names))
        return out

    def _ready(self, type_url: str, snapshot: Snapshot) -> bool:
        if type_url == rt.ENDPOINT:  # after the clusters that use them are sent
            cds = self.types[rt.CLUSTER]
            return not cds.subscribed or cds.sent_version == snapshot.version_of(rt.CLUSTER)
        if type_url == rt.ROUTE:
            lds = self.types[rt.LISTENER]
            listeners_sent = not lds.subscribed or lds.sent_version == snapshot.version_of(rt.LISTENER)
            return listeners_sent and self._clusters_settled(snapshot)
        return type_url == rt.CLUSTER or self._clusters_settled(snapshot)

    def _names(self, type_url: str, state: TypeState, snapshot: Snapshot) -> frozenset[str]:
        available = snapshot.names(type_url)
        if type_url in rt.NAMED:
            return frozenset(n for n in available if n in state.names)
        return frozenset(available)

    def _clusters_settled(self, snapshot: Snapshot) -> bool:
        """CDS of this snapshot answered and, if accepted, its endpoints requested and sent."""
        cds, eds = self.types[rt.CLUSTER], self.types[rt.ENDPOINT]
        if not cds.subscribed:
            return True
        if cds.sent_version != snapshot.version_of(rt.CLUSTER) or cds.nonce is not None:
            return False
        wanted = frozenset(snapshot.names(rt.ENDPOINT))
        if cds.nacked or not wanted:
            return True
        return (eds.subscribed and eds.nonce is None and wanted <= (eds.sent_names or frozenset())
                and eds.sent_version == version(rt.ENDPOINT, snapshot, eds.sent_names))

    def _response(self, type_url: str, state: TypeState, snapshot: Snapshot,
                  names: frozenset[str]) -> DiscoveryResponse:
        self.counter += 1
        state.nonce = state.last_nonce = f"{self.counter}"
        state.sent_version = version(type_url, snapshot, names)
        state.sent_names = names
        state.rewarm = False
        if type_url == rt.CLUSTER:
            # Envoy warms a new or changed cluster until it gets endpoints, and holds back
            # the CDS ACK meanwhile: endpoints follow every CDS push, changed or not.
            self.types[rt.ENDPOINT].rewarm = True
        self.on_push(type_url)
        serialized = snapshot.serialized.get(type_url, {})
        return DiscoveryResponse(
            version_info=state.sent_version, type_url=type_url, nonce=state.nonce,
            resources=[Any(type_url=type_url, value=serialized[n]) for n in sorted(names)],
            control_plane=CONTROL_PLANE)

    def accepted(self, snapshot: Snapshot) -> bool:
        """Whether every type `snapshot` has resources of is subscribed and has ACKed
        what the snapshot holds for it."""
        return all(self._accepted(t, s, snapshot) for t, s in self.types.items() if s.subscribed or snapshot.names(t))

    def _accepted(self, type_url: str, state: TypeState, snapshot: Snapshot) -> bool:
        names = self._names(type_url, state, snapshot)
        current = version(type_url, snapshot, names)
        if type_url in rt.NAMED and not names and state.sent_version == current and not state.nacked:
            # Nothing of this type for Envoy, and that was sent: once the last cluster (or
            # listener) using it went, Envoy has no watch on it and takes the empty response
            # without answering (GrpcMuxImpl), so no ACK would ever come.
            return True
        return state.subscribed and state.acked_version == current and state.nonce is None and not state.nacked


def version(type_url: str, snapshot: Snapshot, names: frozenset[str] | None) -> str:
    """The version of what a response for `names` carries: the type's version for
    wildcard types; for types subscribed by name, a hash of just those resources, so a
    change elsewhere in the type does not resend them."""
    if type_url not in rt.NAMED:
        return snapshot.version_of(type_url)
    digest = hashlib.sha256()
    serialized = snapshot.serialized.get(type_url, {})
    for name in sorted(names or ()):
        digest.update(name.encode() + b"\0" + serialized[name] + b"\0")
    return digest.hexdigest()[:16]
