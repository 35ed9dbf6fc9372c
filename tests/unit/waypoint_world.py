"""The waypoint tests' world, over xds_world's cluster: Istio documents (the poisoned ones
carry POISON, which the fake Envoy of test_waypoint_nack refuses), the agent settings of
a waypoint in a test's directory, a stand-in Envoy binary for running the Waypoint
without the real one (the xDS side is then played by an AdsSession), and a wait."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import yaml

from nodeagent.agent import config as agent_config
from nodeagent.agent.config import AgentConfig
from nodeagent.digests import spec_digest
from xds_world import doc

POISON = "x-poison"  # the fake Envoy refuses every response carrying this
VS = doc("VirtualService", "reviews", "hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews}}]")
VS_TIMEOUT = doc("VirtualService", "reviews", "hosts: [reviews]\nhttp:\n- route: [{destination: {host: reviews}}]\n"
                                              "  timeout: 3s")
RATINGS_OK = doc("VirtualService", "ratings", """
hosts: [ratings]
http:
- match: [{headers: {x-canary: {exact: "1"}}}]
  route: [{destination: {host: ratings}}]
- route: [{destination: {host: ratings}}]
""")
RATINGS_POISONED = RATINGS_OK.replace("x-canary", POISON)
DR = doc("DestinationRule", "reviews", "host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}")
ALLOW_GET = doc("AuthorizationPolicy", "ratings", """
selector: {matchLabels: {app: ratings}}
rules: [{to: [{operation: {methods: [GET]}}]}]
""", api="security.istio.io/v1")
NEW_POD = """apiVersion: v1
kind: Pod
metadata: {name: reviews-v4, namespace: shop, labels: {app: reviews, version: v4}}
spec: {nodeName: node2, serviceAccountName: reviews}
status: {phase: Running, podIP: 10.244.2.8}
---
"""


def digest(document: str) -> str:
    """The spec digest status shows for the first resource of `document`."""
    return spec_digest(yaml.safe_load(document.split("---")[0])["spec"])


def waypoint_config(tmp_path: Path) -> AgentConfig:
    """node1's agent settings, its waypoint directory and cluster files under `tmp_path`."""
    (tmp_path / "cluster").mkdir()
    return agent_config.load({"node": "node1", "source": f"files:{tmp_path / 'cluster'}", "cgroup": str(tmp_path),
                              "waypoint_dir": str(tmp_path / "wp")}, {})


def stand_in_envoy(tmp_path: Path) -> str:
    """A binary that runs as Envoy would (until stopped) and does nothing else."""
    path = tmp_path / "envoy"
    path.write_text("#!/bin/sh\nexec sleep 60\n")
    path.chmod(0o755)
    return str(path)


async def until(predicate, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached in {timeout}s: {what}"
        await asyncio.sleep(0.02)
