"""Keeps a certificate for every local workload identity, ahead of need (agent side).

As ztunnel's SecretManager: `prefetch` starts fetching for identities of pods on this
node before any connection needs them; `get` returns the current credentials (waiting
for the first fetch); each identity has one task that fetches, then sleeps until the
certificate's half-life and fetches again. Every fetch makes a fresh P-256 key on this
node and sends only the CSR. When the CA fails, the valid certificate stays in use and
the task retries with exponential backoff and jitter until the CA answers; `get` fails
only when there is no valid certificate at all. `forget` stops all that and deletes the
identity's file when no local pod uses it any more. Time comes from an injected clock
(wall time, since certificates carry wall times); metrics go to the registry given.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.identity import credentials, pemfiles
from nodeagent.identity.credentials import Credentials
from nodeagent.identity.errors import (CaRefused, CaUnavailable, IdentityError, IdentityUnavailable,
                                       IssuedCertificateInvalid)
from nodeagent.identity.spiffe import Identity

DEFAULT_RUNTIME_DIR = Path("/run/nodeagent/identity")  # tmpfs: keys never reach a disk
REASONS = {CaUnavailable: "unavailable", CaRefused: "refused", IssuedCertificateInvalid: "invalid_response"}


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock seconds since the epoch."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class CertificateIssuer(Protocol):
    """What the manager needs of a CA client (CaClient is one)."""

    async def create_certificate(self, csr_pem: bytes, identity: Identity,
                                 ttl: dt.timedelta | None = None) -> list[str]: ...


@dataclass(frozen=True)
class Backoff:
    """Exponential, doubling from `first` up to `maximum`, with equal jitter: the delay
    of attempt n is uniform in [d/2, d] for d = min(maximum, first * 2**(n-1)), so agents
    that lost the CA together do not all come back in the same second."""

    first: float = 1.0
    maximum: float = 60.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        ceiling = min(self.maximum, self.first * 2 ** max(attempt - 1, 0))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


class IdentityMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.expiry = Gauge("nodeagent_cert_expiry_seconds",
                            "Unix time at which the certificate in use for an identity expires",
                            ["identity"], registry=registry)
        self.errors = Counter("nodeagent_cert_issuance_errors",
                              "Failed attempts to get a certificate from the CA, by reason",
                              ["reason"], registry=registry)
        self.rotations = Counter("nodeagent_cert_rotations",
                                 "Certificates replaced by a newer one for the same identity", registry=registry)


@dataclass
class _Slot:
    identity: Identity
    creds: Credentials | None = None
    error: Exception | None = None  # of the last attempt, None after a success
    failures: int = 0  # consecutive
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # the first attempt has ended
    task: asyncio.Task | None = None


class IdentityManager:
    def __init__(self, ca_client: CertificateIssuer, clock: Clock, trust_bundle: bytes,
                 registry: CollectorRegistry, log: logging.Logger, runtime_dir: Path = DEFAULT_RUNTIME_DIR,
                 backoff: Backoff = Backoff(), rng: random.Random | None = None,
                 cert_ttl: dt.timedelta | None = None):
        self.client, self.clock, self.log = ca_client, clock, log
        self.trust_bundle = trust_bundle
        self.roots = pemfiles.load_certs(trust_bundle, "trust bundle")
        self.runtime_dir = pemfiles.private_dir(runtime_dir)
        self.metrics = IdentityMetrics(registry)
        self.backoff, self.rng = backoff, rng or random.Random()
        self.cert_ttl = cert_ttl  # None: the CA's default
        self._slots: dict[Identity, _Slot] = {}

    # --- what callers use ---------------------------------------------------------------
    def prefetch(self, identities: Iterable[Identity]) -> None:
        """Start keeping certificates for `identities` (call from the event loop)."""
        for identity in identities:
            self._slot(identity)

    async def get(self, identity: Identity) -> Credentials:
        """Valid credentials for `identity`; IdentityUnavailable if there are none (yet)."""
        slot = self._slot(identity)
        await slot.settled.wait()
        creds = slot.creds
        if creds is not None and creds.valid_at(self.clock.now()):
            return creds
        why = f"last attempt: {slot.error}" if slot.error else "no certificate yet"
        expired = f"certificate expired at {_iso(creds.not_after)}; " if creds else ""
        raise IdentityUnavailable(f"no valid certificate for {identity}: {expired}{why}",
                                  "the agent keeps retrying; check the CA and its logs")

    def forget(self, identity: Identity) -> None:
        """Stop keeping `identity`: cancel its fetches, delete its file and metric."""
        slot = self._slots.pop(identity, None)
        if slot is None:
            return
        if slot.task is not None:
            slot.task.cancel()
        (self.runtime_dir / credentials.file_name(identity)).unlink(missing_ok=True)
        if slot.creds is not None:
            self.metrics.expiry.remove(identity.uri)
        self.log.info("forgot identity %s", identity)

    def current(self, identity: Identity) -> Credentials | None:
        """The valid credentials held for `identity` now, without waiting; None if none."""
        slot = self._slots.get(identity)
        creds = slot.creds if slot is not None else None
        return creds if creds is not None and creds.valid_at(self.clock.now()) else None

    def describe(self) -> list[dict]:
        """Per identity: its certificate's validity and rotation time, the last error."""
        now = self.clock.now()
        return [{"identity": i.uri, "valid": bool(s.creds and s.creds.valid_at(now)),
                 "not_after": s.creds.not_after if s.creds else None,
                 "refresh_at": s.creds.refresh_at if s.creds else None,
                 "failures": s.failures, "error": str(s.error) if s.error else None}
                for i, s in sorted(self._slots.items())]

    @property
    def identities(self) -> list[Identity]:
        return sorted(self._slots)

    async def close(self) -> None:
        """Forget everything (keys are deleted) and wait for the tasks to end."""
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        for identity in list(self._slots):
            self.forget(identity)
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- the per-identity task ----------------------------------------------------------
    def _slot(self, identity: Identity) -> _Slot:
        slot = self._slots.get(identity)
        if slot is None:
            slot = self._slots[identity] = _Slot(identity)
            slot.task = asyncio.get_running_loop().create_task(self._maintain(slot), name=f"identity {identity}")
        return slot

    async def _maintain(self, slot: _Slot) -> None:
        while True:
            try:
                creds = await self._fetch(slot.identity)
            except Exception as exc:  # noqa: BLE001 - anything: keep the old cert and retry
                await self.clock.sleep(self._failed(slot, exc))
                continue
            self._install(slot, creds)
            await self._sleep_until(creds.refresh_at)

    async def _fetch(self, identity: Identity) -> Credentials:
        key, csr = credentials.new_request(identity)
        chain_pem = await self.client.create_certificate(csr, identity, self.cert_ttl)
        chain = credentials.accept(identity, key, chain_pem, self.roots, self.clock.now())
        return credentials.write(self.runtime_dir, identity, key, chain, self.trust_bundle)

    def _install(self, slot: _Slot, creds: Credentials) -> None:
        if slot.creds is not None:
            self.metrics.rotations.inc()
        slot.creds, slot.error, slot.failures = creds, None, 0
        slot.settled.set()
        self.metrics.expiry.labels(identity=slot.identity.uri).set(creds.not_after)
        self.log.info("certificate for %s valid until %s, rotating at %s", slot.identity,
                      _iso(creds.not_after), _iso(creds.refresh_at))

    def _failed(self, slot: _Slot, exc: Exception) -> float:
        """Record a failed attempt; the delay before the next one."""
        slot.error, slot.failures = exc, slot.failures + 1
        slot.settled.set()
        reason = REASONS.get(type(exc), "write_failed" if isinstance(exc, OSError) else "internal")
        self.metrics.errors.labels(reason=reason).inc()
        delay = self.backoff.delay(slot.failures, self.rng)
        still = (f"keeping the certificate valid until {_iso(slot.creds.not_after)}"
                 if slot.creds and slot.creds.valid_at(self.clock.now()) else "no valid certificate")
        log = self.log.warning if isinstance(exc, IdentityError) else self.log.error
        log("cannot get a certificate for %s (attempt %d, retrying in %.1fs; %s): %s", slot.identity,
            slot.failures, delay, still, exc, exc_info=reason == "internal")
        return delay

    async def _sleep_until(self, when: float) -> None:
        # Re-checked after waking: the wall clock may have been stepped meanwhile.
        while (left := when - self.clock.now()) > 0:
            await self.clock.sleep(left)


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="seconds")
