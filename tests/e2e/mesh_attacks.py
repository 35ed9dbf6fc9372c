"""Helpers of tests/e2e/test_mtls.py for abuse of a pod's tunnel port: a long-lived
connection through the mesh to watch for collateral damage, client certificates minted
with the lab's CA key (a valid one, as a compromised workload would hold, an expired
one, one of another trust domain) and with another CA, and running hbone_attacker.py
inside an unmeshed pod."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.agent.probe import HoldClient
from nodeagent.identity import cakeys, pemfiles
from nodeagent.identity.ca import CertificateAuthority
from nodeagent.identity.spiffe import Identity
from nodeagent.lab.layout import Layout
from tests.e2e.conftest import NODEAGENT

ATTACKER = Path(__file__).with_name("hbone_attacker.py")
TD = "cluster.local"


def held(lab, pod: str, target: str) -> HoldClient:
    """A connection from `pod` to `target` (an echo server) kept open: `probe hold`."""
    return HoldClient(subprocess.Popen([*NODEAGENT, "lab", "exec", "--name", lab.name, pod, "--", "python3", "-m",
                                        "nodeagent.agent.probe", "hold", target, "--no-greeting"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1))


def _issue(ca: CertificateAuthority, identity: Identity, path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    pemfiles.write_private(path, pemfiles.key_pem(key) + pemfiles.certs_pem([ca.issue(key.public_key(), identity)]))
    return path


def certificates(layout: Layout, namespace: str, directory: Path) -> dict[str, Path]:
    """Client certificates for ns/<namespace>/sa/default: `valid` (signed by the lab's
    CA: what a compromised workload would hold) and ones the mesh must refuse."""
    material, now = cakeys.load(Path(layout.ca_dir), dt.datetime.now(dt.timezone.utc)), time.time()
    mine, theirs = Identity(TD, namespace, "default"), Identity("evil.example", namespace, "default")
    foreign = cakeys.generate_root(TD, dt.datetime.now(dt.timezone.utc))
    return {
        "valid": _issue(CertificateAuthority(TD, material), mine, directory / "valid.pem"),
        "foreign_ca": _issue(CertificateAuthority(TD, foreign), mine, directory / "foreign-ca.pem"),
        "expired": _issue(CertificateAuthority(TD, material, clock=lambda: now - 3600,
                                               cert_ttl=dt.timedelta(minutes=30)), mine, directory / "expired.pem"),
        "foreign_trust_domain": _issue(CertificateAuthority(theirs.trust_domain, material), theirs,
                                       directory / "foreign-td.pem"),
    }


def attack(lab, layout: Layout, pod: str, ip: str, directory: Path) -> dict:
    namespace, _, _ = pod.partition("/")
    certs = certificates(layout, namespace, directory)
    out = lab.exec(pod, "python3", str(ATTACKER), ip, layout.root_cert,
                   *(f"{name}={path}" for name, path in certs.items()), timeout=60).stdout
    return json.loads(out)


def counter(samples: list, kind: str, reason: str) -> float:
    """Inbound HBONE refusals: kind `handshake` (TLS/identity) or `error` (after it)."""
    name = {"handshake": "nodeagent_hbone_handshake_failures_total",
            "error": "nodeagent_hbone_connection_errors_total"}[kind]
    return sum(s.value for s in samples
               if s.name == name and s.labels.get("direction") == "inbound" and s.labels.get("reason") == reason)
