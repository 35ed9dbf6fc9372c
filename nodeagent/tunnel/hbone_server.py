"""HBONE server: the destination side of the tunnel (ztunnel's inbound.rs).

Serves TCP sockets the agent accepted on port 15008 inside a pod's netns: a TLS 1.3
handshake with the context `ssl_context_for(local_ip)` (the pod's certificate, client
certificates required), the peer's identity from `verify_peer(cert_der)`, then HTTP/2.
Each CONNECT stream whose `:authority` is an `ip:port` goes to `on_stream(info, reader,
writer)` (reader and writer are the same HboneStream), which answers with
`writer.respond(200)` and relays, or refuses with `respond(401|403|503)`. Other
methods get 405, a malformed authority 400; a handler that fails or returns without
answering gets 503. Every refusal and failure is counted; one bad peer never touches
another connection. A stream counts against `settings.max_concurrent_streams` until its
handler returns, also once the client has reset it; more are refused (limits.py).

Before any of that, an accepted connection must fit the accept budget (limits.py
`HandshakeBudget`: pending handshakes of the whole server and of its client IP), else it
is reset at once; then it has `server_handshake_timeout` seconds to send its first bytes
and finish TLS. Until it speaks it holds only a reader on its socket (tls.client_speaks).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import h2.events

from nodeagent.nodelay import set_nodelay
from nodeagent.resets import reset
from nodeagent.tunnel import tls
from nodeagent.tunnel.authority import Address, parse_authority
from nodeagent.tunnel.budget import StreamBudget
from nodeagent.tunnel.errors import TunnelError
from nodeagent.tunnel.h2conn import latin1_headers
from nodeagent.memory import MemoryGuard
from nodeagent.tunnel.limits import HandshakeBudget
from nodeagent.tunnel.metrics import TunnelMetrics
from nodeagent.tunnel.session import Session
from nodeagent.tunnel.settings import TunnelSettings, check_positive
from nodeagent.tunnel.stream import HboneStream

DIRECTION = "inbound"
ACCEPT_ERROR_PAUSE = 0.1  # seconds to wait after accept() fails (EMFILE...) before retrying


@dataclass(frozen=True)
class StreamInfo:
    peer_identity: str  # the client's SPIFFE URI (the source workload)
    peer_address: Address  # the client's address as this socket sees it
    local_address: Address  # our end: the pod IP and 15008
    authority: Address  # the original destination (ip, port) from :authority
    headers: tuple[tuple[str, str], ...]  # request headers, pseudo-headers removed, names lower-case

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


OnStream = Callable[[StreamInfo, HboneStream, HboneStream], Awaitable[None]]


class HboneServer:
    def __init__(self, ssl_context_for: Callable[[str], ssl.SSLContext], verify_peer: Callable[[bytes], str],
                 on_stream: OnStream, *, metrics: TunnelMetrics, log: logging.Logger,
                 settings: TunnelSettings = TunnelSettings(), idle_timeout: float = 600.0,
                 clock: Callable[[], float] | None = None, budget: StreamBudget | None = None,
                 memory: MemoryGuard | None = None):
        self.ssl_context_for = ssl_context_for
        self.verify_peer = verify_peer
        self.on_stream = on_stream
        self.metrics = metrics
        self.log = log
        self.settings = settings
        self.budget = budget or StreamBudget(settings)  # the agent shares one with its pools
        self.idle_timeout = check_positive("tunnel.server_idle_timeout", idle_timeout)
        self.clock = clock  # for the reset window (the loop's clock when None) and refusal logs
        self.handshakes = HandshakeBudget(settings, metrics, log, DIRECTION, clock or time.monotonic, memory)
        self.sessions: set[Session] = set()
        self._tasks: set[asyncio.Task] = set()  # connections and stream handlers
        self._acceptors: set[asyncio.Task] = set()  # serve_socket loops
        self._closing = False

    async def serve_socket(self, listener: socket.socket) -> None:
        """Accept on a listening socket (the caller keeps owning it) until cancelled or close()."""
        loop = asyncio.get_running_loop()
        listener.setblocking(False)
        self._acceptors.add(asyncio.current_task())
        try:
            while not self._closing:
                try:
                    sock, _ = await loop.sock_accept(listener)
                except OSError as exc:
                    if listener.fileno() < 0:
                        return  # the caller closed the listener
                    self.log.warning("HBONE accept on %s failed: %s", listener.getsockname(), exc)
                    await asyncio.sleep(ACCEPT_ERROR_PAUSE)
                    continue
                self._spawn(self.handle_connection(sock))
        finally:
            self._acceptors.discard(asyncio.current_task())

    async def handle_connection(self, sock: socket.socket) -> None:
        """Serve one accepted socket until it closes; never raises (but CancelledError)."""
        try:
            peer, local = sock.getpeername()[:2], sock.getsockname()[0]
        except OSError:
            return self._refuse_connection(sock, "closed", "?", "the client left before the handshake")
        if not self.handshakes.admit(peer[0], local):
            return reset(sock)  # counted and logged by the budget
        try:
            set_nodelay(sock)  # HTTP/2 frames are small writes: none may wait for a delayed ACK
            try:
                session = await self._handshake(sock, peer)
            finally:
                self.handshakes.release(peer[0])
            if session is None:
                return
            self.sessions.add(session)
            try:
                await asyncio.shield(session.closed)
            except asyncio.CancelledError:
                session.abort()
                raise
            finally:
                self.sessions.discard(session)
        finally:
            self.handshakes.closed(peer[0])

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting, drain every connection (GOAWAY once its streams end), and
        abort what is left after `grace` seconds."""
        self._closing = True
        for task in list(self._acceptors):
            task.cancel()
        for session in list(self.sessions):
            session.drain()
        if self.sessions:
            await asyncio.wait([s.closed for s in self.sessions], timeout=grace)
        for session in list(self.sessions):
            session.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)

    # --- one connection -------------------------------------------------------------

    async def _handshake(self, sock: socket.socket, peer: tuple[str, int]) -> Session | None:
        loop = asyncio.get_running_loop()
        client = f"{peer[0]}:{peer[1]}"
        deadline = loop.time() + self.settings.server_handshake_timeout
        local = "?"
        try:
            sock.setblocking(False)
            if not await asyncio.wait_for(tls.client_speaks(sock), self.settings.server_handshake_timeout):
                return self._refuse_connection(sock, "closed", client, "the client left before the handshake")
            local = sock.getsockname()[0]
            context = tls.with_alpn(self.ssl_context_for(local))
        except asyncio.TimeoutError:
            return self._refuse_connection(sock, "timeout", client, "nothing received within "
                                           f"{self.settings.server_handshake_timeout:g} s of accept")
        except asyncio.CancelledError:
            sock.close()  # the server is closing
            raise
        except OSError as exc:
            return self._refuse_connection(sock, "closed", client, f"the client left before the handshake: {exc}")
        except Exception as exc:  # the caller's lookup: no certificate for this pod IP
            return self._refuse_connection(sock, "no_local_identity", client,
                                           f"no certificate for local address {local}: {exc}")
        try:
            # What is left of the deadline; asyncio wants a positive timeout, and aborts at it.
            session = await tls.serve_tls(sock, self._new_session, context, max(deadline - loop.time(), 0.001))
        except (OSError, EOFError, asyncio.TimeoutError) as exc:  # ssl.SSLError is an OSError
            return self._refuse_connection(sock, tls.failure_reason(exc), client, str(exc))
        except Exception as exc:  # never let one connection's surprise reach the accept loop
            self.log.exception("HBONE handshake with %s:%d: unexpected failure", *peer)
            return self._refuse_connection(sock, "internal_error", client, repr(exc))
        if session.refused is not None:
            return self._refuse_connection(sock, session.refused.reason, client, str(session.refused))
        self.log.debug("%r: connected", session)
        return session

    def _new_session(self) -> Session:
        return Session(direction=DIRECTION, settings=self.settings, metrics=self.metrics, log=self.log,
                       check_peer=lambda t: self.verify_peer(tls.peer_certificate(t)),
                       max_streams=self.settings.max_concurrent_streams, idle_timeout=self.idle_timeout,
                       budget=self.budget, on_request=self._on_request, clock=self.clock)

    def _refuse_connection(self, sock: socket.socket, reason: str, peer: str, detail: str) -> None:
        self.metrics.handshake_failure(DIRECTION, reason)
        self.log.info("HBONE connection from %s refused (%s): %s", peer, reason, detail)
        sock.close()
        return None

    # --- one stream -----------------------------------------------------------------

    def _on_request(self, session: Session, event: h2.events.RequestReceived) -> None:
        headers = latin1_headers(event.headers)
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        ended = event.stream_ended is not None
        if session.draining:
            return self._refuse_stream(session, event.stream_id, None, ended, "draining")
        if not session.guard.stream_allowed(session.serving):
            return self._refuse_stream(session, event.stream_id, None, ended, "too_many_streams", quiet=True)
        if pseudo.get(":method") != "CONNECT":
            return self._refuse_stream(session, event.stream_id, 405, ended, "bad_method")
        authority = parse_authority(pseudo.get(":authority"))
        if authority is None:
            return self._refuse_stream(session, event.stream_id, 400, ended, "bad_authority")
        info = StreamInfo(session.peer_identity, session.peer_address, session.local_address, authority,
                          tuple((k, v) for k, v in headers if not k.startswith(":")))
        stream = session.accept_stream(event, info)
        session.serving += 1
        self._spawn(self._serve_stream(session, info, stream))

    def _refuse_stream(self, session: Session, stream_id: int, status: int | None, ended: bool, reason: str,
                       quiet: bool = False) -> None:
        self.metrics.refused(DIRECTION, reason)
        if not quiet:  # a flood's refusals are logged once, by the limit
            self.log.info("%r: stream %d refused (%s)", session, stream_id, reason)
        session.refuse(stream_id, status, ended)

    async def _serve_stream(self, session: Session, info: StreamInfo, stream: HboneStream) -> None:
        try:
            await self._handle(info, stream)
        finally:
            session.serving -= 1

    async def _handle(self, info: StreamInfo, stream: HboneStream) -> None:
        try:
            await self.on_stream(info, stream, stream)
        except asyncio.CancelledError:
            stream.abort()
            raise
        except Exception as exc:
            # A TunnelError is the stream or its connection ending under the handler: routine.
            level = logging.INFO if isinstance(exc, TunnelError) else logging.WARNING
            self.log.log(level, "HBONE stream to %s:%d from %s: handler failed: %r",
                         *info.authority, info.peer_identity, exc)
            if stream.status is None:
                stream.respond(503, reason="handler_error")
            else:
                stream.abort()
            return
        if stream.ended:
            return  # the client reset it, or its connection ended: nobody to answer
        if stream.status is None:
            self.log.warning("HBONE stream to %s:%d: on_stream returned without respond(); answering 503",
                             *info.authority)
            stream.respond(503, reason="unanswered")
        else:
            stream.close()

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
