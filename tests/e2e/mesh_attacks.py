"""Helpers of tests/e2e/test_mtls.py for abuse of a pod's tunnel port: a long-lived
connection through the mesh to watch for collateral damage, a valid workload
certificate minted from the lab's CA (what a compromised workload would hold), and
running hbone_attacker.py inside an unmeshed pod."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.agent.probe import HoldClient
from nodeagent.identity import cakeys, pemfiles
from nodeagent.identity.ca import CertificateAuthority
from nodeagent.identity.spiffe import Identity
from nodeagent.lab.layout import Layout
from tests.e2e.conftest import NODEAGENT

ATTACKER = Path(__file__).with_name("hbone_attacker.py")


def held(lab, pod: str, target: str) -> HoldClient:
    """A connection from `pod` to `target` (an echo server) kept open: `probe hold`."""
    return HoldClient(subprocess.Popen([*NODEAGENT, "lab", "exec", "--name", lab.name, pod, "--", "python3", "-m",
                                        "nodeagent.agent.probe", "hold", target, "--no-greeting"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1))


def mint(layout: Layout, identity: Identity, directory: Path) -> Path:
    """A key + certificate file for `identity`, signed by the lab's CA."""
    material = cakeys.load(Path(layout.ca_dir), dt.datetime.now(dt.timezone.utc))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = CertificateAuthority(identity.trust_domain, material).issue(key.public_key(), identity)
    path = directory / "stolen.pem"
    pemfiles.write_private(path, pemfiles.key_pem(key) + pemfiles.certs_pem([leaf]))
    return path


def attack(lab, layout: Layout, pod: str, ip: str, directory: Path) -> dict:
    namespace, _, _ = pod.partition("/")
    cert = mint(layout, Identity("cluster.local", namespace, "default"), directory)
    out = lab.exec(pod, "python3", str(ATTACKER), ip, str(cert), layout.root_cert, timeout=60).stdout
    return json.loads(out)


def counter(samples: list, kind: str, reason: str) -> float:
    """Inbound HBONE refusals: kind `handshake` (TLS/identity) or `error` (after it)."""
    name = {"handshake": "nodeagent_hbone_handshake_failures_total",
            "error": "nodeagent_hbone_connection_errors_total"}[kind]
    return sum(s.value for s in samples
               if s.name == name and s.labels.get("direction") == "inbound" and s.labels.get("reason") == reason)
