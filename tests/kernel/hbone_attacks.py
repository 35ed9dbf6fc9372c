"""Helpers of test_agent_tunnel.py for abuse of a pod's real tunnel port: client
certificates minted with the sandbox CA's key (a valid one, as a compromised workload
would hold, an expired one, one of another trust domain) and with another CA, running
hbone_attacker.py inside an unmeshed pod (bad clients, or a valid one aiming its
streams elsewhere), and the destination agent's refusal counters."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent.bench.sandbox import Sandbox, SandboxPod, scaled
from nodeagent.identity import pemfiles
from nodeagent.identity.ca import keys as cakeys
from nodeagent.identity.ca.signer import CertificateAuthority
from nodeagent.identity.spiffe import Identity
from nodeagent.lab.layout import Layout

ATTACKER = Path(__file__).with_name("hbone_attacker.py")
TD = "cluster.local"


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


def _run(sb: Sandbox, attacker: SandboxPod, *args: str) -> dict:
    proc = sb.in_pod(attacker, [sys.executable, str(ATTACKER), *args], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=scaled(60))
    return json.loads(out)


def attack(sb: Sandbox, attacker: SandboxPod, ip: str) -> dict:
    """Run every bad client from `attacker` against `ip`:15008; what the server did."""
    certs = certificates(sb.layout, attacker.namespace, sb.workdir)
    return _run(sb, attacker, "clients", ip, sb.layout.root_cert, *(f"{name}={path}" for name, path in certs.items()))


def aim(sb: Sandbox, attacker: SandboxPod, ip: str, app_port: int, authorities: list[str]) -> dict:
    """From `attacker`, holding a valid mesh certificate, on one connection to `ip`:15008:
    a CONNECT to each of `authorities`, then one to `ip`:`app_port` (hbone_attacker.py
    authorities); each status, and what the good stream carried."""
    valid = certificates(sb.layout, attacker.namespace, sb.workdir)["valid"]
    return _run(sb, attacker, "authorities", ip, sb.layout.root_cert, str(valid), str(app_port), *authorities)


def labelled(counters: dict, name: str, direction: str = "inbound") -> dict[str, float]:
    """reason -> value of the counter `name`{direction, reason} in an agent's status counters."""
    prefix, out = f"{name}{{direction={direction},reason=", {}
    for key, value in counters.items():
        if key.startswith(prefix):
            out[key[len(prefix):].rstrip("}")] = value
    return out


def refusals(counters: dict) -> dict[tuple[str, str], float]:
    """Inbound HBONE refusals in an agent's status counters: (`handshake` (TLS and
    identity) or `error` (after them), reason) -> count."""
    out = {}
    for key, value in counters.items():
        for kind, name in (("handshake", "hbone_handshake_failures_total"), ("error", "hbone_connection_errors_total")):
            if key.startswith(name + "{") and "direction=inbound" in key and value:
                out[(kind, key.split("reason=")[1].rstrip("}"))] = value
    return out
