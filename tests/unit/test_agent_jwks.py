"""JwksFetcher: the agent fetches every jwksUri in force into a local file (exact bytes,
atomically), refreshes it, keeps the last good file when the issuer fails (each distinct
error logged once, retried with backoff), forgets URIs no longer wanted, and survives a
restart. A real http.server on 127.0.0.1 in a thread answers; time between fetches is a
manual clock, time within a fetch (timeouts) is real."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import http.server
import ipaddress
import logging
import os
import random
import ssl
import threading
from dataclasses import dataclass
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from identity_fixtures import T0, ManualClock, run, until
from nodeagent.agent.waypoint import jwks as jwks_module
from nodeagent.agent.waypoint.jwks import (JwksFetcher, JwksUnavailable, file_name, http_get, jwks_uris,
                                           mesh_addresses)
from nodeagent.kube.objects import parse_documents
from nodeagent.model import Model
from nodeagent.backoff import Backoff
from nodeagent.errors import ConfigError
from nodeagent.policy import jwkset
from xds_world import config, doc, valid

LOG = "test.jwks"
REFRESH = timedelta(minutes=20)
JWKS1 = b'{"keys": [{"kty": "EC", "crv": "P-256", "kid": "one", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",' \
        b' "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}'
JWKS2 = b'{"keys": [{"kty": "oct", "kid": "two", "k": "c2VjcmV0"}, {"kty": "oct", "kid": "three", "k": "eA"}]}\n'
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@dataclass
class Answer:
    status: int = 200
    body: bytes = JWKS1
    delay: float = 0.0  # before the status line
    trickle: float = 0.0  # between body bytes
    declare_length: bool = True
    location: str = ""


class Issuer:
    """An HTTP(S) server in a thread answering each path as `answers` says, counting GETs."""

    def __init__(self, tls: ssl.SSLContext | None = None):
        self.answers: dict[str, Answer] = {"/keys": Answer()}
        self.hits: dict[str, int] = {}
        self.hosts: list[str] = []  # the Host header of each GET
        self.release = threading.Event()  # ends slow answers at teardown
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                issuer.hits[self.path] = issuer.hits.get(self.path, 0) + 1
                issuer.hosts.append(self.headers.get("Host", ""))
                answer = issuer.answers.get(self.path, Answer(404, b"no such key set"))
                if issuer.release.wait(answer.delay):
                    return
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                if answer.location:
                    self.send_header("Location", answer.location)
                if answer.declare_length:
                    self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if not answer.trickle:
                    self.wfile.write(answer.body)
                    return
                for i in range(len(answer.body)):
                    self.wfile.write(answer.body[i:i + 1])
                    self.wfile.flush()
                    if issuer.release.wait(answer.trickle):
                        return

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # the fetcher hanging up on a slow or huge answer is the point

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/keys") -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


REFUSED = jwks_module.refused_address


def on_loopback(monkeypatch) -> None:
    """The test's issuers answer on 127.0.0.1, which the agent refuses outside tests
    (refused_address: test_a_jwks_uri_on_the_node_or_a_link_local_address_is_refused)."""
    monkeypatch.setattr(jwks_module, "refused_address", lambda ip: None)


@pytest.fixture
def issuer(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    on_loopback(monkeypatch)
    server = Issuer()
    yield server
    server.close()


class World:
    """A fetcher on a manual clock, counting its on_change calls."""

    def __init__(self, directory, **kw):
        self.changes = 0
        self.clock = ManualClock()
        kw.setdefault("retry", Backoff(1.0, 4.0))
        kw.setdefault("rng", random.Random(7))
        self.fetcher = JwksFetcher(directory, logging.getLogger(LOG), on_change=self._changed,
                                   refresh=REFRESH, clock=self.clock, **kw)

    def _changed(self):
        self.changes += 1

    async def attempts(self, n: int) -> None:
        """Wait until the n-th fetch attempt has ended (each ends in a sleep)."""
        await until(lambda: len(self.clock.sleeps) >= n, what=f"fetch attempt {n}")
        assert len(self.clock.sleeps) == n
        await settle()

    async def next_attempt(self) -> None:
        n = len(self.clock.sleeps)
        self.clock.advance(self.clock.sleeps[-1])
        await self.attempts(n + 1)


async def settle() -> None:
    """Let callbacks scheduled with call_soon (on_change) run."""
    for _ in range(3):
        await asyncio.sleep(0)


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno == logging.WARNING]


def test_jwks_uris_are_those_of_the_rules_in_force_without_inline_keys():
    yaml = (doc("RequestAuthentication", "a", "jwtRules: [{issuer: i1, jwksUri: 'https://one.example/keys'}]",
                "security.istio.io/v1")
            + doc("RequestAuthentication", "b", """
jwtRules:
- {issuer: i2, jwksUri: 'http://two.example/jwks'}
- {issuer: i3, jwksUri: 'https://three.example/keys', jwks: '{"keys": []}'}
- {issuer: i4, jwksUri: 'https://one.example/keys'}
""", "security.istio.io/v1")
            + doc("RequestAuthentication", "bad", "jwtRules: [{issuer: i5, jwksUri: 'ftp://five.example/keys'}]",
                  "security.istio.io/v1"))
    built = config(yaml)
    assert [e.where for e in built.errors] == ["test.yaml#14 (RequestAuthentication shop/bad) spec.jwtRules[0].jwksUri"]
    assert jwks_uris(built) == {"https://one.example/keys": timedelta(seconds=5), "http://two.example/jwks":
                                timedelta(seconds=5)}


def test_each_uri_is_fetched_within_its_rules_timeout(tmp_path):
    """jwtRules[].timeout: the longest of the rules naming a URI, istiod's 5 s without one."""
    built = valid(doc("RequestAuthentication", "a", """
jwtRules:
- {issuer: i1, jwksUri: 'https://one.example/keys', timeout: 2s}
- {issuer: i2, jwksUri: 'https://one.example/keys', timeout: 30s}
- {issuer: i3, jwksUri: 'https://two.example/keys'}
- {issuer: i4, jwksUri: 'https://three.example/keys', timeout: 1.5s}
- {issuer: i5, jwksUri: 'https://two.example/keys', timeout: 2000000h}
""", "security.istio.io/v1"))
    uris = jwks_uris(built)
    # at most 30 s: a silent issuer holds one of the fetcher's threads meanwhile
    assert uris == {"https://one.example/keys": timedelta(seconds=30), "https://two.example/keys":
                    timedelta(seconds=30), "https://three.example/keys": timedelta(seconds=1.5)}
    asked = {}

    def fetch(uri, timeout, max_bytes):
        asked[uri] = timeout
        return JWKS1

    world = World(tmp_path, fetch=fetch)

    async def main():
        world.fetcher.want(uris)
        await world.attempts(3)
        assert asked == {"https://one.example/keys": 30.0, "https://two.example/keys": 30.0,
                         "https://three.example/keys": 1.5}
        assert world.fetcher.describe()["uris"]["https://three.example/keys"]["timeout_seconds"] == 1.5
        await world.fetcher.close()
    run(main())


def test_a_new_uri_is_fetched_at_once_into_its_file_and_refreshed(tmp_path, issuer):
    world = World(tmp_path / "jwks")
    uri = issuer.url()
    path = tmp_path / "jwks" / (hashlib.sha256(uri.encode()).hexdigest()[:16] + ".json")

    async def main():
        world.fetcher.want([uri])
        await world.attempts(1)
        assert world.fetcher.files() == {uri: str(path)}
        assert path.read_bytes() == JWKS1
        assert (issuer.hits, world.changes, world.clock.sleeps) == ({"/keys": 1}, 1, [REFRESH.total_seconds()])
        assert world.fetcher.describe() == {
            "directory": str(tmp_path / "jwks"), "refresh_seconds": REFRESH.total_seconds(),
            "uris": {uri: {"path": str(path), "fetched_at": T0, "failures": 0, "error": None, "timeout_seconds": 5.0}}}

        world.clock.advance(60)
        await world.next_attempt()  # the same keys: nothing to tell
        assert (issuer.hits, world.changes, path.read_bytes()) == ({"/keys": 2}, 1, JWKS1)
        assert world.fetcher.describe()["uris"][uri]["fetched_at"] == T0 + REFRESH.total_seconds() + 60

        issuer.answers["/keys"] = Answer(body=JWKS2)
        await world.next_attempt()
        assert (issuer.hits, world.changes, path.read_bytes()) == ({"/keys": 3}, 2, JWKS2)
        assert world.fetcher.files() == {uri: str(path)}
        assert sorted(os.listdir(tmp_path / "jwks")) == [path.name]  # no temporary file left
        await world.fetcher.close()
    run(main())


def test_failures_keep_the_last_good_file_back_off_and_log_each_error_once(tmp_path, issuer, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    world = World(tmp_path, max_bytes=1000)
    uri = issuer.url()
    path = tmp_path / file_name(uri)
    expected = random.Random(7)

    async def main():
        world.fetcher.want([uri])
        await world.attempts(1)
        failures = [(Answer(500, b"oops"), f"{uri} answered HTTP 500 Internal Server Error"),
                    (Answer(500, b"oops"), f"{uri} answered HTTP 500 Internal Server Error"),
                    (Answer(body=b"<html>not json</html>"), "is not JSON (JSONDecodeError)"),
                    (Answer(body=b'{"kid": "one"}'), "is not a JSON Web Key Set"),
                    # a set Envoy would refuse, and with it the node's whole waypoint configuration
                    (Answer(body=b'{"keys": [{"kty": "RSA", "n": "AQAB"}, {"kty": "EC", "crv": "P-256", '
                                 b'"x": "AQAB", "y": "AQAB"}]}'), "has no key Envoy can use"),
                    (Answer(body=b" " * 1001 + JWKS1), f"the answer of {uri} is larger than 1000 bytes")]
        for n, (answer, error) in enumerate(failures, start=1):
            issuer.answers["/keys"] = answer
            await world.next_attempt()
            assert world.clock.sleeps[-1] == Backoff(1.0, 4.0).jittered(n, expected)
            state = world.fetcher.describe()["uris"][uri]
            assert (state["path"], state["fetched_at"], state["failures"]) == (str(path), T0, n)
            assert error in state["error"]
            assert (path.read_bytes(), world.fetcher.files(), world.changes) == (JWKS1, {uri: str(path)}, 1)
        logged = warnings(caplog)
        assert len(logged) == 5  # the second 500 was not logged again
        assert all(f"cannot fetch the JWKS of {uri} (keeping the keys fetched at 2025-06-15T15:06:40+00:00" in m
                   for m in logged)

        issuer.answers["/keys"] = Answer()
        await world.next_attempt()
        assert world.fetcher.describe()["uris"][uri] == {
            "path": str(path), "fetched_at": world.clock.now(), "failures": 0, "error": None, "timeout_seconds": 5.0}
        assert (world.clock.sleeps[-1], world.changes, issuer.hits) == (REFRESH.total_seconds(), 1, {"/keys": 8})
        assert f"JWKS of {uri} fetched again, unchanged" in [r.getMessage() for r in caplog.records]
        assert sorted(os.listdir(tmp_path)) == [path.name]
        await world.fetcher.close()
    run(main())


def test_no_good_answer_yet_means_no_file(tmp_path, issuer, caplog):
    world = World(tmp_path)
    issuer.answers["/keys"] = Answer(body=b'{"keys": {"kid": "one"}}')
    uri = issuer.url()

    async def main():
        world.fetcher.want([uri])
        await world.attempts(1)
        assert (world.fetcher.files(), os.listdir(tmp_path), world.changes) == ({}, [], 0)
        state = world.fetcher.describe()["uris"][uri]
        assert (state["path"], state["fetched_at"], state["failures"]) == (None, None, 1)
        assert state["error"] == (f"jwksUri {uri}: {tmp_path / file_name(uri)}.tmp is not a JSON Web Key Set "
                                  f"({jwkset.HINT})")
        assert "its issuer's tokens are refused (401) until it answers" in warnings(caplog)[0]
        await world.fetcher.close()
    run(main())


@pytest.mark.parametrize("declare_length", [True, False])
def test_a_huge_answer_is_refused_as_it_arrives(issuer, declare_length):
    issuer.answers["/keys"] = Answer(body=b'{"keys": [], "pad": "' + b"x" * (3 << 20) + b'"}',
                                     declare_length=declare_length)
    with pytest.raises(JwksUnavailable, match=f"the answer of .* is larger than {1 << 20} bytes"):
        http_get(issuer.url(), 5.0, 1 << 20)


# Answers that would take 10 minutes: an attempt that ends at all (within the 10 s `attempts`
# waits) gave up; late sends nothing for 600 s, trickling a byte every 0.05 s (each read
# well within the timeout, the whole answer not). Issuer.close ends them.
SLOW = [Answer(delay=600.0), Answer(body=b" " * 12_000 + JWKS1, trickle=0.05)]


@pytest.mark.parametrize("answer", SLOW, ids=["late", "trickling"])
def test_a_slow_answer_is_given_up_on(tmp_path, issuer, answer):
    issuer.answers["/keys"] = answer
    world = World(tmp_path, timeout=timedelta(seconds=0.5))
    uri = issuer.url()

    async def main():
        world.fetcher.want([uri])
        try:
            await world.attempts(1)
        finally:
            issuer.release.set()  # a fetch that did not give up ends now, so a failure is quick
        assert world.fetcher.describe()["uris"][uri]["error"] == f"{uri} did not answer within 0.5s"
        assert world.fetcher.files() == {}
        await world.fetcher.close()
    run(main())


def test_redirects_are_followed_to_http_only(issuer):
    issuer.answers["/moved"] = Answer(302, b"", location="/keys")
    issuer.answers["/local"] = Answer(302, b"", location="file:///etc/hostname")
    assert http_get(issuer.url("/moved"), 5.0, 1000) == JWKS1
    with pytest.raises(JwksUnavailable, match=r"answered HTTP 302 Found - Redirection to url 'file:///etc/hostname'"):
        http_get(issuer.url("/local"), 5.0, 1000)
    with pytest.raises(JwksUnavailable, match="file:///etc/hostname is not an http"):
        http_get("file:///etc/hostname", 5.0, 1000)
    assert issuer.hits == {"/moved": 1, "/keys": 1, "/local": 1}


def test_forgetting_a_uri_deletes_its_file_and_tells(tmp_path, issuer):
    issuer.answers["/other"] = Answer(body=JWKS2)
    world = World(tmp_path)
    one, other = issuer.url(), issuer.url("/other")

    async def main():
        world.fetcher.want([one, other])
        await world.attempts(2)
        assert world.fetcher.files() == {one: str(tmp_path / file_name(one)), other: str(tmp_path / file_name(other))}
        changes = world.changes
        world.fetcher.want([other])
        assert not (tmp_path / file_name(one)).exists()
        assert world.fetcher.files() == {other: str(tmp_path / file_name(other))}
        assert list(world.fetcher.describe()["uris"]) == [other]
        assert world.changes == changes  # told soon, never from inside want()
        await settle()
        assert world.changes == changes + 1
        world.fetcher.want([other])
        await settle()
        assert (world.changes, issuer.hits) == (changes + 1, {"/keys": 1, "/other": 1})
        assert (tmp_path / file_name(other)).read_bytes() == JWKS2
        await world.fetcher.close()
    run(main())


def test_a_restarted_fetcher_uses_the_files_left_and_sweeps_the_rest(tmp_path, issuer, caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    uri = issuer.url()
    path = tmp_path / file_name(uri)

    async def first_run():
        world = World(tmp_path)
        world.fetcher.want([uri])
        await world.attempts(1)
        await world.fetcher.close()
    run(first_run())
    assert path.read_bytes() == JWKS1  # close() keeps the files
    os.utime(path, (T0 - 300, T0 - 300))
    stale, leftover, foreign = tmp_path / file_name("https://gone.example/keys"), tmp_path / (path.name + ".tmp"), \
        tmp_path / "README"
    for f in (stale, leftover, foreign):
        f.write_text("{}")
    issuer.answers["/keys"] = Answer(503, b"down")
    world = World(tmp_path)

    async def second_run():
        world.fetcher.want([uri])
        assert world.fetcher.files() == {uri: str(path)}  # at once, before any fetch
        assert sorted(os.listdir(tmp_path)) == sorted([path.name, "README"])
        await world.attempts(1)
        assert world.fetcher.describe()["uris"][uri] == {
            "path": str(path), "fetched_at": T0 - 300, "failures": 1,
            "error": f"{uri} answered HTTP 503 Service Unavailable", "timeout_seconds": 5.0}
        assert (path.read_bytes(), world.changes) == (JWKS1, 1)
        await world.fetcher.close()
    run(second_run())
    assert any(f"using the JWKS of {uri} fetched at 2025-06-15T15:01:40+00:00" in r.getMessage()
               for r in caplog.records)


def _tls_pair(directory, names: tuple[x509.GeneralName, ...] = (x509.IPAddress(ipaddress.ip_address("127.0.0.1")),)):
    """A CA file and a server context for `names` (127.0.0.1) signed by it."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test issuer CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(leaf.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "server.pem")
    return directory / "ca.pem", context


def test_https_is_verified_against_the_system_cas(tmp_path, monkeypatch):
    for name in PROXY_VARIABLES + ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    on_loopback(monkeypatch)
    ca_file, context = _tls_pair(tmp_path)
    server = Issuer(tls=context)
    try:
        with pytest.raises(JwksUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            http_get(server.url(), 5.0, 1000)  # our test CA is not a system CA
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # OpenSSL's own way to name the system CAs
        assert http_get(server.url(), 5.0, 1000) == JWKS1
    finally:
        server.close()


def test_on_change_failing_does_not_stop_the_fetches(tmp_path, issuer, caplog):
    clock = ManualClock()

    def broken():
        raise RuntimeError("bug in the caller")

    fetcher = JwksFetcher(tmp_path, logging.getLogger(LOG), on_change=broken, clock=clock)
    uri = issuer.url()

    async def main():
        fetcher.want([uri])
        await until(lambda: clock.sleeps, what="first fetch")
        await settle()
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
            "the JWKS on_change callback failed"]
        issuer.answers["/keys"] = Answer(body=JWKS2)
        clock.advance(clock.sleeps[-1])
        await until(lambda: len(clock.sleeps) == 2, what="refresh")
        assert (tmp_path / file_name(uri)).read_bytes() == JWKS2
        await fetcher.close()
    run(main())


@pytest.mark.parametrize("setting, value, where", [("refresh", timedelta(0), "jwks refresh"),
                                                   ("timeout", timedelta(seconds=-1), "jwks timeout"),
                                                   ("max_bytes", 0, "jwks max_bytes")])
def test_bad_settings_are_refused_by_name(tmp_path, setting, value, where):
    with pytest.raises(ConfigError, match=f"^{where}: "):
        JwksFetcher(tmp_path, logging.getLogger(LOG), **{setting: value})



# --- jwksUri naming an in-cluster Service (issue 14) -------------------------------------
JWKS_HOST = "jwks.auth.svc.cluster.local"


def cluster(cluster_ip: str, pod_phase: str | None = "Running") -> Model:
    """Service auth/jwks (app: jwks) at `cluster_ip` ("None": headless) and, unless
    `pod_phase` is None, its pod at 127.0.0.1 in that phase."""
    text = f"""
apiVersion: v1
kind: Service
metadata: {{name: jwks, namespace: auth}}
spec: {{clusterIP: "{cluster_ip}", selector: {{app: jwks}}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}
"""
    if pod_phase is not None:
        text += f"""---
apiVersion: v1
kind: Pod
metadata: {{name: jwks-0, namespace: auth, uid: u1, labels: {{app: jwks}}}}
spec: {{nodeName: node1, containers: [{{name: main}}]}}
status: {{podIP: 127.0.0.1, phase: {pod_phase}}}
"""
    return Model.build(parse_documents(text, "cluster.yaml"))


@pytest.mark.parametrize("host", [JWKS_HOST, "jwks.auth.svc", "jwks.auth"])
def test_a_jwks_uri_naming_a_service_connects_to_its_cluster_ip_with_the_name_as_host(issuer, host, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9/")  # the mesh's own Services bypass proxies
    port = issuer.server.server_address[1]
    uri = f"http://{host}:{port}/keys"
    assert http_get(uri, 5.0, 1000, resolve=mesh_addresses(lambda: cluster("127.0.0.1"))) == JWKS1
    assert issuer.hosts == [f"{host}:{port}"]


def test_without_the_model_the_name_goes_to_the_node_resolver(issuer):
    with pytest.raises(JwksUnavailable, match=f"cannot reach http://{JWKS_HOST}:1/keys"):
        http_get(f"http://{JWKS_HOST}:1/keys", 5.0, 1000)  # the node knows no cluster names
    # A name that is no Service of the model is the node resolver's too.
    resolve = mesh_addresses(lambda: cluster("127.0.0.1"))
    assert resolve("localhost") is None and resolve("other.auth.svc.cluster.local") is None
    assert resolve("jwks.auth.svc.cluster.local.") == "127.0.0.1"


def test_a_headless_service_is_reached_at_its_first_ready_endpoint(issuer):
    port = issuer.server.server_address[1]
    assert http_get(f"http://{JWKS_HOST}:{port}/keys", 5.0, 1000,
                    resolve=mesh_addresses(lambda: cluster("None"))) == JWKS1
    with pytest.raises(JwksUnavailable, match="is the headless Service auth/jwks, which has no ready endpoint"):
        http_get(f"http://{JWKS_HOST}:{port}/keys", 5.0, 1000, resolve=mesh_addresses(lambda: cluster("None", "Pending")))


def test_https_to_a_service_verifies_the_services_name(tmp_path, monkeypatch):
    for name in PROXY_VARIABLES + ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    on_loopback(monkeypatch)
    ca_file, context = _tls_pair(tmp_path, (x509.DNSName(JWKS_HOST),))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    server = Issuer(tls=context)
    try:
        port, resolve = server.server.server_address[1], mesh_addresses(lambda: cluster("127.0.0.1"))
        assert http_get(f"https://{JWKS_HOST}:{port}/keys", 5.0, 1000, resolve=resolve) == JWKS1
        with pytest.raises(JwksUnavailable, match="CERTIFICATE_VERIFY_FAILED"):  # the certificate names no 127.0.0.1
            http_get(server.url(), 5.0, 1000)
    finally:
        server.close()


def test_the_fetcher_resolves_through_the_model_it_is_given(tmp_path, issuer):
    async def scenario():
        world = World(tmp_path, resolve=mesh_addresses(lambda: cluster("127.0.0.1")))
        uri = f"http://{JWKS_HOST}:{issuer.server.server_address[1]}/keys"
        world.fetcher.want([uri])
        await world.attempts(1)
        assert (tmp_path / file_name(uri)).read_bytes() == JWKS1 and world.fetcher.files() == {
            uri: str(tmp_path / file_name(uri))}
        await world.fetcher.close()
    run(scenario())


@pytest.mark.parametrize("uri, says", [
    ("http://127.0.0.1:9/keys", "127.0.0.1 is a loopback address"),
    ("http://localhost:9/keys", "is a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://[fe80::1]:9/keys", "fe80::1 is a link-local address"),
    ("http://0.0.0.0:9/keys", "0.0.0.0 is a unspecified address"),
])
def test_a_jwks_uri_on_the_node_or_a_link_local_address_is_refused(uri, says, monkeypatch):
    """The agent fetches from the node's network, as root, a URI anybody allowed a
    RequestAuthentication names: not from the node itself or the cloud's metadata service
    (istiod fetches from its pod's network). A redirect there is refused the same way."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(JwksUnavailable, match=says.replace("[", r"\[")):
        http_get(uri, 5.0, 1000)


def test_a_redirect_to_the_metadata_service_is_refused(issuer, monkeypatch):
    """The issuer (allowed here on 127.0.0.1) redirects to the cloud's metadata service:
    the redirect's address is checked as the first one was."""
    monkeypatch.setattr(jwks_module, "refused_address", lambda ip: None if ip == "127.0.0.1" else REFUSED(ip))
    issuer.answers["/meta"] = Answer(302, b"", location="http://169.254.169.254/latest/meta-data/")
    with pytest.raises(JwksUnavailable, match="169.254.169.254 is a link-local address"):
        http_get(issuer.url("/meta"), 5.0, 1000)
    assert issuer.hits == {"/meta": 1}
