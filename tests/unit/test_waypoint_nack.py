"""What Envoy refuses stays out, and everything else still flows (issue 9.5: one route
Envoy NACKed froze every later change on the node while status said all was in force).

A NACK is traced to the Istio resources whose change caused it — the one changed, or by
bisection among several — which are held out (at their last accepted version, or left
out) with Envoy's message among the waypoint's errors, and the rest is published again.
Driven through the started Waypoint (a stand-in Envoy process, the agent's own AdsServer
over gRPC) by a fake Envoy's xDS session (AdsSession) that refuses whatever carries a
marked header, and by the real Envoy, refusing regexes over its program size limit that
our validation is told to let through. The publisher's steps alone, NACK by NACK:
test_waypoint_publisher.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.agent.waypoint.waypoint import Waypoint
from nodeagent.xds import resources as rt
from nodeagent.xds.cache import SnapshotCache
from nodeagent.xds.client import AdsSession
from nodeagent.xds.istio import fields
from nodeagent.xds.server import AdsServer
from nodeagent.xds.snapshot import Snapshot
from waypoint_world import (ALLOW_GET, DR, POISON, RATINGS_OK, RATINGS_POISONED, VS, VS_TIMEOUT, digest,
                            stand_in_envoy, until, waypoint_config)
from xds_world import RATINGS, doc, model, translation

REFUSAL = f"refused by the fake Envoy: {POISON}"
DENY_POISONED = doc("AuthorizationPolicy", "ratings-deny", f"""
selector: {{matchLabels: {{app: ratings}}}}
action: DENY
rules: [{{to: [{{operation: {{paths: ["/{POISON}"]}}}}]}}]
""", api="security.istio.io/v1")


def fake_envoy(response) -> str | None:
    return REFUSAL if any(POISON.encode() in r.value for r in response.resources) else None


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def make(tmp_path: Path, registry: CollectorRegistry, **supervisor) -> Waypoint:
    async def handler(sock, header):
        sock.close()

    return Waypoint(waypoint_config(tmp_path), registry=registry, log=logging.getLogger("t"), on_upstream=handler,
                    on_deliver=handler, debounce=0.02, supervisor_options={"backoff": 0.2, **supervisor})


@pytest.fixture
def waypoint(envoy_tmp: Path, registry) -> Waypoint:
    """With a stand-in Envoy: the xDS side is an AdsSession that refuses what carries POISON."""
    return make(envoy_tmp, registry, binary=stand_in_envoy(envoy_tmp))


@contextlib.asynccontextmanager
async def running(waypoint: Waypoint):
    """The waypoint started, and a fake Envoy's xDS session with it."""
    await waypoint.start()
    try:
        with AdsSession(waypoint.sockets.xds, "node1", reject=fake_envoy) as session:
            yield session
    finally:
        await waypoint.close()


def settled(waypoint: Waypoint, wanted: dict[str, str]) -> bool:
    """Envoy ACKed the latest snapshot, and exactly `wanted` is in force."""
    status = waypoint.describe()
    return status["xds"]["in_sync"] and status["resources"] == wanted


def refused(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("nodeagent_waypoint_errors_total", {"reason": "envoy_refused"}) or 0


def test_one_refused_resource_among_several_changes_is_found_and_the_rest_flows(waypoint, registry):
    async def go():
        async with running(waypoint) as session:
            waypoint.update(model(VS))
            await until(lambda: settled(waypoint, {"VirtualService shop/reviews": digest(VS)}), "the first ACK")
            # Three changes at once, one of them refused: found by bisection, one NACK only.
            waypoint.update(model(VS + RATINGS_POISONED + DR + ALLOW_GET))
            others = {"VirtualService shop/reviews": digest(VS), "DestinationRule shop/reviews": digest(DR),
                      "AuthorizationPolicy shop/ratings": digest(ALLOW_GET)}
            await until(lambda: settled(waypoint, others), "everything but the refused resource in force")
            assert len(session.nacked) == 1 and refused(registry) == 1
            (error,) = waypoint.describe()["errors"]
            assert f"(VirtualService shop/ratings): Envoy refused it: {REFUSAL} (fix it; it is left out " \
                   "until its spec changes)" in error
            assert f"{RATINGS}:8080" not in session.resources[rt.ROUTE]
            assert ("10.244.1.8", 9000) in waypoint.dataplane().inbound  # the new policy is enforced by Envoy
            # A later change flows; the refused spec is never sent again.
            waypoint.update(model(VS_TIMEOUT + RATINGS_POISONED + DR + ALLOW_GET))
            await until(lambda: settled(waypoint, {**others, "VirtualService shop/reviews": digest(VS_TIMEOUT)}),
                        "a later change in force")
            assert len(session.nacked) == 1 and len(waypoint.describe()["errors"]) == 1
            # Fixed, it is tried again and goes in.
            waypoint.update(model(VS_TIMEOUT + RATINGS_OK + DR + ALLOW_GET))
            await until(lambda: settled(waypoint, {**others, "VirtualService shop/reviews": digest(VS_TIMEOUT),
                                                   "VirtualService shop/ratings": digest(RATINGS_OK)}),
                        "the fixed resource in force")
            assert waypoint.describe()["errors"] == [] and f"{RATINGS}:8080" in session.resources[rt.ROUTE]
            assert len(session.nacked) == 1
    asyncio.run(go())


def test_a_refused_edit_keeps_the_last_accepted_version(waypoint):
    async def go():
        async with running(waypoint) as session:
            waypoint.update(model(VS + RATINGS_OK))
            good = {"VirtualService shop/reviews": digest(VS), "VirtualService shop/ratings": digest(RATINGS_OK)}
            await until(lambda: settled(waypoint, good), "the first ACK")
            waypoint.update(model(VS + RATINGS_POISONED))
            await until(lambda: waypoint.describe()["errors"] and settled(waypoint, good), "the edit refused")
            (error,) = waypoint.describe()["errors"]
            assert "(VirtualService shop/ratings): Envoy refused it" in error
            assert "its last accepted version stays in force until its spec changes" in error
            routes = session.resources[rt.ROUTE][f"{RATINGS}:8080"].virtual_hosts[0].routes
            assert [h.name for h in routes[0].match.headers] == ["x-canary"]  # the accepted version
            assert waypoint.describe()["xds"]["nacks"] == 1
    asyncio.run(go())


def test_a_refused_server_side_policy_sends_its_pods_to_l4_enforcement(waypoint):
    """Envoy enforcing every policy of a pod but the refused DENY would let through what
    it denies: the pod leaves the waypoint, and the agent enforces all at L4."""
    async def go():
        async with running(waypoint):
            waypoint.update(model(VS + ALLOW_GET))
            await until(lambda: waypoint.describe()["xds"]["in_sync"], "the first ACK")
            assert set(waypoint.dataplane().inbound) == {("10.244.1.8", 9000), ("10.244.1.8", 9090)}
            waypoint.update(model(VS + ALLOW_GET + DENY_POISONED))
            await until(lambda: waypoint.describe()["errors"] and waypoint.describe()["xds"]["in_sync"]
                        and waypoint.dataplane().inbound == {}, "ratings out of the waypoint")
            (error,) = waypoint.describe()["errors"]
            assert "(AuthorizationPolicy shop/ratings-deny): Envoy refused it" in error and "left out" in error
    asyncio.run(go())


def test_the_server_hands_each_nack_over_with_the_snapshot_it_refused(tmp_path):
    """...and never calls a snapshot accepted whose new route table the proxy has not
    even asked for yet (it ACKs the listeners naming it first)."""
    cache, seen, accepted = SnapshotCache(), [], []
    path = str(tmp_path / "xds.sock")
    server = AdsServer(cache, CollectorRegistry(), debounce=0.02, on_rejected=lambda *args: seen.append(args),
                       on_accepted=lambda node, snapshot: accepted.append(snapshot.version)).start(unix_path=path)
    try:
        good = translation(VS)
        cache.set_snapshot("node1", Snapshot.build("1", good.messages(), good.dataplane))
        with AdsSession(path, "node1", reject=fake_envoy) as session:
            session.wait(AdsSession.complete)
            deadline = time.monotonic() + 5
            while not accepted and time.monotonic() < deadline:
                time.sleep(0.02)
            bad = translation(VS + RATINGS_POISONED)
            snapshot = Snapshot.build("2", bad.messages(), bad.dataplane)
            cache.set_snapshot("node1", snapshot)
            session.wait(lambda s: len(s.nacked) == 1)
            deadline = time.monotonic() + 5
            while not seen and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:
        server.stop()
    assert seen == [("node1", snapshot, rt.ROUTE, REFUSAL)]
    assert f"{RATINGS}:8080" in snapshot.names(rt.ROUTE) and accepted == ["1"]


# --- the real Envoy --------------------------------------------------------------------
def uri_regex(name: str, regex: str) -> str:
    return doc("VirtualService", name, f"""
hosts: [ratings]
http:
- match: [{{uri: {{regex: '{regex}'}}}}]
  route: [{{destination: {{host: ratings}}}}]
""")


def test_the_real_envoy_refuses_what_validation_let_through_and_later_changes_flow(envoy_tmp, registry,
                                                                                   monkeypatch):
    """Our validation is told Envoy's limit is higher than it is, so a regex Envoy refuses
    gets through to it, as anything validation cannot know about would. Envoy's verdict
    on regexes near its limit is compared with our validation's too."""
    limit = fields.MAX_PROGRAM_SIZE  # the real one, before it is raised
    monkeypatch.setattr(fields, "MAX_PROGRAM_SIZE", 1_000_000)
    waypoint = make(envoy_tmp, registry)

    async def go():
        await waypoint.start()
        try:
            waypoint.update(model(VS))
            await until(lambda: settled(waypoint, {"VirtualService shop/reviews": digest(VS)}), "Envoy's first ACK")
            too_big = uri_regex("ratings", "/[a-z]{200}")
            waypoint.update(model(VS + too_big))
            await until(lambda: waypoint.describe()["errors"], "the regex refused")
            (error,) = waypoint.describe()["errors"]
            assert "(VirtualService shop/ratings): Envoy refused it: regex '/[a-z]{200}' RE2 program size of " \
                   "205 > max program size of 100" in error and "it is left out" in error
            # Later changes are ACKed and in force; the refused one stays out.
            waypoint.update(model(VS_TIMEOUT + too_big + DR))
            await until(lambda: settled(waypoint, {"VirtualService shop/reviews": digest(VS_TIMEOUT),
                                                   "DestinationRule shop/reviews": digest(DR)}), "a later change")
            assert len(waypoint.describe()["errors"]) == 1
            # Envoy and our validation agree about the limit (the Envoy we run counts as
            # RE2's Latin-1 mode does: `.` is 2 instructions).
            for regex in ("/[a-z]{95}", "/[a-z]{96}", "/.{47}", "/.{48}", r"/\pL{13}", r"/\pL{14}", r"/\x{100}"):
                size = fields.program_size(regex)
                ours = isinstance(size, int) and size <= limit
                document = uri_regex("ratings", regex)
                waypoint.update(model(VS_TIMEOUT + document + DR))
                await until(lambda: waypoint.describe()["errors"] or (
                    waypoint.describe()["xds"]["in_sync"]
                    and waypoint.describe()["resources"].get("VirtualService shop/ratings") == digest(document)),
                    f"Envoy's verdict on {regex}")
                assert (not waypoint.describe()["errors"]) == ours, (regex, waypoint.describe()["errors"])
        finally:
            await waypoint.close()
    asyncio.run(go())
