"""The Waypoint the data path holds, with a stand-in Envoy: its status, composed of the
publisher's and the Envoy side's (the JSON `nodeagent status` shows); ACKs from the xDS
server handed to the agent's loop, only this node's; PROXY v2 headers read exactly;
connections Envoy hands back and the agent opens to Envoy's listeners, and their
failures. (The publisher alone: test_waypoint_publisher.py; NACKs over gRPC and the real
Envoy: test_waypoint_nack.py; Envoy itself: test_xds_envoy_acceptance.py; the lab:
tests/e2e/test_waypoint.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.agent import config as agent_config
from nodeagent.agent.proxy.steering import NoWaypoint
from nodeagent.agent.waypoint.waypoint import Waypoint, WaypointUnavailable, read_header
from nodeagent.xds import dataplane
from nodeagent.xds.client import AdsSession
from nodeagent.errors import EnvironmentProblem
from nodeagent.xds.dataplane import DataPlane, ProxyHeader
from nodeagent.xds.envoy import EnvoyUser, admin_get, described, untraversable, writable_parent
from waypoint_world import ALLOW_GET, VS, stand_in_envoy, until, waypoint_config
from xds_world import model


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def seen() -> list:
    """What the handlers got: (the first bytes after the header, the header)."""
    return []


def make(tmp_path: Path, registry: CollectorRegistry, seen: list, **options) -> Waypoint:
    async def handler(sock, header):
        seen.append((sock.recv(100), header))
        sock.close()

    return Waypoint(waypoint_config(tmp_path), registry=registry, log=logging.getLogger("t"), on_upstream=handler,
                    on_deliver=handler, debounce=0.02, supervisor_options={"binary": stand_in_envoy(tmp_path)},
                    **options)


@pytest.fixture
def waypoint(envoy_tmp: Path, registry, seen) -> Waypoint:
    return make(envoy_tmp, registry, seen)


def test_nothing_is_steered_before_envoy_acked(waypoint):
    waypoint.update(model(VS))
    assert waypoint.dataplane() == DataPlane(waypoint.sockets)
    assert waypoint.dataplane().inbound.get(("10.244.1.8", 9000)) is None
    assert NoWaypoint().dataplane().inbound.get(("10.244.1.8", 9000)) is None
    status = waypoint.describe()
    assert list(status) == ["directory", "envoy", "xds", "built_at", "resources", "errors", "warnings", "dataplane",
                            "connections", "unsolicited", "access_log"]
    assert status["access_log"] == {"path": waypoint.sockets.access_log, "lines": 0, "unreadable": 0}
    assert status["xds"] == {"version": "1", "accepted": None, "in_sync": False, "connected": False, "nacks": 0,
                             "snapshot_error": None}
    assert list(status["xds"]) == ["version", "accepted", "in_sync", "connected", "nacks", "snapshot_error"]
    assert status["dataplane"] == {"outbound": [], "inbound": [], "enforced": {}}
    assert status["envoy"]["running"] is False and status["envoy"]["pid"] is None
    assert status["resources"] == {} and status["errors"] == [] and status["connections"] == {"outbound": 0,
                                                                                              "inbound": 0}


def test_only_this_nodes_acks_steer_and_on_the_agents_loop(envoy_tmp, registry, seen):
    threads: list[threading.Thread] = []
    waypoint = make(envoy_tmp, registry, seen, on_steering=lambda: threads.append(threading.current_thread()))

    async def go():
        await waypoint.start()
        try:
            waypoint.update(model(VS + ALLOW_GET))
            first = waypoint.cache.get("node1")
            waypoint.cache.set_snapshot("node2", first)  # another node's proxy ACKs it: nothing is steered here
            with AdsSession(waypoint.sockets.xds, "node2"):
                await until(lambda: waypoint.server.accepted("node2") is first, "node2's ACK")
                await asyncio.sleep(0.05)
                assert waypoint.dataplane() == DataPlane(waypoint.sockets) and threads == []
            with AdsSession(waypoint.sockets.xds, "node1"):
                await until(lambda: waypoint.describe()["xds"]["in_sync"], "node1's ACK in force")
                assert waypoint.dataplane() is first.dataplane and threads == [threading.main_thread()]
                status = waypoint.describe()
                assert status["xds"] == {"version": "1", "accepted": "1", "in_sync": True, "connected": True,
                                         "nacks": 0, "snapshot_error": None}
                assert status["envoy"]["running"] is True and status["envoy"]["pid"] is not None
                assert status["dataplane"]["outbound"] == ["10.96.1.10:9080"]
        finally:
            await waypoint.close()
        assert not os.path.exists(waypoint.sockets.upstream) and not os.path.exists(waypoint.sockets.deliver)
    asyncio.run(go())


def run(coro):
    return asyncio.run(coro)


def test_read_header_reads_exactly_the_header():
    async def go():
        a, b = socket.socketpair()
        a.setblocking(False)
        header = ProxyHeader(("10.244.1.2", 40000), ("10.96.0.10", 8080),
                             ((dataplane.TLV_ENDPOINT, b"10.244.2.3:8080"),))
        b.sendall(header.encode() + b"GET / HTTP/1.1\r\n")
        got = await read_header(a)
        rest = a.recv(100)
        a.close(), b.close()
        return got, rest
    got, rest = run(go())
    assert got == ProxyHeader(("10.244.1.2", 40000), ("10.96.0.10", 8080), ((0xE2, b"10.244.2.3:8080"),))
    assert rest == b"GET / HTTP/1.1\r\n"


@pytest.mark.parametrize("data,why", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a PROXY protocol v2 header"),
    (dataplane.SIGNATURE + b"\x21\x11\xff\xff", "PROXY v2 header of 65535 bytes"),
    (dataplane.SIGNATURE + b"\x21\x11\x00\x0c\x0a", "closed inside the PROXY header"),
])
def test_bad_headers_are_refused_by_name(data, why):
    async def go():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        try:
            await read_header(a)
        finally:
            a.close(), b.close()
    with pytest.raises(ValueError, match=why):
        run(go())
    a, b = socket.socketpair()  # the blocking reader refuses them alike: one parser (dataplane.HeaderReader)
    with a, b:
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(ValueError, match=why):
            dataplane.read_header(a)


def test_envoy_connections_are_handed_over_after_their_header(waypoint, seen, registry):
    async def go():
        a, b = socket.socketpair()
        a.setblocking(False)
        header = ProxyHeader(("10.244.1.2", 1234), ("10.244.1.8", 9000), ((dataplane.TLV_PRINCIPAL, b"spiffe://x"),))
        b.sendall(header.encode() + b"payload")
        with waypoint.expecting("inbound", header):
            await waypoint._accepted("deliver", a)
        garbage_a, garbage_b = socket.socketpair()
        garbage_a.setblocking(False)
        garbage_b.sendall(b"x" * 16)
        await waypoint._accepted("upstream", garbage_a)
        b.close(), garbage_b.close()
        return header
    header = run(go())
    assert seen == [(b"payload", header)]  # the garbage one was closed, never handed over
    assert registry.get_sample_value("nodeagent_waypoint_errors_total", {"reason": "bad_proxy_header"}) == 1


def test_a_hand_back_from_another_user_than_envoys_is_refused(waypoint, seen, registry, monkeypatch):
    """upstream.sock and deliver.sock are reachable by Envoy's group: a connection from
    any other user than Envoy's or the agent's (root) is reset before its header is read."""
    from types import SimpleNamespace
    from nodeagent.agent.waypoint import waypoint as module
    header = ProxyHeader(("10.244.1.2", 0), ("10.96.1.10", 9080))

    async def go():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.sendall(header.encode() + b"x")
        with waypoint.expecting("outbound", header):
            await waypoint._accepted("upstream", a)
        with pytest.raises(ConnectionResetError):
            b.recv(1)
        b.close()
    waypoint.user = SimpleNamespace(uid=os.geteuid() + 10337)  # Envoy's: not this process's
    monkeypatch.setattr(module.os, "geteuid", lambda: os.getuid() + 4242)  # nor the agent's
    run(go())
    assert seen == [] and registry.get_sample_value("nodeagent_waypoint_errors_total", {"reason": "not_envoy"}) == 1


def test_envoy_hands_back_only_for_connections_the_agent_sent_it_and_still_relays(waypoint, seen, registry,
                                                                                 caplog):
    """A compromised Envoy must not act as any pod of the node to anywhere: a connection
    it hands back is handed over only while the agent relays one it sent through Envoy
    for the same client and destination (outbound: the service asked for; inbound: the
    pod and port); any other is reset, counted and reported, and the handler never sees
    it. Source ports are not compared (Envoy pools per PROXY header)."""
    sent_out = ProxyHeader(("10.244.1.2", 0), ("10.96.1.10", 9080), ((dataplane.TLV_SOURCE_WORKLOAD, b"shop/a"),))
    sent_in = ProxyHeader(("10.244.2.7", 40100), ("10.244.1.8", 9000))

    async def hand_back(name: str, header: ProxyHeader) -> bool:
        """Whether the handler got it (else Envoy's end was reset)."""
        a, b = socket.socketpair()
        a.setblocking(False)
        b.sendall(header.encode() + b"x")
        before = len(seen)
        await waypoint._accepted(name, a)
        got = len(seen) > before
        if not got:
            with pytest.raises(ConnectionResetError):
                b.recv(1)
        b.close()
        return got

    def back(header: ProxyHeader, src=None, dst=None) -> ProxyHeader:
        return ProxyHeader(src or header.source, dst or header.destination, header.tlvs)

    async def go():
        results = {"before": await hand_back("upstream", sent_out)}
        with waypoint.expecting("outbound", sent_out), waypoint.expecting("inbound", sent_in):
            with waypoint.expecting("outbound", sent_out):  # two connections of the pod to the service
                pass  # one ended: the other still is relayed
            results.update({
                "outbound": await hand_back("upstream", sent_out),
                "outbound, another source port": await hand_back("upstream", back(sent_out, src=("10.244.1.2", 5))),
                "outbound as another pod": await hand_back("upstream", back(sent_out, src=("10.244.1.3", 0))),
                "outbound to another service": await hand_back("upstream", back(sent_out, dst=("10.96.1.11", 9080))),
                "outbound to another port": await hand_back("upstream", back(sent_out, dst=("10.96.1.10", 9081))),
                "outbound on deliver.sock": await hand_back("deliver", sent_out),
                "inbound": await hand_back("deliver", sent_in),
                "inbound to another pod": await hand_back("deliver", back(sent_in, dst=("10.244.1.9", 9000))),
                "inbound from another client": await hand_back("deliver", back(sent_in, src=("10.244.2.8", 40100))),
                "inbound on upstream.sock": await hand_back("upstream", sent_in),
            })
        results["after"] = await hand_back("deliver", sent_in)
        return results
    with caplog.at_level(logging.WARNING, logger=waypoint.log.name):
        results = run(go())
    assert results == {"before": False, "outbound": True, "outbound, another source port": True,
                       "outbound as another pod": False, "outbound to another service": False,
                       "outbound to another port": False, "outbound on deliver.sock": False, "inbound": True,
                       "inbound to another pod": False, "inbound from another client": False,
                       "inbound on upstream.sock": False, "after": False}
    assert len(waypoint.handoffs) == 0
    assert waypoint.describe()["unsolicited"] == {"upstream": 5, "deliver": 4}
    assert registry.get_sample_value("nodeagent_waypoint_errors_total", {"reason": "unsolicited"}) == 9
    assert [r.getMessage() for r in caplog.records if "handed back" in r.getMessage()] == [
        "waypoint upstream.sock: refused 1 connection(s) Envoy handed back for no connection the agent sent it "
        "(the last: from 10.244.1.2 to 10.96.1.10 port 9080); Envoy acts only for connections the agent relays "
        "through it: a compromised or misbehaving Envoy?"]  # then at most one report every few seconds


def test_open_writes_the_header_or_says_envoy_is_unavailable(waypoint, tmp_path):
    """The header goes to Envoy's listener; with Envoy as its own user (the agent root)
    only a listener of that uid is Envoy's: a socket of another uid at the path (a
    symlink Envoy planted to a socket of the node) is refused."""
    async def go():
        Path(waypoint.sockets.envoy_directory).mkdir(parents=True)
        header = ProxyHeader(("10.244.1.2", 1), ("10.96.1.10", 9080), ((dataplane.TLV_SOURCE_WORKLOAD, b"shop/pp"),))
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(waypoint.sockets.outbound)
        if waypoint.user is not None:
            listener.listen()  # as root: not Envoy's
            with pytest.raises(WaypointUnavailable, match=r"waypoint outbound listener: .*the listener is not "
                               rf"Envoy's \(its peer is uid 0, not {waypoint.user.uid}\)"):
                await waypoint.open("outbound", header)
            listener.close()
            os.unlink(waypoint.sockets.outbound)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(waypoint.sockets.outbound)
            os.seteuid(waypoint.user.uid)  # the peer credentials are the listen(2) caller's
            try:
                listener.listen()
            finally:
                os.seteuid(0)
        else:
            listener.listen()
        sock = await waypoint.open("outbound", header)
        conn, _ = listener.accept()
        got = dataplane.read_header(conn)
        sock.close(), conn.close(), listener.close()
        with pytest.raises(WaypointUnavailable, match="waypoint inbound listener"):
            await waypoint.open("inbound", header)
        return header, got
    header, got = run(go())
    assert got == header
    assert waypoint.describe()["connections"] == {"outbound": 1, "inbound": 0}


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in status)}


def as_user(uid: int, attempt) -> str:
    """What `attempt()` says run as `uid` (gid the same, no groups): "done", or the name of
    the OSError it raised. A forked child switches and tries (the interpreter lives where
    only root may enter)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            try:
                attempt()
                said = b"done"
            except OSError as exc:
                said = type(exc).__name__.encode()
            os.write(write, said)
        finally:
            os._exit(0)
    os.close(write)
    try:
        return os.read(read, 100).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def connect_as(uid: int, path: str) -> str:
    return as_user(uid, lambda: socket.socket(socket.AF_UNIX).connect(path))


def create_as(uid: int, path: str) -> str:
    return as_user(uid, lambda: os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)))


@pytest.mark.root
def test_two_waypoints_run_side_by_side_each_envoy_its_own_user_without_privileges(envoy_tmp):
    """Two agents of one node (a rolling update with surge) each run their waypoint, whose
    Envoy runs as uid/gid 10337 (the default), no other group, no capability, no_new_privs:
    it parses every pod's HTTP. Its admin API answers on its own directory's socket (no
    port of the node: both used 15000 once, and any hostNetwork pod could stop it), which
    only root and Envoy's group reach: another uid can connect to none of the sockets."""
    from nodeagent.agent import config as agent_config

    async def handler(sock, header):
        sock.close()

    async def go():
        waypoints = []
        try:
            for name in ("old", "new"):
                (envoy_tmp / name / "cluster").mkdir(parents=True)
                config = agent_config.load({"node": "node1", "source": f"files:{envoy_tmp / name / 'cluster'}",
                                            "cgroup": str(envoy_tmp), "waypoint_dir": str(envoy_tmp / name / "wp")},
                                           {})
                waypoint = Waypoint(config, registry=CollectorRegistry(), log=logging.getLogger(name),
                                    on_upstream=handler, on_deliver=handler)
                waypoints.append(waypoint)
                await waypoint.start()
                waypoint.update(model(VS))
            answers = []
            for waypoint in waypoints:
                deadline, info = time.monotonic() + 60, {}
                while info.get("state") != "LIVE":  # configured: the xDS server's sockets reached
                    assert time.monotonic() < deadline, f"not live after 60 s: {info}"
                    await asyncio.sleep(0.1)
                    with contextlib.suppress(OSError):
                        info = json.loads(await asyncio.to_thread(admin_get, waypoint.sockets.admin, "/server_info"))
                envoy = waypoint.describe()["envoy"]
                answers.append((info["state"], info["command_line_options"]["concurrency"], envoy["user"],
                                envoy["admin"], proc_status(envoy["pid"])))
                others = [await asyncio.to_thread(connect_as, 4242, path)
                          for path in (waypoint.sockets.admin, waypoint.sockets.xds, waypoint.sockets.upstream,
                                       waypoint.sockets.deliver, waypoint.sockets.outbound)]
                answers.append(others)
                answers.append([await asyncio.to_thread(create_as, 10337, path) for path in
                                (waypoint.directory / "envoy.log.1", waypoint.directory / "planted",
                                 Path(waypoint.sockets.envoy_directory) / "planted")])
                modes = [os.stat(d) for d in (waypoint.directory, waypoint.sockets.envoy_directory)]
                answers.append([(oct(d.st_mode & 0o7777), d.st_uid, d.st_gid) for d in modes])
            return answers
        finally:
            for waypoint in waypoints:
                await waypoint.close()

    answers = run(go())
    for name, (live, others, planted, directory) in zip(("old", "new"), (answers[0:4], answers[4:8])):
        state, concurrency, user, admin, status = live
        assert (state, concurrency, user, admin) == ("LIVE", 2, "10337:10337",
                                                     str(envoy_tmp / name / "wp" / "envoy" / "admin.sock"))
        assert [status[k].split() for k in ("Uid", "Gid")] == [["10337"] * 4, ["10337"] * 4]
        assert (status["Groups"], status["NoNewPrivs"]) == ("", "1")
        assert [status[k] for k in ("CapInh", "CapPrm", "CapEff", "CapAmb")] == ["0000000000000000"] * 4
        assert others == ["PermissionError"] * 5
        # Envoy's uid may make no name the agent, root, would open (envoy.log.1: a symlink to
        # /proc/1/root/etc/cron.d/x, and the agent appended Envoy's output to it), but in envoy/
        assert planted == ["PermissionError", "PermissionError", "done"]
        assert directory == [(oct(0o750), 0, 10337), (oct(0o1770), 0, 10337)]


def test_untraversable_names_the_first_directory_envoys_user_may_not_enter(envoy_tmp):
    tmp_path = envoy_tmp
    me = EnvoyUser(os.geteuid(), os.getegid())
    stranger = EnvoyUser(4242, 4242)
    (tmp_path / "a" / "b").mkdir(parents=True)
    for mode in (0o755, 0o711, 0o701):
        (tmp_path / "a").chmod(mode)
        assert untraversable(tmp_path / "a" / "b", me) is None
    (tmp_path / "a").chmod(0o710)
    assert untraversable(tmp_path / "a" / "b", me) is None  # the owner's bits
    assert untraversable(tmp_path / "a" / "b", EnvoyUser(4242, os.getegid())) is None  # the group's
    found = untraversable(tmp_path / "a" / "b", stranger)
    assert found is not None and found.startswith(f"{tmp_path / 'a'} (mode 0710, owner {me.uid}:{me.gid})")
    (tmp_path / "a").chmod(0o700)
    assert untraversable(tmp_path / "a" / "b", EnvoyUser(4242, os.getegid())).startswith(str(tmp_path / "a"))


def test_writable_parent_names_a_directory_where_envoys_user_could_replace_the_waypoints(envoy_tmp):
    stranger = EnvoyUser(4242, 4242)
    (envoy_tmp / "a" / "wp").mkdir(parents=True)
    (envoy_tmp / "a").chmod(0o755)
    assert writable_parent(envoy_tmp / "a" / "wp", stranger) is None  # /tmp is sticky: only its own names
    (envoy_tmp / "a").chmod(0o757)
    assert writable_parent(envoy_tmp / "a" / "wp", stranger) == envoy_tmp / "a"
    assert described(envoy_tmp / "a").startswith(f"{envoy_tmp / 'a'} (mode 0757")
    (envoy_tmp / "a").chmod(0o1757)
    assert writable_parent(envoy_tmp / "a" / "wp", stranger) is None  # sticky, and not its own
    (envoy_tmp / "a").chmod(0o775)
    assert writable_parent(envoy_tmp / "a" / "wp", EnvoyUser(4242, os.stat(envoy_tmp / "a").st_gid)) == \
        envoy_tmp / "a"  # its group's


@pytest.mark.root
def test_a_parent_anybody_may_write_is_made_sticky_as_the_daemonsets_emptydir_needs(envoy_tmp, registry, seen):
    """kubelet makes an emptyDir 0777 (the DaemonSet's /run/nodeagent, the waypoint
    directory's parent): Envoy's uid could rename the waypoint directory away and put its
    own there. The agent's own such directory is made sticky; another's is refused."""
    run_dir = envoy_tmp / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    waypoint = make(run_dir, registry, seen)

    async def go():
        await waypoint.start()
        await waypoint.close()
    run(go())
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o1777


def test_a_name_envoy_left_where_its_directory_goes_is_removed_first(envoy_tmp, registry, seen):
    """An agent that gave Envoy the whole waypoint directory (01770) let it make any name
    there, `envoy` too: a symlink (followed, the agent would chmod and chown its target)
    or a directory of its own. Replaced by the agent's directory; the target untouched."""
    target = envoy_tmp / "elsewhere"
    target.mkdir()
    waypoint = make(envoy_tmp, registry, seen)
    Path(waypoint.directory).mkdir()
    os.symlink(target, waypoint.sockets.envoy_directory)

    async def go():
        await waypoint.start()
        try:
            info = os.lstat(waypoint.sockets.envoy_directory)
            return stat.S_ISDIR(info.st_mode), info.st_uid
        finally:
            await waypoint.close()
    assert run(go()) == (True, os.geteuid())
    assert stat.S_IMODE(target.stat().st_mode) == 0o755 and list(target.iterdir()) == []


@pytest.mark.root
def test_a_waypoint_directory_envoys_user_cannot_reach_stops_the_start_naming_it(tmp_path):
    """pytest's base directory is 0700: a waypoint there could not run Envoy as 10337, and
    the start says which parent and both ways out, before anything is made."""
    (tmp_path / "cluster").mkdir()
    config = agent_config.load({"node": "node1", "source": f"files:{tmp_path / 'cluster'}", "cgroup": str(tmp_path),
                                "waypoint_dir": str(tmp_path / "wp")}, {})
    waypoint = Waypoint(config, registry=CollectorRegistry(), log=logging.getLogger("t"),
                        on_upstream=None, on_deliver=None)
    base = next(p for p in tmp_path.parents if p.name.startswith("pytest-of-"))
    with pytest.raises(EnvironmentProblem, match=rf"runs as 10337:10337 and cannot reach {re.escape(str(tmp_path))}/wp: "
                       rf"it may not enter {re.escape(str(base))} \(mode 0700.*--waypoint-dir.*--envoy-user root"):
        run(waypoint.start())
    assert sorted(os.listdir(tmp_path / "wp")) == []
    run(waypoint.close())


def test_failed_accepts_on_the_hand_back_sockets_are_reported_once_per_interval(waypoint, seen, caplog):
    """At the descriptor limit accept(2) fails on upstream.sock / deliver.sock every
    retry (ten a second): one warning says so, with the count at most every 10 s, and the
    connection waiting is taken once accepts work again."""
    class Failing(socket.socket):
        def __init__(self):
            super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
            self.errors = 3

        def accept(self):
            if self.errors:
                self.errors -= 1
                raise OSError(24, "Too many open files")
            return super().accept()

    async def main():
        path = waypoint.sockets.path("upstream.sock")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        listener = Failing()
        listener.bind(path)
        listener.listen(8)
        listener.setblocking(False)
        task = asyncio.get_running_loop().create_task(waypoint._serve("upstream", listener))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        header = dataplane.ProxyHeader(("10.244.1.5", 0), ("10.96.0.10", 80))
        try:
            client.connect(path)
            client.sendall(header.encode() + b"hello")
            with waypoint.expecting("outbound", header):
                await until(lambda: seen, "the connection to be handed over after the failed accepts")
            assert seen[0][0] == b"hello" and listener.errors == 0
            lines = [r.getMessage() for r in caplog.records if "accept" in r.getMessage()]
            assert lines == ["waypoint upstream.sock: 1 accept(s) failed since the last report, the last: [Errno 24] "
                             "Too many open files; retrying every 0.1 s, reported at most every 10 s"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            client.close()
            listener.close()
    caplog.set_level(logging.WARNING)
    asyncio.run(main())
