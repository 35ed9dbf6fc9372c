"""The CA's kube side without an API server: what a TokenReview answer decides (caller's
node, or a refusal saying why), the pod fallback, token expiry, the bounded cache, an
API error failing closed, the Secret's layout read back, and the kube settings. The
API server's real answers are checked by tests/e2e/test_lab_kube_ca.py."""

from __future__ import annotations

import base64
import hashlib
import datetime as dt
import json
import logging
import ssl

import pytest

from nodeagent.errors import ConfigError
from nodeagent.identity.ca import config, keys, kubekeys
from nodeagent.identity.ca.auth import Caller
from nodeagent.identity.ca.kubeauth import (NODE_NAME, POD_NAME, POD_UID, REFUSAL_SECONDS, Binding, CallerCache,
                                            KubeAuthenticator, SyncedModelView, binding_of, node_of_pod,
                                            review_request, token_expiry)
from nodeagent.identity.errors import CaUnavailable, Unauthenticated
from nodeagent.kube.client import ClusterConfig, KubeClient

AGENT = ("nodeagent-system", "nodeagent")
AUD = "nodeagent-ca"


def review(authenticated=True, audiences=(AUD,), username="system:serviceaccount:nodeagent-system:nodeagent",
           extra=None, error=None) -> dict:
    status = {"authenticated": authenticated, "audiences": list(audiences),
              "user": {"username": username, "extra": extra if extra is not None else
                       {POD_NAME: ["nodeagent-x1"], POD_UID: ["u-1"], NODE_NAME: ["node1"]}}}
    if error:
        status["error"] = error
    return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": status}


def test_the_request_names_the_cas_audience():
    assert review_request("tok", AUD) == {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                          "spec": {"token": "tok", "audiences": [AUD]}}


def test_an_agent_token_bound_to_a_pod_names_its_node():
    assert binding_of(review(), AUD, AGENT) == Binding("nodeagent-system", "nodeagent-x1", "u-1", "node1")


def test_without_the_node_extra_the_pod_is_named_for_a_lookup():
    got = binding_of(review(extra={POD_NAME: ["nodeagent-x1"], POD_UID: ["u-1"]}), AUD, AGENT)
    assert got == Binding("nodeagent-system", "nodeagent-x1", "u-1", None)


@pytest.mark.parametrize("answer, says", [
    (review(authenticated=False, error="[invalid bearer token, token audiences [\"api\"] is invalid]"),
     "the API server refused the token: [invalid bearer token"),
    (review(authenticated=False), "the API server refused the token: not authenticated"),
    (review(audiences=("api",)), "not for audience nodeagent-ca (it is for api)"),
    (review(audiences=()), "not for audience nodeagent-ca (it is for no audience)"),
    (review(username="system:serviceaccount:shop:default"),
     "the token is system:serviceaccount:shop:default's; only ServiceAccount nodeagent-system/nodeagent"),
    (review(username="system:serviceaccount:other:nodeagent"), "only ServiceAccount nodeagent-system/nodeagent"),
    (review(username="admin"), "the token is admin's"),
    (review(extra={}), "bound to no pod"),
    (review(extra={POD_NAME: ["p"]}), "bound to no pod"),
    ({"kind": "TokenReview"}, "not authenticated"),
])
def test_refusals_say_why(answer, says):
    with pytest.raises(Unauthenticated) as err:
        binding_of(answer, AUD, AGENT)
    assert says in str(err.value)


def test_the_bound_pods_node_by_uid():
    binding = Binding("nodeagent-system", "nodeagent-x1", "u-1", None)
    pod = {"metadata": {"uid": "u-1"}, "spec": {"nodeName": "node2"}}
    assert node_of_pod(pod, binding) == "node2"
    with pytest.raises(Unauthenticated, match="no longer exists"):
        node_of_pod({"metadata": {"uid": "u-2"}, "spec": {"nodeName": "node2"}}, binding)
    with pytest.raises(Unauthenticated, match="is on no node"):
        node_of_pod({"metadata": {"uid": "u-1"}, "spec": {}}, binding)


def jwt(claims: dict) -> str:
    part = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"eyJhbGciOiJSUzI1NiJ9.{part}.c2ln"


def test_token_expiry():
    assert token_expiry(jwt({"exp": 1700000000, "aud": [AUD]})) == 1700000000.0
    assert token_expiry(jwt({"aud": [AUD]})) is None
    assert token_expiry(jwt({"exp": True})) is None
    assert token_expiry("not-a-jwt") is None and token_expiry("a.!!!.c") is None


def test_the_cache_keeps_until_expiry_or_its_seconds_and_is_bounded():
    cache = CallerCache(size=3, seconds=60)
    cache.put(b"a", Caller("n1"), now=1000, expiry=1030)  # the token expires first
    cache.put(b"b", Caller("n2"), now=1000, expiry=5000)  # 60 s first
    cache.put(b"c", Caller("n3"), now=1000, expiry=None)
    cache.put(b"x", Caller("n9"), now=1000, expiry=999)  # already expired: not kept
    assert len(cache) == 3
    assert cache.get(b"a", 1029) == Caller("n1") and cache.get(b"a", 1030) is None
    assert cache.get(b"b", 1059) == Caller("n2") and cache.get(b"b", 1060) is None
    for i in range(5):
        cache.put(bytes([i]), Caller(f"m{i}"), now=2000, expiry=None)
    assert len(cache) == 3 and cache.get(b"c", 2000) is None  # the least recently used went first
    assert [cache.get(bytes([i]), 2001) for i in (2, 3, 4)] == [Caller("m2"), Caller("m3"), Caller("m4")]


def unreachable_client() -> KubeClient:
    # Port 1 of loopback: nothing listens, the connection is refused at once.
    return KubeClient(ClusterConfig("127.0.0.1", 1, ssl.create_default_context(), "t", "test"), timeout=2)


def test_an_api_error_is_unavailable_never_authenticated(caplog):
    auth = KubeAuthenticator(unreachable_client(), AUD, AGENT, logging.getLogger("t"))
    with pytest.raises(CaUnavailable, match="the API server did not answer its TokenReview"):
        auth.authenticate(jwt({"exp": 4102444800, "aud": [AUD]}))
    assert len(auth.cache) == 0


@pytest.mark.parametrize("token, says", [
    ("junk", "not a JWT"), ("a.!!!.c", "not a JWT"),
    (jwt({"exp": 999, "aud": [AUD]}), "expired"), (jwt({"aud": [AUD]}), "expired"),
    (jwt({"exp": 4102444800, "aud": ["other"]}), f"not for audience {AUD}"),
    (jwt({"exp": 4102444800}), f"not for audience {AUD}")])
def test_a_token_the_api_would_refuse_unseen_costs_no_review(token, says):
    """Anybody can send a token, before anything is known of them: one the API server would
    refuse without looking it up is refused here (the client can reach no API server:
    a review would be UNAVAILABLE), so junk sent in a loop is no TokenReview each."""
    auth = KubeAuthenticator(unreachable_client(), AUD, AGENT, logging.getLogger("t"), clock=lambda: 1000.0)
    with pytest.raises(Unauthenticated, match=says):
        auth.authenticate(token)


def test_reviews_under_way_at_once_are_bounded():
    """While the CA reviews as many tokens as it will at once, another token waits
    review_wait for its turn, then is UNAVAILABLE (the agent retries), never reviewed."""
    auth = KubeAuthenticator(unreachable_client(), AUD, AGENT, logging.getLogger("t"), reviews_at_once=2,
                             review_wait=0.05)
    assert auth.reviews.acquire(blocking=False) and auth.reviews.acquire(blocking=False)  # two under way
    with pytest.raises(CaUnavailable, match="reviewing 2 tokens at once"):
        auth.authenticate(jwt({"exp": 4102444800, "aud": [AUD]}))
    auth.reviews.release()
    with pytest.raises(CaUnavailable, match="did not answer its TokenReview"):  # its turn: reviewed
        auth.authenticate(jwt({"exp": 4102444800, "aud": [AUD]}))


def test_a_token_the_api_server_refused_is_refused_again_without_a_review(monkeypatch):
    """One forged-looking token sent in a loop is one TokenReview, not one a call; and a
    call of it is decided at once (`known`), never queued behind the reviews of others."""
    now = [1000.0]
    auth = KubeAuthenticator(unreachable_client(), AUD, AGENT, logging.getLogger("t"), clock=lambda: now[0])
    reviewed = []

    async def refused(token):
        reviewed.append(token)
        raise Unauthenticated("the API server does not know the token")
    monkeypatch.setattr(auth, "_review", refused)
    token = jwt({"exp": 4102444800, "aud": [AUD]})
    assert not auth.known(token)
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            auth.authenticate(token)
    assert len(reviewed) == 1 and auth.known(token)
    now[0] += REFUSAL_SECONDS
    assert not auth.known(token)
    with pytest.raises(Unauthenticated):
        auth.authenticate(token)
    assert len(reviewed) == 2
    assert auth.known("junk")  # refused unseen: decided at once too


def test_a_cached_caller_needs_no_review():
    cache = CallerCache()
    auth = KubeAuthenticator(unreachable_client(), AUD, AGENT, cache=cache, clock=lambda: 1000.0)
    cache.put(hashlib.sha256(b"tok").digest(), Caller("node7"), 1000.0, None)
    assert auth.authenticate("tok") == Caller("node7")


class Unsynced:
    scan_error = "waiting for the first list of Pod"

    def __init__(self):
        self.models = [None]
        self.polls = 0

    def poll(self):
        self.polls += 1
        return self.models.pop(0) if self.models else None


def test_the_model_view_is_unavailable_until_the_pods_are_listed():
    from nodeagent.model import Model
    source = Unsynced()
    view = SyncedModelView(source)
    with pytest.raises(CaUnavailable, match="waiting for the first list of Pod"):
        view()
    source.models = [Model.empty()]
    source.scan_error = None
    assert view() == Model.empty() and view() == Model.empty()  # then the last model read


def test_a_pod_watch_failing_for_long_makes_the_ca_unavailable_and_rebuilds_are_spaced():
    """The pods the CA read may have left their nodes while its watch fails: past
    stale_after it refuses (UNAVAILABLE) rather than give identities on that word, and
    answers again once the watch is back. Rebuilds of the model come at most every
    rebuild_every seconds however often the pods change."""
    from nodeagent.model import Model
    now = [1000.0]
    source = Unsynced()
    source.models, source.scan_error = [Model.empty()], None
    view = SyncedModelView(source, clock=lambda: now[0], stale_after=30, rebuild_every=1)
    assert view() == Model.empty() and source.polls == 1
    now[0] += 0.5
    view()
    assert source.polls == 1  # within a second of the last rebuild: the model in hand
    source.scan_error = "Pod: the API server did not answer"
    now[0] += 1
    assert view() == Model.empty() and source.polls == 2  # failing, not for long yet
    now[0] += 29
    assert view() == Model.empty()
    now[0] += 1
    with pytest.raises(CaUnavailable, match="pod watch has failed for 30s"):
        view()
    source.scan_error = None
    assert view() == Model.empty()


def test_the_secret_holds_the_state_directorys_layout():
    now = dt.datetime.now(dt.timezone.utc)
    material = keys.generate_root("cluster.local", now)
    body = kubekeys.secret_body("nodeagent-system", "nodeagent-ca-keys", material)
    assert sorted(body["data"]) == ["ca-cert.pem", "ca-key.pem", "root-cert.pem"]
    assert body["type"] == "Opaque" and body["metadata"]["name"] == "nodeagent-ca-keys"
    back = keys.from_files(kubekeys.secret_files(body, "Secret x"), "Secret x", now)
    assert back.root == material.root and back.self_signed
    partial = {k: v for k, v in body["data"].items() if k != "ca-key.pem"}
    with pytest.raises(ConfigError, match="Secret x: lacks ca-key.pem"):
        keys.from_files(kubekeys.secret_files({"data": partial}, "Secret x"), "Secret x", now)
    with pytest.raises(ConfigError, match="data ca-key.pem is not base64"):
        kubekeys.secret_files({"data": {**body["data"], "ca-key.pem": "!!"}}, "Secret x")
    broken = {**kubekeys.secret_files(body, "s"), "ca-key.pem": b"-----BEGIN PRIVATE KEY-----\nAAAA\n"}
    with pytest.raises(ConfigError) as err:
        keys.from_files(broken, "Secret x", now)
    assert str(err.value).startswith("Secret x/ca-key.pem: not an unencrypted PEM private key")
    assert "AAAA" not in str(err.value)


def test_kube_settings(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("""
apiVersion: v1
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
users: [{name: u, user: {token: abc}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
""")
    cfg = config.load({"source": f"kube:{kubeconfig}", "namespace": "nodeagent-system"}, {})
    assert cfg.kube and cfg.kubeconfig == kubeconfig and cfg.state_dir is None and cfg.tokens is None
    assert (cfg.token_audience, cfg.agent_service_account) == ("nodeagent-ca", AGENT)
    assert (cfg.root_secret, cfg.root_configmap) == ("nodeagent-ca-keys", "nodeagent-ca-root-cert")
    with pytest.raises(ConfigError, match="setting state_dir: is for the files source"):
        config.load({"source": f"kube:{kubeconfig}", "state_dir": str(tmp_path / "ca")}, {})
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set"):
        config.load({"source": "kube"}, {})
    with pytest.raises(ConfigError, match="setting state_dir: is required with the files source"):
        config.load({"source": f"files:{tmp_path}"}, {})
