"""The agent's identity manager under a controlled clock: first fetch, rotation at
half-life, CA outages (the valid certificate stays in use, retries back off), expiry,
forgetting, metrics; and restarts: a manager made again on the same runtime directory
serves the still valid key files at once (even with the CA down) and rotates them when
the CA is back, and deletes every file it cannot trust, saying why.

The CA side is real (CertificateAuthority, token file, node authorization over the files
source) and called in-process; only gRPC is left out here (test_ca_grpc covers it) so
the clock can be controlled on both sides.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from nodeagent.backoff import Backoff
from nodeagent.identity import pemfiles
from nodeagent.identity.ca.auth import ModelView, NodeAuthorizer, TokenFileAuthenticator
from nodeagent.identity.ca.server import STATUS, CaMetrics, CertificateService
from nodeagent.identity.caproto import IstioCertificateRequest
from nodeagent.identity.errors import CaRefused, CaUnavailable, IdentityUnavailable
from nodeagent.identity.workload import credentials
from nodeagent.identity.workload.manager import CA_RETRY, IdentityManager
from nodeagent.sources.files import FilesSource

from identity_fixtures import (T0, ManualClock, csr_pem, identity, make_ca, pod_yaml, run, until, write_pods,
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
    def __init__(self, tmp_path, backoff=CA_RETRY):
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

    def restart(self, trust_bundle=None):
        """A new manager on the same runtime directory (the agent started again)."""
        self.registry = CollectorRegistry()
        self.manager = IdentityManager(self.issuer, self.clock, trust_bundle or self.ca.root_pem, self.registry, LOG,
                                       runtime_dir=self.runtime, backoff=CA_RETRY, rng=random.Random(7))
        return self.manager

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
        assert [p.name for p in env.runtime.iterdir()] == ["data_db_cluster.local.pem"]  # for the next agent
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
        assert web == {"identity": WEB.uri, "valid": True, "serial": creds.serial, "not_before": creds.not_before,
                       "not_after": creds.not_after, "refresh_at": creds.refresh_at, "failures": 0, "error": None}
        assert ghost_row["serial"] is None and ghost_row["not_before"] is None
        assert ghost_row["valid"] is False and ghost_row["failures"] == 1 and "ghost" in ghost_row["error"]
        env.clock.advance_to(creds.not_after)  # expired: no longer current
        assert env.manager.current(WEB) is None
        await env.manager.close()
    run(main())


# --- restarts: the key files an earlier agent left ------------------------------------

def fetched_then_closed(env, *identities):
    """Certificates for `identities` fetched, then the manager closed (the agent stopped)."""
    async def main():
        got = [await env.manager.get(i) for i in identities]
        await env.manager.close()
        return got
    return run(main())


def test_a_restart_with_the_ca_down_serves_the_left_certificate_at_once(env):
    first, = fetched_then_closed(env, WEB)
    env.issuer.down = True
    env.clock.advance(3 * 3600)

    async def main():
        manager = env.restart()
        manager.prefetch([WEB])
        creds = manager.current(WEB)  # no waiting, no CA
        assert creds is not None and (creds.key_pem, creds.chain_pem) == (first.key_pem, first.chain_pem)
        assert (creds.not_before, creds.not_after, creds.path) == (first.not_before, first.not_after, first.path)
        assert await manager.get(WEB) is creds and manager.problem(WEB) is None
        creds.ssl_context(server_side=True)  # what the tunnel serves with
        assert env.expiry(WEB) == first.not_after and env.issuer.calls == 1
        await env.sleeping()
        assert env.clock.deadlines == [first.refresh_at]  # rotated on the usual schedule
        assert env.errors() == 0 and env.metric("nodeagent_cert_rotations_total") == 0
        await manager.close()
    run(main())


def test_after_a_restart_rotation_resumes_when_the_ca_comes_back(env):
    first, = fetched_then_closed(env, WEB)
    env.issuer.down = True
    env.clock.advance_to(first.refresh_at + 600)  # restarted past the half-life

    async def main():
        manager = env.restart()
        manager.prefetch([WEB])
        assert manager.current(WEB).key_pem == first.key_pem
        await until(lambda: env.errors() == 1, what="an attempt at once")
        await env.sleeping()
        assert manager.current(WEB).key_pem == first.key_pem and manager.problem(WEB) is None
        env.issuer.down = False
        env.clock.advance(env.clock.sleeps[-1])
        await until(lambda: env.metric("nodeagent_cert_rotations_total") == 1, what="rotation")
        fresh = manager.current(WEB)
        assert fresh.key_pem != first.key_pem and fresh.path == first.path
        assert fresh.path.read_bytes() == fresh.key_pem + fresh.chain_pem
        assert env.expiry(WEB) == fresh.not_after and env.issuer.calls == 1 + 2
        await env.sleeping()
        assert env.clock.deadlines == [fresh.refresh_at]
        await manager.close()
    run(main())


def plant(env, ca, ident, key=None, certified_key=None):
    """A key file for `ident` written as the agent writes one (credentials.write): `key`
    with a certificate from `ca` for `certified_key` (default: for `key` itself)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    chain = ca.sign(ca.read_csr(csr_pem(certified_key or key, uris=(ident.uri,))))
    return credentials.write(env.runtime, ident, key, [c for c in chain if c.subject != c.issuer], ca.root_pem)


def _expired(env):
    left = plant(env, env.ca, WEB)
    env.clock.advance_to(left.not_after + 1)
    return left.path, "expired at"


def _expiring(env):
    left = plant(env, env.ca, WEB)
    env.clock.advance_to(left.not_after - 60)
    return left.path, "expires at .*, within 300s"


def _foreign_root(env):
    return plant(env, make_ca(clock=env.clock.now), WEB).path, "does not verify against the trust bundle"


def _mismatched_key(env):
    return plant(env, env.ca, WEB, certified_key=ec.generate_private_key(ec.SECP256R1())).path, \
        "the private key is not the certificate's"


def _world_readable(env):
    path = plant(env, env.ca, WEB).path
    os.chmod(path, 0o644)
    return path, "has mode 0644, not 0600"


def _symlink(env):
    path = plant(env, env.ca, WEB).path
    elsewhere = env.runtime.parent / "elsewhere.pem"
    os.replace(path, elsewhere)
    path.symlink_to(elsewhere)
    return path, "is a symbolic link"


def _renamed(env):
    path = env.runtime / credentials.file_name(WEB)
    os.replace(plant(env, env.ca, DB).path, path)
    return path, f"holds a certificate for {DB}"


def _interrupted_write(env):
    path = env.runtime / f".{credentials.file_name(WEB)}.x1y2z3"
    pemfiles.write_private(path, b"-----BEGIN PRIVATE KEY-----\nMIGH")
    return path, "interrupted"


def _garbage(env):
    path = env.runtime / credentials.file_name(WEB)
    pemfiles.write_private(path, b"not a key\n")
    return path, "no usable private key"


@pytest.mark.parametrize("left", [_expired, _expiring, _foreign_root, _mismatched_key, _world_readable, _symlink,
                                  _renamed, _interrupted_write, _garbage], ids=lambda f: f.__name__.strip("_"))
def test_a_left_file_that_cannot_be_trusted_is_deleted_saying_why(env, left, caplog):
    path, reason = left(env)
    calls = env.issuer.calls

    async def main():
        with caplog.at_level(logging.WARNING, logger=LOG.name):
            manager = env.restart()
        assert not os.path.lexists(path)
        [warning] = [r.getMessage() for r in caplog.records if r.name == LOG.name]
        assert str(path) in warning and re.search(reason, warning), warning
        manager.prefetch([WEB])
        assert manager.current(WEB) is None  # nothing served from the file
        fresh = await manager.get(WEB)  # the CA is asked instead
        assert env.issuer.calls == calls + 1 and fresh.path.read_bytes() == fresh.key_pem + fresh.chain_pem
        await manager.close()
    run(main())


def test_a_left_file_no_local_pod_claims_is_deleted_once_the_pods_are_known(env, caplog):
    web, db = plant(env, env.ca, WEB), plant(env, env.ca, DB)

    async def main():
        manager = env.restart()
        manager.prefetch([WEB])
        with caplog.at_level(logging.INFO, logger=LOG.name):
            manager.discard_unclaimed()
        assert web.path.exists() and not db.path.exists()
        assert any(f"no local pod has identity {DB}" in r.getMessage() for r in caplog.records)
        manager.prefetch([DB])  # a pod of DB's came back after all: the CA is asked
        assert manager.current(DB) is None and (await manager.get(DB)).key_pem != db.key_pem
        await manager.close()
    run(main())


def test_what_cannot_be_deleted_from_the_runtime_directory_is_reported_not_fatal(env, caplog):
    (env.runtime / "stray.pem").mkdir(parents=True)

    async def main():
        with caplog.at_level(logging.WARNING, logger=LOG.name):
            manager = env.restart()
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "is not a regular file" in messages and "cannot delete" in messages
        assert (await manager.get(WEB)).identity == WEB
        await manager.close()
    run(main())
