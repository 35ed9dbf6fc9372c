"""HTTP/2 rapid reset (CVE-2023-44487) against a pod's real tunnel port: a client holding
a valid mesh certificate opens CONNECT streams and resets each at once (RST_STREAM
CANCEL right behind HEADERS). The agent must keep nothing of them — its descriptors and
the app's established connections come back to their baseline exactly — and a flood
beyond the reset-rate limit (`TunnelSettings.max_stream_resets`) ends that connection
with GOAWAY ENHANCE_YOUR_CALM, counted once, while a meshed client's connection through
the same pod's tunnel never notices. Streams reset once the app has them (answered 200,
relayed) end their app connections too.

The attacker runs in this process with a socket made in an unmeshed pod's netns
(nothing of it is captured), speaking HTTP/2 with a bare h2 client.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes

from hbone_attacker import PORT as TUNNEL_PORT, tls_context
from hbone_attacks import certificates
from nodeagent import netns
from nodeagent.bench.probe import HoldClient
from meshed_sandbox import PORT, meshed_sandbox
from nodeagent.bench.sandbox import Sandbox, scaled
from nodeagent.tunnel import TunnelSettings

pytestmark = pytest.mark.root
LIMIT = TunnelSettings().max_stream_resets  # the agent runs with the default settings
BURST = 50  # streams per write, each followed by a PING the agent answers after them
ESTABLISHED = "01"  # st column of /proc/net/tcp
HBONE_ENGINES = ("python", "native")  # the agent's hbone_engine settings these attacks run against


@pytest.fixture(params=HBONE_ENGINES)
def mesh(tmp_path, request):
    """server (namespace app, meshed, probe server on PORT) and its meshed client;
    attacker (namespace plain, unmeshed) holding a valid mesh certificate. Each test runs
    against both HBONE engines: `python` (nodeagent/tunnel, the fallback where the native
    module is missing) and `native` (native/hbone.c, the default; an agent told to use it
    refuses to start without it, so a missing build fails here)."""
    with meshed_sandbox(tmp_path, "attacker", "--no-same-node-fast-path", "--hbone-engine", request.param) as (
            sb, client, server, attacker, app):
        yield sb, client, server, attacker, app


class RapidResetClient:
    """One HBONE connection from the attacker pod to `ip`:15008; blocking, bounded by
    the socket timeout."""

    def __init__(self, sb: Sandbox, attacker, ip: str):
        cert = certificates(sb.layout, attacker.namespace, sb.workdir)["valid"]
        raw = netns.socket_in(netns.named_path(attacker.netns), socket.AF_INET)
        raw.settimeout(scaled(30))
        raw.connect((ip, TUNNEL_PORT))
        self.sock = tls_context(sb.layout.root_cert, str(cert)).wrap_socket(raw)
        self.authority = f"{ip}:{PORT}"
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sent = 0  # streams opened and reset
        self.goaway: h2.events.ConnectionTerminated | None = None

    def reset_streams(self, count: int) -> None:
        """`count` CONNECT streams, each reset right behind its HEADERS, in one write."""
        for _ in range(count):
            self.reset(self._open())
        self.sent += count
        self._send()

    def open_answered(self, count: int) -> list[int]:
        """`count` CONNECT streams, each answered 200 (delivered to the app, relayed)."""
        ids = [self._open() for _ in range(count)]
        self._send()
        statuses: dict[int, bytes] = {}
        while len(statuses) < count:
            for event in self._receive():
                if isinstance(event, h2.events.ResponseReceived):
                    statuses[event.stream_id] = dict(event.headers)[b":status"]
        assert statuses == {stream_id: b"200" for stream_id in ids}
        return ids

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)

    def ping(self) -> bool:
        """Send what is queued and a PING, and read until its ACK (the agent handled
        everything sent before) or a GOAWAY (kept in `goaway`); True unless a GOAWAY came.
        h2 answers a PING as it reads it, so a GOAWAY for frames before it may come right
        behind the ACK: a flood loops until `goaway` is set."""
        self.conn.ping(os.urandom(8))
        self._send()
        acked = False
        while not acked and self.goaway is None:
            acked = any(isinstance(event, h2.events.PingAckReceived) for event in self._receive())
        return self.goaway is None

    def _open(self) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", self.authority)])
        return stream_id

    def _send(self) -> None:
        if pending := self.conn.data_to_send():
            self.sock.sendall(pending)

    def _receive(self) -> list:
        data = self.sock.recv(65536)
        assert data, "the agent closed the connection without GOAWAY"
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
            elif isinstance(event, h2.events.DataReceived):  # the app's greeting: keep the windows open
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if self.goaway is None:
            self._send()
        return events

    def close(self) -> None:
        self.sock.close()


def agent_descriptors(sb: Sandbox) -> int:
    return len(os.listdir(f"/proc/{sb.agent.pid}/fd"))


def app_established(app: subprocess.Popen) -> int:
    """ESTABLISHED TCP connections of the app's netns whose local port is PORT."""
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{app.pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == PORT and fields[3] == ESTABLISHED:
                    count += 1
    return count


def steady(read, readings: int = 10, timeout: float = 30.0) -> int:
    """A baseline: the value once `readings` readings 50 ms apart (scaled, as the agent's
    own steps are slower under emulation) agree, so a passing descriptor (a source poll,
    the CA channel connecting) does not shift it."""
    deadline, last, same = time.monotonic() + scaled(timeout), None, 0
    while same < readings:
        assert time.monotonic() < deadline, f"no steady reading: last {last}"
        value = read()
        same = same + 1 if value == last else 1
        last = value
        time.sleep(scaled(0.05))
    return last


def settle(read, want, what: str, timeout: float = 30.0) -> None:
    """Poll `read()` until it equals `want`; fail with the last reading at the deadline."""
    deadline = time.monotonic() + scaled(timeout)
    while (got := read()) != want:
        assert time.monotonic() < deadline, f"{what}: {got}, want {want}"
        time.sleep(0.05)


def test_rapid_resets_leave_nothing_and_a_flood_gets_goaway(mesh):
    sb, client, server, attacker, app = mesh
    held = HoldClient(sb.probe(client, "hold", f"{server.ip}:{PORT}", stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, bufsize=1))
    rapid = None
    try:
        assert held.echo("before") == "before"
        before = sb.status()["counters"]
        fds_idle = steady(lambda: agent_descriptors(sb))
        apps = app_established(app)
        assert apps == 1  # the held connection

        rapid = RapidResetClient(sb, attacker, server.ip)
        assert rapid.ping()  # TLS and HTTP/2 up: the agent holds this connection now
        fds = steady(lambda: agent_descriptors(sb))
        while rapid.sent < LIMIT:  # up to the limit, not beyond: the connection stays
            rapid.reset_streams(min(BURST, LIMIT - rapid.sent))
            assert rapid.ping(), f"GOAWAY after {rapid.sent} resets, at most {LIMIT} in its window are allowed"
        settle(lambda: (agent_descriptors(sb), app_established(app)), (fds, apps),
               f"(agent descriptors, app connections) after {LIMIT} rapid resets")

        while rapid.goaway is None and rapid.sent < 20 * LIMIT:  # the flood: until the agent has had enough
            rapid.reset_streams(BURST)
            rapid.ping()
        assert rapid.goaway is not None, f"no GOAWAY after {rapid.sent} rapid resets"
        assert rapid.goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
        handled = (rapid.goaway.last_stream_id + 1) // 2  # client streams are 1, 3, 5...; none after it
        rapid.close()
        rapid = None
        settle(lambda: (agent_descriptors(sb), app_established(app)), (fds_idle, apps),
               "(agent descriptors, app connections) once the flooding connection is gone")

        after = sb.status()["counters"]
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("hbone_")}
        assert moved["hbone_limit_hits_total{direction=inbound,limit=stream_resets}"] == 1
        assert moved["hbone_connection_errors_total{direction=inbound,reason=too_many_resets}"] == 1
        assert moved.get("hbone_streams_opened_total{direction=inbound}", 0) == 0  # none was answered
        failures = {k: v for k, v in after.items() if k.startswith("connection_failures_total") and v != before.get(k, 0)}
        assert failures == {"connection_failures_total{direction=inbound,reason=client_reset}":
                            before.get("connection_failures_total{direction=inbound,reason=client_reset}", 0) + handled}
        assert held.echo("after") == "after"  # another connection to the same pod never noticed
    finally:
        if rapid is not None:
            rapid.close()
        held.close()


def test_streams_reset_once_relayed_end_their_app_connections(mesh):
    sb, client, server, attacker, app = mesh
    count = 20
    fds_idle, apps = steady(lambda: agent_descriptors(sb)), app_established(app)
    before = sb.status()["counters"]
    late = RapidResetClient(sb, attacker, server.ip)
    try:
        assert late.ping()
        fds = steady(lambda: agent_descriptors(sb))
        ids = late.open_answered(count)
        settle(lambda: app_established(app), apps + count, "app connections of the answered streams")
        for stream_id in ids:
            late.reset(stream_id)
        assert late.ping()
        # what the native engine keeps while the connection lives: the sockets of the route
        # the agent gave it for more CONNECTs of this kind (agent/proxy/routes.py)
        native = sb.status()["data_path"]["hbone"]["native"]
        routed = native["route_sockets"] if native else 0
        settle(lambda: (agent_descriptors(sb), app_established(app)), (fds + routed, apps),
               f"(agent descriptors, app connections) after resetting {count} relayed streams")
    finally:
        late.close()
    settle(lambda: agent_descriptors(sb), fds_idle, "agent descriptors once the connection is gone")
    after = sb.status()["counters"]
    opened = "hbone_streams_opened_total{direction=inbound}"
    assert after[opened] - before.get(opened, 0) == count
