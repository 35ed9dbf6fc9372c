"""Typed errors of the HBONE tunnel.

Each carries `reason`, the short label used in metrics and logs, and says what to do
about it. The pool raises them from `open_stream`; a stream's reads and writes raise
`StreamReset` (or `ConnectionLost`) when the peer or the connection ends it abruptly.
"""

from __future__ import annotations

import asyncio
import errno

from nodeagent.errors import NodeagentError

PORT_HINT = "maybe a NetworkPolicy is blocking HBONE port 15008, or the destination node's agent is down"


class TunnelError(NodeagentError):
    """Base of the tunnel's errors; `reason` is the metrics label."""

    reason = "tunnel_error"


class ConnectFailed(TunnelError):
    """The TCP connection to the destination's HBONE port could not be made."""

    def __init__(self, addr: tuple[str, int], reason: str, detail: str):
        self.addr = addr
        self.reason = reason
        super().__init__(f"HBONE connect to {addr[0]}:{addr[1]} failed: {detail}", PORT_HINT)


class HandshakeFailed(TunnelError):
    """The TLS handshake (or the peer's certificate) was refused, by us or by the peer."""

    def __init__(self, addr: tuple[str, int], reason: str, detail: str, hint: str | None = None):
        self.addr = addr
        self.reason = reason
        super().__init__(f"HBONE TLS handshake with {addr[0]}:{addr[1]} failed ({reason}): {detail}",
                         hint or "check that both sides hold current certificates from the mesh CA")


class IdentityMismatch(TunnelError):
    """The destination presented a valid certificate, but for another workload."""

    reason = "identity_mismatch"

    def __init__(self, addr: tuple[str, int], expected: str, got: str):
        self.addr = addr
        self.expected = expected
        self.got = got
        super().__init__(f"HBONE peer {addr[0]}:{addr[1]}: expected {expected}, got {got}",
                         "the pod at that address is not the workload the model says; "
                         "is the model stale, or is an IP being reused?")


class PeerRefused(TunnelError):
    """`verify_peer` refused a certificate (no SPIFFE ID, foreign trust domain...)."""

    reason = "identity"


class ConnectRefused(TunnelError):
    """The destination answered the CONNECT with a non-200 status."""

    def __init__(self, addr: tuple[str, int], authority: tuple[str, int], status: int):
        self.addr = addr
        self.authority = authority
        self.status = status
        self.reason = f"status_{status}"
        hint = {401: "an AuthorizationPolicy at the destination denies this source",
                403: "an AuthorizationPolicy at the destination denies this source",
                503: "the destination agent could not reach the app port (is it listening?), or is over its "
                     "memory limit (its log says so)"}.get(status)
        super().__init__(f"HBONE CONNECT {authority[0]}:{authority[1]} via {addr[0]}:{addr[1]} "
                         f"refused with status {status}", hint)


class ResponseTimeout(TunnelError):
    """The destination accepted the CONNECT stream but never answered it."""

    reason = "timeout"

    def __init__(self, addr: tuple[str, int], authority: tuple[str, int], timeout: float):
        self.addr = addr
        self.authority = authority
        super().__init__(f"HBONE CONNECT {authority[0]}:{authority[1]} via {addr[0]}:{addr[1]}: no response "
                         f"within {timeout} s", "is the destination node's agent overloaded or stuck?")


class StreamReset(TunnelError):
    """The stream was reset (RST_STREAM) by the peer or by us."""

    reason = "reset"

    def __init__(self, stream_id: int, error_code: int, detail: str = ""):
        self.stream_id = stream_id
        self.error_code = error_code
        super().__init__(f"HBONE stream {stream_id} reset (HTTP/2 error code {error_code})"
                         + (f": {detail}" if detail else ""))


class Overloaded(TunnelError):
    """The stream was reset (RST_STREAM CANCEL) because its app lagged while the node's
    streams held half the receive budget (budget.py)."""

    reason = "overload"


class ConnectionLost(TunnelError):
    """The HBONE connection carrying the stream ended (closed, GOAWAY, protocol error,
    keepalive timeout) before the stream was done."""

    reason = "connection_lost"

    def __init__(self, detail: str, retryable: bool = False):
        self.retryable = retryable  # the peer never processed the stream: safe to retry
        super().__init__(f"HBONE connection lost: {detail}")


class PoolClosed(TunnelError):
    reason = "pool_closed"

    def __init__(self):
        super().__init__("the HBONE pool is closed")


def connect_failure_reason(exc: BaseException) -> str:
    """The metrics label for a failed TCP connect (the agent's passthrough uses the same)."""
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "connect_timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connect_refused"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "connect_unreachable"
    return "connect_error"
