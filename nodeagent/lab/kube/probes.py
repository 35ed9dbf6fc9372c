"""Readiness probes of the lab's API pods (`--kube`), run as kubelet's prober runs them.

A container's `readinessProbe` (exec, httpGet or tcpSocket; initialDelaySeconds,
periodSeconds, timeoutSeconds, successThreshold, failureThreshold) is run by one thread
per probed container from the container's start: exec as `lab exec` runs a command in
the container (same netns, mounts, environment, cgroup), httpGet and tcpSocket from the
node's netns to the pod's address, as kubelet probes from the node. A result must repeat
successThreshold (failureThreshold) times to flip the container's readiness, which is
false from each start until the first flip to true, as kubelet's readiness manager has
it. The kubelet reports it in `containerStatuses[].ready` and the pod's Ready condition,
so the real EndpointSlice controller leaves unready pods out. gRPC probes are refused
by name; liveness and startup probes are not run (a Warning event says so).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable

from nodeagent import netns
from nodeagent.errors import ConfigError

USER_AGENT = "kube-probe/1.34"


@dataclass(frozen=True)
class Probe:
    kind: str  # exec | httpGet | tcpSocket
    command: tuple[str, ...] = ()
    port: int = 0
    path: str = "/"
    host: str = ""
    scheme: str = "HTTP"
    headers: tuple[tuple[str, str], ...] = ()
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3


def _port(value, container: dict, where: str) -> int:
    if isinstance(value, int) and 0 < value < 65536:
        return value
    for port in container.get("ports") or []:
        if port.get("name") == value:
            return int(port["containerPort"])
    raise ConfigError(f"{where}.port", f"{value!r} is neither a port number nor the name of a container port")


def readiness(container: dict) -> Probe | None:
    """The container's readinessProbe; ConfigError for a kind the lab does not run."""
    raw = container.get("readinessProbe")
    if not raw:
        return None
    where = f"container {container.get('name')} readinessProbe"
    timing = dict(initial_delay=float(raw.get("initialDelaySeconds") or 0),
                  period=float(raw.get("periodSeconds") or 10), timeout=float(raw.get("timeoutSeconds") or 1),
                  success_threshold=int(raw.get("successThreshold") or 1),
                  failure_threshold=int(raw.get("failureThreshold") or 3))
    if "exec" in raw:
        command = tuple(raw["exec"].get("command") or ())
        if not command:
            raise ConfigError(f"{where}.exec.command", "empty")
        return Probe("exec", command=command, **timing)
    if "httpGet" in raw:
        get = raw["httpGet"]
        scheme = get.get("scheme", "HTTP")
        if scheme not in ("HTTP", "HTTPS"):
            raise ConfigError(f"{where}.httpGet.scheme", f"{scheme!r} is not HTTP or HTTPS")
        headers = tuple((h["name"], h.get("value", "")) for h in get.get("httpHeaders") or [])
        return Probe("httpGet", port=_port(get.get("port"), container, f"{where}.httpGet"), path=get.get("path") or "/",
                     host=get.get("host", ""), scheme=scheme, headers=headers, **timing)
    if "tcpSocket" in raw:
        tcp = raw["tcpSocket"]
        return Probe("tcpSocket", port=_port(tcp.get("port"), container, f"{where}.tcpSocket"),
                     host=tcp.get("host", ""), **timing)
    kinds = [k for k in ("grpc",) if k in raw] or ["none"]
    raise ConfigError(where, f"the lab does not run {kinds[0]} probes", "it runs exec, httpGet and tcpSocket")


class Readiness:
    """kubelet's result counting: a result flips readiness after repeating its threshold."""

    def __init__(self, probe: Probe):
        self.probe, self.ready, self.last, self.run = probe, False, None, 0

    def record(self, ok: bool) -> bool:
        self.run = self.run + 1 if ok == self.last else 1
        self.last = ok
        if self.run >= (self.probe.success_threshold if ok else self.probe.failure_threshold):
            self.ready = ok
        return self.ready


def in_netns(path: str) -> Callable[[], socket.socket]:
    """Makes TCP sockets in the netns at `path` (a node's: kubelet probes from the node)."""
    return lambda: netns.socket_in(path)


def http_check(make_socket: Callable[[], socket.socket], ip: str, probe: Probe) -> bool:
    """An HTTP(S) GET: success for a status in [200, 400)."""
    host = probe.host or ip
    sock = make_socket()
    try:
        sock.settimeout(probe.timeout)
        sock.connect((host, probe.port))
        if probe.scheme == "HTTPS":
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # as kubelet: no verification
            sock = context.wrap_socket(sock, server_hostname=host)
        headers = {"Host": f"{host}:{probe.port}", "User-Agent": USER_AGENT, "Accept": "*/*",
                   "Connection": "close", **dict(probe.headers)}
        request = f"GET {probe.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        sock.sendall(request.encode())
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        parts = reply.split(b"\r\n", 1)[0].split()
        return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
    except OSError:
        return False
    finally:
        sock.close()


def tcp_check(make_socket: Callable[[], socket.socket], ip: str, probe: Probe) -> bool:
    sock = make_socket()
    try:
        sock.settimeout(probe.timeout)
        sock.connect((probe.host or ip, probe.port))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def exec_check(argv: list[str], env: dict[str, str], preexec: Callable, probe: Probe) -> bool:
    try:
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, preexec_fn=preexec, start_new_session=True,
                              timeout=probe.timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Prober:
    """One thread probing one container: `check()` runs the probe once; `started()` is
    the container's current (pid, monotonic start) or None while it is not running."""

    def __init__(self, probe: Probe, check: Callable[[], bool], started: Callable[[], tuple | None],
                 changed: Callable[[], None], clock: Callable[[], float]):
        self.probe, self.check, self.started, self.changed, self.clock = probe, check, started, changed, clock
        self.state = Readiness(probe)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, name="prober", daemon=True)
        self.seen: tuple | None = None

    @property
    def ready(self) -> bool:
        return self.state.ready and self.seen is not None and self.started() == self.seen

    def run(self) -> None:
        while not self.stop_event.is_set():
            current = self.started()
            if current != self.seen:  # a new start: not ready until probed again
                self.seen, self.state = current, Readiness(self.probe)
            if current is not None and self.clock() - current[1] >= self.probe.initial_delay:
                before = self.state.ready
                if self.state.record(self.check()) != before:
                    self.changed()
                self.stop_event.wait(self.probe.period)
            else:
                self.stop_event.wait(0.2)

    def close(self) -> None:
        self.stop_event.set()
