"""HBONE client: a pool of mTLS HTTP/2 connections to destination pods' port 15008
(ztunnel's outbound.rs and pool.rs).

Connections are keyed by (source identity, destination identity, destination address)
and carry up to `max_streams_per_connection` streams each (fewer if the server says
so). Callers opening streams to the same key at the same time share one connection
attempt and all see its outcome, so a burst never opens a herd of connections. A
connection that received GOAWAY or REFUSED_STREAM takes no new streams; a stream the
server provably never processed (above GOAWAY's last stream ID, or REFUSED_STREAM) is
retried once on a new connection. Idle connections close after `idle_timeout`.
Failures are typed (ConnectFailed, HandshakeFailed, IdentityMismatch, ConnectRefused,
StreamReset, ConnectionLost) and counted.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
from typing import Awaitable, Callable, Sequence, Union

import h2.exceptions
from h2.errors import ErrorCodes

from nodeagent.nodelay import set_nodelay
from nodeagent.tunnel import tls
from nodeagent.tunnel.authority import Address, format_authority
from nodeagent.tunnel.budget import StreamBudget
from nodeagent.tunnel.errors import (ConnectFailed, ConnectionLost, ConnectRefused, HandshakeFailed,
                                     IdentityMismatch, PoolClosed, ResponseTimeout, StreamReset, TunnelError,
                                     connect_failure_reason)
from nodeagent.tunnel.metrics import TunnelMetrics
from nodeagent.tunnel.session import Session
from nodeagent.tunnel.settings import TunnelSettings, check_positive
from nodeagent.tunnel.stream import HboneStream

DIRECTION = "outbound"
CLOSE_GRACE = 1.0  # seconds close() lets GOAWAYs flush before aborting
Key = tuple[str, str, Address]  # (source identity, destination identity, destination address)
Connect = Callable[[str, int], Union[socket.socket, Awaitable[socket.socket]]]


class _Retry(Exception):
    def __init__(self, error: TunnelError):
        self.error = error


class HbonePool:
    def __init__(self, connect: Connect, ssl_context_for: Callable[[str], ssl.SSLContext],
                 verify_peer: Callable[[bytes], str], *, metrics: TunnelMetrics, log: logging.Logger,
                 settings: TunnelSettings = TunnelSettings(), max_streams_per_connection: int = 100,
                 idle_timeout: float = 300.0, budget: StreamBudget | None = None):
        """`connect(ip, port)` returns a socket (or an awaitable of one), connected or not
        (then the pool connects it); `ssl_context_for(source_identity)` a client context
        holding that workload's certificate."""
        self.connect = connect
        self.ssl_context_for = ssl_context_for
        self.verify_peer = verify_peer
        self.metrics = metrics
        self.log = log
        self.settings = settings
        self.budget = budget or StreamBudget(settings)  # the agent shares one between its pools and server
        self.max_streams = int(check_positive("tunnel.max_streams_per_connection", max_streams_per_connection))
        self.idle_timeout = check_positive("tunnel.pool_idle_timeout", idle_timeout)
        self._sessions: dict[Key, list[Session]] = {}
        self._connects: dict[Session, asyncio.Task] = {}
        self._closed = False

    async def open_stream(self, source_identity: str, dest_identity: str, dest_addr: Address,
                          authority: Address, headers: Sequence[tuple[str, str]] = ()
                          ) -> tuple[HboneStream, HboneStream]:
        """Open a CONNECT stream to `authority` through the destination pod at `dest_addr`
        (its IP, 15008), whose certificate must name `dest_identity`. Returns the stream
        twice, as (reader, writer)."""
        key = (source_identity, dest_identity, (dest_addr[0], int(dest_addr[1])))
        for _ in range(2):
            session = await self._checkout(key)
            try:
                stream = await self._open_on(session, key, authority, headers)
                return stream, stream
            except _Retry as retry:
                error = retry.error
                self.log.debug("%r: stream not processed (%s), retrying on a new connection", session, error)
        self.metrics.refused(DIRECTION, error.reason)
        raise error

    def connections(self, key: Key | None = None) -> int:
        """Pooled connections (connecting or open), for one key or all."""
        if key is not None:
            return len(self._sessions.get(key, ()))
        return sum(len(v) for v in self._sessions.values())

    async def close(self) -> None:
        """GOAWAY and close every connection; open streams end with ConnectionLost."""
        self._closed = True
        for task in list(self._connects.values()):
            task.cancel()
        sessions = [s for v in self._sessions.values() for s in v]
        for session in sessions:
            session.goaway()
        closing = [s.closed for s in sessions if s.transport is not None]
        if closing:
            await asyncio.wait(closing, timeout=CLOSE_GRACE)
        for session in sessions:
            session.abort()

    # --- connections ----------------------------------------------------------------

    async def _checkout(self, key: Key) -> Session:
        """A connection with room for one more stream, reserved for the caller."""
        while True:
            if self._closed:
                raise PoolClosed()
            session = next((s for s in self._sessions.get(key, ())
                            if s.usable and len(s.streams) + s.reserved < s.stream_limit), None)
            if session is None:
                session = self._start_connection(key)
            session.reserve()
            try:
                connecting = self._connects.get(session)
                if connecting is not None:
                    await asyncio.shield(connecting)
            except asyncio.CancelledError:
                session.unreserve()
                if asyncio.current_task().cancelling():
                    raise  # our caller gave up
                raise PoolClosed() from None  # close() stopped the attempt
            except BaseException:
                session.unreserve()
                raise
            if session.usable and len(session.streams) + session.reserved <= session.stream_limit:
                return session
            session.unreserve()  # the server allows fewer streams, or it went away meanwhile

    def _start_connection(self, key: Key) -> Session:
        session = Session(direction=DIRECTION, settings=self.settings, metrics=self.metrics, log=self.log,
                          check_peer=lambda transport: self._check_server(transport, key),
                          max_streams=self.max_streams, idle_timeout=self.idle_timeout, budget=self.budget)
        self._sessions.setdefault(key, []).append(session)
        self.metrics.pool_connections.inc()
        session.closed.add_done_callback(lambda _: self._forget(key, session))
        task = asyncio.get_running_loop().create_task(self._connect(session, key))
        self._connects[session] = task
        task.add_done_callback(lambda t: (self._connects.pop(session, None), t.cancelled() or t.exception()))
        return session

    async def _connect(self, session: Session, key: Key) -> None:
        source, _, addr = key
        try:
            sock = await self._tcp_connect(addr)
            if self._closed:  # Python 3.11's wait_for can swallow the cancel close() sent as the connect completed
                sock.close()
                raise asyncio.CancelledError()
            try:
                context = tls.with_alpn(self.ssl_context_for(source))
            except Exception as exc:
                sock.close()
                raise HandshakeFailed(addr, "no_local_identity", f"no certificate for {source}: {exc}") from None
            await self._tls(session, sock, context, addr)
            if self._closed:  # the same, as the handshake completed: waiters get PoolClosed, not a session
                raise asyncio.CancelledError()
        except TunnelError as err:
            self._connect_failed(session, key, err)
            raise
        except asyncio.CancelledError:  # the pool is closing
            self._connect_failed(session, key, None)
            raise
        except Exception as exc:  # a bug, or the caller's connect/context: still a typed error for waiters
            err = HandshakeFailed(addr, "internal_error", repr(exc))
            self.log.exception("HBONE to %s:%d: unexpected failure", addr[0], addr[1])
            self._connect_failed(session, key, err)
            raise err from exc

    def _connect_failed(self, session: Session, key: Key, err: TunnelError | None) -> None:
        if err is not None:
            self.metrics.handshake_failure(DIRECTION, err.reason)
            self.log.info("HBONE to %s:%d for %s failed: %s", key[2][0], key[2][1], key[0], err)
        session.draining = True
        session.abort()
        self._forget(key, session)

    async def _tcp_connect(self, addr: Address) -> socket.socket:
        loop = asyncio.get_running_loop()
        sock = None
        try:
            made = self.connect(addr[0], addr[1])
            sock = await asyncio.wait_for(made, self.settings.handshake_timeout) if inspect.isawaitable(made) else made
            sock.setblocking(False)
            set_nodelay(sock)  # HTTP/2 frames are small writes: none may wait for a delayed ACK
            try:
                sock.getpeername()
            except OSError:  # not connected yet: our job
                await asyncio.wait_for(loop.sock_connect(sock, addr), self.settings.handshake_timeout)
            return sock
        except (OSError, asyncio.TimeoutError) as exc:
            if sock is not None:
                sock.close()
            raise ConnectFailed(addr, connect_failure_reason(exc), str(exc) or type(exc).__name__) from None
        except BaseException:
            if sock is not None:
                sock.close()
            raise

    async def _tls(self, session: Session, sock: socket.socket, context: ssl.SSLContext, addr: Address) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: session, sock=sock, ssl=context, server_hostname=addr[0],
                                         ssl_handshake_timeout=self.settings.handshake_timeout)
            if session.refused is not None:
                raise session.refused
            # The server checks our certificate after its side of the handshake: its refusal
            # (an alert) arrives instead of its first SETTINGS.
            await asyncio.wait_for(asyncio.shield(session.ready), self.settings.handshake_timeout)
        except ConnectionLost:
            sock.close()
            raise HandshakeFailed(addr, "peer_closed", "the server closed the connection right after the TLS "
                                  "handshake", "it refused our certificate (another CA, expired, an identity it does "
                                  "not accept) or is no HBONE server; its log says which") from None
        except (OSError, EOFError, asyncio.TimeoutError) as exc:
            sock.close()
            raise HandshakeFailed(addr, tls.failure_reason(exc), str(exc) or type(exc).__name__) from None

    def _check_server(self, transport: asyncio.BaseTransport, key: Key) -> str:
        got = self.verify_peer(tls.peer_certificate(transport))
        if got != key[1]:
            raise IdentityMismatch(key[2], key[1], got)
        return got

    def _forget(self, key: Key, session: Session) -> None:
        sessions = self._sessions.get(key)
        if sessions and session in sessions:
            sessions.remove(session)
            self.metrics.pool_connections.dec()
            if not sessions:
                del self._sessions[key]

    # --- streams --------------------------------------------------------------------

    async def _open_on(self, session: Session, key: Key, authority: Address, headers) -> HboneStream:
        try:
            stream = session.open_stream(format_authority(authority), headers)
        except h2.exceptions.ProtocolError as exc:
            if session.closing:  # the connection closed under us: nothing was sent
                raise _Retry(ConnectionLost(f"{session!r}: {exc}", retryable=True)) from None
            raise TunnelError(f"cannot send CONNECT {format_authority(authority)}: {exc}",
                              "HTTP/2 forbids some request headers (connection, upgrade...); drop them") from None
        try:
            status, _ = await asyncio.wait_for(asyncio.shield(stream.response), self.settings.open_timeout)
        except asyncio.TimeoutError:
            stream.abort()
            self.metrics.refused(DIRECTION, "timeout")
            raise ResponseTimeout(key[2], authority, self.settings.open_timeout) from None
        except (StreamReset, ConnectionLost) as exc:
            if getattr(exc, "retryable", False) or getattr(exc, "error_code", None) == ErrorCodes.REFUSED_STREAM:
                raise _Retry(exc) from None
            self.metrics.refused(DIRECTION, exc.reason)
            raise
        except asyncio.CancelledError:
            stream.abort()
            raise
        if status != 200:
            stream.abort()
            self.metrics.refused(DIRECTION, f"status_{status}")
            raise ConnectRefused(key[2], authority, status)
        self.metrics.streams_opened.labels(direction=DIRECTION).inc()
        return stream
