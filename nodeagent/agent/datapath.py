"""The agent's data path, wired from its config: what handles the connections of the
in-pod listeners, and what those handlers read.

- outbound (15001): destinations.resolve, then HBONE (tunnel_outbound) to meshed
  endpoints or passthrough to the rest;
- inbound plaintext (15006): PeerAuthentication and AuthorizationPolicy, then delivery;
- tunnel (15008): the HBONE server (tunnel_inbound), policy with the peer's identity,
  then the same delivery;
- the pods' outbound listeners accepted by the native HBONE engine (source_routes, setting
  outbound_in_engine), which opens the streams itself on routes the outbound relay taught it;
- same node (samenode, setting same_node_fast_path): outbound to a meshed pod of this
  node is admitted as the HBONE server would, delivered with the same Delivery and
  joined, with no HBONE;
- delivered connections are re-checked (admission.InboundConnections) after every
  policy update and every change of the waypoint's steering.
They share the policies in force (policies.PolicyState), the workload identities
(identities.WorkloadIdentities: an IdentityManager talking to the mesh CA, or none
without `--ca-address`), Istio's TCP telemetry and the flow log, all registered into
the agent's registry. `enrolled()` follows enrolment: certificates for the pods' service
accounts, tunnel connections of removed pods drained and closed. The `Splicer` (setting
data_path_engine) says which engine moves the relays' bytes: its native engine starts
with the data path and stops last, resetting what is still open. `HboneEngines`
(setting hbone_engine) says which carries HBONE, tunnel/ in Python or the native HBONE
engine, for both the source's pools and the tunnel listener.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Callable

from prometheus_client import CollectorRegistry

from nodeagent.agent.proxy.admission import InboundConnections
from nodeagent.agent.config import AgentConfig
from nodeagent.agent.configwork import ConfigWork
from nodeagent.agent.proxy.identities import WorkloadIdentities
from nodeagent.agent.proxy.delivery import Delivery
from nodeagent.agent.proxy.hbone_native import HboneEngines
from nodeagent.agent.proxy.inbound import InboundRelay
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.waypoint.jwks import JwksFetcher, jwks_uris, mesh_addresses
from nodeagent.agent.metrics import AgentMetrics
from nodeagent.agent.proxy.outbound import OutboundRelay, Passthrough
from nodeagent.agent.proxy.policies import PolicyState
from nodeagent.agent.proxy.samenode import KernelJoin, SameNodeRoute
from nodeagent.agent.proxy.splice import Splicer
from nodeagent.agent.proxy.steering import NoWaypoint
from nodeagent.agent.proxy.telemetry import FlowLog, Telemetry, TrafficMetrics
from nodeagent.agent.proxy.tunnel_inbound import TunnelInbound
from nodeagent.agent.proxy.tunnel_outbound import HboneRoute
from nodeagent.agent.waypoint.waypoint import Waypoint
from nodeagent.errors import ConfigError
from nodeagent.memory import MemoryGuard, Trimmer
from nodeagent.identity.workload.client import CaClient
from nodeagent.kube.client import TokenFile
from nodeagent.clock import SystemClock
from nodeagent.identity.workload.manager import IdentityManager
from nodeagent.model import Model, Pod
from nodeagent.tunnel import StreamBudget, TunnelMetrics, TunnelSettings

CONNECT_TIMEOUT = 10.0  # seconds for an upstream connect (outbound or delivery to the app)


class DataPath:
    def __init__(self, config: AgentConfig, *, registry: CollectorRegistry, metrics: AgentMetrics, capture,
                 log: logging.Logger, model: Callable[[], Model], pod_at: Callable[[str], PodContext | None],
                 work: ConfigWork):
        c = config
        self.log = log
        self.pod_at = pod_at
        self.work = work  # the config thread: policy and waypoint rebuilds run there
        self.policies = PolicyState(c.root_namespace, log.getChild("policy"))
        self.identities = WorkloadIdentities(c.trust_domain, identity_manager(c, registry, log.getChild("identity")),
                                             log.getChild("identity"), node=c.node)
        self.flow_log = FlowLog.open(c.flow_log, log, max_bytes=c.flow_log_max_mib << 20)
        self.telemetry = Telemetry(TrafficMetrics(registry), self.flow_log)
        self.waypoint = self.jwks = None
        if c.waypoint:
            # Envoy hands connections back to the relays, and tells when its steering
            # changed, through this object's methods: the relays are built below.
            self.jwks = JwksFetcher(c.waypoint_dir / "jwks", log.getChild("jwks"), on_change=self._keys_changed,
                                    resolve=mesh_addresses(model))  # in-cluster jwksUri names: the model's
            self.waypoint = Waypoint(c, registry=registry, log=log.getChild("waypoint"),
                                     on_upstream=self._upstream, on_deliver=self._deliver,
                                     jwks_files=self.jwks.files, principal_of=self.identities.uri_of,
                                     on_steering=self._steering_changed, defer=work.submit)
        waypoint = self.waypoint if self.waypoint is not None else NoWaypoint()
        self.connections = InboundConnections(lambda: self.policies.current, pod_at, waypoint, registry,
                                              log.getChild("inbound"))
        self.splicer = Splicer(c.data_path_engine, log.getChild("relay"))
        self.memory = MemoryGuard(c.memory_limit_mib, log.getChild("memory"), per_pod=c.max_connections_per_pod,
                                  pipes=self._pipe_bytes)
        inputs = ProxyInputs(model=model, pod_at=pod_at, policies=self.policies, identities=self.identities,
                             telemetry=self.telemetry, connections=self.connections, waypoint=waypoint,
                             metrics=metrics, agent_ports=frozenset({c.outbound_port, c.inbound_port,
                                                                     c.tunnel_port, c.admin_port}),
                             splicer=self.splicer, memory=self.memory)
        tunnel_metrics = TunnelMetrics(registry)
        tunnel = TunnelSettings(server_handshake_timeout=c.hbone_handshake_timeout)
        self.hbone_engines = HboneEngines(c.hbone_engine, log.getChild("hbone"), tunnel)
        self.stream_budget = StreamBudget(tunnel)  # the Python path's server and pools together
        self.hbone = HboneRoute(self.identities, tunnel_metrics, log.getChild("hbone"), mark=c.mark,
                                port=c.tunnel_port, settings=tunnel, engines=self.hbone_engines,
                                budget=self.stream_budget)
        self.delivery = delivery = Delivery(c.delivery_mark, CONNECT_TIMEOUT)
        self.memory.tightening.append(delivery.ahead.clear)
        self.capture = capture
        self.kernel_join = KernelJoin(c.same_node_sockmap, self.splicer, log.getChild("samenode")) \
            if c.same_node_fast_path else None
        self.same_node = SameNodeRoute(inputs, delivery, registry, log.getChild("samenode"),
                                       kernel=self.kernel_join) if c.same_node_fast_path else None
        self.outbound = OutboundRelay(inputs, capture, log.getChild("outbound"),
                                      passthrough=Passthrough(c.mark, CONNECT_TIMEOUT), hbone=self.hbone,
                                      same_node=self.same_node, in_engine=c.outbound_in_engine)
        # where an outbound connection goes changed: the engine's out-routes are stale
        self.connections.changing.append(self.outbound.routes.invalidate)
        self.memory.tightening.append(self.outbound.routes.invalidate)
        self.inbound = InboundRelay(inputs, log.getChild("inbound"), delivery=delivery)
        self.tunnel = TunnelInbound(inputs, delivery, tunnel_metrics, log.getChild("hbone"), settings=tunnel,
                                    engines=self.hbone_engines, budget=self.stream_budget)
        self._releases: set[asyncio.Task] = set()
        self.trimmer = Trimmer()  # freed heap back to the system (memory.py)
        self._trimming: asyncio.Task | None = None
        self._shedding: asyncio.Task | None = None
        self._kernel_start: asyncio.Task | None = None

    async def start(self) -> None:
        """Start what runs beside the relays: the native relay and HBONE engines (when
        chosen), the waypoint (xDS server, Envoy)."""
        await self.splicer.start()
        await self.hbone_engines.start()
        self._trimming = asyncio.get_running_loop().create_task(self.trimmer.run(), name="malloc-trim")
        self._shedding = asyncio.get_running_loop().create_task(self.memory.watch(), name="memory-shed")
        if self.kernel_join is not None:  # a compile child of its own: readiness does not wait for it
            self._kernel_start = asyncio.get_running_loop().create_task(self.kernel_join.start(self.capture))
        if self.waypoint is not None:
            await self.waypoint.start()

    async def _upstream(self, sock, header) -> None:
        """Envoy handed back a connection after client-side L7 (upstream.sock)."""
        await self.outbound.handle_upstream(sock, header)

    async def _deliver(self, sock, header) -> None:
        """Envoy handed back a request it allowed after server-side L7 (deliver.sock)."""
        await self.inbound.handle_delivery(sock, header)

    def _steering_changed(self) -> None:
        """Envoy ACKed a change of what goes through it: re-check what was sent around it."""
        self.connections.recheck()

    async def update(self, model: Model, with_policies: Callable[[], object] = lambda: None) -> None:
        """A new model: the policies in force (delivered connections they now refuse are
        reset), then the waypoint's configuration (which re-checks them again once Envoy
        ACKed a change of steering). The rebuilds run in the config thread; the new
        policies go in force in one step of the loop with `with_policies()` (the pods'
        labels of the same model), so no connection is admitted under one without the other."""
        built = await self.work.run(self.policies.build, model)
        if built is not None:
            self.policies.install(built)
        with_policies()
        self.connections.recheck()
        if self.waypoint is not None:
            try:
                uris = await self.work.run(self._rebuild_waypoint, model)
            except Exception:  # a bug must not stop enrolment; the snapshot in force stays
                self.log.exception("cannot build the waypoint configuration; keeping the one in force")
                return
            self.jwks.want(uris)

    def _rebuild_waypoint(self, model: Model) -> dict[str, timedelta]:
        """In the config thread: the waypoint's snapshot of `model`; the jwksUris its
        configuration needs."""
        self.waypoint.update(model)
        return jwks_uris(self.waypoint.config)

    def _keys_changed(self) -> None:
        """A fetched JWKS changed (or went): rebuild the snapshot with the last model."""
        self.work.submit(self.waypoint.update)

    def enrolled(self, pods: list[Pod], removed: set[PodContext]) -> None:
        """After a reconcile: keep certificates for `pods`, let go of `removed` pods."""
        self.identities.sync(pods)
        for ctx in removed:
            self.tunnel.drain(ctx.pod.ip)
            self.delivery.ahead.forget(ctx.cookie)
            self.delivery.ahead.forget_client(ctx.pod.ip)
            task = asyncio.get_running_loop().create_task(self._release(ctx))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release(self, ctx: PodContext) -> None:
        """A removed pod's pool closes once its connections, the engine's and the relays', ended."""
        await self.outbound.routes.drained(ctx)
        await self.hbone.release(ctx)

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for the streams the engine opened for the pods to
        end (the relays' tasks are the Enroller's to wait for); how many are still open."""
        return await self.outbound.routes.drained(None, timeout)

    def describe(self) -> dict:
        return {"identity": self.identities.describe(), "policy": self.policies.describe(),
                "tunnel": {"pooled_connections": self.hbone.connections(),
                           "inbound_connections": self.tunnel.connections()},
                "delivered_connections": len(self.connections), "data_path": self._data_path(),
                "memory": {**self.memory.describe(), "most_held": self._most_held()},
                "waypoint": {**self.waypoint.describe(), "jwks": self.jwks.describe()}
                if self.waypoint is not None else None}

    def _pipe_bytes(self) -> int:
        """What the native relay engine's pipes hold now (kernel pages: the memory guard
        adds them to its reading)."""
        engine = self.splicer.engine
        return engine.stats()["bytes_held"] if engine is not None else 0

    def _most_held(self) -> list[dict]:
        """The three local pods the agent relays the most connections for (who a memory
        limit's fair share would refuse first)."""
        out = []
        for ip, count in self.memory.holdings.most(3):
            ctx = self.pod_at(ip)
            out.append({"pod": str(ctx) if ctx is not None else ip, "connections": count})
        return out

    def _data_path(self) -> dict:
        """The engines (splice.Splicer for socket pairs, HboneEngines for HBONE) and the
        same-node fast path; the summary line says all three."""
        data_path, hbone = self.splicer.describe(), self.hbone_engines.describe()
        hbone["receive"] = self.hbone_engines.budgets(hbone["native"]) or self.stream_budget.describe()
        relays = engines_summary(data_path["summary"], hbone)
        if self.same_node is None:
            same_node, line = {"enabled": False}, "off (same_node_fast_path=false: HBONE)"
        else:
            same_node = self.same_node.describe()
            line = f"on, joined by {same_node['join']}"
            if same_node["join"] != "sockmap":
                line += f" (sockmap: {same_node['sockmap']})"
        outbound = self.outbound.routes.describe()
        accepts = "the engine" if outbound["listeners"] else f"the agent ({outbound['why']})"
        return {**data_path, "hbone": hbone, "same_node": same_node, "outbound": outbound,
                "summary": f"{relays}; same-node fast path {line}; outbound accepted by {accepts}"}

    async def close(self) -> None:
        for task in (self._trimming, self._shedding):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for task in list(self._releases):
            task.cancel()
        await self.hbone.close()
        await self.tunnel.close()
        self.delivery.ahead.clear()
        await self.identities.close()
        if self.waypoint is not None:
            await self.jwks.close()
            await self.waypoint.close()
        if self._kernel_start is not None:
            self._kernel_start.cancel()
            await asyncio.gather(self._kernel_start, return_exceptions=True)
        if self.kernel_join is not None:
            self.kernel_join.close()
        self.hbone_engines.close()
        self.splicer.close()
        self.flow_log.close()


def engines_summary(relays: str, hbone: dict) -> str:
    """The status line's start: who moves socket pairs (splice.Splicer's summary) and who
    carries HBONE (HboneEngines.describe())."""
    relays = relays.replace("; python for HBONE streams", "")
    if hbone["engine"] == "native":
        library = " ".join((hbone.get("tls_library") or "").split()[:2])  # "OpenSSL 3.5.5"
        return f"{relays}; HBONE: native engine" + (f" ({library})" if library else "") \
            + f" [hbone_engine={hbone['setting']}]"
    return f"{relays}; HBONE: python ({hbone['why']})"


def identity_manager(config: AgentConfig, registry: CollectorRegistry, log: logging.Logger) -> IdentityManager | None:
    """The manager of this node's workload certificates, or None without a CA."""
    if config.ca_address is None:
        log.warning("no --ca-address: no workload certificates, so no mTLS; connections to meshed "
                    "destinations will be refused")
        return None
    root = _read(config.ca_root_cert, "ca_root_cert")
    token = _read(config.ca_token_file, "ca_token_file").decode().strip()
    if not token:
        raise ConfigError("setting ca_token_file", f"{config.ca_token_file} is empty",
                          "it must hold this node's token for the CA")
    host, port = config.ca_address
    # Re-read at every request: a projected token (--ca-token-file in a cluster) is rotated by kubelet.
    client = CaClient(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", root,
                      TokenFile(config.ca_token_file).get, config.ca_server_name)
    return IdentityManager(client, SystemClock(), root, registry, log, runtime_dir=config.identity_dir,
                           cert_ttl=config.cert_ttl)


def _read(path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"setting {setting}", f"cannot read {path}: {exc.strerror}") from None
