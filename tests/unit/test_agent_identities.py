"""WorkloadIdentities: the agent keeps certificates for the service accounts of its
enrolled pods (fetched ahead, forgotten when unused), serves TLS contexts from the
certificate in use (rebuilt after a rotation), and without a CA refuses, saying why.
Readiness: `/healthz/ready` answers 503 naming each identity of an enrolled pod without a
valid certificate and why, and 200 once they all have one."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from identity_fixtures import ManualClock, make_ca, run, until
from nodeagent.admin import AdminServer, Readiness
from nodeagent.agent.proxy.identities import WorkloadIdentities
from nodeagent.identity import pemfiles
from nodeagent.identity.errors import CaUnavailable, IdentityUnavailable
from nodeagent.identity.spiffe import node_identity
from nodeagent.identity.workload.manager import IdentityManager
from nodeagent.model import Pod

LOG = logging.getLogger("test.identities")


class Issuer:
    """Signs every CSR with a real CA (authorization is the CA tests' business)."""

    def __init__(self, ca):
        self.ca = ca
        self.asked: list[str] = []
        self.down = False

    async def create_certificate(self, csr_pem, identity, ttl=None):
        self.asked.append(identity.uri)
        if self.down:
            raise CaUnavailable("CA at 10.0.0.1:15012 failed: UNAVAILABLE: connection refused",
                                "check that the CA runs")
        return [pemfiles.certs_pem([cert]).decode() for cert in self.ca.sign(self.ca.read_csr(csr_pem), ttl)]

    async def close(self):
        pass


def pod(name: str, sa: str, ns: str = "mesh") -> Pod:
    return Pod(ns, name, f"uid-{name}", "node1", "10.244.1.2", {}, {}, sa)


def make(tmp_path, node: str | None = None):
    clock = ManualClock()
    ca = make_ca(clock=clock.now)
    issuer = Issuer(ca)
    registry = CollectorRegistry()
    manager = IdentityManager(issuer, clock, ca.root_pem, registry, LOG, runtime_dir=tmp_path / "id")
    return WorkloadIdentities("cluster.local", manager, LOG, node=node), issuer, clock, registry


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


def test_the_nodes_own_identity_is_kept_beside_its_pods_and_waited_for_by_none(tmp_path):
    """One waypoint per request: what the agent presents when it vouches for its pod's
    request. Fetched with the pods' and kept when they go; `missing` (readiness) never
    names it: without it such requests meet their destination's waypoint."""
    identities, issuer, _, _ = make(tmp_path, node="node1")

    async def main():
        node = node_identity("cluster.local", "node1")
        assert identities.node == node and identities.node_ready() is None
        identities.sync([pod("a-0", "web")])
        await until(lambda: identities.node_ready() is not None, what="the node's certificate")
        assert node.uri in issuer.asked and identities.node_ready() == node
        identities.sync([])
        assert [i["identity"] for i in identities.describe()["identities"]] == [node.uri]
        assert identities.missing([]) == []
        with pytest.raises(IdentityUnavailable, match="namespace nodeagent-node holds the node agents' own"):
            identities.of(pod("impostor", "node1", ns="nodeagent-node"))  # never a pod's
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


def test_ready_only_once_every_enrolled_pod_has_a_valid_certificate(tmp_path):
    identities, issuer, clock, registry = make(tmp_path)
    pods = [pod("a-0", "web"), pod("a-1", "web"), pod("bad-0", "Not_A_Name")]  # bad-0 can never have one
    admin = AdminServer(registry=registry, status=dict, log=LOG,
                        ready=lambda: Readiness(tuple(identities.missing(pods))))
    web = "spiffe://cluster.local/ns/mesh/sa/web"
    issuer.down = True

    async def main():
        identities.sync(pods)
        assert admin.respond("GET", "/healthz/ready") == (503, "text/plain", (
            f"not ready: no valid certificate for {web}: waiting for the CA's first answer\n").encode())
        # the admin address (any pod reaches it) says whether, not why: the why names pods
        assert admin.respond("GET", "/healthz/ready", local=False) == (
            503, "text/plain", b"not ready (why: nodeagent status, on the node)\n")
        await until(lambda: identities.manager.describe()[0]["failures"] == 1, what="a failed attempt")
        assert admin.respond("GET", "/healthz/ready") == (503, "text/plain", (
            f"not ready: no valid certificate for {web}: CA unreachable "
            "(CA at 10.0.0.1:15012 failed: UNAVAILABLE: connection refused)\n").encode())
        issuer.down = False
        clock.advance(clock.sleeps[-1])
        await until(lambda: identities.manager.current(identities.of(pods[0])) is not None, what="a certificate")
        assert admin.respond("GET", "/healthz/ready") == (200, "text/plain", b"ready\n")
        assert admin.respond("GET", "/healthz/ready", local=False) == (200, "text/plain", b"ready\n")
        issuer.down = True
        clock.advance_to(identities.manager.current(identities.of(pods[0])).not_after)  # lapsed, CA down
        code, _, body = admin.respond("GET", "/healthz/ready")
        assert code == 503 and body.startswith(f"not ready: no valid certificate for {web}: certificate expired".encode())
        await identities.close()
    run(main())


def test_a_certificate_left_by_the_previous_agent_is_ready_at_once_with_the_ca_down(tmp_path):
    identities, issuer, clock, _ = make(tmp_path)
    pods = [pod("a-0", "web")]

    async def main():
        identities.sync(pods)
        first = await identities.ready(identities.of(pods[0]))
        await identities.close()
        issuer.down = True
        manager = IdentityManager(issuer, clock, issuer.ca.root_pem, CollectorRegistry(), LOG,
                                  runtime_dir=tmp_path / "id")  # the agent restarted
        again = WorkloadIdentities("cluster.local", manager, LOG)
        assert again.missing(pods) != []  # not asked for yet: the first reconcile claims it
        again.sync(pods)
        assert again.missing(pods) == [] and again.context(again.of(pods[0]), True) is not None
        assert again.manager.current(again.of(pods[0])).key_pem == first.key_pem and len(issuer.asked) == 1
        await again.close()
    run(main())


def test_without_a_ca_nothing_is_missing():
    assert WorkloadIdentities("cluster.local", None, LOG).missing([pod("a-0", "web")]) == []


def test_status_names_each_certificate_by_serial_and_validity_and_the_root(tmp_path):
    """What `nodeagent proxy-config secret` shows (issue 14)."""
    from cryptography import x509

    identities, issuer, clock, _ = make(tmp_path)

    async def main():
        web = identities.of(pod("a-0", "web"))
        creds = await identities.ready(web)
        leaf = x509.load_pem_x509_certificate(creds.chain_pem)
        (entry,) = identities.describe()["identities"]
        assert (entry["identity"], entry["serial"], entry["not_before"], entry["not_after"]) == (
            web.uri, f"{leaf.serial_number:x}", leaf.not_valid_before_utc.timestamp(),
            leaf.not_valid_after_utc.timestamp())
        root = x509.load_pem_x509_certificate(issuer.ca.root_pem)
        (described,) = identities.describe()["roots"]
        assert described == {"subject": root.subject.rfc4514_string(), "serial": f"{root.serial_number:x}",
                             "not_before": root.not_valid_before_utc.timestamp(),
                             "not_after": root.not_valid_after_utc.timestamp()}
        await identities.close()
    run(main())
