"""A real agent sheds at FULL (nodeagent/memory.py `watch`, `shed`): it runs in a memory
cgroup that charges its sockets (as a container's does), with a limit it holds 80 % of
at rest. A pod holding a valid mesh certificate (one stolen certificate) opens HBONE
connections to an app that writes without end, reads until each has carried a few MiB
(so its windows and the agent's send buffer grow as a fast client's would), and stops
reading. The kernel queues what the agent sends it, in the agent's cgroup: the agent's
reading passes FULL, and within a few seconds it resets the connections holding the
most (the attacker sees their RST; how many depends on how far the queues had grown at
each reading, which tests/unit/test_memory.py pins down) and is back under FULL, up and
serving: a meshed client's connection through the same tunnel, open all along, still
echoes. Before sock_diag looked in the pods' netns the agent found none of them (the
HBONE connections a pod's port 15008 accepted live there) and the queues stayed, up to
the cgroup's limit, which kills the agent with every connection of the node."""

from __future__ import annotations

import math
import socket
import struct
import subprocess
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from hbone_attacker import PORT as TUNNEL_PORT, tls_context
from hbone_attacks import certificates
from kernel_sandbox import socket_charging_cgroup
from meshed_sandbox import PORT, enrolled, meshed_sandbox
from nodeagent import netns
from nodeagent.bench.probe import HoldClient
from nodeagent.bench.sandbox import Sandbox, scaled
from nodeagent.memory import FULL, MIB

pytestmark = pytest.mark.root
FLOOD_PORT = 9100  # the server pod's app that writes without end
CONNECTIONS = 10
READ_FIRST = 4 << 20  # what each attacking connection reads before it stops
WINDOW = 2 ** 31 - 1  # the attacker's HTTP/2 windows: the agent may send all it has
AT_REST = 0.80  # of the limit, what the agent holds before the attack
STEADY = 2 * MIB
TCP_ESTABLISHED, TCP_CLOSE = 1, 7  # tcpi_state: open, and once an RST came
POUR = r"""
import socket, sys, threading
def pour(conn):
    chunk = b"x" * 65536
    try:
        while True:
            conn.sendall(chunk)
    except OSError:
        conn.close()
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=pour, args=(conn,), daemon=True).start()
"""


class Download:
    """One HBONE connection from the attacker pod to `ip`:15008 with a CONNECT to the
    pouring app; blocking, bounded by the socket timeout."""

    def __init__(self, sb: Sandbox, attacker, cert: str, ip: str):
        raw = netns.socket_in(netns.named_path(attacker.netns), socket.AF_INET)
        raw.settimeout(scaled(30))
        raw.connect((ip, TUNNEL_PORT))
        self.sock = tls_context(sb.layout.root_cert, cert).wrap_socket(raw)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        self.conn.increment_flow_control_window(WINDOW - 65535)
        self.stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(self.stream, [(":method", "CONNECT"), (":authority", f"{ip}:{FLOOD_PORT}")])
        self.sock.sendall(self.conn.data_to_send())
        self.status: bytes | None = None
        self.received = 0

    def read(self, total: int) -> None:
        """Read until the stream has carried `total` bytes of the app's."""
        while self.received < total:
            data = self.sock.recv(65536)
            assert data, f"the agent closed the connection after {self.received} bytes"
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    self.status = dict(event.headers)[b":status"]
                    assert self.status == b"200", self.status
                elif isinstance(event, h2.events.DataReceived):
                    self.received += len(event.data)
                elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    pytest.fail(f"the agent ended the download after {self.received} bytes: {event}")
            if pending := self.conn.data_to_send():
                self.sock.sendall(pending)

    def state(self) -> int:
        """The TCP state of the attacker's socket (tcp_info's first byte)."""
        return struct.unpack("B", self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0]


def at_rest(sb: Sandbox) -> dict:
    """The agent's memory status once its waypoint Envoy runs with its config and two
    readings a second apart agree within STEADY (the larger of them)."""
    sb.wait_for(lambda s: s["waypoint"]["envoy"]["running"] and s["waypoint"]["xds"]["in_sync"], 30,
                "the waypoint Envoy running and in sync")
    deadline, last = time.monotonic() + scaled(30), sb.status()["memory"]
    while True:
        time.sleep(scaled(1))
        memory = sb.status()["memory"]
        if abs(memory["usage_bytes"] - last["usage_bytes"]) < STEADY:
            return max(memory, last, key=lambda m: m["usage_bytes"])
        assert time.monotonic() < deadline, f"no steady reading of the agent's memory: {last}, then {memory}"
        last = memory


def test_an_agent_resets_the_connections_of_peers_that_stopped_reading(tmp_path):
    with socket_charging_cgroup() as cgroup, meshed_sandbox(tmp_path, "attacker", "--no-same-node-fast-path",
                                                             cgroup=cgroup) as (sb, client, server, attacker, _):
        # the limit from what the agent and its waypoint hold at rest, sockets included, as
        # its guard reads them
        memory = at_rest(sb)
        assert memory["socket_source"] and memory["socket_source"].startswith(cgroup), memory
        limit_mib = math.ceil(memory["usage_bytes"] / AT_REST / MIB)
        sb.stop_agent()
        sb.start_agent(*sb.ca_args(), "--no-same-node-fast-path", "--memory-limit-mib", str(limit_mib),
                       cgroup=cgroup)
        enrolled(sb)
        assert at_rest(sb)["shedding"] == "on"
        pour = sb.in_pod(server, [sys.executable, "-c", POUR, str(FLOOD_PORT)], stdout=subprocess.PIPE, text=True)
        assert pour.stdout.readline().strip() == "listening"
        held = HoldClient(sb.probe(client, "hold", f"{server.ip}:{PORT}", stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, bufsize=1))
        downloads: list[Download] = []
        try:
            assert held.echo("before") == "before"
            cert = str(certificates(sb.layout, attacker.namespace, sb.workdir)["valid"])
            for _ in range(CONNECTIONS):
                downloads.append(Download(sb, attacker, cert, server.ip))
            for download in downloads:
                download.read(READ_FIRST)  # then never again

            limit = limit_mib * MIB
            sb.wait_for(lambda s: s["memory"]["shed_sockets"] > 0, 30, "the agent to reset connections at FULL")
            deadline = time.monotonic() + scaled(30)
            while not any(d.state() == TCP_CLOSE for d in downloads):
                assert time.monotonic() < deadline, "no attacking connection saw an RST"
                time.sleep(0.05)
            memory = sb.wait_for(lambda s: s["memory"]["usage_bytes"] < FULL * limit, 30,
                                 f"the agent back under {FULL:.0%} of its {limit_mib} MiB limit")["memory"]
            assert sb.agent.poll() is None
            states = [d.state() for d in downloads]  # reset, or still open as the attacker left them
            assert set(states) <= {TCP_ESTABLISHED, TCP_CLOSE}, states
            assert memory["peak_bytes"] >= FULL * limit, memory  # it was past FULL...
            assert 1 <= states.count(TCP_CLOSE) <= memory["shed_sockets"], (states, memory)  # ...and reset these
            assert held.echo("after") == "after"  # the honest connection, open all along
        finally:
            for download in downloads:
                download.sock.close()
            held.close()
