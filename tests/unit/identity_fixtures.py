"""Shared pieces of the identity tests: a controllable clock, CAs, CSRs, cluster files.

Everything here is real: CAs are nodeagent's CertificateAuthority with freshly generated
keys, cluster state is YAML read by the files source. Only time is controlled.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from nodeagent.identity.ca import keys as cakeys
from nodeagent.identity.ca.signer import CertificateAuthority
from nodeagent.identity.spiffe import Identity

TD = "cluster.local"
T0 = 1_750_000_000.0  # a fixed wall time for tests that control the clock


class ManualClock:
    """Wall time that moves only when told; `sleep` waits until `advance` passes its deadline."""

    def __init__(self, start: float = T0):
        self.t = start
        self.sleeps: list[float] = []  # every duration asked for, in order
        self._waiting: list[tuple[float, asyncio.Future]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        entry = (self.t + seconds, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        finally:
            self._waiting.remove(entry)

    @property
    def deadlines(self) -> list[float]:
        return sorted(d for d, f in self._waiting if not f.done())

    def advance_to(self, when: float) -> None:
        self.t = when
        for deadline, fut in self._waiting:
            if deadline <= self.t and not fut.done():
                fut.set_result(None)

    def advance(self, seconds: float) -> None:
        self.advance_to(self.t + seconds)


async def until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    """Let the event loop run until `condition()` holds (real time bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


def make_ca(clock=time.time, trust_domain: str = TD, **kw) -> CertificateAuthority:
    return CertificateAuthority(trust_domain, cakeys.generate_root(trust_domain, utc(clock())), clock, **kw)


def csr_pem(key=None, uris=(f"spiffe://{TD}/ns/default/sa/app",), dns=(), extra=()) -> bytes:
    """A CSR with these SANs, signed by `key` (a new P-256 key by default)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns] + list(extra)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload-csr-subject")]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def identity(ns: str = "default", sa: str = "app") -> Identity:
    return Identity(TD, ns, sa)


def pod_yaml(name: str, node: str, sa: str, ns: str = "default", phase: str = "Running") -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"},
            "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "c", "command": ["x"]}]},
            "status": {"phase": phase, "podIP": "10.244.1.5"}}


def write_pods(directory: Path, *pods: dict, name: str = "pods.yaml") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(yaml.safe_dump_all(pods))


def write_tokens(path: Path, tokens: dict[str, str]) -> None:
    path.write_text(yaml.safe_dump(tokens))


def run(coro, timeout: float = 30.0):
    """Run a test coroutine on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
