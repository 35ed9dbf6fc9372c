"""The CA over real gRPC/TLS on 127.0.0.1 (an ephemeral port), built exactly as
`nodeagent ca` builds it: issuing end to end, refusals as status codes with their
reasons, the CA's own certificate, and wire compatibility with Istio's ca.proto."""

from __future__ import annotations

import datetime as dt
import logging
import random
import socket
import ssl
import time

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2
from prometheus_client import CollectorRegistry

from nodeagent.errors import ConfigError, EnvironmentProblem
from nodeagent.identity import pemfiles
from nodeagent.identity.ca import server
from nodeagent.identity.workload import credentials
from nodeagent.identity.workload.client import CaClient
from nodeagent.identity.ca.config import CaConfig
from nodeagent.identity.errors import CaRefused, CaUnavailable
from nodeagent.clock import SystemClock
from nodeagent.identity.workload.manager import IdentityManager
from nodeagent.identity.spiffe import Identity, identity_of_certificate
from nodeagent.identity.tls import peer_identity

from identity_fixtures import (TD, ManualClock, csr_pem, identity, make_ca, pod_yaml, run, write_pods,
                               write_tokens)

LOG = logging.getLogger("test.ca_grpc")
TOKENS = {"node1": "node1-" + "1" * 26, "node2": "node2-" + "2" * 26}
WEB = identity("default", "web")
SERVER_NAME = "nodeagent-ca.istio-system.svc"


class RunningCa:
    def __init__(self, tmp_path, metrics_address=None, **kw):
        write_pods(tmp_path / "cluster", pod_yaml("web-0", "node1", "web"))
        write_tokens(tmp_path / "tokens.yaml", TOKENS)
        self.config = CaConfig(
            listen=("127.0.0.1", 0), trust_domain=TD, state_dir=tmp_path / "ca", tokens=tmp_path / "tokens.yaml",
            source=f"files:{tmp_path / 'cluster'}", source_dir=tmp_path / "cluster", cert_ttl=dt.timedelta(hours=24),
            namespace="istio-system", server_names=(SERVER_NAME,), metrics_address=metrics_address)
        self.registry = CollectorRegistry()
        self.server = server.build(self.config, self.registry, LOG, **kw)
        self.port = self.server.start()
        self.address = f"127.0.0.1:{self.port}"
        self.root_pem = (tmp_path / "ca" / "root-cert.pem").read_bytes()  # what the lab gives agents

    def client(self, node="node1", **kw) -> CaClient:
        return CaClient(self.address, kw.pop("root", self.root_pem), kw.pop("token", TOKENS[node]), **kw)


@pytest.fixture
def ca(tmp_path):
    running = RunningCa(tmp_path)
    yield running
    running.server.stop(grace=0)


async def _ask(client: CaClient, ident: Identity = WEB):
    key, csr = credentials.new_request(ident)
    try:
        return key, await client.create_certificate(csr, ident, dt.timedelta(hours=1))
    finally:
        await client.close()


def test_a_node_gets_a_certificate_end_to_end(ca):
    key, chain = run(_ask(ca.client()))
    roots = pemfiles.load_certs(ca.root_pem, "root")
    presented = credentials.accept(WEB, key, chain, roots, time.time())
    assert identity_of_certificate(presented[0]) == WEB
    lifetime = presented[0].not_valid_after_utc - presented[0].not_valid_before_utc
    assert lifetime == dt.timedelta(hours=1, minutes=1)  # as asked, plus the minute of backdating
    assert ca.registry.get_sample_value("nodeagent_ca_certificates_issued_total") == 1


def test_the_identity_manager_works_against_the_real_service(ca, tmp_path):
    async def main():
        client = ca.client()
        manager = IdentityManager(client, SystemClock(), ca.root_pem, CollectorRegistry(), LOG,
                                  runtime_dir=tmp_path / "run", rng=random.Random(1))
        creds = await manager.get(WEB)
        assert creds.identity == WEB and creds.path.exists()
        creds.ssl_context(server_side=True), creds.ssl_context(server_side=False)
        await manager.close()
        await client.close()
    run(main())


def test_a_bad_token_is_unauthenticated(ca):
    with pytest.raises(CaRefused) as err:
        run(_ask(ca.client(token="not-a-node-token-at-all")))
    assert err.value.code == "UNAUTHENTICATED" and "unknown bearer token" in str(err.value)
    assert "/" not in str(err.value).partition("unknown bearer token")[2], err.value  # no CA file path leaks
    assert ca.registry.get_sample_value("nodeagent_ca_denials_total", {"reason": "unauthenticated"}) == 1


def test_no_token_is_unauthenticated(ca):
    with pytest.raises(CaRefused) as err:
        run(_ask(ca.client(token="")))
    assert err.value.code == "UNAUTHENTICATED"


def test_an_identity_without_a_pod_on_the_callers_node_is_denied_with_the_reason(ca):
    with pytest.raises(CaRefused) as err:
        run(_ask(ca.client("node2")))
    assert err.value.code == "PERMISSION_DENIED"
    assert "no pod with service account ns/default/sa/web on node node2" in str(err.value)
    assert ca.registry.get_sample_value("nodeagent_ca_denials_total", {"reason": "permission_denied"}) == 1


def test_an_invalid_csr_is_an_invalid_argument(ca):
    async def main():
        client = ca.client()
        try:
            await client.create_certificate(csr_pem(uris=("spiffe://elsewhere/ns/default/sa/web",)), WEB)
        finally:
            await client.close()
    with pytest.raises(CaRefused) as err:
        run(main())
    assert err.value.code == "INVALID_ARGUMENT" and "this CA issues only for cluster.local" in str(err.value)


@pytest.mark.parametrize("kw", [
    {"root": make_ca().root_pem},  # a client that trusts another root
    {"server_name": "somebody-else.example"},  # the CA's certificate does not name this
])
def test_a_ca_that_does_not_verify_is_unavailable_not_trusted(ca, kw):
    with pytest.raises(CaUnavailable, match="certificate verify failed"):
        run(_ask(ca.client(timeout=5, **kw)))
    assert ca.registry.get_sample_value("nodeagent_ca_certificates_issued_total") == 0


def test_calls_that_never_send_their_request_hold_no_worker_and_end(tmp_path):
    """Anybody who can connect opens calls and never sends their request message: 4
    connections of 16 such calls, far more than the CA's 8 worker threads. An agent still
    gets its certificate meanwhile (with grpc's threaded server each such call held a
    worker waiting for its message: 8 stopped the CA); a call without a token is refused
    at once (UNAUTHENTICATED, its message never awaited), and each stalled call with one
    ends DEADLINE_EXCEEDED once the request timeout passed."""
    import h2.config
    import h2.connection
    import h2.events
    from nodeagent.identity.caproto import PATH

    running = RunningCa(tmp_path, request_timeout=1.0)
    attackers = []
    try:
        ctx = ssl.create_default_context(cadata=running.root_pem.decode())
        ctx.check_hostname = False
        ctx.set_alpn_protocols(["h2"])
        for _ in range(4):
            sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", running.port), timeout=10),
                                   server_hostname=SERVER_NAME)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            for i in range(16):
                token = [("authorization", "Bearer not-a-node-token-but-it-could-be")] if i % 2 else []
                conn.send_headers(conn.get_next_available_stream_id(), [
                    (":method", "POST"), (":scheme", "https"), (":path", PATH), (":authority", SERVER_NAME),
                    ("content-type", "application/grpc"), ("te", "trailers")] + token)
            sock.sendall(conn.data_to_send())
            attackers.append((sock, conn))
        key, chain = run(_ask(running.client(timeout=5)))
        assert identity_of_certificate(pemfiles.load_certs(chain[0].encode(), "leaf")[0]) == WEB
        for sock, conn in attackers:
            statuses = {}
            while len(statuses) < 16:
                data = sock.recv(65536)
                assert data, "closed before every call ended"
                for event in conn.receive_data(data):
                    headers = dict(getattr(event, "headers", None) or ())  # trailers, or a trailers-only answer
                    if b"grpc-status" in headers:
                        statuses[event.stream_id] = headers[b"grpc-status"]
                sock.sendall(conn.data_to_send())
            # DEADLINE_EXCEEDED with a token (streams 3, 7, ...), UNAUTHENTICATED without
            assert statuses == {sid: b"4" if sid % 4 == 3 else b"16" for sid in range(1, 32, 2)}
    finally:
        for sock, _ in attackers:
            sock.close()
        running.server.stop(grace=0)


def test_a_request_message_past_64_kib_is_refused_unread(ca):
    """grpc's default lets a call send 4 MiB, held until it is whole: a few connections of
    16 such calls from anybody had the CA killed for memory. A CSR is 0.5-2 KB."""
    from nodeagent.identity.caproto import PATH, IstioCertificateRequest, IstioCertificateResponse
    channel = grpc.secure_channel(ca.address, grpc.ssl_channel_credentials(ca.root_pem),
                                  options=[("grpc.ssl_target_name_override", SERVER_NAME)])
    try:
        call = channel.unary_unary(PATH, request_serializer=IstioCertificateRequest.SerializeToString,
                                   response_deserializer=IstioCertificateResponse.FromString)
        with pytest.raises(grpc.RpcError) as refused:
            call(IstioCertificateRequest(csr="x" * (65 * 1024)), metadata=[("authorization", f"Bearer {TOKENS['node1']}")],
                 timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ca.registry.get_sample_value("nodeagent_ca_issued_total") in (None, 0.0)
    finally:
        channel.close()


def test_known_callers_are_never_queued_behind_tokens_under_review():
    """Anybody can send a token that looks like an agent's: each is a TokenReview, on the
    review workers. A caller whose token is known is decided on workers of its own, at
    once; past `unknown_at_once` unknown calls, the next is UNAVAILABLE (agents retry)."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from nodeagent.identity.ca.auth import Caller, ModelView, NodeAuthorizer
    from nodeagent.identity.caproto import PATH, IstioCertificateRequest, IstioCertificateResponse
    from nodeagent.identity.errors import Unauthenticated
    from nodeagent.model import Model
    from nodeagent.kube.objects import parse_documents
    import yaml

    class Reviewing:
        def __init__(self):
            self.release = threading.Event()

        def known(self, token):
            return token == "known-node1-token"

        def authenticate(self, token):
            if token == "known-node1-token":
                return Caller("node1")
            self.release.wait(10)  # a review the API server is slow to answer
            raise Unauthenticated("the API server does not know the token")

    class Models:
        def poll(self):
            return Model.build(parse_documents(yaml.safe_dump(pod_yaml("web-0", "node1", "web")), "m.yaml"))

    authenticator = Reviewing()
    service = server.CertificateService(make_ca(), authenticator, NodeAuthorizer(ModelView(Models())),
                                        server.CaMetrics(CollectorRegistry()), LOG)
    reviews, known = ThreadPoolExecutor(1), ThreadPoolExecutor(1)

    async def main():
        handler = server.grpc_handler(service, reviews, 5.0, known, unknown_at_once=2)
        srv = grpc.aio.server(handlers=[handler])
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary(PATH, request_serializer=IstioCertificateRequest.SerializeToString,
                                   response_deserializer=IstioCertificateResponse.FromString)
        request = IstioCertificateRequest(csr=csr_pem(uris=(WEB.uri,)).decode())
        try:
            pending = [asyncio.ensure_future(call(request, metadata=[("authorization", f"Bearer forged-{i}")]))
                       for i in range(2)]
            await asyncio.sleep(0.3)  # both under way (one reviewing, one queued behind it)
            with pytest.raises(grpc.aio.AioRpcError) as busy:
                await call(request, metadata=[("authorization", "Bearer forged-2")], timeout=5)
            assert busy.value.code() == grpc.StatusCode.UNAVAILABLE
            answer = await call(request, metadata=[("authorization", "Bearer known-node1-token")], timeout=5)
            assert len(answer.cert_chain) >= 1  # while the reviews still hold their workers
            assert not any(p.done() for p in pending)
            authenticator.release.set()
            for p in pending:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await p
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            authenticator.release.set()
            await channel.close()
            await srv.stop(0)
    try:
        run(main())
    finally:
        reviews.shutdown(wait=True)
        known.shutdown(wait=True)


def test_the_metrics_port_serves_a_bounded_number_of_connections(tmp_path):
    """Any pod reaches the CA's metrics port. prometheus_client's server ran a thread per
    connection with no limit and no timeout: idle connections held in thousands would have
    the CA killed for memory. It is served as the agent's admin address is: at most 32 at
    once, more closed at accept and counted, and /metrics answers once they are gone."""
    import urllib.request
    from nodeagent.admin import MAX_TCP_CONNECTIONS

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    running = RunningCa(tmp_path, metrics_address=("127.0.0.1", port))
    idle = []
    try:
        for _ in range(MAX_TCP_CONNECTIONS + 40):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        refused = "nodeagent_admin_connections_refused_total"
        deadline = time.monotonic() + 10
        while (running.registry.get_sample_value(refused) or 0) < 40:
            assert time.monotonic() < deadline, running.registry.get_sample_value(refused)
            time.sleep(0.02)
        for sock in idle:
            sock.close()
        idle.clear()
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
                    assert b"nodeagent_ca_certificates_issued_total" in answer.read()
                break
            except OSError:  # still at the limit while the closed ones are noticed
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for sock in idle:
            sock.close()
        running.server.stop(grace=0)


def test_a_metrics_address_in_use_stops_the_ca_naming_its_own_setting(tmp_path):
    """The metrics port is served by the agent's admin server, whose refusal named the
    agent's --admin-address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as failed:
            RunningCa(tmp_path, metrics_address=("127.0.0.1", port))
    message = str(failed.value)
    assert message.startswith(f"setting metrics_address: cannot listen on 127.0.0.1:{port}: ")
    assert message.endswith("address already in use (is another process (another agent?) listening there? "
                            "pick another --metrics-address)")


def test_a_second_ca_on_the_same_port_fails_to_start(ca, tmp_path):
    second = server.CaServer(server.CertificateService(
        make_ca(), None, None, server.CaMetrics(CollectorRegistry()), LOG),
        server.ServingCertificate(make_ca(), Identity(TD, "istio-system", "nodeagent-ca"), (SERVER_NAME,)),
        ("127.0.0.1", ca.port))
    with pytest.raises(EnvironmentProblem, match=f"the CA cannot listen on 127.0.0.1:{ca.port}"):
        second.start()
    second.stop(grace=0)


def test_the_cas_certificate_names_its_spiffe_id_and_dns_name(ca):
    ctx = ssl.create_default_context(cadata=ca.root_pem.decode())  # hostname checking on
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", ca.port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            assert peer_identity(tls) == Identity(TD, "istio-system", "nodeagent-ca")


def test_the_cas_certificate_is_reissued_at_half_life():
    clock = ManualClock()
    ca = make_ca(clock=clock.now)
    serving = server.ServingCertificate(ca, Identity(TD, "istio-system", "nodeagent-ca"), (SERVER_NAME,),
                                        ttl=dt.timedelta(hours=2))
    first = serving.config
    clock.advance(3569)  # half-life: notBefore (T0 - 60 s) + (2 h + 60 s) / 2 = T0 + 3570 s
    assert serving.fetch() is None
    clock.advance(1)
    renewed = serving.fetch()
    assert renewed is not None and renewed is not first and serving.config is renewed
    assert serving.fetch() is None


# --- wire compatibility: Istio's proto, encoded by google.protobuf -----------------------
def _istio_messages():
    """IstioCertificateRequest/Response built from a descriptor written after ca.proto
    (istio/api security/v1alpha1), independent of nodeagent's classes (caproto's schema)."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    f = descriptor_pb2.FileDescriptorProto(name="ca.proto", package="istio.v1.auth", syntax="proto3",
                                           dependency=["google/protobuf/struct.proto"])
    T = descriptor_pb2.FieldDescriptorProto
    req = f.message_type.add(name="IstioCertificateRequest")
    req.field.add(name="csr", number=1, type=T.TYPE_STRING, label=T.LABEL_OPTIONAL)
    req.field.add(name="validity_duration", number=3, type=T.TYPE_INT64, label=T.LABEL_OPTIONAL)
    req.field.add(name="metadata", number=4, type=T.TYPE_MESSAGE, label=T.LABEL_OPTIONAL,
                  type_name=".google.protobuf.Struct")
    resp = f.message_type.add(name="IstioCertificateResponse")
    resp.field.add(name="cert_chain", number=1, type=T.TYPE_STRING, label=T.LABEL_REPEATED)
    pool.Add(f)
    get = lambda name: message_factory.GetMessageClass(pool.FindMessageTypeByName(name))  # noqa: E731
    return get("istio.v1.auth.IstioCertificateRequest"), get("istio.v1.auth.IstioCertificateResponse")


def _call_with_istio_encoding(ca: RunningCa, request):
    """CreateCertificate as node1, the request encoded by google.protobuf (a plain grpc client)."""
    _, Response = _istio_messages()
    creds = grpc.ssl_channel_credentials(root_certificates=ca.root_pem)
    with grpc.secure_channel(ca.address, creds, options=[("grpc.ssl_target_name_override", SERVER_NAME)]) as ch:
        call = ch.unary_unary("/istio.v1.auth.IstioCertificateService/CreateCertificate",
                              request_serializer=type(request).SerializeToString,
                              response_deserializer=Response.FromString)
        return call(request, metadata=[("authorization", f"Bearer {TOKENS['node1']}")], timeout=10)


def test_a_client_using_istios_proto_encoding_gets_a_certificate(ca):
    Request, _ = _istio_messages()
    key, csr = credentials.new_request(WEB)
    request = Request(csr=csr.decode(), validity_duration=7200)
    request.metadata.update({"ImpersonatedIdentity": WEB.uri, "ClusterID": "Kubernetes"})
    response = _call_with_istio_encoding(ca, request)
    assert len(response.cert_chain) == 2  # leaf, root
    leaf = credentials.accept(WEB, key, list(response.cert_chain), pemfiles.load_certs(ca.root_pem, "r"),
                              time.time())[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=2, minutes=1)


def test_a_lifetime_past_what_a_duration_holds_is_asked_for_the_longest(ca):
    """validity_duration 2^62 s overflowed the CA's timedelta (gRPC UNKNOWN, neither logged
    nor counted); it is a request for the longest lifetime, which the CA caps at its TTL."""
    Request, _ = _istio_messages()
    key, csr = credentials.new_request(WEB)
    response = _call_with_istio_encoding(ca, Request(csr=csr.decode(), validity_duration=2 ** 62))
    leaf = credentials.accept(WEB, key, list(response.cert_chain), pemfiles.load_certs(ca.root_pem, "r"),
                              time.time())[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(hours=24, minutes=1)


def test_an_impersonated_identity_that_differs_from_the_csr_is_refused(ca):
    Request, _ = _istio_messages()
    _, csr = credentials.new_request(WEB)
    request = Request(csr=csr.decode())
    request.metadata.update({"ImpersonatedIdentity": identity("default", "admin").uri})
    with pytest.raises(grpc.RpcError) as err:
        _call_with_istio_encoding(ca, request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ImpersonatedIdentity" in err.value.details()


def test_our_messages_encode_as_istios_do():
    from nodeagent.identity.caproto import IstioCertificateRequest, IstioCertificateResponse, Struct

    Request, Response = _istio_messages()
    metadata = Struct()
    metadata.update({"ImpersonatedIdentity": WEB.uri})
    ours = IstioCertificateRequest(csr="PEM", validity_duration=86400, metadata=metadata)
    theirs = Request.FromString(ours.SerializeToString())
    assert (theirs.csr, theirs.validity_duration, dict(theirs.metadata)) == ("PEM", 86400,
                                                                           {"ImpersonatedIdentity": WEB.uri})
    assert IstioCertificateResponse.FromString(Response(cert_chain=["a", "b"]).SerializeToString()).cert_chain == [
        "a", "b"]


def test_our_schema_has_istios_field_numbers_and_types():
    """Every field of caproto's messages as ca.proto declares it (number, type, repeated,
    message type), checked against the independent descriptor above."""
    from nodeagent.identity.caproto import IstioCertificateRequest, IstioCertificateResponse

    def fields(cls):
        return {f.name: (f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name)
                for f in cls.DESCRIPTOR.fields}
    Request, Response = _istio_messages()
    assert fields(IstioCertificateRequest) == fields(Request)
    assert fields(IstioCertificateResponse) == fields(Response)
    assert IstioCertificateRequest.DESCRIPTOR.full_name == Request.DESCRIPTOR.full_name


def test_metadata_string_reads_only_a_string_that_is_there():
    from nodeagent.identity.caproto import IstioCertificateRequest, Struct, metadata_string

    assert metadata_string(IstioCertificateRequest(csr="PEM"), "ImpersonatedIdentity") is None  # no metadata
    metadata = Struct()
    metadata.update({"ImpersonatedIdentity": WEB.uri, "Count": 3, "Flag": True})
    request = IstioCertificateRequest.FromString(IstioCertificateRequest(metadata=metadata).SerializeToString())
    assert metadata_string(request, "ImpersonatedIdentity") == WEB.uri
    assert metadata_string(request, "Count") is None and metadata_string(request, "Flag") is None
    assert metadata_string(request, "ClusterID") is None
