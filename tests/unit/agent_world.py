"""An agent on a loopback node for the daemon tests (test_agent_daemon.py): the real
`Agent` of nodeagent/agent/daemon.py, configured by a real AgentConfig (config.load),
reading a real `files` source directory (woken by real inotify), serving its real admin
endpoints on a unix socket, with its real DataPath, enrolment and relays, and, when a
test asks for one, a real mesh CA over gRPC. Stand-ins only for what needs the kernel
or root:

- `CaptureMaps` for capture.loader.CaptureLoader (bcc programs, pinned maps): the maps
  as dicts, every call recorded in order, cookies "left by a previous agent" given;
- `PodProcesses` for podns.PodNetnsResolver (a /proc scan): a pod is found once the
  test `start`s it; its "netns fd" is an open file of its own, so the stand-ins below
  can tell the pods apart by inode whatever fd number the enroller dups it to;
- `PodKernel` (installed with monkeypatch) for what enters a pod's netns: setns
  (netns.entered), the pod's delivery routing (podrouting, netlink), and the marked or
  IP_TRANSPARENT sockets of inpod.upstream / transparent_upstream. Pods have 127.78.0.x
  addresses (every 127/8 address is local on lo), and a pod's in-pod listeners bind its
  own address: 127.0.0.1 and 0.0.0.0 in the pod are the pod's IP here, and ::1 is absent
  (as in a pod without IPv6).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from nodeagent import netns
from nodeagent.agent import config as agent_config
from nodeagent.agent.inpod import podrouting
from nodeagent.agent.inpod import sockets as inpod
from nodeagent.admin import fetch, fetch_status
from nodeagent.agent.config import AgentConfig
from nodeagent.agent.daemon import Agent
from nodeagent.agent.inpod.sockets import ListenSpec
from nodeagent.agent.inpod.podns import PodNetns, PodNotFound
from nodeagent.identity.ca import server as ca_server
from nodeagent.identity.ca.config import CaConfig
from nodeagent.netns import NetnsError
from nodeagent.sources.files import FilesSource

LOG = logging.getLogger("test.agent")
NODE = "node1"
TD = "cluster.local"
CA_SERVER_NAME = "nodeagent-ca.istio-system.svc"
CA_TOKEN = "node1-" + "1" * 26
CLIENT, SERVER, LEGACY, ELSEWHERE = (f"127.78.0.{n}" for n in (20, 10, 30, 40))
WAIT = 20.0  # seconds a test waits for the agent to get somewhere before it fails


_handed_out: set[int] = set()
_ports = random.Random()


def free_port() -> int:
    """A port nothing listens on now, below the ephemeral range (so no connect or
    listen(port 0) of a concurrent process takes it before the test binds it), never
    the same twice in this process (an agent's ports must differ)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = _ports.randrange(max(1024, low - 12000), low)
        if port in _handed_out:
            continue
        try:
            with socket.socket() as s:
                s.bind(("0.0.0.0", port))
        except OSError:
            continue
        _handed_out.add(port)
        return port


# --- cluster state -------------------------------------------------------------------
@dataclass(frozen=True)
class PodSpec:
    namespace: str
    name: str
    ip: str
    service_account: str = "default"
    node: str = NODE
    phase: str = "Running"
    labels: dict = field(default_factory=dict)
    annotations: dict = field(default_factory=dict)

    def but(self, **changes) -> "PodSpec":
        return PodSpec(**{**self.__dict__, **changes})

    @property
    def uid(self) -> str:
        return f"uid-{self.namespace}-{self.name}"

    def document(self) -> dict:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid,
                             "labels": {"app": self.name, **self.labels}, "annotations": dict(self.annotations)},
                "spec": {"serviceAccountName": self.service_account, "nodeName": self.node},
                "status": {"podIP": self.ip, "phase": self.phase}}


SLEEP = PodSpec("mesh", "sleep", CLIENT, "sleep")
HTTPBIN = PodSpec("mesh", "httpbin", SERVER, "httpbin")
LEGACY_POD = PodSpec("plain", "legacy", LEGACY, "legacy")  # not in the mesh
REMOTE = PodSpec("mesh", "remote", ELSEWHERE, "remote", node="node2")  # meshed, another node's


def namespaces() -> list[dict]:
    return [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}
            for ns, labels in (("mesh", {"istio.io/dataplane-mode": "ambient"}), ("plain", {}),
                               ("istio-system", {}))]


def write(path: Path, text: str) -> None:
    """Replace `path` at once (a hidden temporary file renamed over it), so the agent
    never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def write_docs(path: Path, docs: list[dict]) -> None:
    write(path, yaml.safe_dump_all(docs))


# --- capture and pod netns stand-ins -------------------------------------------------
class CaptureMaps:
    """Stand-in for capture.loader.CaptureLoader: the netns cookies enrolled (with their
    excluded outbound ports), the steered pod IPs, and `calls`, every call in order."""

    def __init__(self, left: dict[int, list[int]] | None = None):
        self.pods: dict[int, list[int]] = dict(left or {})  # what a previous agent left pinned
        self.steered: dict[str, int] = {}  # pod IP -> netns cookie
        self.refused: dict[str, int] = {}  # pod IP -> netns cookie: enrolled without a listener (dropped)
        self.original: dict[tuple[int, int, int], tuple[str, int]] = {}
        self.calls: list[tuple] = []
        self.stats_error: Exception | None = None
        self.failing: dict[str, Exception] = {}  # call name -> what it raises (recorded first) until removed

    def load(self) -> None:
        self.calls.append(("load",))

    def close(self, keep: bool = False) -> None:
        self.calls.append(("close", keep))

    def enrol_netns(self, netns_cookie: int, exclude_outbound_ports=()) -> None:
        self.calls.append(("enrol_netns", netns_cookie, list(exclude_outbound_ports)))
        self.pods[netns_cookie] = list(exclude_outbound_ports)

    def remove_netns(self, netns_cookie: int) -> None:
        self.calls.append(("remove_netns", netns_cookie))
        self.pods.pop(netns_cookie, None)

    def enrolled_netns(self) -> set[int]:
        self.calls.append(("enrolled_netns",))
        return set(self.pods)

    def steer_inbound(self, netns_fd: int, netns_cookie: int, pod_ips, listener: socket.socket,
                      exclude_ports=()) -> None:
        ips = list(pod_ips)
        self.calls.append(("steer_inbound", netns_cookie, ips, listener.getsockname()[:2], list(exclude_ports)))
        if "steer_inbound" in self.failing:
            raise self.failing["steer_inbound"]
        self.steered.update((ip, netns_cookie) for ip in ips)
        for ip in ips:
            self.refused.pop(ip, None)

    def refuse_inbound(self, netns_fd: int, netns_cookie: int, pod_ips, exclude_ports=()) -> None:
        ips = list(pod_ips)
        self.calls.append(("refuse_inbound", netns_cookie, ips, list(exclude_ports)))
        if "refuse_inbound" in self.failing:
            raise self.failing["refuse_inbound"]
        for ip in ips:
            self.steered.pop(ip, None)
            self.refused[ip] = netns_cookie

    def unsteer_inbound(self, netns_cookie: int, pod_ips) -> None:
        ips = list(pod_ips)
        self.calls.append(("unsteer_inbound", netns_cookie, ips))
        for ip in ips:
            self.steered.pop(ip, None)
            self.refused.pop(ip, None)

    def record_original_dst(self, cookie: int, client_port: int, dst: tuple[str, int]) -> None:
        """What the connect program records when a pod's app connects to `dst`."""
        self.original[(cookie, socket.AF_INET, client_port)] = dst

    def pop_original_dst(self, netns_cookie: int, family: int, client_port: int) -> tuple[str, int] | None:
        return self.original.pop((netns_cookie, family, client_port), None)

    def stats(self) -> dict:
        if self.stats_error is not None:
            raise self.stats_error
        return {"pods": len(self.pods), "steered": len(self.steered)}

    def named(self, *names: str) -> list[tuple]:
        """The calls of these names, in order."""
        return [c for c in self.calls if c[0] in names]


class PodProcesses:
    """Stand-in for podns.PodNetnsResolver: a pod's netns is found once `start`ed."""

    def __init__(self, directory: Path):
        self.directory = directory  # one file per started pod: its "netns"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.started: dict[str, tuple[str, int]] = {}  # uid -> (ip, cookie)
        self.ip_of_inode: dict[int, str] = {}
        self._open: dict[str, PodNetns] = {}
        self.asked: list[list[str]] = []
        self.fail_next: Exception | None = None  # raised by the next resolve_many (a bug)

    def start(self, pod: PodSpec, cookie: int) -> None:
        self.started[pod.uid] = (pod.ip, cookie)

    def resolve_many(self, uids, ips=None) -> dict[str, PodNetns | NetnsError]:
        uids = list(uids)
        self.asked.append(uids)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return {uid: self._resolve(uid) for uid in uids}

    def _resolve(self, uid: str) -> PodNetns | NetnsError:
        if uid not in self.started:
            return PodNotFound(f"no process of pod {uid} in /proc/*/cgroup",
                               "the pod has not started yet or is gone; retrying")
        if uid not in self._open:
            ip, cookie = self.started[uid]
            path = self.directory / uid  # netns_file
            path.touch()
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            self.ip_of_inode[os.fstat(fd).st_ino] = ip
            self._open[uid] = PodNetns(uid, pid=4000 + len(self._open), fd=fd, cookie=cookie,
                                       inode=os.fstat(fd).st_ino)
        return self._open[uid]

    def netns_file(self, pod: PodSpec) -> Path:
        return self.directory / pod.uid

    def ip_of(self, netns_fd: int) -> str:
        return self.ip_of_inode[os.fstat(netns_fd).st_ino]

    def forget(self, uid: str) -> None:
        entry = self._open.pop(uid, None)
        if entry is not None:
            entry.close()

    def close(self) -> None:
        for uid in list(self._open):
            self.forget(uid)


class PodKernel:
    """Stand-ins for entering a pod's netns (see the module's docstring); `routing`
    records the delivery routing installed and removed, as (action, pod IP)."""

    def __init__(self, pods: PodProcesses, monkeypatch):
        self.pods = pods
        self.routing: list[tuple[str, str]] = []
        self._listeners = inpod.listeners
        monkeypatch.setattr(netns, "entered", self._entered)
        monkeypatch.setattr(inpod, "listeners", self.listeners)
        monkeypatch.setattr(podrouting, "install", lambda fd, spec: self.routing.append(("install", pods.ip_of(fd))))
        monkeypatch.setattr(podrouting, "remove", lambda fd, spec: self.routing.append(("remove", pods.ip_of(fd))))
        monkeypatch.setattr(inpod, "upstream", self.upstream)
        monkeypatch.setattr(inpod, "transparent_upstream", self.transparent_upstream)
        monkeypatch.setattr(inpod, "transparent_upstreams", self.transparent_upstreams)

    @contextlib.contextmanager
    def _entered(self, target):
        self.pods.ip_of(target)  # only pods' netns are entered
        yield

    def listeners(self, netns_fd: int, specs: list[ListenSpec]) -> list[socket.socket | None]:
        ip = self.pods.ip_of(netns_fd)
        mine = [ListenSpec(ip if s.host in ("127.0.0.1", "0.0.0.0") else s.host, s.port, s.freebind, s.optional)
                for s in specs if s.host != "::1"]
        made = iter(self._listeners(netns_fd, mine))
        return [None if s.host == "::1" else next(made) for s in specs]

    def upstream(self, netns_fd: int, family: int, mark: int) -> socket.socket:
        return bound(self.pods.ip_of(netns_fd))

    def transparent_upstream(self, ctx: inpod.PodContext, mark: int, source_ip: str, avoid_port: int) -> socket.socket:
        self.pods.ip_of(ctx.netns_fd)
        while True:
            sock = bound(source_ip)
            if sock.getsockname()[1] != avoid_port:
                return sock
            sock.close()


    def transparent_upstreams(self, ctx: inpod.PodContext, mark: int, source_ip: str, avoid_port: int,
                              count: int, verify: bool = False) -> list[socket.socket]:
        return [self.transparent_upstream(ctx, mark, source_ip, avoid_port) for _ in range(count)]


def bound(ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((ip, 0))
    return sock


# --- a mesh CA -----------------------------------------------------------------------
class MeshCa:
    """The real CA (as `nodeagent ca` builds it) reading the same cluster directory as the
    agent, to listen on `port` once `start`ed; `settings` are what an agent needs for it."""

    def __init__(self, tmp_path: Path, cluster: Path):
        (tmp_path / "tokens.yaml").write_text(yaml.safe_dump({NODE: CA_TOKEN}))
        self.port = free_port()
        cfg = CaConfig(listen=("127.0.0.1", self.port), trust_domain=TD, state_dir=tmp_path / "ca",
                       tokens=tmp_path / "tokens.yaml", source=f"files:{cluster}", source_dir=cluster,
                       cert_ttl=dt.timedelta(hours=24), namespace="istio-system", server_names=(CA_SERVER_NAME,),
                       metrics_address=None)
        self.server = ca_server.build(cfg, CollectorRegistry(), LOG.getChild("ca"))
        self.started = False
        (tmp_path / "node-token").write_text(CA_TOKEN + "\n")
        self.settings = {"ca_address": f"127.0.0.1:{self.port}", "ca_root_cert": str(tmp_path / "ca" / "root-cert.pem"),
                         "ca_token_file": str(tmp_path / "node-token"), "ca_server_name": CA_SERVER_NAME}

    def start(self) -> None:
        self.server.start()
        self.started = True

    def stop(self) -> None:
        if self.started:
            self.server.stop(grace=0)


# --- the agent -----------------------------------------------------------------------
def load_config(tmp_path: Path, cluster: Path, **settings: Any) -> AgentConfig:
    """A real AgentConfig: everything under tmp_path, no waypoint, no CA, free ports,
    polling fast when it polls; `settings` override (as flags would)."""
    (tmp_path / "cgroup").mkdir(exist_ok=True)
    given = {"node": NODE, "source": f"files:{cluster}", "cgroup": str(tmp_path / "cgroup"),
             "bpffs": str(tmp_path / "bpffs"), "admin_socket": str(tmp_path / "run" / "agent.sock"),
             "admin_address": f"127.0.0.1:{free_port()}", "outbound_port": free_port(),
             "inbound_port": free_port(), "tunnel_port": free_port(), "poll_interval": "0.02",
             "identity_dir": str(tmp_path / "identity"), "flow_log": str(tmp_path / "flows.jsonl"),
             "waypoint": False, "ca_address": "off"}
    given.update(settings)
    return agent_config.load(given, {})


class CountingSource(FilesSource):
    """The real files source, counting its polls (`polls`), so a test can let rounds pass."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.polls = 0

    def poll(self):
        try:
            return super().poll()
        finally:
            self.polls += 1


class RunningAgent:
    """`Agent.run(stop)` as a task on the test's loop; the test reads it as `nodeagent
    status` does, over the admin socket (in a thread: the agent serves on this loop)."""

    def __init__(self, config: AgentConfig, capture: CaptureMaps, pods: PodProcesses):
        self.config = config
        self.capture = capture
        self.pods = pods
        self.registry = CollectorRegistry()
        self.source = CountingSource(config.source_dir, log=LOG.getChild("source"))
        self.agent = Agent(config, capture=capture, registry=self.registry, log=LOG, source=self.source,
                           resolver=pods)
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "RunningAgent":
        self.task = asyncio.get_running_loop().create_task(self.agent.run(self.stop_event))
        await self.until(lambda: self.config.admin_socket.exists() or self.task.done(), "the admin socket")
        if self.task.done():
            await self.task  # its start-up failure
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(asyncio.shield(self.task), WAIT)

    # --- what the test reads ------------------------------------------------------
    async def status(self) -> dict:
        return await asyncio.to_thread(fetch_status, self.config.admin_socket)

    async def ready(self) -> tuple[int, str]:
        """/healthz/ready: (HTTP status, body)."""
        return await asyncio.to_thread(get, self.config.admin_socket, "/healthz/ready")

    async def metrics(self) -> dict[tuple, float]:
        """/metrics: (name, sorted label items) -> value."""
        text = (await asyncio.to_thread(fetch, self.config.admin_socket, "/metrics")).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    async def until(self, condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    async def until_status(self, condition: Callable[[dict], bool], what: str, timeout: float = WAIT) -> dict:
        """The first status for which `condition` holds."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status()
            if condition(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last status: {status}")
            await asyncio.sleep(0.01)

    async def until_ready(self) -> dict:
        await self.until_status(lambda s: s["ready"], "readiness")
        return await self.status()

    async def until_ready_says(self, condition: Callable[[str], bool], timeout: float = WAIT) -> tuple[int, str]:
        """The first /healthz/ready answer whose body meets `condition`."""
        deadline = time.monotonic() + timeout
        while True:
            code, body = await self.ready()
            if condition(body):
                return code, body
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for readiness to say it; last: {code} {body!r}")
            await asyncio.sleep(0.01)

    async def rounds(self, n: int) -> None:
        """Let `n` more source polls happen."""
        target = self.source.polls + n
        await self.until(lambda: self.source.polls >= target, f"{n} polls")


def get(socket_path: Path, path: str) -> tuple[int, str]:
    """GET over the admin socket: (status, body), whatever the status."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(socket_path))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()
