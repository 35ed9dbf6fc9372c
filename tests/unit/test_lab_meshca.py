"""The lab's mesh CA without root: what `lab up` provisions (tokens 0600, the CA's keys,
the root bundle), that the CA accepts exactly those tokens, and when `lab up` calls an
agent ready (enrolled its meshed pods and holds their certificates)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from pathlib import Path

import yaml

from nodeagent.identity.ca.auth import TokenFileAuthenticator
from nodeagent.identity.ca.keys import load
from nodeagent.lab import meshca
from nodeagent.lab.layout import Layout
from nodeagent.lab.lifecycle import agent_problem
from nodeagent.lab.status import render

LOG = logging.getLogger("test.meshca")


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_provision_tokens_keys_and_root(tmp_path):
    layout = Layout("t1", "/cg", run_root=str(tmp_path))
    os.makedirs(layout.state_dir)
    meshca.provision(layout, ["node1", "node2"], LOG)
    tokens = yaml.safe_load(Path(layout.ca_tokens).read_text())
    assert sorted(tokens) == ["node1", "node2"] and tokens["node1"] != tokens["node2"]
    for node in ("node1", "node2"):
        assert Path(layout.node_token(node)).read_text().strip() == tokens[node]
        assert mode(layout.node_token(node)) == 0o600
    assert mode(layout.ca_tokens) == 0o600 and mode(layout.tokens_dir) == 0o700
    assert mode(os.path.join(layout.ca_dir, "ca-key.pem")) == 0o600
    assert mode(layout.root_cert) == 0o644
    material = load(Path(layout.ca_dir), dt.datetime.now(dt.timezone.utc))
    assert Path(layout.root_cert).read_bytes() == Path(layout.ca_dir, "root-cert.pem").read_bytes()
    assert material.self_signed
    auth = TokenFileAuthenticator(Path(layout.ca_tokens), LOG)
    assert auth.authenticate(tokens["node2"]).node == "node2"


def status(ready=True, pods=(), identities=(), enabled=True, waypoint=None) -> dict:
    """An agent's /debug/status as agent_problem reads it; `waypoint`: (Envoy running, in sync)."""
    return {"ready": ready, "pods": [{"namespace": ns, "name": n} for ns, n in pods],
            "identity": {"enabled": enabled, "identities": [{"identity": i, "valid": v} for i, v in identities]},
            "waypoint": None if waypoint is None else {"envoy": {"running": waypoint[0]},
                                                       "xds": {"in_sync": waypoint[1]}}}


def test_agent_problem_says_what_is_missing():
    meshed = {"mesh/client", "mesh/web-0"}
    both = [("mesh", "client"), ("mesh", "web-0")]
    sa = "spiffe://cluster.local/ns/mesh/sa/default"
    assert agent_problem(None, meshed) == "not ready"
    assert agent_problem(status(ready=False), meshed) == "not ready"
    waiting = {**status(ready=False), "not_ready": ["no valid certificate for spiffe://a", "first reconcile"]}
    assert agent_problem(waiting, meshed) == "not ready: no valid certificate for spiffe://a; first reconcile"
    assert agent_problem(status(pods=both[:1]), meshed) == "not enrolled yet: mesh/web-0"
    assert agent_problem(status(pods=both), meshed) == "no certificate yet for its pods"
    assert agent_problem(status(pods=both, identities=[(sa, False)]), meshed) == f"no certificate yet for {sa}"
    assert agent_problem(status(pods=both, identities=[(sa, True)]), meshed) is None
    assert agent_problem(status(pods=both, enabled=False), meshed) is None
    assert agent_problem(status(), set()) is None
    # An agent running a waypoint is ready once its Envoy runs the latest configuration.
    assert agent_problem(status(waypoint=(False, False)), set()) == "waypoint Envoy not running yet"
    assert agent_problem(status(waypoint=(True, False)), set()) == "waypoint Envoy not in sync yet"
    assert agent_problem(status(waypoint=(True, True)), set()) is None


def test_lab_status_shows_the_ca():
    data = {"name": "t1", "stateDir": "/run/nodeagent/t1", "agents": True,
            "supervisor": {"pid": 10, "running": True},
            "ca": {"node": "node1", "address": "172.30.0.2:15012", "rootCert": "/run/nodeagent/t1/root-cert.pem",
                   "trustDomain": "cluster.local", "pid": 11, "restarts": 0, "state": "running", "exit_code": None},
            "nodes": [{"name": "node1", "fabricIP": "172.30.0.2", "podCIDR": "10.244.1.0/24",
                       "agent": {"pid": 12, "restarts": 1, "state": "running"}}],
            "pods": [], "services": []}
    text = render(data)
    assert ("Mesh CA (cluster.local) on node1 at 172.30.0.2:15012: running (pid 11, 0 restarts); "
            "root /run/nodeagent/t1/root-cert.pem") in text
    assert "running (pid 12, 1 restarts)" in text
    assert "Mesh CA" not in render({**data, "ca": None, "agents": False})
