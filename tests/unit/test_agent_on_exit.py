"""What a stopping agent does with capture (issue 13): the --on-exit setting (keep, remove,
owner; --[no-]keep-on-exit still works), and the real daemon with the real kube source
and owner watch deciding at its stop. The API server here is one that cannot be reached
(a closed port): the agent must keep capture and say why. The decision over what an
API server says is tests/unit/test_kube_owner.py; a real `kubectl delete -k` is e2e."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from agent_world import NODE, WAIT, CaptureMaps, PodProcesses, free_port, load_config, namespaces, write_docs
from nodeagent.agent.daemon import Agent
from nodeagent.errors import ConfigError
from nodeagent.kube.owner import OwnerWatch
from nodeagent.sources.kube import KubeSource


@pytest.fixture
def cluster(tmp_path) -> Path:
    write_docs(tmp_path / "cluster" / "namespaces.yaml", namespaces())
    return tmp_path / "cluster"


def unreachable_kubeconfig(tmp_path: Path) -> Path:
    """A kubeconfig naming an API server nobody listens for (a free port, closed)."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{free_port()}"}}],
        "users": [{"name": "u", "user": {"token": "t" * 20}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    return path


@pytest.mark.parametrize("given, on_exit, keep", [
    ({}, "keep", True),
    ({"keep_on_exit": True}, "keep", True),
    ({"keep_on_exit": False}, "remove", False),
    ({"on_exit": "remove"}, "remove", False),
    ({"on_exit": "keep", "keep_on_exit": True}, "keep", True),
    ({"on_exit": "remove", "keep_on_exit": False}, "remove", False),
])
def test_on_exit_and_keep_on_exit(tmp_path, cluster, given, on_exit, keep):
    cfg = load_config(tmp_path, cluster, **given)
    assert (cfg.on_exit, cfg.keep_on_exit, cfg.pod) == (on_exit, keep, None)


def test_owner_needs_the_kube_source_and_the_agents_pod(tmp_path, cluster):
    with pytest.raises(ConfigError, match="owner reads the agent's DaemonSet from the API"):
        load_config(tmp_path, cluster, on_exit="owner", pod="nodeagent-system/nodeagent-x1")
    kube = {"source": f"kube:{unreachable_kubeconfig(tmp_path)}", "on_exit": "owner"}
    with pytest.raises(ConfigError, match=r"owner needs the agent's own pod.*--pod=\$\(POD_NAMESPACE\)"):
        load_config(tmp_path, cluster, **kube)
    cfg = load_config(tmp_path, cluster, **kube, pod="nodeagent-system/nodeagent-x1")
    assert (cfg.on_exit, cfg.keep_on_exit, cfg.pod) == ("owner", True, ("nodeagent-system", "nodeagent-x1"))


@pytest.mark.parametrize("given, says", [
    ({"on_exit": "later"}, "must be one of keep, remove, owner"),
    ({"on_exit": "keep", "keep_on_exit": False}, "keep contradicts keep_on_exit=False"),
    ({"on_exit": "remove", "keep_on_exit": True}, "remove contradicts keep_on_exit=True"),
    ({"pod": "nodeagent-x1"}, "must be NAMESPACE/NAME of the agent's own pod"),
    ({"pod": "Bad_NS/x"}, "setting pod"),
])
def test_bad_exit_settings_are_refused_naming_them(tmp_path, cluster, given, says):
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        load_config(tmp_path, cluster, **given)


def test_a_contradicting_variable_is_refused_too(tmp_path, cluster):
    from nodeagent.agent import config as agent_config
    given = {"node": NODE, "source": f"files:{cluster}", "cgroup": str(tmp_path), "on_exit": "remove"}
    with pytest.raises(ConfigError, match="contradicts keep_on_exit=True"):
        agent_config.load(given, {"NODEAGENT_KEEP_ON_EXIT": "true"})


def test_an_agent_that_cannot_read_the_api_keeps_capture_at_exit_and_says_why(tmp_path, cluster, caplog):
    """The real Agent, its KubeSource and OwnerWatch (new_source wires them), an API server
    that cannot be reached: the agent never gets ready, and its stop keeps capture."""
    caplog.set_level(logging.INFO, logger="test.on-exit")
    cfg = load_config(tmp_path, cluster, source=f"kube:{unreachable_kubeconfig(tmp_path)}", on_exit="owner",
                      pod="nodeagent-system/nodeagent-x1")
    capture = CaptureMaps()
    agent = Agent(cfg, capture=capture, registry=CollectorRegistry(), log=logging.getLogger("test.on-exit"),
                  resolver=PodProcesses(tmp_path / "netns"))
    assert isinstance(agent.source, KubeSource) and isinstance(agent.source.owner, OwnerWatch)

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        owner = agent.source.owner
        for _ in range(int(WAIT / 0.05)):  # until a watch of the owner failed once
            if owner.seen.error or task.done():
                break
            await asyncio.sleep(0.05)
        assert "cannot connect to https://127.0.0.1:" in owner.seen.error
        assert not agent.readiness()
        stop.set()
        await asyncio.wait_for(task, WAIT)

    asyncio.run(main())
    assert capture.calls[-1] == ("close", True)
    stopping = [r.getMessage() for r in caplog.records if r.getMessage().startswith("agent stopping: ")]
    assert len(stopping) == 1
    assert stopping[0].startswith("agent stopping: keeping capture for the next agent: own pod "
                                  "nodeagent-system/nodeagent-x1 never read from the API (last API error: ")
    assert "agent stopped: capture kept for the next agent" in caplog.text


@pytest.mark.parametrize("on_exit, keep", [("keep", True), ("remove", False)])
def test_keep_and_remove_need_no_api(tmp_path, cluster, caplog, on_exit, keep):
    caplog.set_level(logging.INFO, logger="test.on-exit")
    cfg = load_config(tmp_path, cluster, on_exit=on_exit)
    capture = CaptureMaps()
    agent = Agent(cfg, capture=capture, registry=CollectorRegistry(), log=logging.getLogger("test.on-exit"),
                  resolver=PodProcesses(tmp_path / "netns"))

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        for _ in range(int(WAIT / 0.05)):
            if agent.reconciled or task.done():
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, WAIT)

    asyncio.run(main())
    assert capture.calls[-1] == ("close", keep)
    verdict = "keeping capture for the next agent" if keep else "removing capture (as `nodeagent uninstall`)"
    assert f"agent stopping: {verdict}: --on-exit={on_exit}" in caplog.text
