"""Connections to a pod's real tunnel port that never finish TLS (issue 9.4): an unmeshed
pod opens 2000 of them to a meshed pod's :15008 and holds them, silent or after one
ClientHello. Each pending handshake held ~300 KB of the agent for good (asyncio's 256 KiB
TLS read buffer and the rest): 2000 of them took it from 228 MB to 838 MB. Now it admits
`max_pending_handshakes_per_source` of them, resets the rest at once, counting each in
`nodeagent_hbone_limit_hits_total{limit=max_pending_handshakes_per_source}`, drops the
admitted ones at `server_handshake_timeout`, and grows by a few MB; a meshed client
(another source) opens fresh HBONE connections and moves bytes meanwhile, 20/20.

The attacker runs in this process with sockets made in the unmeshed pod's netns
(nothing of it is captured). The sandbox's agent has its handshake timeout
(`hbone_handshake_timeout`) scaled as the waits are: under software emulation 2000
connections take the agent longer than 5 s, and admitted ones timing out mid-flood would
free their slots for more.
"""

from __future__ import annotations

import resource
import socket
import ssl

import pytest

from hbone_attacker import PORT as TUNNEL_PORT
from nodeagent import netns
from meshed_sandbox import meshed_sandbox
from nodeagent.bench.sandbox import Sandbox, scaled
from nodeagent.tunnel import TunnelSettings
from test_agent_tunnel import connect
from test_rapid_reset import HBONE_ENGINES, settle

pytestmark = pytest.mark.root
FLOOD = 2000
SETTINGS = TunnelSettings()  # the agent runs with the default settings
PER_SOURCE = SETTINGS.max_pending_handshakes_per_source
RSS_BOUND_MB = 40  # growth with the flood held: ~128 x 60 KB of TLS state and allocator slack; was 610 MB
PREFIX = "hbone_"
HITS = "hbone_limit_hits_total{direction=inbound,limit=max_pending_handshakes_per_source}"
PENDING = "hbone_pending_handshakes{direction=inbound}"
TIMEOUTS = "hbone_handshake_failures_total{direction=inbound,reason=timeout}"


@pytest.fixture(params=HBONE_ENGINES)
def mesh(tmp_path, request):
    """server (namespace app, meshed, probe server on PORT) and its meshed client;
    attacker (namespace plain, unmeshed); both HBONE engines, as test_rapid_reset.py's
    (the native one keeps the Python path's per-source budget, told of each connection
    up or ended, and counts as it counts)."""
    with meshed_sandbox(tmp_path, "attacker", "--no-same-node-fast-path", "--hbone-engine", request.param) as (
            sb, client, server, attacker, app):
        yield sb, client, server, attacker


@pytest.fixture
def descriptors():
    """Enough descriptors for the flood in this process (and the agent it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * FLOOD))
    assert want >= 2 * FLOOD, f"RLIMIT_NOFILE hard limit {hard} is too low for {FLOOD} connections"
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello (ALPN h2) from a client that will never go on."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    out = ssl.MemoryBIO()
    try:
        ctx.wrap_bio(ssl.MemoryBIO(), out).do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def flood(attacker, ip: str, first: bytes) -> "Fates":
    """FLOOD connections from the attacker pod to ip:15008, each sending `first` (maybe
    nothing), held open."""
    fates = Fates()
    try:
        for _ in range(FLOOD):
            sock = netns.socket_in(netns.named_path(attacker.netns))
            fates.add(sock)
            sock.settimeout(scaled(10))
            try:
                sock.connect((ip, TUNNEL_PORT))
                sock.sendall(first)
            except ConnectionResetError:  # the agent reset it before connect() or sendall() returned
                fates.fates[-1] = "reset"
    except BaseException:
        fates.close()
        raise
    return fates


class Fates:
    """What the agent did with each flood connection, as its client sees it: `reset`,
    `answered` (the agent's TLS flight came: it holds the handshake), else nothing yet."""

    def __init__(self):
        self.socks: list[socket.socket] = []
        self.fates: list[str | None] = []

    def add(self, sock: socket.socket) -> None:
        self.socks.append(sock)
        self.fates.append(None)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()

    def tally(self) -> tuple[int, int]:
        """(reset, answered), reading the connections not known yet."""
        for i, sock in enumerate(self.socks):
            if self.fates[i] is None:
                self.fates[i] = self._read(sock)
        return self.fates.count("reset"), self.fates.count("answered")

    @staticmethod
    def _read(sock: socket.socket) -> str | None:
        sock.setblocking(False)
        try:
            return "answered" if sock.recv(65536) else None  # EOF: timed out silent
        except BlockingIOError:
            return None
        except ConnectionResetError:
            return "reset"


def rss_mb(sb: Sandbox) -> float:
    with open(f"/proc/{sb.agent.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def moved(sb: Sandbox, before: dict) -> dict:
    after = sb.status()["counters"]
    return {k: after[k] - before.get(k, 0) for k in after if k.startswith(PREFIX)}


@pytest.mark.parametrize("first", ["silent", "client_hello"])
def test_a_handshake_flood_is_capped_reset_and_counted(mesh, descriptors, first):
    sb, client, server, attacker = mesh
    before = sb.status()["counters"]
    rss_before = rss_mb(sb)
    fates = flood(attacker, server.ip, client_hello() if first == "client_hello" else b"")
    try:
        # Every connection decided: admitted (pending, or timed out already) or reset.
        settle(lambda: (lambda m: m.get(HITS, 0) + m.get(PENDING, 0) + m.get(TIMEOUTS, 0))(moved(sb, before)),
               FLOOD, f"the agent's decision on all {FLOOD} connections (reset + pending + timed out)")
        during = moved(sb, before)
        result = connect(sb, client, server, 20)  # fresh HBONE connections from another source
        resets = during.get(HITS, 0)
        if first == "client_hello":  # the admitted ones get the agent's answer: it holds their TLS state
            settle(fates.tally, (resets, FLOOD - resets), "(reset, answered) flood connections")
        assert fates.tally()[0] == resets  # each reset counted once
        rss_during = rss_mb(sb)
        print(f"{first}: agent RSS {rss_before:.0f} MB -> {rss_during:.0f} MB with {FLOOD} connections "
              f"({during.get(PENDING, 0):.0f} pending, {resets:.0f} reset)")
        assert result["ok"] == 20 and result["peers"] == {client.ip: 20}
        assert during.get(PENDING, 0) <= PER_SOURCE
        assert resets >= FLOOD - 2 * PER_SOURCE  # FLOOD - PER_SOURCE, unless admitted ones timed out meanwhile
        assert rss_during - rss_before < RSS_BOUND_MB
    finally:
        fates.close()
    # The admitted ones end at the timeout (silent) or as their client leaves: none stays.
    settle(lambda: sb.status()["counters"].get(PENDING), 0, "pending handshakes once the flood is gone")
    after = moved(sb, before)
    assert after[HITS] == resets
    assert after["hbone_connections{direction=inbound}"] == 1  # the meshed client's, pooled: none of the flood
    print(f"{first}: agent RSS {rss_mb(sb):.0f} MB once the flood is gone")
