"""The mesh CA as a gRPC service: Istio's IstioCertificateService over TLS.

`CertificateService` is the transport-free decision: authenticate the caller's bearer
token, check the CSR, check that the caller's node runs a pod with the identity asked
for, sign; every refusal is typed, logged with the reason and counted. `CaServer` serves
it with grpcio generic handlers (the messages of caproto, no generated code) over TLS
with a certificate the CA issues to itself for
`spiffe://<td>/ns/<ca-namespace>/sa/nodeagent-ca` plus DNS names (and the listen IP
when it is not a wildcard); grpc asks before each handshake, and the certificate is
reissued at half-life. Agents get the root to verify it from a file (root-cert.pem).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import threading
from concurrent import futures
from typing import Iterable

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeagent.admin import AdminServer
from nodeagent.errors import EnvironmentProblem
from nodeagent.identity import pemfiles
from nodeagent.identity.ca import keys
from nodeagent.identity.ca.auth import (Authenticator, ModelView, NodeAuthorizer, TokenFileAuthenticator,
                                        bearer_token)
from nodeagent.identity.ca.config import CaConfig
from nodeagent.identity.ca.signer import CertificateAuthority
from nodeagent.identity.caproto import (IMPERSONATED_IDENTITY, METHOD, SERVER_ACCOUNT, SERVICE,
                                        IstioCertificateRequest, IstioCertificateResponse, metadata_string)
from nodeagent.identity.errors import (CaUnavailable, CsrRejected, IdentityError, PermissionDenied,
                                       SignerExpired, Unauthenticated)
from nodeagent.identity.spiffe import Identity
from nodeagent.sources.files import FilesSource

# Refusals as gRPC status codes, and as the `reason` label of the denial counter.
STATUS = {Unauthenticated: grpc.StatusCode.UNAUTHENTICATED, PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
          CsrRejected: grpc.StatusCode.INVALID_ARGUMENT, SignerExpired: grpc.StatusCode.UNAVAILABLE,
          CaUnavailable: grpc.StatusCode.UNAVAILABLE}
REASONS = {Unauthenticated: "unauthenticated", PermissionDenied: "permission_denied",
           CsrRejected: "invalid_csr", SignerExpired: "signer_expired", CaUnavailable: "unavailable"}
SERVER_CERT_TTL = dt.timedelta(hours=24)
MAX_ASKED_TTL = 10 * 365 * 86400
REQUEST_TIMEOUT = 10.0  # a call's request message must follow its headers within this (seconds)
STREAMS_PER_CONNECTION = 16  # calls one connection may have open at once (HTTP/2 MAX_CONCURRENT_STREAMS)
MAX_REQUEST = 64 * 1024  # bytes of a request message (a CSR is 0.5-2 KB): grpc's default is 4 MiB a stream
UNKNOWN_AT_ONCE = 64  # calls of callers whose token is not known yet, decided or waiting at once


class CaMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.issued = Counter("nodeagent_ca_certificates_issued", "Workload certificates the CA signed",
                              registry=registry)
        self.denied = Counter("nodeagent_ca_denials", "Certificate requests the CA refused, by reason",
                              ["reason"], registry=registry)
        self.signer_expiry = Gauge("nodeagent_ca_signer_expiry_seconds",
                                   "Unix time at which the CA's own certificate chain expires", registry=registry)


class CertificateService:
    """CreateCertificate without the transport: metadata and request in, chain out."""

    def __init__(self, ca: CertificateAuthority, authenticator: Authenticator, authorizer: NodeAuthorizer,
                 metrics: CaMetrics, log: logging.Logger):
        self.ca, self.authenticator, self.authorizer = ca, authenticator, authorizer
        self.metrics, self.log = metrics, log
        metrics.signer_expiry.set(ca.material.not_after.timestamp())

    def known(self, token: str) -> bool:
        """Whether `token` is decided without asking anybody (a token file's; one the API
        server vouched for a moment ago): its call need not wait behind reviews."""
        known = getattr(self.authenticator, "known", None)
        return known(token) if known is not None else True

    def refuse(self, exc: IdentityError, peer: str) -> None:
        """Count and log a refusal decided before the request was read."""
        self.metrics.denied.labels(reason=REASONS.get(type(exc), "error")).inc()
        self.log.warning("refused a certificate for an unauthenticated caller from %s: %s", peer or "?", exc)

    def create_certificate(self, request: IstioCertificateRequest, metadata: Iterable[tuple[str, str]],
                           peer: str = "") -> IstioCertificateResponse:
        caller = None
        try:
            caller = self.authenticator.authenticate(bearer_token(list(metadata)))
            signing = self.ca.read_csr(request.csr)
            _check_impersonation(request, signing.identity)
            self.authorizer.authorize(caller, signing.identity)
            # at most the CA's cert_ttl (the signer's cap); past a timedelta's range: asking for the longest
            ttl = (dt.timedelta(seconds=min(request.validity_duration, MAX_ASKED_TTL))
                   if request.validity_duration > 0 else None)
            chain = self.ca.sign(signing, ttl)
        except IdentityError as exc:
            self.metrics.denied.labels(reason=REASONS.get(type(exc), "error")).inc()
            self.log.warning("refused a certificate for %s from %s: %s", caller or "unauthenticated caller",
                             peer or "?", exc)
            raise
        self.metrics.issued.inc()
        self.log.info("issued %s to %s (serial %x, until %s)", signing.identity, caller, chain[0].serial_number,
                      chain[0].not_valid_after_utc.isoformat())
        return IstioCertificateResponse(cert_chain=[pemfiles.certs_pem([c]).decode() for c in chain])


def _check_impersonation(request: IstioCertificateRequest, identity: Identity) -> None:
    """ztunnel names the identity in metadata too; when present it must match the CSR."""
    named = metadata_string(request, IMPERSONATED_IDENTITY)
    if named is not None and named != identity.uri:
        raise CsrRejected(f"metadata {IMPERSONATED_IDENTITY} {named!r} differs from the CSR's SAN {identity.uri}")


def grpc_handler(service: CertificateService, workers: futures.Executor,
                 request_timeout: float = REQUEST_TIMEOUT, known_workers: futures.Executor | None = None,
                 unknown_at_once: int = UNKNOWN_AT_ONCE) -> grpc.GenericRpcHandler:
    """CreateCertificate for the asyncio server. The request message is awaited on the loop,
    at most `request_timeout` after the call's headers, and the decision (token review,
    signing) runs on `workers`: a client that sends headers and never its message holds a
    stream, not a worker. (With grpc's threaded server the worker thread itself waited for
    the message, so 8 streams without one, from anybody who can connect, stopped the CA.)
    A call without a bearer token is refused before its message is read (with the server's
    MAX_REQUEST, what anybody who can connect makes the CA hold). A caller whose token is
    known (`CertificateService.known`) is decided on `known_workers`, never behind the
    reviews of tokens nobody vouched for yet (anybody can send a plausible-looking one); of
    those, at most `unknown_at_once` wait or run at once, the next is UNAVAILABLE (agents
    retry)."""
    unknown = 0

    async def create(requests, context: grpc.aio.ServicerContext) -> IstioCertificateResponse:
        nonlocal unknown
        metadata = list(context.invocation_metadata() or ())
        try:
            token = bearer_token(metadata)
        except IdentityError as exc:
            service.refuse(exc, context.peer())
            await context.abort(STATUS.get(type(exc), grpc.StatusCode.INTERNAL), str(exc))
        try:
            request = await asyncio.wait_for(anext(requests), request_timeout)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no request message within {request_timeout:g}s of the call")
        except StopAsyncIteration:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message")
        known = known_workers is not None and service.known(token)
        if not known and unknown >= unknown_at_once:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"the CA is deciding {unknown_at_once} calls of callers it does not know yet; retry")
        unknown += 0 if known else 1
        try:
            return await asyncio.get_running_loop().run_in_executor(
                known_workers if known else workers, service.create_certificate, request, metadata, context.peer())
        except IdentityError as exc:
            await context.abort(STATUS.get(type(exc), grpc.StatusCode.INTERNAL), str(exc))
        finally:
            unknown -= 0 if known else 1

    # stream-unary on the wire is what a unary call sends (one message): the handler awaits it
    method = grpc.stream_unary_rpc_method_handler(create, request_deserializer=IstioCertificateRequest.FromString,
                                                  response_serializer=IstioCertificateResponse.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, {METHOD: method})


class ServingCertificate:
    """The CA's own TLS certificate, issued by itself, reissued at half-life."""

    def __init__(self, ca: CertificateAuthority, identity: Identity, dns_names: tuple[str, ...],
                 ips: tuple[str, ...] = (), ttl: dt.timedelta = SERVER_CERT_TTL):
        self.ca, self.identity, self.dns_names, self.ips, self.ttl = ca, identity, dns_names, ips, ttl
        self._lock = threading.Lock()
        self._config, self._renew_at = self._issue()

    def _issue(self) -> tuple[grpc.ServerCertificateConfiguration, dt.datetime]:
        key = ec.generate_private_key(ec.SECP256R1())  # in memory only, never written
        leaf = self.ca.issue(key.public_key(), self.identity, self.ttl, self.dns_names, self.ips)
        root = self.ca.material.root  # clients have it; presenting it again is useless
        chain = pemfiles.certs_pem([leaf, *(c for c in self.ca.material.chain if c != root)])
        renew_at = leaf.not_valid_before_utc + (leaf.not_valid_after_utc - leaf.not_valid_before_utc) / 2
        return grpc.ssl_server_certificate_configuration([(pemfiles.key_pem(key), chain)]), renew_at

    @property
    def config(self) -> grpc.ServerCertificateConfiguration:
        return self._config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc calls this before every handshake: a new configuration, or None to keep it."""
        with self._lock:
            if self.ca.now() < self._renew_at:
                return None
            self._config, self._renew_at = self._issue()
            return self._config


class CaServer:
    """The gRPC server (grpc.aio on a loop of its own thread; the decisions on `workers`
    threads); `start()` returns the bound port (0 in `address` picks one)."""

    def __init__(self, service: CertificateService, certificate: ServingCertificate,
                 address: tuple[str, int], workers: int = 8, source=None, request_timeout: float = REQUEST_TIMEOUT,
                 registry: CollectorRegistry | None = None, metrics_address: tuple[str, int] | None = None):
        self.address = address
        # /metrics (and /healthz/ready) served as the agent serves them: at most 32 connections
        # at once, 5 s each for a request (prometheus_client's server, a thread per
        # connection with no limit, let any pod hold thousands and have the CA killed for memory)
        self.metrics_address = metrics_address
        self._metrics = (AdminServer(registry=registry, status=dict, ready=lambda: True,
                                     log=logging.getLogger("nodeagent.ca.metrics"))
                         if metrics_address is not None and registry is not None else None)
        self.certificate = certificate
        self.source = source  # the kube source feeding NodeAuthorizer, closed by stop()
        self._workers = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ca")
        # callers whose token is known: never queued behind reviews (grpc_handler)
        self._known_workers = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ca-known")
        self._handler = grpc_handler(service, self._workers, request_timeout, self._known_workers)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="ca-grpc", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._started = False
        self._stopped = threading.Event()

    def start(self) -> int:
        """Serve; the port the CA listens on. A start that fails stops what it started."""
        self._thread.start()
        target = grpc_target(*self.address)
        try:
            port = self._run(self._start(target))
            if port == 0:
                raise EnvironmentProblem(f"the CA cannot listen on {target}",
                                         "is another process using the port? choose another with --listen")
            if self._metrics is not None:
                self._run(self._metrics.start(self.metrics_address, None, reuse_port=False,
                                              setting="metrics_address"))
        except BaseException:
            self.stop(grace=0)
            raise
        return port

    async def _start(self, target: str) -> int:
        # grpc turns SO_REUSEPORT on by default: a second CA on the port would share it silently.
        self._server = grpc.aio.server(handlers=[self._handler], options=[
            ("grpc.so_reuseport", 0), ("grpc.max_concurrent_streams", STREAMS_PER_CONNECTION),
            ("grpc.max_receive_message_length", MAX_REQUEST)])
        creds = grpc.dynamic_ssl_server_credentials(self.certificate.config, self.certificate.fetch)
        try:
            port = self._server.add_secure_port(target, creds)
        except RuntimeError:
            port = 0
        if port:
            await self._server.start()
            self._started = True
        return port

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped.is_set():
            return
        if self._thread.is_alive():
            if self._metrics is not None:
                self._run(self._metrics.close())
            if self._started:
                self._run(self._server.stop(grace))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()
        self._workers.shutdown(wait=True, cancel_futures=True)
        self._known_workers.shutdown(wait=True, cancel_futures=True)
        self._stopped.set()
        if self.source is not None:
            self.source.close()

    def wait(self) -> None:
        self._stopped.wait()


def grpc_target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_ips(host: str) -> tuple[str, ...]:
    """The listen address as an IP SAN, unless it is a wildcard."""
    return () if ipaddress.ip_address(host).is_unspecified else (host,)


def build(cfg: CaConfig, registry: CollectorRegistry, log: logging.Logger,
          request_timeout: float = REQUEST_TIMEOUT) -> CaServer:
    """The CaServer `cfg` describes, not started: what `nodeagent ca` runs. Files source:
    keys from the state directory, node tokens from a file, the cluster model from the
    files. Kube source: keys from the root Secret (made on first start) and the root
    published in the ConfigMap, agents by TokenReview, the pods from the API (watched)."""
    now = dt.datetime.now(dt.timezone.utc)
    source = None
    if cfg.kube:
        material, authenticator, source, authorizer = _from_kube(cfg, now, log)
    else:
        material = keys.load_or_create(cfg.state_dir, cfg.trust_domain, now, log)
        authenticator = TokenFileAuthenticator(cfg.tokens, log.getChild("tokens"))
        authorizer = NodeAuthorizer(ModelView(FilesSource(cfg.source_dir, log.getChild("source"))))
    ca = CertificateAuthority(cfg.trust_domain, material, cert_ttl=cfg.cert_ttl)
    service = CertificateService(ca, authenticator, authorizer, CaMetrics(registry), log)
    identity = Identity(cfg.trust_domain, cfg.namespace, SERVER_ACCOUNT)
    certificate = ServingCertificate(ca, identity, cfg.server_names, listen_ips(cfg.listen[0]))
    return CaServer(service, certificate, cfg.listen, source=source, request_timeout=request_timeout,
                    registry=registry, metrics_address=cfg.metrics_address)


def _from_kube(cfg: CaConfig, now: dt.datetime, log: logging.Logger):
    """Keys, authenticator, pod source and authorizer of the kube source (the source
    started): the pod watch's model, and a direct list on a miss (kubeauth.PodLookup)."""
    from nodeagent.identity.ca import kubekeys
    from nodeagent.identity.ca.config import cluster_config
    from nodeagent.identity.ca.kubeauth import KubeAuthenticator, PodLookup, SyncedModelView
    from nodeagent.kube.client import KubeClient
    from nodeagent.sources.kube import KINDS, KubeSource

    cluster = cluster_config(cfg.kubeconfig)
    client = KubeClient(cluster)

    async def keys_and_root():
        material = await kubekeys.load_or_create(client, cfg.namespace, cfg.root_secret, cfg.trust_domain,
                                                 now, log)
        await kubekeys.publish_root(client, cfg.namespace, cfg.root_configmap, material, log)
        return material

    material = asyncio.run(keys_and_root())
    authenticator = KubeAuthenticator(client, cfg.token_audience, cfg.agent_service_account,
                                      log.getChild("tokens"))
    # Only Pods: the node authorization needs who runs where with which service account.
    source = KubeSource(cluster, log.getChild("source"), kinds=tuple(k for k in KINDS if k.kind == "Pod"))
    source.start()
    authorizer = NodeAuthorizer(SyncedModelView(source), PodLookup(client, log.getChild("pods")))
    return material, authenticator, source, authorizer
