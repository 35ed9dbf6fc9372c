"""The agent's side of a rolling update's hand-over, through its own admin API and
readiness file (agent_world.py: stand-ins only for capture, the /proc scan and entering
a pod's netns): a pod the previous agent captured but this agent cannot serve keeps its
capture and makes the agent not ready, saying why; the readiness file kubelet's exec
probe reads says what /healthz/ready says, and goes with the agent."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from agent_world import (LEGACY_POD, SLEEP, CaptureMaps, PodKernel, PodProcesses, RunningAgent, load_config,
                         namespaces, write_docs)
from identity_fixtures import run

from nodeagent import admin


@pytest.fixture
def cluster(tmp_path) -> Path:
    """The source directory: the namespaces, an unmeshed pod and the meshed sleep pod."""
    directory = tmp_path / "cluster"
    write_docs(directory / "namespaces.yaml", namespaces())
    write_docs(directory / "pods.yaml", [LEGACY_POD.document(), SLEEP.document()])
    return directory


@pytest.fixture
def pods(tmp_path) -> PodProcesses:
    return PodProcesses(tmp_path / "netns")


def agent(tmp_path, cluster, pods: PodProcesses, capture: CaptureMaps) -> RunningAgent:
    return RunningAgent(load_config(tmp_path, cluster), capture, pods)


def readiness_file(node: RunningAgent) -> str:
    return admin.readiness_path(node.config.admin_socket).read_text()


@pytest.mark.timeout(120)
def test_a_pod_the_previous_agent_captured_but_this_one_cannot_serve_keeps_capture_and_holds_readiness(
        tmp_path, cluster, pods, monkeypatch):
    PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=701)
    capture = CaptureMaps(left={701: []})  # the old agent's capture of the pod, still serving it
    node = agent(tmp_path, cluster, pods, capture)
    squatter = socket.socket()  # the old agent's 15006 without SO_REUSEPORT (an older version)
    squatter.bind((SLEEP.ip, node.config.inbound_port))
    squatter.listen()

    async def main():
        async with node:
            code, body = await node.until_ready_says(lambda b: "is not enrolled" in b)
            assert code == 503 and body.startswith("not ready: pod mesh/sleep is not enrolled: OSError: "), body
            assert "Address already in use" in body and body.count("\n") == 1, body
            await node.until(lambda: readiness_file(node) == body, "the readiness file to say it")  # the probe prints it
            assert capture.named("remove_netns", "unsteer_inbound") == []  # neither undone nor stale
            assert capture.pods == {701: []}
            squatter.close()
            status = await node.until_ready()  # retried with backoff
            assert [(p["name"], p["netns_cookie"]) for p in status["pods"]] == [("sleep", 701)]
            await node.until(lambda: readiness_file(node) == "ready\n", "the readiness file to say ready")
        assert not admin.readiness_path(node.config.admin_socket).exists()  # gone with the agent
    try:
        run(main())
    finally:
        squatter.close()


def test_a_pod_no_agent_served_does_not_hold_readiness_and_its_inbound_is_refused(tmp_path, cluster, pods,
                                                                                  monkeypatch):
    """An app holding a mesh port from the start: reported, retried, but the agent is ready
    (no agent could serve that pod; one pod must not hold back the node's agent). Its
    inbound is refused meanwhile (enrolled in sk_lookup's map without a listener: the
    kernel drops what comes): before, nothing steered it, and its app took plaintext from
    anybody, every policy of the pod unenforced. Once the port is free it is enrolled; a
    pod gone while refused is refused no more."""
    PodKernel(pods, monkeypatch)
    pods.start(SLEEP, cookie=702)
    capture = CaptureMaps()
    node = agent(tmp_path, cluster, pods, capture)
    squatter = socket.socket()
    squatter.bind((SLEEP.ip, node.config.inbound_port))
    squatter.listen()

    async def main():
        async with node:
            status = await node.until_status(lambda s: s["waiting"] and s["waiting"][0].get("attempts", 0) >= 2,
                                             "two failed enrolments")
            assert status["ready"] and "Address already in use" in status["waiting"][0]["reason"], status
            assert capture.pods == {} and capture.steered == {}  # undone: nothing half-done...
            assert capture.refused == {SLEEP.ip: 702} and status["waiting"][0]["inbound"] == "refused"  # ...but this
            pods_file = node.config.source_dir / "pods.yaml"
            write_docs(pods_file, [LEGACY_POD.document()])  # the pod leaves while refused: no longer refused
            await node.until_status(lambda s: not s["waiting"], "the pod gone")
            assert capture.refused == {} and ("unsteer_inbound", 702, [SLEEP.ip]) in capture.calls
            write_docs(pods_file, [LEGACY_POD.document(), SLEEP.document()])  # back, the port still held
            await node.until_status(lambda s: s["waiting"] and s["waiting"][0].get("inbound") == "refused",
                                    "the pod refused again")
            squatter.close()
            status = await node.until_status(lambda s: s["pods"], "the pod enrolled once the port is free")
            assert (capture.steered, capture.refused) == ({SLEEP.ip: 702}, {}) and status["waiting"] == []
    try:
        run(main())
    finally:
        squatter.close()


def test_agents_whose_sockets_share_a_directory_each_write_their_own_readiness(tmp_path):
    """A lab's agents keep their admin sockets in one directory: with one `readiness`
    file there, each agent's write replaced the other's verdict, and a write that raced
    another's rename failed the agent's start (FileNotFoundError on readiness.new)."""
    import asyncio
    import logging

    verdicts = {"node1": admin.Readiness(), "node2": admin.Readiness(("no valid certificate for x",))}
    files = {node: admin.ReadinessFile(admin.readiness_path(tmp_path / f"{node}.sock"), lambda v=verdict: v,
                                       logging.getLogger("test"), every=0.01)
             for node, verdict in verdicts.items()}

    async def main():
        for f in files.values():
            f.start()
        await asyncio.sleep(0.1)  # both rewrite theirs ten times meanwhile
        texts = {node: admin.readiness_path(tmp_path / f"{node}.sock").read_text() for node in files}
        for f in files.values():
            await f.close()
        return texts

    assert run(main()) == {"node1": "ready\n", "node2": "not ready: no valid certificate for x\n"}
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # each removed its own at close


def test_the_readiness_file_is_written_under_a_new_name_each_time(tmp_path):
    """The DaemonSet's /run/nodeagent is an emptyDir (1777) the waypoint Envoy's uid may
    write: a FIFO it planted at the fixed temporary name hung the agent's loop in the
    write (a symlink there redirected it). Each write takes a fresh name (O_EXCL)."""
    import logging
    import threading

    path = admin.readiness_path(tmp_path / "agent.sock")
    planted = path.with_name(path.name + ".new")
    os.mkfifo(planted)
    readiness = admin.ReadinessFile(path, lambda: admin.Readiness(), logging.getLogger("test"))
    done = threading.Thread(target=readiness.write, daemon=True)
    done.start()
    done.join(10)
    assert not done.is_alive() and path.read_text() == "ready\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, planted.name])  # nothing else left
