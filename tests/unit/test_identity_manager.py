"""The agent's identity manager under a controlled clock: first fetch, rotation at
half-life, CA outages (the valid certificate stays in use, retries back off), expiry,
forgetting, metrics.

The CA side is real (CertificateAuthority, token file, node authorization over the files
source) and called in-process; only gRPC is left out here (test_ca_grpc covers it) so
the clock can be controlled on both sides.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry

from nodeagent.identity import pemfiles
from nodeagent.identity.caauth import ModelView, NodeAuthorizer, TokenFileAuthenticator
from nodeagent.identity.caproto import IstioCertificateRequest
from nodeagent.identity.errors import CaRefused, CaUnavailable, IdentityUnavailable
from nodeagent.identity.manager import Backoff, IdentityManager
from nodeagent.identity.server import STATUS, CaMetrics, CertificateService
from nodeagent.sources.files import FilesSource

from identity_fixtures import (T0, ManualClock, identity, make_ca, pod_yaml, run, until, write_pods,
                               write_tokens)

LOG = logging.getLogger("test.manager")
TOKEN = "node1-token-" + "f" * 20
WEB, DB = identity("default", "web"), identity("data", "db")
DAY = 86400


class InProcessIssuer:
    """CreateCertificate through the real CertificateService without gRPC; refusals come
    back as CaRefused with the status the server would send. `down` = unreachable."""

    def __init__(self, service: CertificateService):
        self.service = service
        self.calls = 0
        self.down = False

    async def create_certificate(self, csr_pem, identity, ttl=None):
        self.calls += 1
        await asyncio.sleep(0)  # a real call always yields
        if self.down:
            raise CaUnavailable("CA at in-process failed: UNAVAILABLE: connection refused")
        request = IstioCertificateRequest(csr=csr_pem.decode(), validity_duration=int(ttl.total_seconds()) if ttl else 0)
        try:
            response = self.service.create_certificate(request, [("authorization", f"Bearer {TOKEN}")])
        except tuple(STATUS) as exc:
            raise CaRefused(STATUS[type(exc)].name, str(exc)) from None
        return list(response.cert_chain)


class Env:
    def __init__(self, tmp_path, backoff=Backoff()):
        self.clock = ManualClock()
        self.cluster = tmp_path / "cluster"
        write_pods(self.cluster, pod_yaml("web-0", "node1", "web"), pod_yaml("db-0", "node1", "db", ns="data"))
        write_tokens(tmp_path / "tokens.yaml", {"node1": TOKEN})
        self.ca = make_ca(clock=self.clock.now)
        self.issuer = InProcessIssuer(CertificateService(
            self.ca, TokenFileAuthenticator(tmp_path / "tokens.yaml", LOG),
            NodeAuthorizer(ModelView(FilesSource(self.cluster))), CaMetrics(CollectorRegistry()), LOG))
        self.registry = CollectorRegistry()
        self.runtime = tmp_path / "run" / "identity"
        self.manager = IdentityManager(self.issuer, self.clock, self.ca.root_pem, self.registry, LOG,
                                       runtime_dir=self.runtime, backoff=backoff, rng=random.Random(7))

    def metric(self, name, **labels):
        return self.registry.get_sample_value(name, labels)

    def expiry(self, ident):
        return self.metric("nodeagent_cert_expiry_seconds", identity=ident.uri)

    def errors(self, reason="unavailable"):
        return self.metric("nodeagent_cert_issuance_errors_total", reason=reason) or 0

    async def sleeping(self, count=1):
        """Wait until the manager's tasks are all asleep on the clock."""
        await until(lambda: len(self.clock.deadlines) == count, what=f"{count} sleeping tasks")


@pytest.fixture
def env(tmp_path):
    return Env(tmp_path)


def test_first_get_fetches_writes_a_private_file_and_sets_expiry(env):
    async def main():
        creds = await env.manager.get(WEB)
        assert creds.identity == WEB and env.issuer.calls == 1
        assert (creds.not_before, creds.not_after) == (T0 - 60, T0 + DAY)
        assert creds.trust_bundle_pem == env.ca.root_pem
        assert stat.S_IMODE(os.stat(creds.path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(env.runtime).st_mode) == 0o700
        assert creds.path.read_bytes() == creds.key_pem + creds.chain_pem
        leaf = pemfiles.load_certs(creds.chain_pem, "chain")
        assert len(leaf) == 1  # self-signed root: presented chain is the leaf alone
        key = serialization.load_pem_private_key(creds.key_pem, None)
        assert key.public_key().public_numbers() == leaf[0].public_key().public_numbers()
        assert env.expiry(WEB) == T0 + DAY
        assert await env.manager.get(WEB) is creds and env.issuer.calls == 1
        await env.manager.close()
    run(main())


def test_prefetch_fetches_before_anyone_asks(env):
    async def main():
        env.manager.prefetch([WEB, DB, WEB])
        await env.sleeping(2)
        assert env.issuer.calls == 2
        assert sorted(p.name for p in env.runtime.iterdir()) == [
            "data_db_cluster.local.pem", "default_web_cluster.local.pem"]
        assert env.expiry(WEB) == env.expiry(DB) == T0 + DAY
        await env.manager.get(DB)
        assert env.issuer.calls == 2
        await env.manager.close()
    run(main())


def test_rotation_happens_exactly_at_half_life(env):
    async def main():
        first = await env.manager.get(WEB)
        half = first.refresh_at
        assert half == T0 - 60 + (DAY + 60) / 2
        await env.sleeping()
        assert env.clock.deadlines == [half]
        env.clock.advance_to(half - 1)
        await asyncio.sleep(0.05)
        assert env.issuer.calls == 1 and await env.manager.get(WEB) is first
        env.clock.advance_to(half)
        await until(lambda: env.metric("nodeagent_cert_rotations_total") == 1, what="rotation")
        second = await env.manager.get(WEB)
        assert env.issuer.calls == 2
        assert (second.not_before, second.not_after) == (half - 60, half + DAY)
        assert second.key_pem != first.key_pem  # a fresh key per certificate
        assert second.path == first.path and second.path.read_bytes() == second.key_pem + second.chain_pem
        assert env.expiry(WEB) == half + DAY
        await env.sleeping()
        assert env.clock.deadlines == [second.refresh_at]
        await env.manager.close()
    run(main())


def test_ca_outage_keeps_the_valid_certificate_and_backs_off_until_the_ca_returns(env):
    async def main():
        first = await env.manager.get(WEB)
        await env.sleeping()
        env.issuer.down = True
        env.clock.advance_to(first.refresh_at)
        for attempt in range(1, 7):
            await until(lambda: env.errors() == attempt, what=f"failure {attempt}")
            await env.sleeping()
            delay = env.clock.sleeps[-1]
            ceiling = min(60.0, 2.0 ** (attempt - 1))
            assert ceiling / 2 <= delay <= ceiling, (attempt, delay)
            assert await env.manager.get(WEB) is first  # still in use
            assert env.expiry(WEB) == T0 + DAY
            if attempt < 6:
                env.clock.advance(delay)
        env.issuer.down = False
        back_at = int(env.clock.now() + delay)  # certificate times are whole seconds
        env.clock.advance(delay)
        await until(lambda: env.metric("nodeagent_cert_rotations_total") == 1, what="recovery")
        fresh = await env.manager.get(WEB)
        assert fresh.not_before == back_at - 60 and env.expiry(WEB) == back_at + DAY
        assert env.issuer.calls == 1 + 6 + 1 and env.errors() == 6
        await env.sleeping()
        assert env.clock.deadlines == [fresh.refresh_at]  # back to the normal schedule
        await env.manager.close()
    run(main())


def test_backoff_jitter_stays_within_its_bounds():
    backoff, rng = Backoff(first=1.0, maximum=60.0), random.Random(1)
    for attempt in range(1, 20):
        ceiling = min(60.0, 2.0 ** (attempt - 1))
        delays = {backoff.delay(attempt, rng) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays) and len(delays) > 1


def test_a_certificate_that_expires_during_an_outage_is_no_longer_handed_out(tmp_path):
    env = Env(tmp_path, backoff=Backoff(first=3600, maximum=3600))

    async def main():
        first = await env.manager.get(WEB)
        env.issuer.down = True
        while env.clock.now() < first.not_after:
            await env.sleeping()
            env.clock.advance_to(min(env.clock.deadlines[0], first.not_after))
        with pytest.raises(IdentityUnavailable, match=r"certificate expired at .*connection refused"):
            await env.manager.get(WEB)
        await env.manager.close()
    run(main())


def test_a_refusal_is_retried_and_get_says_why_meanwhile(env):
    ghost = identity("default", "ghost")

    async def main():
        with pytest.raises(IdentityUnavailable, match="no pod with service account ns/default/sa/ghost on node node1"):
            await env.manager.get(ghost)
        assert env.errors("refused") == 1 and env.expiry(ghost) is None
        write_pods(env.cluster, pod_yaml("ghost-0", "node1", "ghost"), name="ghost.yaml")
        await env.sleeping()
        env.clock.advance(env.clock.sleeps[-1])
        await until(lambda: env.expiry(ghost) is not None, what="certificate after the pod appeared")
        assert (await env.manager.get(ghost)).identity == ghost
        await env.manager.close()
    run(main())


def test_a_chain_that_does_not_verify_against_the_trust_bundle_is_not_used(tmp_path):
    env = Env(tmp_path)
    env.issuer.service.ca = make_ca(clock=env.clock.now)  # the CA's root is not the agent's

    async def main():
        with pytest.raises(IdentityUnavailable, match="does not verify against the trust bundle"):
            await env.manager.get(WEB)
        assert env.errors("invalid_response") == 1 and not list(env.runtime.iterdir())
        await env.manager.close()
    run(main())


def test_forget_stops_rotation_and_removes_the_key_and_metric(env):
    async def main():
        creds = await env.manager.get(WEB)
        await env.manager.get(DB)
        env.manager.forget(WEB)
        env.manager.forget(WEB)  # twice is harmless
        assert not creds.path.exists() and env.expiry(WEB) is None and env.expiry(DB) == T0 + DAY
        assert env.manager.identities == [DB]
        env.clock.advance_to(creds.refresh_at)
        await until(lambda: env.issuer.calls == 3, what="DB's rotation")
        await asyncio.sleep(0.05)
        assert env.issuer.calls == 3  # DB rotated, WEB did not
        await env.manager.close()
        assert list(env.runtime.iterdir()) == []
    run(main())


def test_current_and_describe_read_without_waiting(env):
    ghost = identity("default", "ghost")

    async def main():
        assert env.manager.current(WEB) is None and env.manager.describe() == []
        creds = await env.manager.get(WEB)
        with pytest.raises(IdentityUnavailable):
            await env.manager.get(ghost)
        assert env.manager.current(WEB) is creds and env.manager.current(ghost) is None
        web, ghost_row = sorted(env.manager.describe(), key=lambda r: r["identity"] != WEB.uri)
        assert web == {"identity": WEB.uri, "valid": True, "not_after": creds.not_after,
                       "refresh_at": creds.refresh_at, "failures": 0, "error": None}
        assert ghost_row["valid"] is False and ghost_row["failures"] == 1 and "ghost" in ghost_row["error"]
        env.clock.advance_to(creds.not_after)  # expired: no longer current
        assert env.manager.current(WEB) is None
        await env.manager.close()
    run(main())
