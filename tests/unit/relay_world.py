"""A node on loopback for the agent's relay tests (test_agent_relays.py): the real relays
of nodeagent/agent (outbound, inbound, tunnel_inbound, tunnel_outbound) wired as
datapath.py wires them, real metrics, telemetry, policies and workload certificates from
a real mesh CA, with stand-ins only for what needs the kernel or Envoy.

Pods have 127.77.0.x addresses (every 127/8 address is local on lo), so a pod's app, its
HBONE listener and a client bound to its IP are plain loopback sockets, and every
address a relay reads (peer, local, the endpoint it dials) is the pod's own. In-pod
listeners are the agent's own InPodListener on such sockets. The stand-ins:
- `OriginalDestinations` for the capture maps' `pop_original_dst`: the test records
  what a client port asked for, before it connects, as the kernel does at connect
  (`origdst_map=True`: a real BPF map of the capture's layout, `KernelOriginalDestinations`,
  which needs root, so the native HBONE engine accepts on the outbound listener and reads
  it itself, as the agent runs it: source_routes.py);
- `PodSockets` for inpod.upstream and inpod.transparent_upstream, which enter the pod's
  netns (setns, SO_MARK and IP_TRANSPARENT need root): a socket bound to the pod's IP,
  which a socket in its netns would get, or for delivery to the client's IP, as
  IP_TRANSPARENT allows; each call is recorded (netns, mark, source);
- `Envoy` for the node's Waypoint (agent/waypoint/): the steering it ACKed, and its
  listeners as socket pairs whose far end the test reads, or refused when `down`;
- `App.take()` for sk_lookup: the connection waiting on the app's listener goes to
  the agent's inbound relay, as steering would hand it, with the app's address as its
  local (original destination) address.
The bytes move by the engine a test names (`engine`: python, native, or native-hbone
with the native HBONE engine carrying HBONE too; engines.py), so every relay test runs
against each.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from engines import hbone_engine, splicer
from origdst_map import KernelOriginalDestinations
from identity_fixtures import ManualClock, make_ca
from nodeagent.agent.inpod import sockets as inpod
from nodeagent.agent.proxy.admission import InboundConnections
from nodeagent.agent.proxy.identities import WorkloadIdentities
from nodeagent.agent.proxy.delivery import Delivery
from nodeagent.agent.proxy.hbone_native import HboneEngines
from nodeagent.agent.proxy.inbound import InboundRelay
from nodeagent.agent.proxy.inputs import ProxyInputs
from nodeagent.agent.inpod.sockets import InPodListener, PodContext
from nodeagent.agent.metrics import AgentMetrics
from nodeagent.agent.proxy.outbound import OutboundRelay, Passthrough
from nodeagent.agent.proxy.policies import PolicyState
from nodeagent.agent.proxy.telemetry import FlowLog, Telemetry, TrafficMetrics
from nodeagent.agent.proxy.tunnel_inbound import TunnelInbound
from nodeagent.memory import MemoryGuard
from nodeagent.agent.proxy.tunnel_outbound import HboneRoute
from nodeagent.agent.waypoint.waypoint import WaypointUnavailable
from nodeagent.identity import pemfiles
from nodeagent.identity.spiffe import Identity
from nodeagent.identity.workload.manager import IdentityManager
from nodeagent.kube.objects import parse_documents
from nodeagent.model import Model
from nodeagent.tunnel import HbonePool, TunnelMetrics, TunnelSettings, tls
from nodeagent.xds import dataplane
from nodeagent.xds.dataplane import DataPlane, HandOffs, ProxyHeader, Sockets

LOG = logging.getLogger("test.relays")
TD = "cluster.local"
NODE = "node1"  # every pod's, and the agent's
MARK, DELIVERY_MARK = 0x539, 0x1539
ADMIN_PORT = 15020
TIMEOUT = 5.0  # the relays' connect timeout
CLIENT, SERVER, OTHER, BROKEN, LEGACY, OUTSIDE = (f"127.77.0.{n}" for n in (20, 10, 11, 12, 30, 99))
SERVICE, EMPTY_SERVICE = ("10.96.0.10", 80), ("10.96.0.11", 80)
SERVER_V6 = "fd00:77::10"  # the server pod's other address (dual-stack): never carried by the mesh
# (namespace, name, IP, service account, app label); mesh is ambient, plain is not.
PODS = [("mesh", "sleep", CLIENT, "sleep", "sleep"), ("mesh", "httpbin", SERVER, "httpbin", "httpbin"),
        ("mesh", "other", OTHER, "other", "other"), ("mesh", "broken", BROKEN, "Not_A_Name", "broken"),
        ("plain", "legacy", LEGACY, "legacy", "legacy")]
ENROLLED = (CLIENT, SERVER)  # the meshed pods of this node the agent serves


def principal(namespace: str, service_account: str) -> str:
    return f"spiffe://{TD}/ns/{namespace}/sa/{service_account}"


def sleep_to_httpbin(reporter: str, service: str | None = "httpbin", **given: str) -> dict[str, str]:
    """Istio's TCP metric labels of a connection from sleep to httpbin reported by
    `reporter`, through Service `service` of mesh (None: none known); `given` overrides."""
    labels = {"reporter": reporter, "request_protocol": "tcp", "connection_security_policy": "mutual_tls",
              "response_flags": "-",
              "destination_service": f"{service}.mesh.svc.cluster.local" if service else "unknown",
              "destination_service_name": service or "unknown",
              "destination_service_namespace": "mesh" if service else "unknown"}
    for side, name in (("source", "sleep"), ("destination", "httpbin")):
        labels.update({f"{side}_workload": name, f"{side}_workload_namespace": "mesh",
                       f"{side}_principal": principal("mesh", name), f"{side}_app": name, f"{side}_version": "unknown",
                       f"{side}_canonical_service": name, f"{side}_canonical_revision": "latest"})
    return {**labels, **given}


def cluster(app_port: int, extra_yaml: str = "") -> Model:
    """The model: the pods, Service mesh/httpbin (SERVICE, port 80 -> the app's port) and
    mesh/nobody (EMPTY_SERVICE, selecting no pod), and `extra_yaml` (policies)."""
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}
            for ns, labels in (("mesh", {"istio.io/dataplane-mode": "ambient"}), ("plain", {}),
                               ("istio-system", {}))]
    docs += [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
              "spec": {"serviceAccountName": sa, "nodeName": NODE},
              "status": {"podIP": ip, "phase": "Running",
                         **({"podIPs": [{"ip": ip}, {"ip": SERVER_V6}]} if ip == SERVER else {})}}
             for ns, name, ip, sa, app in PODS]
    docs += [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "mesh"},
              "spec": {"clusterIP": ip, "selector": {"app": app},
                       "ports": [{"port": port, "targetPort": target}]}}
             for name, (ip, port), app, target in (("httpbin", SERVICE, "httpbin", app_port),
                                                   ("nobody", EMPTY_SERVICE, "nobody", 8080))]
    text = yaml.safe_dump_all(docs) + "---\n" + extra_yaml
    return Model.build(parse_documents(text, "cluster.yaml"))



class KeptOpen(io.StringIO):
    """The flow log's stream, readable after the world closed its FlowLog."""

    def close(self) -> None:
        pass

class OriginalDestinations:
    """Stand-in for the capture maps' lookup: what each client port asked for."""

    def __init__(self):
        self.recorded: dict[tuple[int, int, int], tuple[str, int]] = {}

    def record(self, cookie: int, family: int, client_port: int, dst: tuple[str, int]) -> None:
        self.recorded[(cookie, family, client_port)] = dst

    def pop_original_dst(self, cookie: int, family: int, client_port: int) -> tuple[str, int] | None:
        return self.recorded.pop((cookie, family, client_port), None)


class PodSockets:
    """Stand-in for inpod.upstream / inpod.transparent_upstream: loopback sockets bound
    as the pod netns would have them; `asked` records each call."""

    def __init__(self, ip_of_netns: dict[int, str]):
        self.ip_of_netns = ip_of_netns
        self.asked: list[tuple] = []

    def upstream(self, netns_fd: int, family: int, mark: int) -> socket.socket:
        self.asked.append(("upstream", netns_fd, mark))
        return _bound(family, self.ip_of_netns[netns_fd])

    def transparent_upstream(self, ctx: inpod.PodContext, mark: int, source_ip: str, avoid_port: int) -> socket.socket:
        self.asked.append(("transparent", ctx.netns_fd, mark, source_ip))
        while True:  # as inpod does: never the client's own port
            sock = _bound(inpod.family_of(source_ip), source_ip)
            if sock.getsockname()[1] != avoid_port:
                return sock
            sock.close()


    def transparent_upstreams(self, ctx: inpod.PodContext, mark: int, source_ip: str, avoid_port: int,
                              count: int, verify: bool = False) -> list[socket.socket]:
        return [self.transparent_upstream(ctx, mark, source_ip, avoid_port) for _ in range(count)]


def _bound(family: int, ip: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((ip, 0))
    return sock


@dataclass
class Envoy:
    """Stand-in for the node's Waypoint: the steering it ACKed (`outbound`: service
    VIP:ports; `inbound`: pod IP:port -> filter chain digest) and `open`, which writes
    the PROXY header on our end of a socket pair and keeps the far end in `accepted`;
    refused as the real one when `down`."""

    outbound: set[tuple[str, int]] = field(default_factory=set)
    inbound: dict[tuple[str, int], str] = field(default_factory=dict)
    # one waypoint per request: what the outbound chains enforce, what the inbound ones may
    enforced: dict[tuple[str, int], dict[tuple[str, int], str]] = field(default_factory=dict)
    enforceable: dict[tuple[str, int], str] = field(default_factory=dict)
    down: bool = False
    accepted: list[tuple[str, socket.socket]] = field(default_factory=list)

    handoffs: HandOffs = field(default_factory=HandOffs)

    def dataplane(self) -> DataPlane:
        return DataPlane(Sockets("/nonexistent"), frozenset(self.outbound), dict(self.inbound), dict(self.enforced),
                         dict(self.enforceable))

    def expecting(self, kind: str, header: ProxyHeader):
        return self.handoffs.expecting(kind, header)

    async def open(self, kind: str, header: ProxyHeader) -> socket.socket:
        if self.down:
            raise WaypointUnavailable(f"waypoint {kind} listener: Connection refused",
                                      "is Envoy running? see nodeagent status")
        ours, theirs = socket.socketpair()
        ours.sendall(header.encode())
        self.accepted.append((kind, theirs))
        return ours

    def close(self) -> None:
        for _, sock in self.accepted:
            sock.close()


class App:
    """The server pod's app on `ip`: greets each connection with the client's address as
    it sees it ("127.77.0.20:41234\\n"), then echoes until EOF."""

    def __init__(self, ip: str):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((ip, 0))
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.peers: list[tuple[str, int]] = []
        self.server: asyncio.AbstractServer | None = None

    async def take(self) -> socket.socket:
        """The next connection to the app's address, for the agent (as sk_lookup steers it)."""
        sock, _ = await asyncio.get_running_loop().sock_accept(self.listener)
        return sock

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, sock=self.listener)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[:2]
        self.peers.append(peer)
        try:
            writer.write(f"{peer[0]}:{peer[1]}\n".encode())
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        self.listener.close()


class SigningCa:
    """Stand-in for the CA client: every CSR signed by a real CA."""

    def __init__(self):
        self.ca = make_ca(clock=time.time)

    async def create_certificate(self, csr_pem, identity, ttl=None):
        return [pemfiles.certs_pem([cert]).decode() for cert in self.ca.sign(self.ca.read_csr(csr_pem), ttl)]

    async def close(self):
        pass


def listening(ip: str, port: int = 0, avoid=frozenset()) -> socket.socket:
    """A listener on `ip`; with port 0 one whose port is none of `avoid`: the kernel may
    give a port in use on another loopback address, and the relays tell the agent's own
    ports by number, as on a node (15001, 15006, 15008)."""
    for _ in range(100):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        if port or sock.getsockname()[1] not in avoid:
            sock.listen(64)
            sock.setblocking(False)
            return sock
        sock.close()
    raise AssertionError(f"no port on {ip} outside {sorted(avoid)}")


class World:
    """The node: enrolled pods sleep (CLIENT) and httpbin (SERVER), the app of httpbin,
    the agent's listeners (outbound for sleep, HBONE and plaintext inbound for httpbin)
    and every relay. `ca=False`: an agent without a mesh CA; `engine`: which engine
    moves the bytes (engines.py)."""

    def __init__(self, tmp_path: Path, monkeypatch, *, ca: bool = True, engine: str = "python",
                 tunnel: TunnelSettings = TunnelSettings(), memory: MemoryGuard | None = None,
                 origdst_map: bool = False, in_engine: bool = True):
        self.tmp_path = tmp_path
        self.monkeypatch = monkeypatch
        self.ca = ca
        self.engine = engine
        self.tunnel_settings = tunnel  # the agent's HBONE server (both engines)
        self.memory = memory or MemoryGuard(None, LOG)  # the agent's memory limit (nodeagent/memory.py): none by default
        self.origdst_map = origdst_map  # a real BPF map of original destinations (root): the engine accepts
        self.in_engine = in_engine  # setting outbound_in_engine

    async def __aenter__(self) -> "World":
        self._closers: list = []
        try:
            await self._build()
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def _build(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics, tunnel_metrics = AgentMetrics(self.registry), TunnelMetrics(self.registry)
        self.flow_lines = KeptOpen()
        self.flow_log = FlowLog(self.flow_lines, LOG)
        self._closers.append(self.flow_log.close)  # first in, so closed last: its writer thread ends
        self.telemetry = Telemetry(TrafficMetrics(self.registry), self.flow_log)
        self.app = App(SERVER)
        self._closers.append(self.app.close)
        self.tunnel_listener = listening(SERVER)
        self.tunnel_port = self.tunnel_listener.getsockname()[1]
        self.inbound_listener = listening(SERVER)  # the agent's plaintext port (15006 in a pod)
        self.outbound_listener = listening("127.0.0.1", avoid={self.app.address[1]})  # the client pod's :15001
        self.agent_ports = frozenset({self.outbound_listener.getsockname()[1], self.inbound_listener.getsockname()[1],
                                      self.tunnel_port, ADMIN_PORT})
        self.model = cluster(self.app.address[1])
        self.policies = PolicyState("istio-system", LOG)
        self.policies.update(self.model)
        self.identities = WorkloadIdentities(TD, self._identity_manager(), LOG, node=NODE)
        self._closers.append(self.identities.close)
        # Fake netns fds (only PodSockets reads them) and cookies, one per enrolled pod.
        self.enrolled = {ip: PodContext(self.model.pod_by_ip(ip), netns_fd=1000 + i, cookie=7000 + i)
                         for i, ip in enumerate(ENROLLED)}
        self.contexts = list(self.enrolled.values())  # a test may remove a pod from `enrolled`
        self.sockets = PodSockets({ctx.netns_fd: ip for ip, ctx in self.enrolled.items()})
        self.monkeypatch.setattr(inpod, "upstream", self.sockets.upstream)
        self.monkeypatch.setattr(inpod, "transparent_upstream", self.sockets.transparent_upstream)
        self.monkeypatch.setattr(inpod, "transparent_upstreams", self.sockets.transparent_upstreams)
        self.capture = KernelOriginalDestinations() if self.origdst_map else OriginalDestinations()
        if self.origdst_map:
            self._closers.append(self.capture.close)
        engine = splicer(self.engine)
        self.splicer = await engine.__aenter__()
        self._closers.append(lambda: engine.__aexit__(None, None, None))
        self.hbone_engines = HboneEngines(hbone_engine(self.engine), LOG, self.tunnel_settings)
        await self.hbone_engines.start()
        self._closers.append(self.hbone_engines.close)  # after the pools and the tunnel listener
        self._wire(tunnel_metrics)

    def _identity_manager(self) -> IdentityManager | None:
        if not self.ca:
            return None
        signer = SigningCa()
        return IdentityManager(signer, ManualClock(time.time()), signer.ca.root_pem, self.registry, LOG,
                               runtime_dir=self.tmp_path / "identity")

    def _wire(self, tunnel_metrics: TunnelMetrics) -> None:
        """As datapath.DataPath wires them: one ProxyInputs for every relay. The node's
        waypoint is `envoy`, which steers nothing until a test has it ACK (`envoy_acks`)."""
        pod_at = self.enrolled.get
        self.envoy = Envoy()
        self._closers.append(self.envoy.close)
        self.connections = InboundConnections(lambda: self.policies.current, pod_at, self.envoy, self.registry, LOG)
        inputs = ProxyInputs(model=lambda: self.model, pod_at=pod_at, policies=self.policies,
                             identities=self.identities, telemetry=self.telemetry, connections=self.connections,
                             waypoint=self.envoy, metrics=self.metrics, agent_ports=self.agent_ports,
                             splicer=self.splicer, memory=self.memory)
        self.hbone = HboneRoute(self.identities, tunnel_metrics, LOG, mark=MARK, port=self.tunnel_port,
                                engines=self.hbone_engines, settings=self.tunnel_settings)
        self._closers.append(self.hbone.close)
        self.outbound = OutboundRelay(inputs, self.capture, LOG, passthrough=Passthrough(MARK, TIMEOUT),
                                      hbone=self.hbone, in_engine=self.in_engine)
        self.connections.changing.append(self.outbound.routes.invalidate)  # as datapath.DataPath wires it
        self.memory.tightening.append(self.outbound.routes.invalidate)
        self.delivery = Delivery(DELIVERY_MARK, TIMEOUT)
        self.inbound = InboundRelay(inputs, LOG, delivery=self.delivery)
        self.tunnel = TunnelInbound(inputs, self.delivery, tunnel_metrics, LOG, engines=self.hbone_engines,
                                    settings=self.tunnel_settings)
        self._closers.append(self.tunnel.close)
        client, server = self.enrolled[CLIENT], self.enrolled[SERVER]
        self._listen(self.outbound_listener, client, "outbound", self.outbound.handle, self.outbound.offload)
        self._listen(self.tunnel_listener, server, "tunnel", self.tunnel.handle)  # lives as long as the connection
        self._listen(self.inbound_listener, server, "inbound", self.inbound.handle)

    def _listen(self, sock: socket.socket, ctx: PodContext, direction: str, handler, offload=None) -> InPodListener:
        listener = InPodListener(sock, ctx, direction, handler, LOG, offload=offload)
        listener.start()
        self._closers.append(listener.close)
        return listener

    def envoy_acks(self, outbound=(), inbound=None, down: bool = False, enforced=None, enforceable=None) -> Envoy:
        """The node's Envoy ACKed this steering (service VIP:ports; pod IP:port → filter
        chain digest; what the outbound chains enforce, the digests the inbound ones may
        take) and is up, or `down`: the relays steer by it from now on."""
        self.envoy.outbound, self.envoy.inbound, self.envoy.down = set(outbound), dict(inbound or {}), down
        self.envoy.enforced, self.envoy.enforceable = dict(enforced or {}), dict(enforceable or {})
        return self.envoy

    async def serve(self, ip: str) -> App:
        """Another app, on `ip` (a pod the agent does not serve, or outside the mesh)."""
        app = App(ip)
        self._closers.append(app.close)
        await app.start()
        return app

    def apply(self, policies_yaml: str) -> None:
        """A new model with these policies (as the agent's reconcile does)."""
        self.model = cluster(self.app.address[1], policies_yaml)
        self.policies.update(self.model)

    def steer(self) -> tuple[str, int]:
        """A port of the server pod steered to the agent's plaintext relay, as sk_lookup
        does (a listener handing its connections to inbound.handle); its address."""
        sock = listening(SERVER, avoid=self.agent_ports)
        self._listen(sock, self.enrolled[SERVER], "inbound", self.inbound.handle)
        return sock.getsockname()

    def handle(self, ctx: PodContext, direction: str, coro) -> asyncio.Task:
        """Run a relay handler as InPodListener does: a task tracked by the pod."""
        task = asyncio.get_running_loop().create_task(coro)
        ctx.track(direction, task)
        return task

    async def __aexit__(self, *exc) -> None:
        errors = []
        for close in reversed(self._closers):  # every one, also after one failed
            try:
                result = close()
                if asyncio.iscoroutine(result):
                    await result
            except Exception as error:
                errors.append(error)
        tasks = [t for ctx in getattr(self, "contexts", ()) for bucket in ctx.tasks.values() for t in bucket]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        body_failed = bool(exc) and exc[0] is not None
        if errors and not body_failed:  # else the body's error is the one to see
            raise errors[0]

    # --- what a test reads --------------------------------------------------------
    async def settled(self, flows: int, timeout: float = 10.0) -> None:
        """Wait until the relays of the enrolled pods have ended (HBONE connections may
        stay) and the flow log has `flows` lines."""
        deadline = time.monotonic() + timeout
        while len(self.flows()) != flows or any(
                bucket for ctx in self.contexts for kind, bucket in ctx.tasks.items() if kind != "tunnel"):
            if time.monotonic() > deadline:
                raise AssertionError(f"relays still running, or {len(self.flows())} flows, not {flows}, "
                                     f"after {timeout}s")
            await asyncio.sleep(0.002)

    def failures(self) -> dict[tuple[str, str], float]:
        """(direction, reason) -> count of nodeagent_connection_failures_total."""
        return self._by_labels("nodeagent_connection_failures_total", "direction", "reason")

    def stream_refusals(self) -> dict[tuple[str, str], float]:
        """(direction, reason) -> count of nodeagent_hbone_streams_refused_total."""
        return self._by_labels("nodeagent_hbone_streams_refused_total", "direction", "reason")

    def _by_labels(self, name: str, *labels: str) -> dict[tuple, float]:
        return {tuple(s.labels[k] for k in labels): s.value for family in self.registry.collect()
                for s in family.samples if s.name == name}

    def value(self, name: str, **labels) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def flows(self) -> list[dict]:
        """The flow lines logged so far (what the log's writer thread has not written yet too)."""
        self.flow_log.flush()
        return [json.loads(line) for line in self.flow_lines.getvalue().splitlines()]

    # --- clients --------------------------------------------------------------------
    async def dial_out(self, dst: tuple[str, int], ip: str = CLIENT):
        """The client pod's app connecting to `dst`, captured to the outbound listener
        (the capture records the original destination at connect)."""
        ctx = self.enrolled[ip]
        sock = _bound(socket.AF_INET, ip)
        self.capture.record(ctx.cookie, socket.AF_INET, sock.getsockname()[1], dst)
        await asyncio.get_running_loop().sock_connect(sock, self.outbound_listener.getsockname())
        return await asyncio.open_connection(sock=sock)

    async def dial(self, ip: str, dst: tuple[str, int]):
        """A plain connection from `ip` to `dst` (reader, writer)."""
        sock = _bound(socket.AF_INET, ip)
        await asyncio.get_running_loop().sock_connect(sock, dst)
        return await asyncio.open_connection(sock=sock)

    async def hbone_client(self, certificate_of: str = CLIENT, identity: Identity | None = None,
                           source: str = CLIENT) -> HbonePool:
        """An HBONE pool from `source`'s address with the valid certificate of the pod at
        `certificate_of` (what a compromised workload holds), or of `identity`: it can aim
        streams anywhere. Open streams with `open_stream`."""
        identity = identity or self.identities.of(self.model.pod_by_ip(certificate_of))
        await self.identities.ready(identity)
        pool = HbonePool(lambda _ip, _port: _bound(socket.AF_INET, source),
                         lambda _uri: self.identities.context(identity, server_side=False),
                         tls.verifier(TD), metrics=TunnelMetrics(CollectorRegistry()), log=LOG)
        self._closers.append(pool.close)
        return pool

    async def open_stream(self, pool: HbonePool, authority: tuple[str, int], headers=()):
        """A CONNECT to `authority` through the server pod's HBONE port."""
        reader, _ = await pool.open_stream("source", principal("mesh", "httpbin"), (SERVER, self.tunnel_port),
                                           authority, headers)
        return reader


async def ended(reader: asyncio.StreamReader, timeout: float = 10.0) -> str:
    """How the connection ended once the rest is read: 'reset' or 'eof' (an assertion
    error if it has not ended within `timeout` seconds)."""
    async def rest() -> str:
        try:
            while await reader.read(65536):
                pass
        except ConnectionResetError:
            return "reset"
        return "eof"
    try:
        return await asyncio.wait_for(rest(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"the connection did not end within {timeout}s") from None


def header_of(sock: socket.socket) -> ProxyHeader:
    """The PROXY header the agent wrote on a connection to Envoy (blocking read)."""
    sock.settimeout(TIMEOUT)
    return dataplane.read_header(sock)
