"""soak: issue 9's soak ("never fail open, never fall over") on a lab of its own.

Purpose
    Runs mixed meshed traffic and abuse at once for a given time on a two-node lab
    (tests/soak/lab.yaml) and checks that the node agents neither leak nor fail open:
      - mixed traffic from the meshed mesh/client to mesh/backend on the other node:
        keep-alive HTTP, HTTP with a new connection per request, TCP echo; every
        request must get its 200 / its echo;
      - HTTP/2 rapid reset from mesh/attacker, a meshed pod holding a real mesh
        certificate: HBONE connections to the backend pod's :15008, CONNECT streams
        reset (RST_STREAM) right behind their HEADERS, now and then a burst;
      - handshake floods from the unmeshed legacy/client: TCP connections to the backend
        pod's :15008 that never send a ClientHello, or send plaintext instead, held
        then closed;
      - plaintext from legacy/client to the backend's ports (STRICT PeerAuthentication):
        every attempt must be refused;
      - tcpdump on the fabric (the only way between nodes), looking for the marker the
        meshed client puts in its headers, bodies and TCP payloads, and for any packet
        between meshed pods off port 15008: neither may ever appear.
    Per agent it samples RSS (VmRSS) and open descriptors (/proc/PID/fd) after a
    warm-up and a drain, then again after the load and a drain, and prints them side
    by side with every count. Goals (exit 1 when one is missed): RSS growth < 10 %;
    descriptors back to the baseline (see Caveats for the tolerance); 0 plaintext
    accepted by STRICT; 0 marker and 0 meshed plaintext packets on the fabric, with a
    capture that dropped nothing and saw the plaintext control; all mixed traffic
    answered; no agent restarted. Exit 2 when the soak could not run at all.

Usage
    .venv/bin/python tests/soak/soak.py --minutes 30 [--name soak]   (as root)
    --warmup S (30), --drain-timeout S (120), --progress S (60): see --help.
    --only mixed|resets|handshakes|plaintext runs that load alone (to find which one an
    agent's growth comes from); the goals the other loads feed are then missed.
    Not part of CI or pytest (tests/soak/conftest.py keeps pytest out).

How the attacker is certified
    Honestly, through the mesh: mesh/attacker runs with service account `attacker`, so
    node1's agent asks the lab CA for spiffe://cluster.local/ns/mesh/sa/attacker (a CSR
    with node1's token; the CA checks such a pod runs on node1) and keeps key and chain
    in its identity directory, /run/nodeagent/<name>/identity/node1/. The attacker
    process, inside the pod, loads that very file (again for every connection, so a
    rotation is followed): what a workload whose node's key store leaked would hold.
    The CA's root key is never read. The pod is annotated
    traffic.sidecar.istio.io/excludeOutboundPorts: "15008" so its own dials to :15008
    are not captured and tunnelled by its agent.

Caveats
    - Descriptor tolerance: at the end an agent may hold more than at the baseline only
      by the growth of its HBONE client pool (one descriptor per pooled connection, both
      counts shown) plus 2 (a CA or xDS stream being re-made at that instant). Anything
      else the lab holds (listeners per pod, BPF maps and links, Envoy and xDS sockets,
      log files) is in the baseline, taken after warm-up and drain.
    - The warm-up runs the mixed traffic and the control (not the attacks) at the soak's
      rates, so the baseline is what a serving agent holds, one-off costs of serving
      (lazily imported code, TLS contexts, the HBONE pool) included; nothing an attack
      leaked can hide in it. The first costs of the attack paths count as growth.
    - A drain waits until no agent relays, delivers or tunnels a connection beyond its
      pools' idle ones (and, after the load, until descriptors are within the limit),
      at most --drain-timeout seconds: an agent that leaks never drains, so the soak
      waits that long and reports what was still busy.
    - RSS is of the agent process only (its Envoy and the CA are other processes).
    - Rates are fixed and modest (a 2-CPU machine shared with other work); see RATES.
      The driver processes run inside the lab pods (`nodeagent lab exec`), so what they
      do is what a pod there can do; they cost CPU on the same machine.
    - Refuses to start when a lab of that name exists, and never takes one down it did
      not bring up; its own lab is always taken down, even after a failure or ^C.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nodeagent.admin import fetch_status
from nodeagent.errors import NodeagentError
from nodeagent.identity.workload.credentials import file_name
from nodeagent.identity.spiffe import Identity
from nodeagent.lab import topology
from nodeagent.lab.layout import Layout, check_name

from fabric import FabricCapture  # this directory's modules: soak.py runs as a script
from footprint import Snapshot, connections, fd_limits, in_flight, sample
from report import Outcome, goals, render

HERE = Path(__file__).resolve().parent
LAB_YAML, LOAD = HERE / "lab.yaml", HERE / "load.py"
NODEAGENT = [sys.executable, "-m", "nodeagent"]
TRUST_DOMAIN = "cluster.local"
EXIT_MISSED, EXIT_ERROR = 1, 2

# What each driver does a second (load.py); totals are these times the duration.
RATES = {
    "keepalive": 20,  # HTTP requests on one kept connection
    "new": 10,  # HTTP requests, one connection each
    "tcp": 5,  # TCP echo connections, 1000 bytes each
    "streams": 20,  # rapid reset: streams reset on the one HBONE connection a second...
    "burst": 300, "burst_every": 10,  # ...and this many on every tenth
    "flood": 100, "hold": 5.0,  # handshake flood: connections held per round, seconds a round
    "plaintext": 2,  # plaintext HTTP and TCP attempts each to the STRICT backend
    "control": 1,  # plaintext HTTP from legacy to legacy/echo (must be seen on the fabric)
}
WARMUP = ("keepalive", "new", "tcp", "control")  # the drivers the warm-up runs (see Caveats)
# --only: one load alone, to tell which one an agent's growth comes from (the others
# are reported as not run, and the goals they feed are missed).
LOADS = {"mixed": WARMUP, "resets": ("resets",), "handshakes": ("handshakes",), "plaintext": ("plaintext",)}


class SoakError(Exception):
    """The soak could not run (not a missed goal): says what and what to do."""


@dataclass(frozen=True)
class World:
    """Who is where in the running lab, read once after it is up."""

    layout: Layout
    ips: dict[str, str]  # "ns/pod" -> IP
    agents: dict[str, int]  # node -> agent pid
    restarts: dict[str, int]  # node -> agent restarts
    attacker_cert: str

    @property
    def backend(self) -> str:
        return self.ips["mesh/backend-0"]

    def meshed_ips(self) -> set[str]:
        return {self.ips[p] for p in ("mesh/client", "mesh/attacker", "mesh/backend-0")}


@dataclass(frozen=True)
class Markers:
    secret: str  # in the meshed client's traffic: never on the fabric
    control: str  # legacy -> legacy/echo plaintext: must be on the fabric
    plain: str  # legacy -> STRICT backend attempts (informational)

    @classmethod
    def new(cls) -> "Markers":
        token = secrets.token_hex(12)
        return cls(f"SOAK-SECRET-{token}", f"SOAK-CONTROL-{token}", f"SOAK-PLAIN-{token}")


# --- the lab -------------------------------------------------------------------------
def lab(name: str, command: str, *args: str, timeout: float = 180) -> str:
    proc = subprocess.run([*NODEAGENT, "lab", command, "--name", name, *args], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise SoakError(f"nodeagent lab {command} --name {name} exited {proc.returncode}: "
                        f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def check_free(layout: Layout) -> None:
    if os.path.exists(layout.state_dir) or topology.list_netns(layout.netns_prefix):
        raise SoakError(f"a lab named {layout.name} exists already and the soak brings up its own: "
                        f"take it down (nodeagent lab down --name {layout.name}) or pass another --name")


def discover(layout: Layout, timeout: float = 60.0) -> World:
    """Pod IPs, agent pids, and the attacker's certificate file once node1's agent holds it
    and STRICT is in force on the backend's node."""
    status = json.loads(lab(layout.name, "status", "--output", "json"))
    ips = {f"{p['namespace']}/{p['name']}": p["ip"] for p in status["pods"]}
    nodes = {p["name"]: p["node"] for p in status["pods"] if p["namespace"] == "mesh"}
    agents = {n["name"]: n["agent"]["pid"] for n in status["nodes"]}
    restarts = {n["name"]: n["agent"]["restarts"] for n in status["nodes"]}
    cert = Path(layout.identity_dir(nodes["attacker"])) / file_name(Identity(TRUST_DOMAIN, "mesh", "attacker"))
    deadline = time.monotonic() + timeout
    while not (cert.exists() and _strict_in_force(layout, nodes["backend-0"])):
        if time.monotonic() > deadline:
            raise SoakError(f"after {timeout:.0f} s: attacker certificate {cert} "
                            f"{'present' if cert.exists() else 'missing'}, STRICT on {nodes['backend-0']} "
                            f"{'in force' if _strict_in_force(layout, nodes['backend-0']) else 'not in force'}")
        time.sleep(0.5)
    return World(layout, ips, agents, restarts, str(cert))


def _strict_in_force(layout: Layout, node: str) -> bool:
    try:
        resources = fetch_status(layout.agent_socket(node))["policy"]["resources"]
    except (NodeagentError, OSError, ValueError, KeyError):  # not up yet: asked again
        return False
    return "PeerAuthentication mesh/backend-strict" in resources


def agent_restarts(layout: Layout) -> dict[str, int]:
    status = json.loads(lab(layout.name, "status", "--output", "json"))
    return {n["name"]: n["agent"]["restarts"] for n in status["nodes"]}


# --- the load ------------------------------------------------------------------------
def drivers(world: World, markers: Markers) -> dict[str, tuple[str, list[str]]]:
    """name -> (pod, load.py arguments after --seconds)."""
    ip, url = world.backend, "http://backend.mesh:8080/"
    return {
        "keepalive": ("mesh/client", ["http-keepalive", url, "--rate", str(RATES["keepalive"]),
                                      "--marker", markers.secret]),
        "new": ("mesh/client", ["http-new", url, "--rate", str(RATES["new"]), "--marker", markers.secret]),
        "tcp": ("mesh/client", ["tcp", "backend.mesh:9000", "--rate", str(RATES["tcp"]), "--marker", markers.secret]),
        "control": ("legacy/client", ["http-new", "http://echo.legacy:8080/", "--rate", str(RATES["control"]),
                                      "--marker", markers.control]),
        "resets": ("mesh/attacker", ["resets", ip, world.attacker_cert, world.layout.root_cert,
                                     "--streams", str(RATES["streams"]), "--burst", str(RATES["burst"]),
                                     "--burst-every", str(RATES["burst_every"])]),
        "handshakes": ("legacy/client", ["handshakes", ip, "--concurrent", str(RATES["flood"]),
                                         "--hold", str(RATES["hold"])]),
        "plaintext": ("legacy/client", ["plaintext", ip, "--rate", str(RATES["plaintext"]),
                                        "--marker", markers.plain]),
    }


def run_load(world: World, markers: Markers, seconds: float, workdir: Path, progress: float,
             show, names: tuple[str, ...] | None = None) -> dict[str, dict]:
    """The drivers `names` (default: all) at once for `seconds`; name -> its JSON counts.
    `show` gets a line of agent figures every `progress` seconds."""
    procs = {}
    try:
        for name, (pod, args) in drivers(world, markers).items():
            if names is not None and name not in names:
                continue
            with open(workdir / f"{name}.err", "w") as err:
                procs[name] = subprocess.Popen(
                    [*NODEAGENT, "lab", "exec", "--name", world.layout.name, pod, "--", sys.executable, str(LOAD),
                     "--seconds", str(seconds), *args], stdout=subprocess.PIPE, stderr=err, text=True)
        started = shown = time.monotonic()
        deadline = started + seconds + 120
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
            if time.monotonic() - shown >= progress:
                shown = time.monotonic()
                show(f"  {(shown - started) / 60:5.1f} min  {figures(world)}")
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()  # the driver stops its rounds and prints what it counted
    return {name: _result(name, proc, workdir) for name, proc in procs.items()}


def _result(name: str, proc: subprocess.Popen, workdir: Path) -> dict:
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        err = (workdir / f"{name}.err").read_text().strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + (" | ".join(err) or "no output")}


def figures(world: World) -> str:
    parts = []
    for node, pid in sorted(world.agents.items()):
        try:
            s = sample(pid)
            parts.append(f"{node} RSS {s.rss_mib:.1f} MiB fds {s.fds}")
        except OSError:
            parts.append(f"{node} agent pid {pid} GONE")
    return ", ".join(parts)


# --- measuring -----------------------------------------------------------------------
def drain(world: World, limits: dict[str, int] | None, timeout: float) -> tuple[float, dict]:
    """Wait until no agent has a connection in flight (and, with `limits`, each holds at
    most its limit of descriptors); (seconds waited, what was still busy at the end)."""
    started = time.monotonic()
    while True:
        busy, found = {}, {node: connections(world.layout.agent_socket(node)) for node in world.agents}
        pooled = sum(f["pooled"] for f in found.values() if isinstance(f, dict))
        for node, pid in world.agents.items():
            flight = in_flight(found[node], pooled)
            try:
                fds = sample(pid).fds
            except OSError:
                fds = None
            if flight:
                busy[node] = flight
            if limits is not None and (fds is None or fds > limits[node]):
                busy.setdefault(node, {})["fds"] = fds
        waited = time.monotonic() - started
        if not busy or waited > timeout:
            return waited, busy
        time.sleep(1.0)


def snapshot(world: World) -> Snapshot:
    samples, pools = {}, {}
    for node, pid in world.agents.items():
        try:
            samples[node] = sample(pid)
        except OSError:
            samples[node] = None
        found = connections(world.layout.agent_socket(node))
        pools[node] = found["pooled"] if isinstance(found, dict) else None
    return Snapshot(samples, pools)


# --- main ----------------------------------------------------------------------------
def soak(args, show) -> int:
    layout = Layout(check_name(args.name), cgroup_root="")
    check_free(layout)
    markers, capture = Markers.new(), None
    try:
        show(f"bringing up lab {args.name} from {LAB_YAML}")
        lab(args.name, "up", "-f", str(LAB_YAML), "--timeout", "120")
        world = discover(layout)
        capture = FabricCapture(layout.fabric_netns, {"secret": markers.secret.encode(),
                                                      "control": markers.control.encode(),
                                                      "plain": markers.plain.encode()}, world.meshed_ips())
        capture.start()
        with tempfile.TemporaryDirectory(prefix=f"soak-{args.name}-") as tmp:
            show(f"warm-up: the mixed traffic for {args.warmup:g} s")
            warm = run_load(world, markers, args.warmup, Path(tmp), args.progress, show, WARMUP)
            show("  warm-up " + ", ".join(f"{k}: {v.get('error', 'done')}" for k, v in warm.items()))
            drained_base, busy_base = drain(world, None, args.drain_timeout)
            base = snapshot(world)
            if None in base.samples.values():
                raise SoakError(f"an agent died during the warm-up: see {layout.logs_dir}")
            show(f"baseline: {figures(world)}; load for {args.minutes:g} min")
            started = time.monotonic()
            results = run_load(world, markers, args.minutes * 60, Path(tmp), args.progress, show,
                               LOADS[args.only] if args.only else None)
            results = {name: results.get(name, {"error": f"not run (--only {args.only})"})
                       for name in drivers(world, markers)}
            load = time.monotonic() - started
        show("load stopped; waiting for the agents to drain")
        drained_end, busy = drain(world, fd_limits(base, snapshot(world).pools), args.drain_timeout)
        end = snapshot(world)
        capture.stop()
        now = agent_restarts(layout)
        outcome = Outcome(args.name, args.warmup, load, (drained_base, drained_end), (busy_base, busy), base, end,
                          {n: now[n] - world.restarts[n] for n in now}, results, capture, RATES["hold"])
        show("\n" + render(outcome))
        return 0 if all(ok for ok, _ in goals(outcome)) else EXIT_MISSED
    finally:
        if capture is not None:
            capture.stop()
        show(f"taking lab {args.name} down")
        try:
            lab(args.name, "down")
        except SoakError as exc:
            show(f"lab down failed: {exc}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="see the header of tests/soak/soak.py for what it measures and how")
    parser.add_argument("--minutes", type=float, default=30.0, help="load duration (default 30)")
    parser.add_argument("--name", default="soak", help="lab name (default soak); must not exist yet")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds of warm-up load before the baseline")
    parser.add_argument("--drain-timeout", type=float, default=120.0,
                        help="seconds to wait for connections to drain and descriptors to settle")
    parser.add_argument("--progress", type=float, default=60.0, help="seconds between progress lines")
    parser.add_argument("--only", choices=sorted(LOADS),
                        help="run this load alone after the warm-up (mixed: the warm-up's drivers); goals of the "
                             "others are missed")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (it runs a lab)", file=sys.stderr)
        return EXIT_ERROR
    try:
        return soak(args, lambda line: print(line, flush=True))
    except SoakError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
