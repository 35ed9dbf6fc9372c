"""The lab's mesh CA, run as a cluster runs it: `nodeagent ca` on the first node, in
that node's netns (hostNetwork-like), listening on the node's fabric IP, port 15012.

`provision` prepares what an operator would (at `lab up`, before anything runs): one
random token per node (`tokens/<node>.token`, 0600, the agent's credential) and the
CA's token file (`tokens/ca-tokens.yaml`, 0600), the CA's keys (a self-signed root made
by the CA's own `cakeys.load_or_create` in `ca/`), and the root bundle the agents trust
(`root-cert.pem`, as Istio's istio-ca-root-cert ConfigMap carries it). `ca_argv` is the
CA's command line, `agent_args` the agent flags that point an agent at it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import shutil
from pathlib import Path

import yaml

from nodeagent.identity import pemfiles
from nodeagent.identity.ca import keys as cakeys
from nodeagent.identity.ca.config import DEFAULT_PORT
from nodeagent.lab import processes
from nodeagent.lab.layout import Layout
from nodeagent.lab.state import LabRecord

TRUST_DOMAIN = "cluster.local"


def ca_node(record: LabRecord) -> str:
    return record.desired.node_names[0]


def address(record: LabRecord) -> tuple[str, int]:
    """Where the CA listens: the first node's fabric IP."""
    return record.alloc.nodes[ca_node(record)].fabric_ip, DEFAULT_PORT


def provision(layout: Layout, nodes: list[str], log: logging.Logger) -> None:
    """Tokens, CA keys and the root bundle for a new lab."""
    tokens = {node: secrets.token_hex(32) for node in nodes}
    pemfiles.private_dir(Path(layout.tokens_dir))
    for node, token in tokens.items():
        pemfiles.write_private(Path(layout.node_token(node)), token.encode() + b"\n")
    pemfiles.write_private(Path(layout.ca_tokens), yaml.safe_dump(tokens).encode())
    cakeys.load_or_create(Path(layout.ca_dir), TRUST_DOMAIN, dt.datetime.now(dt.timezone.utc), log)
    shutil.copyfile(os.path.join(layout.ca_dir, cakeys.ROOT_CERT), layout.root_cert)
    os.chmod(layout.root_cert, 0o644)


def ca_argv(layout: Layout, record: LabRecord) -> list[str]:
    ip, port = address(record)
    return processes.in_node(layout, ca_node(record), [
        "nodeagent", "ca", "--listen", f"{ip}:{port}", "--trust-domain", TRUST_DOMAIN,
        "--state-dir", layout.ca_dir, "--tokens", layout.ca_tokens, "--source", f"files:{layout.cluster_dir}"])


def agent_args(layout: Layout, record: LabRecord, node: str) -> list[str]:
    ip, port = address(record)
    return ["--ca-address", f"{ip}:{port}", "--ca-root-cert", layout.root_cert,
            "--ca-token-file", layout.node_token(node), "--trust-domain", TRUST_DOMAIN,
            "--identity-dir", layout.identity_dir(node), "--flow-log", layout.flow_log(node)]
