"""`nodeagent bench mesh`: nodeagent against an Envoy sidecar pair, in one run, on a lab of
its own (brought up and taken down again, also on failure, Ctrl-C or SIGTERM).

Four set-ups carry the same requests from a client pod to the same static app, across
nodes (client on node1, server on node2) and on one node (both on node1); bench/meshlab.py
has the pods and bench/sidecars.py the anchor's configuration:
  direct  the pods of an unmeshed namespace (no agent on the path);
  l4      meshed pods: capture, the agents' HBONE (mTLS) between the nodes, delivery;
  l7      meshed, to a Service with a VirtualService and a pod with an HTTP
          AuthorizationPolicy: the client node's waypoint Envoy routes and enforces the
          server pod's policy (one waypoint per request), the agents either side;
  envoy   the anchor: in the unmeshed pods, a client sidecar Envoy (HTTP connection
          manager) to a server sidecar Envoy over mutual TLS 1.3 with SPIFFE certificates
          from the lab's mesh CA keys, then the app; a tcp_proxy pair for iperf3, and
          one to the app's HTTP port (the L4 anchor: wrk with `Connection: close`
          through it, one mTLS handshake per connection, which the run checks).
Each round measures every set-up once (their order rotates from round to round) with
real load generators in the client pod (bench/loadgen.py): wrk -c1 --latency (p50, p99),
wrk -c16 (requests/s, and the CPU the mesh components used meanwhile: agents and their
waypoint Envoys, or the two sidecars, from /proc), wrk with `Connection: close` at -c1
(p50) and -c16 (new connections/s). One stream's throughput (iperf3) is measured apart:
at the start of each round and placement, every set-up's back to back, so the ratios of
throughput compare runs seconds apart, the machine in one state (after the wrk runs,
its throughput moves by half within a minute, direct's as well). Around each set-up's
runs the agents' and sidecars' own counters are read and the run fails if the traffic
did not take the set-up's path (direct and envoy: not captured; l4: captured, no
waypoint; l7: the client node's waypoint and not the server node's; l7s: the server
node's alone; envoy: requests at the server sidecar's HTTP listener, a stream's TLS 1.3
handshakes on its TCP proxy's). Memory is measured on a second lab: RSS
of each node's agent and waypoint at N meshed pods per node, against N sidecars of the
RSS the anchor's sidecars had after their runs. Figures and ratios:
bench/meshreport.py; chart: bench/chart.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from nodeagent.admin import fetch_requests, fetch_status
from nodeagent.bench import loadgen, meshlab, meshreport, sidecars, usage
from nodeagent.bench.tunnel import left_behind
from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.identity.spiffe import Identity
from nodeagent.kube.objects import parse_documents
from nodeagent.lab import cgroups, lifecycle, processes, teardown, topology
from nodeagent.lab.layout import Layout, check_name
from nodeagent.lab.meshca import TRUST_DOMAIN
from nodeagent.lab.state import StateDir
from nodeagent.xds.envoy import admin_get, find_envoy

NODES = ("node1", "node2")
MAX_ERROR_SHARE = 0.01  # of a run's requests; more and the run's figures mean nothing
LAB_TIMEOUT = 180.0
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    rounds: int = 3
    duration: float = 5.0  # seconds per wrk or iperf3 run
    pods: tuple[int, ...] = (1, 10, 50)  # meshed pods per node for the memory figures
    name: str | None = None
    quick: bool = False  # 1 s runs and warm-ups: for tests

    def check(self) -> None:
        if not 1 <= self.rounds <= 20:
            raise ConfigError("--rounds", f"{self.rounds} is out of range", "1-20")
        if not 1 <= self.duration <= 600:
            raise ConfigError("--duration", f"{self.duration:g} s is out of range", "1-600 seconds per run")
        if not self.pods or any(not 1 <= p <= 120 for p in self.pods):
            raise ConfigError("--pods", f"{','.join(map(str, self.pods)) or 'nothing'} is out of range",
                              "a comma-separated list of 1-120 meshed pods per node, e.g. 1,10,50")

    @property
    def warmup(self) -> float:
        return 1.0 if self.quick else 3.0


def parse_pods(text: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        raise ConfigError("--pods", f"{text!r} is not a comma-separated list of numbers", "e.g. 1,10,50") from None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- processes in pods --------------------------------------------------------------------
JOIN_AND_EXEC = 'echo $$ > "$0" && exec "$@"'  # sh: join the cgroup whose cgroup.procs is $0, become "$@"


class Pods:
    """Run commands in the lab's pods exactly as `nodeagent lab exec` does (pod netns and
    hosts file, pod cgroup, the container's environment) without starting Python each time.
    The cgroup is joined by `sh` before it execs, not by a preexec_fn: Python runs its
    at-fork hooks around a preexec_fn, and a KeyboardInterrupt raised in one of them is only
    printed, so Ctrl-C during a fork was lost. `check` runs after every command (Stop.check)."""

    def __init__(self, layout: Layout, check: Callable[[], None] = lambda: None):
        self.layout, self.check = layout, check
        self.record = StateDir(layout).load()

    def _prepare(self, key: str, command: list[str]) -> tuple[list[str], dict[str, str]]:
        pod = self.record.desired.pods[key]
        procs = os.path.join(processes.pod_cgroup(self.record, pod), "cgroup.procs")
        return (["/bin/sh", "-c", JOIN_AND_EXEC, procs, *processes.in_pod(self.layout, pod, command)],
                processes.container_env(self.record, pod, pod.containers[0]))

    def run(self, key: str, command: list[str], timeout: float) -> subprocess.CompletedProcess:
        argv, env = self._prepare(key, command)
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        self.check()
        return proc

    def spawn(self, key: str, command: list[str], log_path: str) -> subprocess.Popen:
        argv, env = self._prepare(key, command)
        with open(log_path, "ab") as log:
            return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    @property
    def vips(self) -> dict[str, str]:
        return dict(self.record.alloc.services)

    def ip(self, key: str) -> str:
        return self.record.alloc.pods[key].ip


def wrk(pods: Pods, client: str, url: str, connections: int, seconds: float, close: bool = False) -> loadgen.WrkResult:
    argv = loadgen.wrk_argv(url, connections, seconds, close)
    proc = pods.run(client, argv, seconds + 60)
    if proc.returncode != 0:
        output = (proc.stderr or proc.stdout).strip()[:400]
        raise loadgen.LoadError(f"wrk in {client} exited {proc.returncode}: {output}")
    result = loadgen.parse_wrk(proc.stdout)
    if result.errors > MAX_ERROR_SHARE * max(result.requests, 1):
        raise loadgen.LoadError(f"wrk in {client} to {url}: {result.errors} errors in {result.requests} requests",
                                f"its output: {proc.stdout.strip()[-400:]!r}")
    return result


def iperf3(pods: Pods, client: str, host: str, port: int, seconds: float) -> float:
    proc = pods.run(client, loadgen.iperf3_argv(host, port, seconds), seconds + 60)
    return loadgen.parse_iperf3(proc.stdout)


# --- the agents ----------------------------------------------------------------------------
def agent_status(layout: Layout, node: str) -> dict:
    return fetch_status(layout.agent_socket(node))


def wait_for(check: Callable[[], str | None], timeout: float, what: str) -> None:
    """Poll `check` (None when done, else what is missing) until done or `timeout`."""
    deadline = time.monotonic() + timeout
    while (missing := check()) is not None:
        if time.monotonic() > deadline:
            raise NodeagentError(f"{what}: still {missing} after {timeout:.0f} s")
        time.sleep(0.2)


def l7_missing(layout: Layout, outbound: dict[str, list[str]], inbound: dict[str, list[str]],
               enforced: dict[str, list[str]] | None = None) -> str | None:
    """What the waypoints do not take yet: per node, the VIP:ports its client side must
    steer (and, `enforced`, whose routes must enforce their endpoints' policy: one
    waypoint per request) and the pod IP:ports its server side must."""
    for node in NODES:
        status = agent_status(layout, node)
        plane = status.get("waypoint", {}).get("dataplane", {})
        if enforced and enforced.get(node) and not ((status.get("identity") or {}).get("node") or {}).get("ready"):
            return f"{node}'s agent has no certificate of its own identity yet (it vouches for its pods with it)"
        for kind, wanted in (("outbound", outbound.get(node, [])), ("inbound", inbound.get(node, [])),
                             ("enforced", (enforced or {}).get(node, []))):
            absent = set(wanted) - set(plane.get(kind, []))
            if absent:
                return f"{node}'s waypoint not steering {kind} {', '.join(sorted(absent))}"
    return None


def agent_pids(layout: Layout) -> list[int]:
    return [int(agent_status(layout, node)["pid"]) for node in NODES]


def envoy_concurrency(pid: int) -> int:
    """The --concurrency a running Envoy was given (Envoy's default: one worker per CPU)."""
    with open(f"/proc/{pid}/cmdline") as f:
        argv = f.read().split("\0")
    return int(argv[argv.index("--concurrency") + 1]) if "--concurrency" in argv else os.cpu_count() or 1


def code_version() -> str:
    """The commit of the nodeagent being measured, "+ uncommitted changes" when the tree
    differs from it (the agents run from this same tree)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return "not a git checkout"
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30)
    changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                             timeout=30)
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + (" + uncommitted changes" if changed.stdout.strip() else "")


def envoy_version() -> str:
    out = subprocess.run([find_envoy(), "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = out.split("version:", 1)[-1].strip().split("/")
    return parts[1] if len(parts) > 1 else out.strip()


# --- the anchor's sidecars -----------------------------------------------------------------
class Sidecar:
    """One sidecar Envoy running in a pod; its admin is a unix socket in `directory`."""

    def __init__(self, pod: str, directory: Path, proc: subprocess.Popen):
        self.pod, self.directory, self.proc = pod, directory, proc

    @property
    def admin(self) -> str:
        return str(self.directory / "admin.sock")

    def get(self, path: str, timeout: float = 5.0) -> str:
        try:
            return admin_get(self.admin, path, timeout)
        except NodeagentError as exc:
            raise NodeagentError(f"the {self.pod} sidecar: {exc.message}") from None

    def tls13_handshakes(self, port: int | None = None) -> int:
        """TLS 1.3 sessions its listeners (or the one on `port`) accepted (its mTLS inbound side)."""
        stats = self.get("/stats?filter=ssl.versions.TLSv1.3")
        prefix = "listener." if port is None else f"listener.0.0.0.0_{port}."
        return sum(int(v) for k, _, v in (line.partition(": ") for line in stats.splitlines())
                   if k.startswith(prefix) and v.strip().isdigit())

    def http_requests(self) -> int:
        """Requests its inbound HTTP connection manager took (0 for the client sidecar's)."""
        stats = self.get("/stats?filter=^http\\.inbound_http\\.downstream_rq_total$")
        return sum(int(v) for _, _, v in (line.partition(": ") for line in stats.splitlines()) if v.strip().isdigit())

    def wait_ready(self, timeout: float = 30.0) -> None:
        def missing() -> str | None:
            if self.proc.poll() is not None:
                log = (self.directory / "envoy.log").read_text(errors="replace")[-1500:]
                raise NodeagentError(f"the {self.pod} sidecar Envoy exited {self.proc.returncode}: {log}")
            try:
                return None if self.get("/ready", 1.0).strip() == "LIVE" else "not live"
            except OSError:
                return "no admin yet"
        wait_for(missing, timeout, f"sidecar Envoy in {self.pod}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_sidecars(pods: Pods, layout: Layout, concurrency: int, started: list[Sidecar]) -> dict[str, Sidecar]:
    """Client sidecar in plain/client, server sidecars in the plain servers; each appended
    to `started` as soon as it runs, so the caller can stop what started if one fails."""
    root = Path(layout.state_dir) / "bench-sidecars"  # removed with the lab's state
    configs = {}
    targets = []
    for placement, (server, _node) in meshlab.PLACEMENT_SERVER.items():
        key = f"plain/{server}"
        tls = sidecars.issue(layout.ca_dir, Identity(TRUST_DOMAIN, "plain", server), root / server / "tls")
        configs[key] = sidecars.server_sidecar(str(root / server / "admin.sock"), tls, TRUST_DOMAIN,
                                               meshlab.HTTP_PORT, meshlab.IPERF_PORT)
        http, tcp, tcp_http = meshlab.SIDECAR_PORTS[placement]
        targets.append(sidecars.Target(placement, http, tcp, tcp_http, pods.ip(key),
                                       Identity(TRUST_DOMAIN, "plain", server).uri))
    tls = sidecars.issue(layout.ca_dir, Identity(TRUST_DOMAIN, "plain", "client"), root / "client" / "tls")
    configs["plain/client"] = sidecars.client_sidecar(str(root / "client" / "admin.sock"), targets, tls)
    out = {}
    for key, config in configs.items():
        directory = root / key.split("/")[1]
        (directory / "envoy.json").write_text(json.dumps(config, indent=1))
        proc = pods.spawn(key, sidecars.envoy_argv(str(directory / "envoy.json"), concurrency),
                          str(directory / "envoy.log"))
        out[key] = Sidecar(key, directory, proc)
        started.append(out[key])
        out[key].wait_ready()
    return out


# --- one cell: a set-up at a placement, one round -------------------------------------------
class Runs:
    def __init__(self, layout: Layout, pods: Pods, cars: dict[str, Sidecar], opts: Options, progress: Progress):
        self.layout, self.pods, self.cars, self.opts, self.progress = layout, pods, cars, opts, progress
        self.targets = {(p, s): meshlab.target(p, s, pods.vips) for p in meshreport.PLACEMENTS
                        for s in meshreport.SETUPS}

    def roots(self, placement: str, setup: str) -> list[int]:
        """The mesh components of a set-up: both agents (and their waypoints), or the two sidecars."""
        if setup == "direct":
            return []
        if setup == "envoy":
            return [self.cars["plain/client"].proc.pid, self.cars[self.targets[(placement, setup)].server].proc.pid]
        return agent_pids(self.layout)

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in NODES:
            c = agent_status(self.layout, node)["counters"]
            out[f"{node}/captured"] = c.get("outbound_connections_total", 0.0)
            out[f"{node}/waypoint_out"] = c.get("waypoint_connections_total{direction=outbound}", 0.0)
            # requests the node's server-side waypoint handled (from its access log): a
            # connection count can stay put, since the client waypoint pools its upstreams
            out[f"{node}/waypoint_in"] = float(fetch_requests(self.layout.agent_socket(node), "destination"))
        for key, car in self.cars.items():
            out[f"{key}/tls13"] = car.tls13_handshakes()
            out[f"{key}/http_in"] = car.http_requests()
        return out

    def warm_up(self, placement: str, setup: str) -> None:
        t = self.targets[(placement, setup)]
        wrk(self.pods, t.client, t.url, 16, self.opts.warmup)

    def cell(self, placement: str, setup: str) -> dict:
        t, d = self.targets[(placement, setup)], self.opts.duration
        before = self.counters()
        one = wrk(self.pods, t.client, t.url, 1, d)
        roots = self.roots(placement, setup)
        cpu = usage.cpu_snapshot(roots)
        many = wrk(self.pods, t.client, t.url, 16, d)
        cpu_used = usage.cpu_delta(cpu, usage.cpu_snapshot(roots))
        new_one = wrk(self.pods, t.client, t.url, 1, d, close=True)
        new_many = wrk(self.pods, t.client, t.url, 16, d, close=True)
        after = self.counters()
        path = check_path(placement, setup, {k: after[k] - before[k] for k in after})
        out = {"p50_us": one.p50_us, "p99_us": one.p99_us, "rps": many.rps, "new_p50_us": new_one.p50_us,
               "cps": new_many.rps,
               "cpu_ms_per_1k": cpu_used * 1e3 / many.requests * 1000 if roots else None,
               "requests": {"c1": one.requests, "c16": many.requests, "new_c1": new_one.requests,
                            "new_c16": new_many.requests},
               "errors": one.errors + many.errors + new_one.errors + new_many.errors, "path": path,
               "loadavg": round(os.getloadavg()[0], 2)}  # the machine's, others' work included
        if setup == meshreport.ANCHOR:
            tcp = self.tcp_pair(placement, t)
            out["errors"] += tcp.pop("errors")
            out.update(tcp)
        return out

    def stream(self, placement: str, setup: str) -> float:
        """One iperf3 stream's Gbit/s, failing if it did not take the set-up's path."""
        t = self.targets[(placement, setup)]
        before = self.counters()
        gbps = iperf3(self.pods, t.client, *t.iperf, self.opts.duration)
        after = self.counters()
        check_stream_path(placement, setup, {k: after[k] - before[k] for k in after})
        return gbps

    def tcp_pair(self, placement: str, t: meshlab.Target) -> dict:
        """The anchor's new-connection figures through its TCP proxies (the L4 anchor: a
        sidecar pair carrying a port it does not read opens an upstream mTLS connection
        per client connection, where the HTTP pair above reuses its pooled ones), with the
        server sidecar's handshakes on that listener proving it: one per connection."""
        server = self.cars[t.server]
        before = server.tls13_handshakes(sidecars.SERVER_TCP_HTTP_PORT)
        one = wrk(self.pods, t.client, t.tcp_url, 1, self.opts.duration, close=True)
        many = wrk(self.pods, t.client, t.tcp_url, 16, self.opts.duration, close=True)
        handshakes = server.tls13_handshakes(sidecars.SERVER_TCP_HTTP_PORT) - before
        if handshakes < one.requests + many.requests:
            raise NodeagentError(f"the sidecars' TCP proxy ({placement}) made {handshakes} mTLS handshakes for "
                                 f"{one.requests + many.requests} connections: not one per connection",
                                 "see the sidecars' logs; the L4 anchor's figures would not be of it")
        self.progress(f"  {placement}-node sidecars' TCP proxy: new connection p50 {one.p50_us:.0f} us, "
                      f"{many.rps:.0f} conn/s, {handshakes} mTLS handshakes")
        return {"tcp_new_p50_us": one.p50_us, "tcp_cps": many.rps, "tcp_handshakes": handshakes,
                "tcp_requests": {"new_c1": one.requests, "new_c16": many.requests},
                "errors": one.errors + many.errors}


def check_path(placement: str, setup: str, delta: dict[str, float]) -> dict[str, int]:
    """What the counters say the traffic of one cell went through; NodeagentError when it
    is not the set-up's path (the figures would be of something else)."""
    server, node = meshlab.PLACEMENT_SERVER[placement]
    path = {"captured": int(delta[f"{meshlab.CLIENT_NODE}/captured"]),
            "client_waypoint": int(delta[f"{meshlab.CLIENT_NODE}/waypoint_out"]),
            "server_waypoint": int(delta[f"{node}/waypoint_in"]),
            "sidecar_requests": int(delta.get(f"plain/{server}/http_in", 0))}
    ok = {"direct": path["captured"] == 0 and path["client_waypoint"] == 0 and path["sidecar_requests"] == 0,
          "l4": path["captured"] > 0 and path["client_waypoint"] == 0 and path["server_waypoint"] == 0,
          # one waypoint per request: the client node's routes and enforces the server's policy
          "l7": path["client_waypoint"] > 0 and path["server_waypoint"] == 0,
          "l7s": path["captured"] > 0 and path["client_waypoint"] == 0 and path["server_waypoint"] > 0,
          "envoy": path["captured"] == 0 and path["sidecar_requests"] > 0}[setup]
    if not ok:
        raise NodeagentError(f"the {setup} set-up ({placement}) did not take its path: {path}",
                             "see the agents' status and the sidecars' logs; the figures would not be of it")
    return path


def check_stream_path(placement: str, setup: str, delta: dict[str, float]) -> None:
    """check_path for an iperf3 run: its port is L4 at the server node (no server waypoint
    takes it), through the client node's waypoint's tcp_proxy in l7."""
    server, _node = meshlab.PLACEMENT_SERVER[placement]
    captured = delta[f"{meshlab.CLIENT_NODE}/captured"]
    client_waypoint = delta[f"{meshlab.CLIENT_NODE}/waypoint_out"]
    tls = delta.get(f"plain/{server}/tls13", 0)
    ok = {"direct": captured == 0 and client_waypoint == 0 and tls == 0,
          "l4": captured > 0 and client_waypoint == 0, "l7s": captured > 0 and client_waypoint == 0,
          "l7": captured > 0 and client_waypoint > 0,
          "envoy": captured == 0 and tls > 0}[setup]
    if not ok:
        raise NodeagentError(f"the {setup} set-up's stream ({placement}) did not take its path: captured "
                             f"{captured:.0f}, client waypoint {client_waypoint:.0f}, sidecar handshakes {tls:.0f}",
                             "see the agents' status and the sidecars' logs; the figures would not be of it")


# --- the whole run -------------------------------------------------------------------------
def rotated(items: tuple[str, ...], by: int) -> list[str]:
    by %= len(items)
    return list(items[by:] + items[:by])


def measure(runs: Runs, opts: Options, progress: Progress) -> dict[str, dict[str, list[dict]]]:
    """{placement: {set-up: [one dict per round]}}, set-ups interleaved within each round."""
    for placement in meshreport.PLACEMENTS:
        for setup in meshreport.SETUPS:
            progress(f"warm-up: {placement}-node {setup}")
            runs.warm_up(placement, setup)
    out = {p: {s: [] for s in meshreport.SETUPS} for p in meshreport.PLACEMENTS}
    for r in range(opts.rounds):
        for placement in meshreport.PLACEMENTS:
            order = rotated(meshreport.SETUPS, r)
            streams = {}
            for setup in order:
                streams[setup] = runs.stream(placement, setup)
            progress(f"round {r + 1}/{opts.rounds} {placement}-node one stream: "
                     + ", ".join(f"{meshreport.SETUP_TITLES[s].lower()} {streams[s]:.2f}" for s in order) + " Gbit/s")
            for setup in order:
                cell = runs.cell(placement, setup)
                cell["gbps"] = streams[setup]
                out[placement][setup].append(cell)
                progress(f"round {r + 1}/{opts.rounds} {placement}-node {meshreport.SETUP_TITLES[setup].lower()}: "
                         f"p50 {cell['p50_us']:.0f} us, {cell['rps']:.0f} req/s, {cell['cps']:.0f} conn/s, "
                         f"path {cell['path']}")
    return out


def sidecar_rss(cars: dict[str, Sidecar]) -> dict[str, int]:
    return {key: sum(usage.rss_bytes(p) for p in usage.tree(car.proc.pid)) for key, car in cars.items()}


def main_phase(layout: Layout, opts: Options, progress: Progress, started: list[Sidecar],
               check: Callable[[], None]) -> tuple[dict, dict]:
    """({placement: {set-up: rounds}}, facts: the Envoy concurrency, the sidecars' RSS after the runs)."""
    app = sidecars.app_argv(meshlab.HTTP_PORT)
    lifecycle.up(layout.name, parse_documents(meshlab.main_lab(app), "bench-mesh.yaml"), True,
                 lambda line: progress(f"lab: {line}"), LAB_TIMEOUT)
    pods = Pods(layout, check)
    tune_clients(layout)
    vips = pods.vips
    outbound = {"node1": [f"{vips[f'mesh/{s}']}:{port}" for s in ("web7", "web7-local")
                          for port in (meshlab.HTTP_PORT, meshlab.IPERF_PORT)]}
    inbound = {"node2": [f"{pods.ip('mesh/server7')}:{meshlab.HTTP_PORT}"],
               "node1": [f"{pods.ip('mesh/local7')}:{meshlab.HTTP_PORT}"]}
    enforced = {"node1": [f"{vips[f'mesh/{s}']}:{meshlab.HTTP_PORT}" for s in ("web7", "web7-local")]}
    wait_for(lambda: l7_missing(layout, outbound, inbound, enforced), 60, "the waypoints taking the L7 services")
    concurrency = envoy_concurrency(int(agent_status(layout, "node1")["waypoint"]["envoy"]["pid"]))
    progress(f"starting the sidecar Envoys (--concurrency {concurrency}, as the waypoints)")
    cars = start_sidecars(pods, layout, concurrency, started)
    rounds = measure(Runs(layout, pods, cars, opts, progress), opts, progress)
    facts = {"envoy_concurrency": concurrency, "sidecar_rss": sidecar_rss(cars),
             "data_path": {n: agent_status(layout, n).get("data_path", {}).get("summary", "not reported")
                           for n in NODES}}
    return rounds, facts


CLIENT_SYSCTLS = {"net/ipv4/tcp_tw_reuse": "1", "net/ipv4/ip_local_port_range": "1024 65535"}


def tune_clients(layout: Layout) -> None:
    """What a load generator's host is given: wrk closes first after a `Connection: close`
    answer, so the client keeps the TIME_WAIT; with the defaults (reuse on loopback only,
    28k ports) the direct set-up ran out of ports within seconds (7000 -> 170 conn/s)
    while the meshed and sidecar clients, which connect to 127.0.0.1, did not. Per netns,
    in the client pods only."""
    for ns in ("plain", "mesh"):
        for key, value in CLIENT_SYSCTLS.items():
            topology.sysctl(layout.pod_netns(ns, "client"), key, value)


def memory_phase(layout: Layout, opts: Options, progress: Progress,
                 check: Callable[[], None]) -> dict[int, dict[str, dict[str, int]]]:
    """{pods per node: {node: {"agent": RSS bytes, "waypoint": RSS bytes}}} on a lab of its own."""
    app = sidecars.app_argv(meshlab.HTTP_PORT)
    lifecycle.up(layout.name, parse_documents(meshlab.memory_lab(app), "bench-mesh-memory.yaml"), True,
                 lambda line: progress(f"lab: {line}"), LAB_TIMEOUT)
    pods = Pods(layout, check)
    vip = pods.vips["mesh/web7"]
    wait_for(lambda: l7_missing(layout, {"node1": [f"{vip}:{meshlab.HTTP_PORT}"]},
                                {"node2": [f"{pods.ip('mesh/server7')}:{meshlab.HTTP_PORT}"]}),
             60, "the waypoints taking the L7 service")
    quiet = (" created", " unchanged", " configured")
    samples, have = {}, 1
    for count in opts.pods:
        if count > have:
            progress(f"memory: adding meshed pods to {count} per node")
            lifecycle.apply(layout.name, parse_documents(meshlab.fillers_yaml(have, count), "bench-mesh-pods.yaml"),
                            lambda line: None if line.endswith(quiet) else progress(f"lab: {line}"), 300)
            have = count
        wait_for(lambda: _enrolment_missing(layout, count), 120, f"{count} pods enrolled per node")
        wrk(pods, "mesh/client", f"http://{vip}:{meshlab.HTTP_PORT}/", 16, opts.duration)
        time.sleep(1.0)
        samples[count] = {node: _agent_rss(layout, node) for node in NODES}
        progress(f"memory at {count} meshed pods per node: " + ", ".join(
            f"{n} agent {s['agent'] / meshreport.MIB:.1f} MiB + waypoint {s['waypoint'] / meshreport.MIB:.1f} MiB"
            for n, s in samples[count].items()))
    return samples


def _enrolment_missing(layout: Layout, count: int) -> str | None:
    for node in NODES:
        status = agent_status(layout, node)
        enrolled = len(status.get("pods", []))
        if enrolled != count:
            return f"{node} has {enrolled} enrolled"
        invalid = [i["identity"] for i in status.get("identity", {}).get("identities", []) if not i.get("valid")]
        if invalid:
            return f"{node} has no certificate yet for {len(invalid)} identities"
    return None


def _agent_rss(layout: Layout, node: str) -> dict[str, int]:
    pids = usage.tree(int(agent_status(layout, node)["pid"]))
    return {"agent": usage.rss_bytes(pids[0]), "waypoint": sum(usage.rss_bytes(p) for p in pids[1:])}


class Stop:
    """Ctrl-C, SIGTERM and SIGHUP end a run (and so take its lab down). The handler raises
    KeyboardInterrupt at once and remembers the signal, and `check()` raises it again at
    the next step: an exception raised where Python only prints it (an at-fork hook, a
    __del__) would otherwise be lost and the run would go on."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, _frame) -> None:
        self.signum = signum
        raise KeyboardInterrupt(f"signal {signum}")

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")

    @contextlib.contextmanager
    def installed(self) -> Iterator["Stop"]:
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while the lab is taken down: a half-removed lab is worse."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _take_down(layout: Layout, started: list[Sidecar]) -> None:
    with uninterrupted():
        for car in started:
            car.stop()
        started.clear()
        teardown.down(layout)


def run_mesh(opts: Options, progress: Progress = _stderr) -> dict:
    opts.check()
    name = check_name(opts.name) if opts.name is not None else f"bm{secrets.token_hex(3)}"
    layout = Layout(name, cgroups.cgroup2_root())
    started_at = time.monotonic()
    result: dict = {"lab": name, "kernel": platform.release(), "cpus": os.cpu_count(), "rounds": opts.rounds,
                    "duration_s": opts.duration, "quick": opts.quick, "pods_per_node": list(opts.pods),
                    "envoy_version": envoy_version(), "code": code_version(), "loadavg_start": list(os.getloadavg())}
    started: list[Sidecar] = []
    with Stop().installed() as stop:
        try:
            rounds, facts = main_phase(layout, opts, lambda line: progress(_stamp(started_at, line)), started,
                                       stop.check)
            _take_down(layout, started)
            stop.check()
            samples = memory_phase(layout, opts, lambda line: progress(_stamp(started_at, line)), stop.check)
        finally:
            _take_down(layout, started)
            result["left_behind"] = left_behind(layout)
    result["loadavg_end"] = list(os.getloadavg())
    result["elapsed_s"] = round(time.monotonic() - started_at, 1)
    result["envoy_concurrency"], result["data_path"] = facts["envoy_concurrency"], facts["data_path"]
    result["placements"] = {p: {"rounds": rounds[p], **meshreport.summarize(rounds[p])} for p in rounds}
    result["rss"] = meshreport.rss_summary(samples, facts["sidecar_rss"])
    return result


def _stamp(since: float, line: str) -> str:
    elapsed = int(time.monotonic() - since)
    return f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {line}"


def render(result: dict, output: str) -> str:
    if output == "json":
        return json.dumps(result, indent=2, sort_keys=True) + "\n"
    cells = [c for p in result["placements"].values() for s in p["rounds"].values() for c in s]
    load = [c["loadavg"] for c in cells]
    lines = [f"nodeagent bench mesh: lab {result['lab']}, kernel {result['kernel']}, {result['cpus']} CPUs, "
             f"envoy {result['envoy_version']} (--concurrency {result['envoy_concurrency']} for waypoints and "
             "sidecars)",
             f"nodeagent {result['code']}; the agents' data path: "
             + "; ".join(f"{n}: {d}" for n, d in result["data_path"].items()),
             f"median of {result['rounds']} interleaved rounds, {result['duration_s']:g} s per run, "
             f"{result['elapsed_s']:.0f} s in all; the machine's load average {result['loadavg_start'][0]:.2f} "
             f"before, {min(load):.2f}-{max(load):.2f} during the runs",
             "+N: added to the direct set-up's latency in the same round; xN: nodeagent's figure over the "
             "Envoy sidecar pair's", "(latency, CPU, memory: lower is better; rates and throughput: higher is better)",
             meshreport.L7_NOTE, ""]
    for placement, summary in result["placements"].items():
        lines += meshreport.placement_lines(placement, summary) + [""]
    lines += meshreport.rss_lines(result["rss"]) + [""]
    lines.append(f"wrk errors: {sum(c['errors'] for c in cells)} in all runs")
    left = result["left_behind"]
    lines.append("cleanup: nothing left behind" if not left else f"cleanup: LEFT BEHIND {', '.join(left)}")
    return "\n".join(lines) + "\n"
