"""The agent as `nodeagent run` runs it (daemon.Agent with its DataPath), read through its
own admin API: readiness, the model it follows from its source directory, enrolment of
this node's meshed pods and the capture state it leaves, policies in force, and, with a
real mesh CA, traffic between two enrolled pods across HBONE (agent_world.py: stand-ins
only for capture, the /proc scan and entering a pod's netns)."""

from __future__ import annotations

import asyncio
import http.server
import logging
import os
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from agent_world import (CLIENT, HTTPBIN, LEGACY_POD, NODE, REMOTE, SERVER, SLEEP, WAIT, CaptureMaps, MeshCa,
                         PodKernel, PodProcesses, PodSpec, RunningAgent, bound, get, load_config,
                         namespaces, write, write_docs)
from engines import require_native_hbone
from identity_fixtures import run
from relay_world import ended
from nodeagent import native
from nodeagent.agent import daemon
from nodeagent.digests import spec_digest
from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.model import EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_PORTS
from policy_world import document

PING = b"ping\n"
STATUS_KEYS = {"node", "version", "pid", "started_at", "ready", "not_ready", "source", "pods", "waiting",
               "capture", "counters", "config", "identity", "policy", "tunnel", "delivered_connections",
               "waypoint", "data_path", "memory", "open_files"}
NOT_STARTED = (f"no process of pod {SLEEP.uid} in /proc/*/cgroup "
               "(the pod has not started yet or is gone; retrying)")  # PodProcesses' PodNotFound
DENY_SLEEP_SPEC = {"selector": {"matchLabels": {"app": "httpbin"}}, "action": "DENY",
                   "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/mesh/sa/sleep"]}}]}]}


@pytest.fixture
def cluster(tmp_path) -> Path:
    """The source directory: the namespaces, and the unmeshed pod of this node."""
    directory = tmp_path / "cluster"
    write_docs(directory / "namespaces.yaml", namespaces())
    write_docs(directory / "pods.yaml", [LEGACY_POD.document()])
    return directory


@pytest.fixture
def pods(tmp_path) -> PodProcesses:
    return PodProcesses(tmp_path / "netns")


def agent(tmp_path, cluster, pods, capture=None, **settings) -> RunningAgent:
    return RunningAgent(load_config(tmp_path, cluster, **settings), capture or CaptureMaps(), pods)


def write_pods(cluster: Path, *specs: PodSpec) -> None:
    write_docs(cluster / "pods.yaml", [LEGACY_POD.document()] + [p.document() for p in specs])


def policy(name: str, spec: dict) -> str:
    return document("AuthorizationPolicy", "mesh", name, yaml.safe_dump(spec))


def open_fds_to(path: Path) -> int:
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == str(path)
        except OSError:
            pass
    return count


# --- readiness and the model ---------------------------------------------------------

def test_ready_after_the_first_reconcile_and_the_status_says_what_the_agent_runs(tmp_path, cluster, pods):
    async def main():
        node = agent(tmp_path, cluster, pods)
        assert tuple(node.agent.readiness().missing) == ("first reconcile not done yet",)
        async with node:
            status = await node.until_ready()
            assert await node.ready() == (200, "ready\n")
            assert set(status) == STATUS_KEYS
            assert (status["node"], status["pid"], status["not_ready"], status["pods"], status["waiting"]) == (
                NODE, os.getpid(), [], [], [])
            changed_at = status["source"].pop("model_changed_at")
            assert status["source"] == {"location": f"files:{cluster}", "errors": {}, "pods_on_node": 1}
            assert changed_at >= status["started_at"]
            assert status["capture"] == {"pods": 0, "steered": 0}
            assert status["config"]["node"] == NODE and status["config"]["waypoint"] is False
            assert status["identity"] == {"enabled": False, "identities": []}  # no CA
            assert (status["policy"]["resources"], status["policy"]["errors"]) == ({}, [])
            assert status["tunnel"] == {"pooled_connections": 0, "inbound_connections": 0}
            assert (status["delivered_connections"], status["waypoint"]) == (0, None)
            memory = status["memory"]  # memory_limit_mib=off: read (this process), never overloaded
            assert (memory["limit_bytes"], memory["overloaded"], memory["overload_episodes"]) == (None, False, 0)
            assert 0 < memory["usage_bytes"] <= memory["peak_bytes"]
            assert (memory["connections_held"], memory["most_held"]) == (0, [])
            files = status["open_files"]  # this process's
            assert files["limit"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0] and 0 < files["open"] < files["limit"]
            assert (status["data_path"]["setting"], status["data_path"]["engine"]) == (
                "auto", "native" if native_built() else "python")  # auto: native when scripts/setup built it
        assert node.capture.calls == [("load",), ("enrolled_netns",), ("close", True)]
        assert pods.asked == []  # no meshed pod of this node: no netns looked for
        assert not node.config.admin_socket.exists()
    run(main())


def test_a_file_written_to_the_source_changes_the_model_and_the_policies_in_force(tmp_path, cluster, pods):
    async def main():
        async with agent(tmp_path, cluster, pods) as node:
            first = (await node.until_ready())["source"]["model_changed_at"]
            write_pods(cluster, SLEEP, REMOTE, PodSpec("mesh", "starting", "127.78.0.50", phase="Pending"))
            status = await node.until_status(lambda s: len(s["waiting"]) == 2, "the new pods reconciled")
            assert (status["source"]["pods_on_node"], status["pods"]) == (3, [])  # REMOTE is node2's
            assert status["source"]["model_changed_at"] > first
            # both meshed (starting is Pending with its IP: its sandbox is up) but neither
            # started (retried with backoff)
            attempts = [w.pop("attempts") for w in status["waiting"]]
            assert min(attempts) >= 1 and status["waiting"] == [
                {"namespace": "mesh", "name": "sleep", "uid": SLEEP.uid,
                 "reason": NOT_STARTED, "inbound": "open"},  # no netns found: nothing to refuse in
                {"namespace": "mesh", "name": "starting", "uid": "uid-mesh-starting",
                 "reason": NOT_STARTED.replace(SLEEP.uid, "uid-mesh-starting"), "inbound": "open"}]
            write(cluster / "policy.yaml", policy("deny-sleep", DENY_SLEEP_SPEC))
            status = await node.until_status(lambda s: s["policy"]["resources"], "the policy")
            assert status["policy"]["resources"] == {
                "AuthorizationPolicy mesh/deny-sleep": spec_digest(DENY_SLEEP_SPEC)}
            assert (status["policy"]["errors"], status["source"]["pods_on_node"], status["ready"]) == ([], 3, True)
            (cluster / "policy.yaml").unlink()
            await node.until_status(lambda s: s["policy"]["resources"] == {}, "the policy gone")
    run(main())


def test_an_invalid_file_is_reported_and_its_last_good_objects_stay(tmp_path, cluster, pods):
    async def main():
        write(cluster / "policy.yaml", policy("deny-sleep", DENY_SLEEP_SPEC))
        async with agent(tmp_path, cluster, pods) as node:
            good = await node.until_ready()
            assert good["policy"]["resources"] == {"AuthorizationPolicy mesh/deny-sleep": spec_digest(DENY_SLEEP_SPEC)}
            write(cluster / "pods.yaml", "kind: Pod\nmetadata: {name: [broken\n")  # not YAML
            status = await node.until_status(lambda s: s["source"]["errors"], "the error")
            assert list(status["source"]["errors"]) == [str(cluster / "pods.yaml")]
            assert status["source"]["pods_on_node"] == 1  # legacy, as last read
            assert status["source"]["model_changed_at"] == good["source"]["model_changed_at"]
            # A policy that is valid YAML but an invalid policy: the version in force stays.
            bad = {**DENY_SLEEP_SPEC, "action": "MAYBE"}
            write(cluster / "policy.yaml", policy("deny-sleep", bad))
            status = await node.until_status(lambda s: s["policy"]["errors"], "the policy error")
            assert status["policy"]["resources"] == good["policy"]["resources"]
            assert len(status["policy"]["errors"]) == 1 and "MAYBE" in status["policy"]["errors"][0]
            write_pods(cluster)  # fixed
            status = await node.until_status(lambda s: str(cluster / "pods.yaml") not in s["source"]["errors"],
                                             "the file fixed")
            assert (status["source"]["errors"], status["source"]["pods_on_node"], status["ready"]) == ({}, 1, True)
    run(main())


def test_a_source_directory_gone_after_it_was_read_keeps_the_model_and_the_agent_ready(
        tmp_path, cluster, pods, monkeypatch):
    PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=501)
    write_pods(cluster, SLEEP)

    async def main():
        async with agent(tmp_path, cluster, pods) as node:
            before = await node.until_ready()
            assert [p["name"] for p in before["pods"]] == ["sleep"]
            cluster.rename(tmp_path / "moved")
            status = await node.until_status(lambda s: s["source"]["errors"], "the scan error")
            assert status["source"]["errors"] == {
                str(cluster): f"source directory {cluster} is gone (recreate it; the objects last read stay in force)"}
            assert (status["ready"], status["source"]["pods_on_node"], status["pods"]) == (
                True, 2, before["pods"])
            assert await node.ready() == (200, "ready\n")
            await node.rounds(3)
            assert node.capture.named("remove_netns", "unsteer_inbound") == []  # nothing concluded
            (tmp_path / "moved").rename(cluster)
            status = await node.until_status(lambda s: not s["source"]["errors"], "the directory back")
            assert (status["pods"], status["source"]["pods_on_node"]) == (before["pods"], 2)
    run(main())


def test_unreadable_at_start_the_agent_is_not_ready_and_removes_no_capture_a_previous_agent_left(
        tmp_path, cluster, pods, monkeypatch):
    """Stale entries (cookies no meshed pod owns now) go only once the source was read:
    an unreadable source is no empty cluster."""
    PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=901)  # its netns survived the previous agent: adopted
    write_pods(cluster, SLEEP)
    capture = CaptureMaps(left={901: [], 902: [], 903: [9090]})
    node = agent(tmp_path, cluster, pods, capture)
    cluster.rename(tmp_path / "later")
    cluster.write_text("not a directory\n")

    async def main():
        async with node:
            await node.rounds(5)
            code, body = await node.ready()
            assert (code, body) == (503, f"not ready: cluster state not read yet: source {cluster} "
                                         "is not a directory\n")
            status = await node.status()
            assert (status["ready"], status["source"]["errors"], status["pods"]) == (
                False, {str(cluster): f"source {cluster} is not a directory"}, [])
            assert capture.calls == [("load",)]  # nothing enrolled, nothing removed, not even looked at
            cluster.unlink()
            (tmp_path / "later").rename(cluster)
            status = await node.until_ready()
            assert [(p["name"], p["netns_cookie"]) for p in status["pods"]] == [("sleep", 901)]
            assert capture.named("enrolled_netns", "remove_netns", "unsteer_inbound") == [
                ("enrolled_netns",), ("remove_netns", 902), ("unsteer_inbound", 902, [LEGACY_POD.ip]),
                ("remove_netns", 903), ("unsteer_inbound", 903, [])]
            assert capture.pods == {901: []}
    run(main())


# --- enrolment -----------------------------------------------------------------------

def test_a_meshed_pod_is_enrolled_when_its_process_starts_and_released_when_it_goes(
        tmp_path, cluster, pods, monkeypatch):
    kernel = PodKernel(pods, monkeypatch)
    write_pods(cluster, SLEEP)

    async def main():
        async with agent(tmp_path, cluster, pods) as node:
            c = node.config
            status = await node.until_ready()  # a pod that cannot be enrolled yet does not hold readiness
            assert [(w["name"], w["reason"]) for w in status["waiting"]] == [
                ("sleep", NOT_STARTED)]
            pods.start(SLEEP, cookie=501)
            status = await node.until_status(lambda s: s["pods"], "the pod enrolled")  # retried, no change needed
            (pod,) = status["pods"]
            assert (pod["name"], pod["uid"], pod["ip"], pod["netns_cookie"], pod["listeners"], status["waiting"]) == (
                "sleep", SLEEP.uid, CLIENT, 501,
                [f"{CLIENT}:{c.outbound_port}", f"{CLIENT}:{c.inbound_port}", f"{CLIENT}:{c.tunnel_port}"], [])
            assert node.capture.named("enrol_netns", "steer_inbound") == [
                ("enrol_netns", 501, []), ("steer_inbound", 501, [CLIENT], (CLIENT, c.inbound_port), [])]
            assert kernel.routing == [("install", CLIENT)]
            with socket.create_connection((CLIENT, c.inbound_port), timeout=5):
                pass  # the in-pod listener accepts
            sleep = SLEEP.but(labels={"istio.io/dataplane-mode": "none"})
            write_pods(cluster, sleep)  # opted out
            status = await node.until_status(lambda s: not s["pods"], "the pod removed")
            assert (status["waiting"], status["source"]["pods_on_node"]) == ([], 2)
            assert node.capture.named("unsteer_inbound", "remove_netns") == [
                ("unsteer_inbound", 501, [CLIENT]), ("remove_netns", 501)]
            await node.until(lambda: len(kernel.routing) == 2, "the routing removed")
            assert kernel.routing == [("install", CLIENT), ("remove", CLIENT)]
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((CLIENT, c.inbound_port), timeout=5)
    run(main())


def test_changed_excluded_ports_update_the_enrolled_pod_in_place(tmp_path, cluster, pods, monkeypatch):
    kernel = PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=501)
    write_pods(cluster, SLEEP)
    capture = CaptureMaps()

    async def main():
        async with agent(tmp_path, cluster, pods, capture) as node:
            inbound = (CLIENT, node.config.inbound_port)
            (before,) = (await node.until_ready())["pods"]
            del capture.calls[:]
            write_pods(cluster, SLEEP.but(annotations={EXCLUDE_OUTBOUND_PORTS: "6379, 5432",
                                                       EXCLUDE_INBOUND_PORTS: "8081"}))
            status = await node.until_status(lambda s: s["pods"][0]["exclude_inbound_ports"], "the update")
            (pod,) = status["pods"]
            assert (pod["exclude_outbound_ports"], pod["exclude_inbound_ports"]) == ([5432, 6379], [8081])
            assert {k: v for k, v in pod.items() if not k.startswith("exclude")} == {
                k: v for k, v in before.items() if not k.startswith("exclude")}  # not re-enrolled
            assert capture.calls == [("enrol_netns", 501, [5432, 6379]),
                                     ("steer_inbound", 501, [CLIENT], inbound, [8081])]
            assert kernel.routing == [("install", CLIENT)]
    run(main())


def test_an_excluded_ports_update_the_capture_refuses_is_retried_until_it_applies(tmp_path, cluster, pods,
                                                                                 monkeypatch):
    PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=501)
    excluding = SLEEP.but(annotations={EXCLUDE_OUTBOUND_PORTS: "5432", EXCLUDE_INBOUND_PORTS: "8081"})
    write_pods(cluster, excluding)
    capture = CaptureMaps()

    async def main():
        async with agent(tmp_path, cluster, pods, capture) as node:
            inbound = (CLIENT, node.config.inbound_port)
            await node.until_ready()
            capture.failing["steer_inbound"] = OSError(12, "cannot update the map")
            write_pods(cluster, SLEEP)  # the exclusions withdrawn
            await node.until(lambda: len(capture.named("steer_inbound")) == 2, "the update tried")
            del capture.failing["steer_inbound"]
            status = await node.until_status(lambda s: s["pods"][0]["exclude_inbound_ports"] == [],
                                             "the update applied", timeout=20)
            assert status["pods"][0]["exclude_outbound_ports"] == []
            assert capture.named("enrol_netns", "steer_inbound")[-2:] == [
                ("enrol_netns", 501, []), ("steer_inbound", 501, [CLIENT], inbound, [])]
    run(main())


def test_an_enrolment_that_fails_half_way_leaves_nothing_of_the_pod_and_is_retried(tmp_path, cluster, pods,
                                                                                     monkeypatch):
    kernel = PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=501)
    write_pods(cluster, SLEEP)
    capture = CaptureMaps()
    capture.failing["steer_inbound"] = OSError(16, "cannot attach sk_lookup")  # after listeners and na_pods

    async def main():
        async with agent(tmp_path, cluster, pods, capture) as node:
            c = node.config
            status = await node.until_status(lambda s: s["waiting"], "the failure")
            (waiting,) = status["waiting"]
            assert (waiting["name"], waiting["reason"], status["pods"]) == (
                "sleep", "OSError: [Errno 16] cannot attach sk_lookup", [])
            attempts = len(capture.named("steer_inbound"))
            assert attempts >= 1
            assert capture.named("enrol_netns", "steer_inbound", "unsteer_inbound", "remove_netns")[:4] == [
                ("enrol_netns", 501, []), ("steer_inbound", 501, [CLIENT], (CLIENT, c.inbound_port), []),
                ("unsteer_inbound", 501, [CLIENT]), ("remove_netns", 501)]
            assert (capture.pods, capture.steered) == ({}, {})  # every attempt undone
            assert kernel.routing == [("install", CLIENT), ("remove", CLIENT)] * attempts
            assert open_fds_to(pods.netns_file(SLEEP)) == 1  # the resolver's own; the enroller's dup closed
            for port in (c.outbound_port, c.inbound_port, c.tunnel_port):
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection((CLIENT, port), timeout=5)
            del capture.failing["steer_inbound"]
            status = await node.until_status(lambda s: s["pods"], "enrolled by a retry")
            assert ([p["name"] for p in status["pods"]], status["waiting"], capture.pods) == (["sleep"], [], {501: []})
            assert open_fds_to(pods.netns_file(SLEEP)) == 2
    run(main())


@pytest.mark.parametrize("keep", [True, False])
def test_on_stop_capture_and_routing_are_kept_unless_keep_on_exit_is_off(tmp_path, cluster, pods, monkeypatch, keep):
    kernel = PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=501)
    write_pods(cluster, SLEEP)

    async def main():
        async with agent(tmp_path, cluster, pods, keep_on_exit=keep) as node:
            status = await node.until_ready()
            assert [p["name"] for p in status["pods"]] == ["sleep"]
            assert status["config"]["keep_on_exit"] is keep
        assert node.capture.calls[-1] == ("close", keep)
        assert node.capture.named("remove_netns", "unsteer_inbound") == []  # capture goes with close(), if at all
        assert kernel.routing == [("install", CLIENT)] + ([] if keep else [("remove", CLIENT)])
        assert not node.config.admin_socket.exists()
        assert open_fds_to(pods.netns_file(SLEEP)) == 0  # the enroller's netns fd, and the resolver's
    run(main())


def test_the_status_renders_when_the_capture_maps_cannot_be_read(tmp_path, cluster, pods):
    async def main():
        capture = CaptureMaps()
        capture.stats_error = NodeagentError("capture is not loaded", "call CaptureLoader.load() first")
        async with agent(tmp_path, cluster, pods, capture) as node:
            status = await node.until_ready()
            assert status["capture"] == {"error": "capture is not loaded (call CaptureLoader.load() first)"}
    run(main())


def test_an_agent_that_cannot_listen_on_its_admin_address_stops_and_keeps_capture(tmp_path, cluster, pods):
    async def main():
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            node = agent(tmp_path, cluster, pods, admin_address=f"127.0.0.1:{port}")
            with pytest.raises(ConfigError) as failed:
                async with node:
                    pass
        message = str(failed.value)
        assert message.startswith(f"setting admin_address: cannot listen on 127.0.0.1:{port}: ")
        assert message.endswith("address already in use (is another process (another agent?) listening there? "
                                "pick another --admin-address)")
        assert node.capture.calls == [("load",), ("close", True)]
    run(main())


def test_the_flow_log_is_closed_when_the_agent_stops(tmp_path, cluster, pods):
    async def main():
        async with agent(tmp_path, cluster, pods) as node:
            await node.until_ready()
            assert open_fds_to(tmp_path / "flows.jsonl") == 1
        assert open_fds_to(tmp_path / "flows.jsonl") == 0
    run(main())


# --- with a mesh CA: traffic between two enrolled pods -------------------------------

class App:
    """httpbin's app on its pod IP: greets each client with the address it sees, then
    echoes until EOF."""

    async def start(self) -> "App":
        self.server = await asyncio.start_server(self._serve, SERVER, 0)
        self.address = (SERVER, self.server.sockets[0].getsockname()[1])
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{writer.get_extra_info('peername')[0]}\n".encode())
        try:
            while data := await reader.read(65536):
                writer.write(data)
            writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def mesh_ca(tmp_path, cluster):
    ca = MeshCa(tmp_path, cluster)
    yield ca
    ca.stop()


@pytest.fixture
def meshed(tmp_path, cluster, pods, monkeypatch, mesh_ca):
    """Both meshed pods of this node started; an agent with the CA (not started yet)."""
    PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=501)
    pods.start(HTTPBIN, cookie=502)
    write_pods(cluster, SLEEP, HTTPBIN)
    # These tests are about HBONE between this node's pods: the same-node fast path
    # (on by default) would skip it; it has its own tests (test_samenode.py).
    return agent(tmp_path, cluster, pods, same_node_fast_path=False, **mesh_ca.settings)


async def dial_out(node: RunningAgent, dst: tuple[str, int]):
    """sleep's app connecting to `dst`: captured to its outbound listener, the capture
    having recorded the original destination at connect."""
    sock = bound(CLIENT)
    node.capture.record_original_dst(501, sock.getsockname()[1], dst)
    await asyncio.get_running_loop().sock_connect(sock, (CLIENT, node.config.outbound_port))
    return await asyncio.open_connection(sock=sock)


async def greeted_and_echoed(reader, writer) -> None:
    assert await reader.readline() == f"{CLIENT}\n".encode()  # delivered as the client pod
    writer.write(PING)
    assert await reader.readexactly(len(PING)) == PING


async def finish(reader, writer) -> None:
    writer.write_eof()
    assert await ended(reader) == "eof"
    writer.close()


def tunnel(status: dict) -> tuple[int, int, int]:
    return (status["tunnel"]["pooled_connections"], status["tunnel"]["inbound_connections"],
            status["delivered_connections"])


def test_not_ready_while_an_enrolled_pod_has_no_certificate(meshed, mesh_ca):
    """The CA is down when the agent starts: not ready, naming each identity and why;
    ready once the CA answers a retry."""
    async def main():
        async with meshed as node:
            code, body = await node.until_ready_says(lambda body: body.count("CA unreachable") == 2)
            lines = body.splitlines()
            assert code == 503 and len(lines) == 2
            for line, account in zip(lines, ("httpbin", "sleep")):
                assert line.startswith(f"not ready: no valid certificate for spiffe://cluster.local/ns/mesh/sa/"
                                       f"{account}: CA unreachable ("), line
            mesh_ca.start()
            status = await node.until_ready()
            assert [(i["identity"], i["valid"], i["error"]) for i in status["identity"]["identities"]
                    if "/nodeagent/node/" not in i["identity"]] == [
                ("spiffe://cluster.local/ns/mesh/sa/httpbin", True, None),
                ("spiffe://cluster.local/ns/mesh/sa/sleep", True, None)]
            assert await node.ready() == (200, "ready\n")
            # the node's own identity (it vouches for its pods' requests with it): fetched
            # beside theirs, retried as theirs, and readiness never waited for it
            node_id = "spiffe://cluster.local/nodeagent/node/node1"
            assert status["identity"]["node"]["identity"] == node_id
            for _ in range(600):
                status = await node.status()
                if status["identity"]["node"]["ready"]:
                    break
                await asyncio.sleep(0.05)
            assert [i["valid"] for i in status["identity"]["identities"] if i["identity"] == node_id] == [True]
    run(main(), 60)


def test_pods_talk_over_hbone_and_a_policy_change_resets_what_it_now_denies(meshed, mesh_ca):
    mesh_ca.start()

    async def main():
        app = await App().start()
        try:
            async with meshed as node:
                await node.until_ready()
                reader, writer = await dial_out(node, app.address)
                await greeted_and_echoed(reader, writer)
                assert tunnel(await node.status()) == (1, 1, 1)
                write(node.config.source_dir / "policy.yaml", policy("deny-sleep", DENY_SLEEP_SPEC))
                assert await ended(reader) == "reset"  # re-checked at once, not at its next connection
                writer.close()
                status = await node.until_status(lambda s: s["delivered_connections"] == 0, "the reset")
                assert status["policy"]["resources"] == {
                    "AuthorizationPolicy mesh/deny-sleep": spec_digest(DENY_SLEEP_SPEC)}
                metrics = await node.metrics()
                assert metrics[("nodeagent_inbound_connections_revoked_total", (("reason", "deny"),))] == 1
                reader, writer = await dial_out(node, app.address)  # a new one meets the policy
                assert await ended(reader) == "reset"
                writer.close()
                (node.config.source_dir / "policy.yaml").unlink()
                await node.until_status(lambda s: s["policy"]["resources"] == {}, "the policy withdrawn")
                reader, writer = await dial_out(node, app.address)
                await greeted_and_echoed(reader, writer)
                await finish(reader, writer)
        finally:
            app.close()
    run(main(), 60)


def test_a_pod_relabelled_into_a_denys_selector_has_what_it_denies_reset(meshed, mesh_ca, cluster):
    """A DENY selects pods labelled locked=yes, none at first; httpbin gets the label while
    sleep's connection to it is open: the connection is reset and the next one refused.
    The re-check ran before the enrolled pods took their new labels (the reconcile after
    it refreshed them), so nothing was re-checked under the label and it stayed open."""
    mesh_ca.start()
    locked = {**DENY_SLEEP_SPEC, "selector": {"matchLabels": {"locked": "yes"}}}

    async def main():
        app = await App().start()
        try:
            async with meshed as node:
                write(node.config.source_dir / "policy.yaml", policy("deny-locked", locked))
                await node.until_status(lambda s: "AuthorizationPolicy mesh/deny-locked" in s["policy"]["resources"],
                                        "the policy in force")
                await node.until_ready()
                reader, writer = await dial_out(node, app.address)
                await greeted_and_echoed(reader, writer)
                write_pods(cluster, SLEEP, HTTPBIN.but(labels={"locked": "yes"}))
                assert await ended(reader) == "reset"
                writer.close()
                await node.until_status(lambda s: s["delivered_connections"] == 0, "the reset")
                reader, writer = await dial_out(node, app.address)
                assert await ended(reader) == "reset"
                writer.close()
        finally:
            app.close()
    run(main(), 60)


def test_new_labels_and_the_policies_of_the_same_model_go_in_force_together(meshed, mesh_ca, cluster,
                                                                            monkeypatch):
    """httpbin moves from version v1 to v2 while its ALLOW (only from `other`) moves with
    it, in one model. The pods took their new labels before the policies were rebuilt (in
    the config thread): meanwhile httpbin, now v2, had no ALLOW applying (the old one
    selected v1) and took anybody's connection. While the build is held here, sleep's
    connection meets the old labels and the old policy: refused; then the new ones: refused."""
    import threading

    from nodeagent.agent.proxy.policies import PolicyState

    mesh_ca.start()
    only_other = {"action": "ALLOW", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/mesh/sa/other"]}}]}]}
    held, building = threading.Event(), threading.Event()
    build = PolicyState.build

    def slow_build(self, model):
        if "v2" in str(model.pods[("mesh", "httpbin")].labels):
            building.set()
            assert held.wait(20)
        return build(self, model)

    async def main():
        app = await App().start()
        try:
            async with meshed as node:
                await node.until_ready()
                reader, writer = await dial_out(node, app.address)  # no policy yet: delivered
                await greeted_and_echoed(reader, writer)
                await finish(reader, writer)
                v1 = {**only_other, "selector": {"matchLabels": {"version": "v1"}}}
                write_docs(cluster / "pods.yaml", [LEGACY_POD.document(), SLEEP.document(),  # one file: one model
                                                   HTTPBIN.but(labels={"version": "v1"}).document(),
                                                   *yaml.safe_load_all(policy("only-other", v1))])
                await node.until_status(lambda s: s["policy"]["resources"].get("AuthorizationPolicy mesh/only-other")
                                        == spec_digest(v1), "the v1 policy in force")
                await node.until_ready()
                reader, writer = await dial_out(node, app.address)
                assert await ended(reader) == "reset"
                writer.close()
                monkeypatch.setattr(PolicyState, "build", slow_build)
                v2 = {**only_other, "selector": {"matchLabels": {"version": "v2"}}}
                write_docs(cluster / "pods.yaml", [LEGACY_POD.document(), SLEEP.document(),
                                                   HTTPBIN.but(labels={"version": "v2"}).document(),
                                                   *yaml.safe_load_all(policy("only-other", v2))])
                await asyncio.to_thread(building.wait, 20)
                reader, writer = await dial_out(node, app.address)  # during the build
                assert await ended(reader) == "reset"
                writer.close()
                held.set()
                await node.until_status(lambda s: s["policy"]["resources"].get("AuthorizationPolicy mesh/only-other")
                                        == spec_digest(v2), "the v2 policy in force")
                reader, writer = await dial_out(node, app.address)
                assert await ended(reader) == "reset"
                writer.close()
        finally:
            held.set()
            app.close()
    run(main(), 60)


def test_a_removed_pod_keeps_its_relayed_connections_then_its_tunnel_connections_are_released(meshed, mesh_ca,
                                                                                               cluster):
    mesh_ca.start()

    async def main():
        app = await App().start()
        try:
            async with meshed as node:
                await node.until_ready()
                reader, writer = await dial_out(node, app.address)
                await greeted_and_echoed(reader, writer)
                write_pods(cluster, SLEEP.but(labels={"istio.io/dataplane-mode": "none"}),
                           HTTPBIN)
                status = await node.until_status(lambda s: [p["name"] for p in s["pods"]] == ["httpbin"],
                                                 "sleep removed")
                assert tunnel(status) == (1, 1, 1)  # its relay goes on, and so does its pool
                writer.write(PING)
                assert await reader.readexactly(len(PING)) == PING
                await finish(reader, writer)
                status = await node.until_status(lambda s: tunnel(s) == (0, 0, 0), "the pool released")
        finally:
            app.close()
    run(main(), 60)


def test_an_agent_stopping_while_a_removed_pod_still_relays_resets_the_connection(meshed, mesh_ca, cluster):
    """Its pool's release, waiting for that relay, is cancelled with it: the agent stops
    at once rather than when the client is done."""
    mesh_ca.start()

    async def main():
        app = await App().start()
        try:
            async with meshed as node:
                await node.until_ready()
                reader, writer = await dial_out(node, app.address)
                await greeted_and_echoed(reader, writer)
                write_pods(cluster, SLEEP.but(labels={"istio.io/dataplane-mode": "none"}), HTTPBIN)
                await node.until_status(lambda s: [p["name"] for p in s["pods"]] == ["httpbin"], "sleep removed")
                await node.stop()
            assert await ended(reader) == "reset"  # not FIN: the client must not take it for a complete answer
            writer.close()
        finally:
            app.close()
    run(main(), 60)


def test_a_removed_pod_drains_its_inbound_tunnel_connections(meshed, mesh_ca, cluster):
    mesh_ca.start()

    async def main():
        app = await App().start()
        try:
            async with meshed as node:
                await node.until_ready()
                reader, writer = await dial_out(node, app.address)
                await greeted_and_echoed(reader, writer)
                await finish(reader, writer)
                status = await node.until_status(lambda s: s["delivered_connections"] == 0, "the relay ended")
                assert tunnel(status) == (1, 1, 0)  # the HBONE connection stays pooled
                write_pods(cluster, SLEEP)  # httpbin deleted
                status = await node.until_status(lambda s: tunnel(s) == (0, 0, 0), "the connection drained")
                assert [p["name"] for p in status["pods"]] == ["sleep"]
        finally:
            app.close()
    run(main(), 60)


def test_a_reconcile_that_fails_is_logged_and_retried(tmp_path, cluster, pods, monkeypatch, caplog):
    PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=501)

    async def main():
        async with agent(tmp_path, cluster, pods) as node:
            await node.until_ready()
            pods.fail_next = RuntimeError("a bug in one round")
            write_pods(cluster, SLEEP)
            await node.until(lambda: any(r.getMessage() == "reconcile failed; retrying next round"
                                         for r in caplog.records), "the failure logged")
            # A later round within a few poll intervals, as for a pod whose enrolment failed.
            status = await node.until_status(lambda s: s["pods"], "sleep enrolled by a later round", timeout=20)
            assert [p["name"] for p in status["pods"]] == ["sleep"]
    with caplog.at_level(logging.ERROR, "test.agent"):
        run(main())


# --- start-up and shutdown -----------------------------------------------------------

def test_an_agent_stopped_before_its_source_ever_read_leaves_capture_as_it_was(tmp_path, cluster, pods):
    capture = CaptureMaps(left={902: [8080]})
    node = agent(tmp_path, cluster, pods, capture)
    cluster.rename(tmp_path / "later")
    cluster.write_text("not a directory\n")

    async def main():
        async with node:
            await node.rounds(3)
        assert capture.calls == [("load",), ("close", True)]
        assert capture.pods == {902: [8080]}
    run(main())


def test_a_ca_token_or_root_the_agent_cannot_use_fails_its_start_naming_the_setting(tmp_path, cluster, pods,
                                                                                   mesh_ca):
    settings = mesh_ca.settings
    Path(settings["ca_token_file"]).write_text("\n")
    with pytest.raises(ConfigError) as empty:
        agent(tmp_path, cluster, pods, **settings)
    assert str(empty.value) == (f"setting ca_token_file: {settings['ca_token_file']} is empty "
                                "(it must hold this node's token for the CA)")
    (tmp_path / "root.pem").write_text("x")
    config = load_config(tmp_path, cluster, **{**settings, "ca_root_cert": str(tmp_path / "root.pem")})
    (tmp_path / "root.pem").unlink()  # gone after the config was checked
    with pytest.raises(ConfigError) as unreadable:
        RunningAgent(config, CaptureMaps(), pods)
    assert str(unreadable.value) == (f"setting ca_root_cert: cannot read {tmp_path / 'root.pem'}: "
                                     "No such file or directory")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_nodeagent_run_stops_on_a_signal_and_keeps_capture_for_the_next_agent(tmp_path, cluster, monkeypatch, signum):
    """daemon.run, the `nodeagent run` entry point, with only the capture loader stood in."""
    capture = CaptureMaps()
    monkeypatch.setattr(daemon, "new_capture", lambda config, log: capture)
    config = load_config(tmp_path, cluster)
    answers = []

    def signal_once_ready() -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                answers.append(get(config.admin_socket, "/healthz/ready"))
            except OSError:
                answers.append(None)
            if answers[-1] == (200, "ready\n"):
                os.kill(os.getpid(), signum)  # only now: the agent's handler is installed
                return
            time.sleep(0.01)

    logger = logging.getLogger("nodeagent")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    signaller = threading.Thread(target=signal_once_ready)
    signaller.start()
    try:
        assert daemon.run(config) == 0
    finally:
        signaller.join()
        logger.handlers[:], logger.level, logger.propagate = saved
    assert answers[-1] == (200, "ready\n")
    assert capture.calls == [("load",), ("enrolled_netns",), ("close", True)]
    assert not config.admin_socket.exists()


def test_the_capture_loader_is_built_from_the_agent_config(tmp_path, cluster):
    config = load_config(tmp_path, cluster, mark="0x777", compile_timeout="450")
    loader = daemon.new_capture(config, logging.getLogger("test.agent"))
    assert (loader.cgroup, loader.pin_dir, loader.mark, loader.ports, loader.compile_timeout) == (
        str(tmp_path / "cgroup"), str(tmp_path / "bpffs"), 0x777,
        {"outbound": config.outbound_port, "inbound": config.inbound_port, "tunnel": config.tunnel_port,
         "admin": config.admin_port}, 450.0)


# --- with the node's waypoint (a real Envoy) ------------------------------------------

JWKS = (b'{"keys": [{"kty": "EC", "crv": "P-256", "kid": "one", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",'
        b' "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}')


@pytest.fixture
def issuer(monkeypatch):
    """A JWT issuer's key set over HTTP on 127.0.0.1 (a thread); its jwksUri. The agent
    fetches from no loopback address outside tests (jwks.refused_address)."""
    from nodeagent.agent.waypoint import jwks

    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jwks, "refused_address", lambda ip: None)

    class Keys(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(JWKS)))
            self.end_headers()
            self.wfile.write(JWKS)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Keys)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/keys.json"
    server.shutdown()
    server.server_close()


def test_with_the_waypoint_envoy_gets_the_model_and_the_keys_its_jwt_rules_name(tmp_path, cluster, pods, issuer,
                                                                                 envoy_tmp):
    jwt = {"selector": {"matchLabels": {"app": "httpbin"}},
           "jwtRules": [{"issuer": "https://issuer.example", "jwksUri": issuer}]}
    write(cluster / "jwt.yaml", document("RequestAuthentication", "mesh", "jwt", yaml.safe_dump(jwt)))

    async def main():
        node = agent(tmp_path, cluster, pods, waypoint=True, waypoint_dir=str(envoy_tmp / "wp"))
        async with node:
            # The keys are fetched once the first build named their URI, so snapshot 1 has
            # none; a later one Envoy accepted was rebuilt because they arrived. (Its
            # resources are in force a config step after the ACK.)
            in_force = {"RequestAuthentication mesh/jwt": spec_digest(jwt)}
            status = await node.until_status(
                lambda s: s["ready"] and s["waypoint"]["xds"]["in_sync"] and int(s["waypoint"]["xds"]["accepted"]) >= 2
                and s["waypoint"]["resources"] == in_force, "Envoy in sync with a snapshot rebuilt for the keys")
            waypoint = status["waypoint"]
            assert (waypoint["envoy"]["running"], waypoint["xds"]["connected"], waypoint["errors"]) == (True, True, [])
            fetched = waypoint["jwks"]["uris"][issuer]
            assert (Path(fetched["path"]).read_bytes(), fetched["failures"], fetched["error"]) == (JWKS, 0, None)
            pid = waypoint["envoy"]["pid"]
            write(cluster / "jwt.yaml", "")  # withdrawn
            status = await node.until_status(lambda s: s["waypoint"]["resources"] == {} and
                                             s["waypoint"]["xds"]["in_sync"], "the rule withdrawn")
            assert status["waypoint"]["jwks"]["uris"] == {}
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # Envoy stopped with the agent
    run(main(), 60)


def test_config_work_runs_off_the_loop_that_serves_connections(tmp_path, cluster, pods):
    """Issue 9.6: reading the source (a 10k-object model took seconds) ran on the loop
    that accepts and relays connections, stalling them. It runs in the config thread now:
    while a poll is held there, the agent's loop still serves (here its admin endpoint,
    on the same loop as the relays)."""
    node = agent(tmp_path, cluster, pods)
    polling = node.source.poll
    hold, held, release = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def held_poll():
        if hold.is_set():
            hold.clear()
            seen["thread"] = threading.current_thread().name
            held.set()
            release.wait(60)
            seen["released"] = release.is_set()
        return polling()

    node.source.poll = held_poll

    async def main():
        async with node:
            await node.until_ready()
            hold.set()
            write_pods(cluster, SLEEP)  # a change: the next poll is held
            await node.until(held.is_set, "a poll held in the config thread")
            status = await node.status()  # answered by the loop while the poll is still held
            assert not release.is_set() and status["ready"] is True
            release.set()
            await node.until_status(lambda s: s["waiting"] or s["pods"], "the held poll's model in force")
        assert seen == {"thread": seen["thread"], "released": True}
        assert str(seen["thread"]).startswith("nodeagent-config")
    run(main())


def native_built() -> bool:
    try:
        native.load()
        return True
    except native.NativeUnavailable:
        return False


@pytest.mark.parametrize("hbone", ["python", "native"])
def test_a_silent_client_of_a_pods_tunnel_port_is_dropped_at_the_agents_handshake_timeout(
        tmp_path, cluster, pods, monkeypatch, mesh_ca, hbone):
    """hbone_handshake_timeout reaches the HBONE server of either engine: a
    client that connects to a meshed pod's :15008 and never sends a ClientHello holds its
    pending slot that long, then the agent drops it, counted as a timeout. (The kernel
    lab's sandbox scales it: under software emulation a flood of handshakes takes the
    agent longer than the default 5 s to answer.)"""
    if hbone == "native":
        require_native_hbone()
    PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=501)
    pods.start(HTTPBIN, cookie=502)
    write_pods(cluster, SLEEP, HTTPBIN)
    mesh_ca.start()
    timeouts = "hbone_handshake_failures_total{direction=inbound,reason=timeout}"

    async def main():
        async with agent(tmp_path, cluster, pods, same_node_fast_path=False, hbone_handshake_timeout="1.5",
                         hbone_engine=hbone, **mesh_ca.settings) as node:
            await node.until_ready()
            assert node.agent.datapath.hbone_engines.native == (hbone == "native")
            datapath = node.agent.datapath
            assert {datapath.tunnel.server.settings.server_handshake_timeout,
                    datapath.hbone.settings.server_handshake_timeout,
                    datapath.hbone_engines.settings.server_handshake_timeout} == {1.5}
            loop = asyncio.get_running_loop()
            reader, writer = await asyncio.open_connection(SERVER, node.config.tunnel_port)
            opened = loop.time()
            # Nothing sent, nothing back: the agent dropped it, closed with FIN by either engine.
            assert await ended(reader, WAIT) == "eof"
            waited = loop.time() - opened
            writer.close()
            status = await node.until_status(lambda s: s["counters"].get(timeouts) == 1, "the timeout counted")
            assert status["config"]["hbone_handshake_timeout"] == 1.5
            assert waited >= 1.4  # held for the setting's time (less a poll of the engine's clock), not dropped at once
    run(main(), 60)
