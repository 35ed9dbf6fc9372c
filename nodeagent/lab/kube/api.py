"""A small client of the lab's API server, for the lab's own calls (readiness, node
registration and heartbeats), over mutual TLS with one of the lab's kubeconfig users.

The API server lives in a lab netns, unreachable from the machine's own, so every
connection is made from inside a netns the caller names (a node's, as that node's
kubelet would, or the control plane's). Standard library only: a request is a fresh
HTTPS connection, a few a second at most.
"""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass

from nodeagent import netns
from nodeagent.errors import NodeagentError

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"


class ApiError(NodeagentError):
    """The API server answered with an error status, or could not be reached."""

    def __init__(self, message: str, status: int = 0, hint: str | None = None):
        super().__init__(message, hint)
        self.status = status


@dataclass(frozen=True)
class Credentials:
    """Who calls: the cluster CA to verify the server, a client certificate and key."""

    ca_cert: str
    cert: str
    key: str


class _Connection(http.client.HTTPSConnection):
    """An HTTPS connection whose socket is made inside network namespace `netns_path`."""

    def __init__(self, host: str, port: int, netns_path: str, context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, context=context, timeout=timeout)
        self._netns_path = netns_path

    def connect(self) -> None:
        sock = netns.socket_in(self._netns_path)
        try:
            sock.settimeout(self.timeout)
            sock.connect((self.host, self.port))
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise


class ApiClient:
    """JSON requests to `https://host:port` from netns `netns_path` as `credentials`."""

    def __init__(self, host: str, port: int, netns_path: str, credentials: Credentials | None,
                 timeout: float = 5.0):
        self.host, self.port, self.netns_path, self.timeout = host, port, netns_path, timeout
        context = ssl.create_default_context()
        if credentials is None:  # health endpoints of kube-controller-manager/-scheduler: self-signed
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context.load_verify_locations(credentials.ca_cert)
            context.load_cert_chain(credentials.cert, credentials.key)
        self.context = context

    def request(self, method: str, path: str, body: dict | None = None,
                content_type: str = "application/json") -> tuple[int, dict | str]:
        """(status, decoded JSON or text); ApiError only when the server cannot be reached."""
        conn = _Connection(self.host, self.port, self.netns_path, self.context, self.timeout)
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, ssl.SSLError, http.client.HTTPException, netns.NetnsError) as exc:
            raise ApiError(f"{method} https://{self.host}:{self.port}{path}: {exc}") from None
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw) if raw.startswith(b"{") else raw.decode(errors="replace")
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def call(self, method: str, path: str, body: dict | None = None, content_type: str = "application/json",
             ok: tuple[int, ...] = (200, 201)) -> dict:
        """The decoded object of a request expected to succeed; ApiError with the server's message otherwise."""
        status, answer = self.request(method, path, body, content_type)
        if status not in ok:
            message = answer.get("message") if isinstance(answer, dict) else str(answer).strip()
            raise ApiError(f"{method} {path}: {status} {message}", status)
        return answer if isinstance(answer, dict) else {}

    def healthy(self, path: str = "/readyz") -> tuple[bool, str]:
        """Whether `path` answers 200, and what it said (or why it could not be reached)."""
        try:
            status, answer = self.request("GET", path)
        except ApiError as exc:
            return False, str(exc)
        return status == 200, str(answer).strip()[-400:]

