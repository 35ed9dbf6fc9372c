"""Keeps a certificate for every local workload identity, ahead of need (agent side).

As ztunnel's SecretManager: `prefetch` starts fetching for identities of pods on this
node before any connection needs them; `get` returns the current credentials (waiting
for the first fetch); each identity has one task that fetches, then sleeps until the
certificate's half-life and fetches again. Every fetch makes a fresh P-256 key on this
node and sends only the CSR. When the CA fails, the valid certificate stays in use and
the task retries with exponential backoff and jitter until the CA answers; `get` fails
only when there is no valid certificate at all, and `problem` says why. `forget` stops
all that and deletes the identity's file when no local pod uses it any more.

Key files outlive the agent (`close` keeps them), so a restart while the CA is down does
not cut the node off: at construction every file in the runtime directory is checked as
strictly as a fresh answer of the CA (credentials.load) and either adopted — served at
once when its identity is asked for, rotated at its half-life as usual — or deleted with
the reason logged. Adopted files nobody claimed are deleted by `discard_unclaimed`. Time
comes from an injected clock (wall time, since certificates carry wall times); metrics
go to the registry given.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.backoff import Backoff
from nodeagent.clock import Clock
from nodeagent.identity import pemfiles
from nodeagent.identity.errors import (CaRefused, CaUnavailable, IdentityError, IdentityUnavailable,
                                       IssuedCertificateInvalid)
from nodeagent.identity.spiffe import Identity
from nodeagent.identity.workload import credentials
from nodeagent.identity.workload.credentials import Credentials, StoredCredentialsInvalid, iso

DEFAULT_RUNTIME_DIR = Path("/run/nodeagent/identity")  # tmpfs: keys never reach a disk
REASONS = {CaUnavailable: "unavailable", CaRefused: "refused", IssuedCertificateInvalid: "invalid_response"}
# A stored certificate with no more than this left is not adopted: it would lapse about as
# soon as it is served; the pod waits for a fresh one instead.
ADOPTION_MARGIN = 300.0
CA_RETRY = Backoff(first=1.0, maximum=60.0)  # jittered: agents that lost the CA retry apart


class CertificateIssuer(Protocol):
    """What the manager needs of a CA client (CaClient is one)."""

    async def create_certificate(self, csr_pem: bytes, identity: Identity,
                                 ttl: dt.timedelta | None = None) -> list[str]: ...


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
                 backoff: Backoff = CA_RETRY, rng: random.Random | None = None,
                 cert_ttl: dt.timedelta | None = None, adoption_margin: float = ADOPTION_MARGIN):
        self.client, self.clock, self.log = ca_client, clock, log
        self.trust_bundle = trust_bundle
        self.roots = pemfiles.load_certs(trust_bundle, "trust bundle")
        self.runtime_dir = pemfiles.private_dir(runtime_dir)
        self.metrics = IdentityMetrics(registry)
        self.backoff, self.rng = backoff, rng or random.Random()
        self.cert_ttl = cert_ttl  # None: the CA's default
        self._slots: dict[Identity, _Slot] = {}
        self._adopted = self._adopt(adoption_margin)  # left by an earlier agent, not claimed yet

    # --- what callers use ---------------------------------------------------------------
    def prefetch(self, identities: Iterable[Identity]) -> None:
        """Start keeping certificates for `identities` (call from the event loop)."""
        for identity in identities:
            self._slot(identity)

    async def get(self, identity: Identity) -> Credentials:
        """Valid credentials for `identity`; IdentityUnavailable if there are none (yet)."""
        slot = self._slot(identity)
        await slot.settled.wait()
        creds = self.current(identity)
        if creds is not None:
            return creds
        raise IdentityUnavailable(self.problem(identity) or f"no valid certificate for {identity}",
                                  "the agent keeps retrying; check the CA and its logs")

    def problem(self, identity: Identity) -> str | None:
        """Why there is no valid certificate for `identity` now (None when there is one)."""
        slot = self._slots.get(identity)
        if slot is None:
            return f"no valid certificate for {identity}: not asked for"
        if self.current(identity) is not None:
            return None
        if isinstance(slot.error, CaUnavailable):
            why = f"CA unreachable ({slot.error.message})"
        else:
            why = f"last attempt: {slot.error}" if slot.error else "waiting for the CA's first answer"
        expired = f"certificate expired at {iso(slot.creds.not_after)}; " if slot.creds else ""
        return f"no valid certificate for {identity}: {expired}{why}"

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
                 "serial": s.creds.serial if s.creds else None,
                 "not_before": s.creds.not_before if s.creds else None,
                 "not_after": s.creds.not_after if s.creds else None,
                 "refresh_at": s.creds.refresh_at if s.creds else None,
                 "failures": s.failures, "error": str(s.error) if s.error else None}
                for i, s in sorted(self._slots.items())]

    def describe_roots(self) -> list[dict]:
        """The trust bundle's root certificates: subject, serial (hex) and validity."""
        return [{"subject": root.subject.rfc4514_string(), "serial": f"{root.serial_number:x}",
                 "not_before": root.not_valid_before_utc.timestamp(), "not_after": root.not_valid_after_utc.timestamp()}
                for root in self.roots]

    @property
    def identities(self) -> list[Identity]:
        return sorted(self._slots)

    def discard_unclaimed(self) -> None:
        """Delete the adopted files no identity was asked for (call once the local pods are
        known): no pod on this node has those identities any more."""
        for identity, creds in sorted(self._adopted.items()):
            self.log.info("deleting %s left by an earlier agent: no local pod has identity %s", creds.path, identity)
            _delete(creds.path, self.log)
        self._adopted.clear()

    async def close(self) -> None:
        """Stop fetching and wait for the tasks to end. The key files stay (0600, tmpfs) for
        the next agent, which adopts the ones still valid: a restart during a CA outage then
        keeps serving."""
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._slots.clear()

    # --- files an earlier agent left ------------------------------------------------------
    def _adopt(self, margin: float) -> dict[Identity, Credentials]:
        """The still good credentials in the runtime directory; every other entry there is
        deleted, saying why. Never raises: at worst nothing is adopted."""
        try:
            paths = sorted(self.runtime_dir.iterdir())
        except OSError as exc:
            self.log.error("cannot list %s, adopting no key files: %s", self.runtime_dir, exc.strerror)
            return {}
        adopted: dict[Identity, Credentials] = {}
        for path in paths:
            try:
                if path.name.startswith("."):  # pemfiles.write_private's temporary name
                    raise StoredCredentialsInvalid(f"{path}: left by a write that was interrupted")
                creds = credentials.load(path, self.roots, self.trust_bundle, self.clock.now(), margin)
            except StoredCredentialsInvalid as exc:
                self.log.warning("deleting key file left by an earlier agent: %s", exc)
                _delete(path, self.log)
                continue
            except Exception:  # noqa: BLE001 - a bug here must not stop the agent; the CA is asked instead
                self.log.exception("deleting %s: cannot check it", path)
                _delete(path, self.log)
                continue
            adopted[creds.identity] = creds
            self.log.info("adopted %s left by an earlier agent: certificate for %s valid until %s", path,
                          creds.identity, iso(creds.not_after))
        return adopted

    # --- the per-identity task ----------------------------------------------------------
    def _slot(self, identity: Identity) -> _Slot:
        slot = self._slots.get(identity)
        if slot is None:
            slot = self._slots[identity] = _Slot(identity)
            adopted = self._adopted.pop(identity, None)
            if adopted is not None and adopted.valid_at(self.clock.now()):
                self._install(slot, adopted)
            slot.task = asyncio.get_running_loop().create_task(self._maintain(slot), name=f"identity {identity}")
        return slot

    async def _maintain(self, slot: _Slot) -> None:
        if slot.creds is not None:  # adopted: rotated at its half-life like one just fetched
            await self._sleep_until(slot.creds.refresh_at)
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
                      iso(creds.not_after), iso(creds.refresh_at))

    def _failed(self, slot: _Slot, exc: Exception) -> float:
        """Record a failed attempt; the delay before the next one."""
        slot.error, slot.failures = exc, slot.failures + 1
        slot.settled.set()
        reason = REASONS.get(type(exc), "write_failed" if isinstance(exc, OSError) else "internal")
        self.metrics.errors.labels(reason=reason).inc()
        delay = self.backoff.jittered(slot.failures, self.rng)
        still = (f"keeping the certificate valid until {iso(slot.creds.not_after)}"
                 if slot.creds and slot.creds.valid_at(self.clock.now()) else "no valid certificate")
        log = self.log.warning if isinstance(exc, IdentityError) else self.log.error
        log("cannot get a certificate for %s (attempt %d, retrying in %.1fs; %s): %s", slot.identity,
            slot.failures, delay, still, exc, exc_info=reason == "internal")
        return delay

    async def _sleep_until(self, when: float) -> None:
        # Re-checked after waking: the wall clock may have been stepped meanwhile.
        while (left := when - self.clock.now()) > 0:
            await self.clock.sleep(left)


def _delete(path: Path, log: logging.Logger) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # a directory someone made there, say: leave it, say so
        log.error("cannot delete %s: %s", path, exc.strerror)
