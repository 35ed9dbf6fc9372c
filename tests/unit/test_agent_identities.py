"""WorkloadIdentities: the agent keeps certificates for the service accounts of its
enrolled pods (fetched ahead, forgotten when unused), serves TLS contexts from the
certificate in use (rebuilt after a rotation), and without a CA refuses, saying why."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from identity_fixtures import ManualClock, make_ca, run, until
from nodeagent.agent.identities import WorkloadIdentities
from nodeagent.identity import pemfiles
from nodeagent.identity.errors import IdentityUnavailable
from nodeagent.identity.manager import IdentityManager
from nodeagent.model import Pod

LOG = logging.getLogger("test.identities")


class Issuer:
    """Signs every CSR with a real CA (authorization is the CA tests' business)."""

    def __init__(self, ca):
        self.ca = ca
        self.asked: list[str] = []

    async def create_certificate(self, csr_pem, identity, ttl=None):
        self.asked.append(identity.uri)
        return [pemfiles.certs_pem([cert]).decode() for cert in self.ca.sign(self.ca.read_csr(csr_pem), ttl)]

    async def close(self):
        pass


def pod(name: str, sa: str, ns: str = "mesh") -> Pod:
    return Pod(ns, name, f"uid-{name}", "node1", "10.244.1.2", {}, {}, sa)


def make(tmp_path):
    clock = ManualClock()
    ca = make_ca(clock=clock.now)
    issuer = Issuer(ca)
    registry = CollectorRegistry()
    manager = IdentityManager(issuer, clock, ca.root_pem, registry, LOG, runtime_dir=tmp_path / "id")
    return WorkloadIdentities("cluster.local", manager, LOG), issuer, clock, registry


def test_sync_fetches_ahead_and_forgets_unused(tmp_path):
    identities, issuer, clock, registry = make(tmp_path)

    async def main():
        identities.sync([pod("a-0", "web"), pod("a-1", "web"), pod("b-0", "db")])
        await until(lambda: len(issuer.asked) == 2, what="two prefetches")
        web, db = identities.of(pod("x", "web")), identities.of(pod("x", "db"))
        assert sorted(issuer.asked) == [db.uri, web.uri]  # one per service account, none asked for yet
        creds = await identities.ready(web)
        assert registry.get_sample_value("nodeagent_cert_expiry_seconds", {"identity": web.uri}) == creds.not_after
        identities.sync([pod("a-0", "web")])
        assert not (tmp_path / "id" / "mesh_db_cluster.local.pem").exists()
        assert [i["identity"] for i in identities.describe()["identities"]] == [web.uri]
        await identities.close()
    run(main())


def test_contexts_are_cached_until_the_certificate_rotates(tmp_path):
    identities, issuer, clock, _ = make(tmp_path)

    async def main():
        web = identities.of(pod("a-0", "web"))
        with pytest.raises(IdentityUnavailable, match="no valid certificate"):
            identities.context(web, server_side=True)  # nothing fetched yet
        first = await identities.ready(web)
        server, client = identities.context(web, True), identities.context(web, False)
        assert identities.context(web, True) is server and client is not server
        clock.advance_to(first.refresh_at)  # half-life: a new certificate
        await until(lambda: identities.manager.current(web) is not first, what="rotation")
        assert identities.context(web, True) is not server
        await identities.close()
    run(main())


def test_without_a_ca_nothing_is_fetched_and_ready_says_how_to_enable_it():
    identities = WorkloadIdentities("cluster.local", None, LOG)

    async def main():
        identities.sync([pod("a-0", "web")])
        with pytest.raises(IdentityUnavailable, match="--ca-address"):
            await identities.ready(identities.of(pod("a-0", "web")))
        assert identities.describe() == {"enabled": False, "identities": []}
        await identities.close()
    run(main())


def test_a_pod_without_a_valid_identity_is_skipped_and_reported_once(tmp_path, caplog):
    identities, issuer, clock, _ = make(tmp_path)
    bad = pod("bad-0", "Not_A_Name")

    async def main():
        with caplog.at_level(logging.WARNING):
            identities.sync([pod("a-0", "web"), bad])
            identities.sync([pod("a-0", "web"), bad])
        await until(lambda: len(issuer.asked) == 1, what="one prefetch")
        assert issuer.asked == ["spiffe://cluster.local/ns/mesh/sa/web"]
        warned = [r.getMessage() for r in caplog.records if "bad-0" in r.getMessage()]
        assert len(warned) == 1 and "has no valid identity" in warned[0]
        assert identities.uri_of(bad) is None and identities.uri_of(None) is None
        with pytest.raises(IdentityUnavailable, match="fix its spec.serviceAccountName"):
            identities.of(bad)
        await identities.close()
    run(main())
