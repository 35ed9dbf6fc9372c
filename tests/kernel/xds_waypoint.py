"""Helpers of the real-Envoy waypoint test: the Istio configuration with every feature
the translation has, a fake agent on the sockets Envoy connects to (it answers with what
the PROXY v2 header told it), PROXY v2 clients for Envoy's listeners, and RS256 JWTs."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from nodeagent.kube.objects import parse_documents
from nodeagent.model import Model
from nodeagent.xds import dataplane

ISSUER = "https://issuer.test"
PRODUCTPAGE = "spiffe://cluster.local/ns/shop/sa/productpage"
OTHER = "spiffe://cluster.local/ns/shop/sa/stranger"

WORLD = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: istio-system}
""" + "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: shop, labels: {labels}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}}}
status: {{phase: Running, podIP: {ip}}}
""" for name, labels, node, ip, sa in [
    ("productpage", "{app: productpage, version: v1}", "node1", "10.244.1.5", "productpage"),
    ("reviews-v1", "{app: reviews, version: v1}", "node1", "10.244.1.6", "reviews"),
    ("reviews-v2", "{app: reviews, version: v2}", "node2", "10.244.2.6", "reviews"),
    ("ratings", "{app: ratings}", "node1", "10.244.1.8", "ratings"),
    ("details", "{app: details}", "node1", "10.244.1.9", "details"),
    ("db", "{app: db}", "node2", "10.244.2.9", "db"),
]) + "".join(f"""---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: {pname}, port: {port}, targetPort: {port}}}]}}
""" for name, vip, pname, port in [("reviews", "10.96.1.10", "http", 9080), ("ratings", "10.96.1.11", "http", 8080),
                                   ("details", "10.96.1.12", "http", 9000), ("db", "10.96.1.13", "tcp", 5432)])

ISTIO = """
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}, sourceLabels: {app: productpage}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{headers: {x-fault: {exact: abort}}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{headers: {x-fault: {exact: delay}}}]
    fault: {delay: {fixedDelay: 0.3s, percent: 100}}
    route: [{destination: {host: reviews, subset: v1}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 100}
    - {destination: {host: reviews, subset: v2}, weight: 0}
    timeout: 5s
    retries: {attempts: 2, perTryTimeout: 2s, retryOn: "gateway-error,503"}
    mirror: {host: ratings}
    mirrorPercentage: {value: 50}
    headers: {request: {set: {x-routed-by: waypoint}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 2s}
      http: {http1MaxPendingRequests: 50, http2MaxRequests: 500, maxRequestsPerConnection: 20, maxRetries: 3}
    outlierDetection: {consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, interval: 10s, baseEjectionTime: 30s,
                       maxEjectionPercent: 50}
  subsets:
  - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec:
  host: db
  subsets: [{name: primary, labels: {app: db}}, {name: replica, labels: {app: db}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db]
  tcp:
  - match: [{port: 5432}]
    route:
    - {destination: {host: db, subset: primary}, weight: 80}
    - {destination: {host: db, subset: replica}, weight: 20}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings, namespace: shop}
spec:
  selector: {matchLabels: {app: ratings}}
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/productpage]}}]
    to: [{operation: {methods: [GET], paths: ["/ratings/*"]}}]
  - from: [{source: {requestPrincipals: ["https://issuer.test/*"]}}]
    to: [{operation: {paths: ["/secure/*"]}}]
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: ratings, namespace: shop}
spec:
  selector: {matchLabels: {app: ratings}}
  jwtRules:
  - issuer: https://issuer.test
    audiences: [ratings]
    jwks: '%(jwks)s'
---
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: details-limit, namespace: shop}
spec:
  workloadSelector: {labels: {app: details}}
  configPatches:
  - applyTo: HTTP_FILTER
    match:
      context: SIDECAR_INBOUND
      listener: {filterChain: {filter: {name: envoy.filters.network.http_connection_manager,
                                        subFilter: {name: envoy.filters.http.router}}}}
    patch:
      operation: INSERT_BEFORE
      value:
        name: envoy.filters.http.local_ratelimit
        typed_config:
          "@type": type.googleapis.com/udpa.type.v1.TypedStruct
          type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
          value:
            stat_prefix: details_rate_limit
            token_bucket: {max_tokens: 3, tokens_per_fill: 3, fill_interval: 60s}
            filter_enabled: {runtime_key: rl_enabled, default_value: {numerator: 100, denominator: HUNDRED}}
            filter_enforced: {runtime_key: rl_enforced, default_value: {numerator: 100, denominator: HUNDRED}}
"""


class Signer:
    """An RS256 key, its JWKS, and tokens signed with it."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = self.key.public_key().public_numbers()
        self.jwks = json.dumps({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "test",
                                          "n": _b64(numbers.n.to_bytes(256, "big")), "e": _b64(b"\x01\x00\x01")}]})

    def token(self, subject: str | None, audience: str = "ratings", **more) -> str:
        """A token of ISSUER for `subject` (None: no `sub` claim), with `more` claims."""
        header = _b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "test"}).encode())
        claims = {"iss": ISSUER, "sub": subject, "aud": audience, "exp": int(time.time()) + 3600, **more}
        claims = _b64(json.dumps({k: v for k, v in claims.items() if v is not None}).encode())
        signature = self.key.sign(f"{header}.{claims}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{claims}.{_b64(signature)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def model(signer: Signer, extra: str = "") -> Model:
    return Model.build(parse_documents(WORLD + "---\n" + ISTIO % {"jwks": signer.jwks} + extra, "waypoint.yaml"))


@dataclass
class Seen:
    socket: str
    header: dataplane.ProxyHeader
    first_bytes: bytes


class FakeAgent:
    """Listens where Envoy hands connections back to the agent; answers every request
    with a JSON description of the PROXY header it came with."""

    def __init__(self, paths: dict[str, str]):
        self.seen: list[Seen] = []
        self._listeners = []
        for name, path in paths.items():
            if os.path.exists(path):
                os.unlink(path)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(path)
            listener.listen(64)
            self._listeners.append(listener)
            threading.Thread(target=self._accept, args=(name, listener), daemon=True).start()

    def close(self) -> None:
        for listener in self._listeners:
            listener.close()

    def _accept(self, name: str, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(name, conn), daemon=True).start()

    def _serve(self, name: str, conn: socket.socket) -> None:
        with conn:
            try:
                header = dataplane.read_header(conn)
                if header is None:
                    return  # a LOCAL command carries no connection: closed, as the agent does
                conn.settimeout(5)
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    self.seen.append(Seen(name, header, data))
                    body = json.dumps({"socket": name, "source": list(header.source),
                                       "destination": list(header.destination),
                                       "tlvs": {f"0x{t:02x}": v.decode() for t, v in header.tlvs},
                                       "request": data.split(b"\r\n", 1)[0].decode(errors="replace")}).encode()
                    if data[:4] in (b"GET ", b"POST", b"HEAD"):
                        # x-grpc-status: N asks for a grpc-status header (a trailers-only gRPC answer)
                        status = re.search(rb"\r\nx-grpc-status: *([0-9]+)\r\n", data, re.IGNORECASE)
                        grpc = b"grpc-status: %s\r\n" % status.group(1) if status else b""
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + grpc +
                                     b"content-length: %d\r\n\r\n" % len(body) + body)
                    else:
                        conn.sendall(body)
            except (OSError, ValueError):
                return


def proxied(path: str, destination: tuple[str, int], tlvs: dict[int, bytes], payload: bytes,
            http: bool = True) -> tuple[int, bytes, float]:
    """Send `payload` to an Envoy listener as the agent would; (status, body, seconds)."""
    start = time.monotonic()
    header = dataplane.ProxyHeader(("10.244.1.5", 40000), destination, tuple(tlvs.items()))
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(path)
        conn.sendall(header.encode() + payload)
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            if not http or _complete(data):
                break
    elapsed = time.monotonic() - start
    if not http:
        return 0, data, elapsed
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body, elapsed


def _complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


def get(url: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {url} HTTP/1.1", "host: test", "connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
