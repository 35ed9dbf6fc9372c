"""The source side's HBONE pool on the native engine (setting hbone_engine; the Python one
is tunnel/hbone_client.HbonePool), kept as HbonePool keeps its own: one connection per
(source identity, destination identity, destination address) carrying up to 100 streams,
concurrent opens sharing one connection attempt, a stream the server provably never
processed (REFUSED_STREAM, GOAWAY above its id, or never sent on a closing connection)
retried once on a new connection, the same typed errors and the same metrics. Idle
connections are closed by the engine (`client_idle`), as are dead ones (keepalive PINGs).
A stream is opened before its client socket is handed over: the answer (200, or the
refusal the relay reports) comes first, then the relay's splice gives the socket to it
(`NativeStream.carry`), so the outbound relay's accounting does not change.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from typing import Awaitable, Callable, Sequence, Union

from nodeagent.agent.proxy.hbone_native import ERROR_ENDS, HboneEngines, error_label, tls_reason
from nodeagent.native import hbone
from nodeagent.resets import linger_default
from nodeagent.tunnel import ConnectFailed, ConnectionLost, ConnectRefused, HandshakeFailed, PoolClosed, \
    ResponseTimeout, StreamReset, TunnelError, TunnelMetrics, TunnelSettings
from nodeagent.tunnel.authority import Address, format_authority
from nodeagent.tunnel.errors import connect_failure_reason

OUTBOUND = "outbound"
CLOSE_GRACE = 1.0  # seconds close() lets GOAWAYs flush before resetting
Key = tuple[str, str, Address]
Connect = Callable[[str, int], Union[socket.socket, Awaitable[socket.socket]]]


class _Conn:
    """One pooled native client connection and what the pool knows of it."""

    def __init__(self, key: Key):
        self.key = key
        self.conn: hbone.ClientConnection | None = None
        self.usable = True  # False once a stream on it was refused unprocessed (GOAWAY, REFUSED_STREAM)


class NativePool:
    def __init__(self, engines: HboneEngines, connect: Connect, tls_for: Callable[[str], hbone.Tls], *,
                 metrics: TunnelMetrics, log: logging.Logger, settings: TunnelSettings = TunnelSettings(),
                 max_streams_per_connection: int = 100, elsewhere: Callable[[int], int] = lambda _conn: 0):
        """`connect(ip, port)` returns a socket (or an awaitable of one), connected or not;
        `tls_for(source_identity)` the engine's credentials of that workload; `elsewhere(conn
        id)` the streams open on a connection that the pool did not open (the engine's, on
        its out-routes: source_routes.py)."""
        self.elsewhere = elsewhere
        self.engines, self.connect, self.tls_for = engines, connect, tls_for
        self.metrics, self.log, self.settings = metrics, log, settings
        # every stream's: the children looked up once (labels() costs a few µs a call)
        self._streams = metrics.streams.labels(direction=OUTBOUND)
        self._opened = metrics.streams_opened.labels(direction=OUTBOUND)
        self.max_streams = max_streams_per_connection
        self._conns: dict[Key, list[_Conn]] = {}
        self._connecting: dict[Key, asyncio.Task] = {}
        self._closed = False

    async def open_stream(self, source_identity: str, dest_identity: str, dest_addr: Address,
                          authority: Address, headers: Sequence[tuple[str, str]] = (),
                          sock: socket.socket | None = None) -> hbone.NativeStream:
        """A CONNECT to `authority` through the destination pod at `dest_addr`, answered 200;
        its socket comes with `carry`. Given `sock` (the client's), the engine gets a copy
        with the CONNECT and relays it the moment the 200 arrives (open_with_copy), and
        `carry` only closes the caller's copy: the client's first bytes do not wait for the
        answer to go through this loop first. Raises the tunnel's typed errors."""
        key = (source_identity, dest_identity, (dest_addr[0], int(dest_addr[1])))
        error = None
        for _ in range(2):
            entry = await self._checkout(key)
            if sock is None:
                stream = entry.conn.open(None, format_authority(authority), headers)
            else:
                stream = entry.conn.open_with_copy(sock, format_authority(authority), headers)
            self._streams.inc()
            stream.ended.add_done_callback(lambda _: self._streams.dec())
            try:
                status = await answer(stream.response, self.settings.open_timeout)
            except asyncio.TimeoutError:
                stream.reset()
                self.metrics.refused(OUTBOUND, "timeout")
                raise ResponseTimeout(key[2], authority, self.settings.open_timeout) from None
            except asyncio.CancelledError:
                stream.reset()
                raise
            except hbone.HboneFailed as failed:
                end = failed.end
                if unprocessed(end):
                    entry.usable = False  # GOAWAY or REFUSED_STREAM: no new streams on it
                    error = ConnectionLost(f"{end.how}: {end.reason}", retryable=True)
                    if sock is not None:
                        linger_default(sock)  # the engine reset its copy, which it never read
                    self.log.debug("HBONE to %s:%d: stream not processed (%s), retrying on a new connection",
                                   *key[2], end.reason)
                    continue
                error = failure(end, key[2], authority, self.settings.open_timeout)
                self.metrics.refused(OUTBOUND, error.reason)
                raise error from None
            if status != 200:
                self.metrics.refused(OUTBOUND, f"status_{status}")
                raise ConnectRefused(key[2], authority, status)
            self._opened.inc()
            return stream
        self.metrics.refused(OUTBOUND, error.reason)
        raise error

    def conn_id(self, key: Key) -> int:
        """The engine's id of an up connection of `key` with room for a new stream, or 0."""
        entry = next((e for e in self._conns.get(key, ()) if self._room(e)), None)
        return entry.conn.id if entry is not None else 0

    def _room(self, entry: _Conn) -> bool:
        """Whether `entry` is up, takes new streams and has room for one more."""
        conn = entry.conn
        return conn is not None and entry.usable and not conn.closed.done() \
            and len(conn.streams) + self.elsewhere(conn.id) < self.max_streams

    def unusable(self, conn_id: int) -> None:
        """A stream on connection `conn_id` was refused unprocessed (GOAWAY, REFUSED_STREAM):
        no new streams on it (the engine's out-routes found that out)."""
        for entries in self._conns.values():
            for entry in entries:
                if entry.conn is not None and entry.conn.id == conn_id:
                    entry.usable = False

    def connections(self, key: Key | None = None) -> int:
        """Pooled connections (connecting or open), for one key or all."""
        if key is not None:
            return len(self._conns.get(key, ()))
        return sum(len(v) for v in self._conns.values())

    async def close(self) -> None:
        """GOAWAY every connection; reset what is left after CLOSE_GRACE."""
        self._closed = True
        for task in list(self._connecting.values()):
            task.cancel()
        conns = [e.conn for v in self._conns.values() for e in v if e.conn is not None]
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=CLOSE_GRACE)
        for conn in conns:
            if not conn.closed.done():
                conn.close(abort=True)

    # --- connections ----------------------------------------------------------------

    async def _checkout(self, key: Key) -> _Conn:
        """An up connection of `key` with room for one more stream."""
        while True:
            if self._closed or not self.engines.native:
                raise PoolClosed()
            entry = next((e for e in self._conns.get(key, ()) if self._room(e)), None)
            if entry is not None:
                return entry
            task = self._connecting.get(key)
            if task is None:
                task = self._connecting[key] = asyncio.get_running_loop().create_task(self._connect(key))
                task.add_done_callback(lambda t: (self._connecting.pop(key, None), t.cancelled() or t.exception()))
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise  # our caller gave up
                raise PoolClosed() from None  # close() stopped the attempt

    async def _connect(self, key: Key) -> None:
        entry = _Conn(key)
        self._conns.setdefault(key, []).append(entry)
        self.metrics.pool_connections.inc()
        try:
            entry.conn = await self._handshake(key)
        except BaseException:
            self._forget(entry)
            raise
        self.metrics.connections.labels(direction=OUTBOUND).inc()
        entry.conn.closed.add_done_callback(lambda f: self._ended(entry, f.result()))

    async def _handshake(self, key: Key) -> hbone.ClientConnection:
        source, dest, addr = key
        sock = await self._tcp_connect(addr)
        try:
            creds = self.tls_for(source)
        except Exception as exc:
            sock.close()
            raise self._failed(HandshakeFailed(addr, "no_local_identity", f"no certificate for {source}: {exc}"))
        try:
            return await self.engines.engine.connect(sock, creds, dest)
        except hbone.HboneFailed as failed:
            end = failed.end
            raise self._failed(HandshakeFailed(addr, tls_reason(end), end.reason)) from None
        except OSError as exc:  # the engine stopped or is full
            raise self._failed(HandshakeFailed(addr, "engine", str(exc))) from None

    def _failed(self, err: HandshakeFailed) -> HandshakeFailed:
        self.metrics.handshake_failure(OUTBOUND, err.reason)
        self.log.info("HBONE to %s:%d failed: %s", err.addr[0], err.addr[1], err)
        return err

    async def _tcp_connect(self, addr: Address) -> socket.socket:
        loop, sock = asyncio.get_running_loop(), None
        try:
            made = self.connect(addr[0], addr[1])
            sock = await asyncio.wait_for(made, self.settings.handshake_timeout) if inspect.isawaitable(made) else made
            sock.setblocking(False)
            try:
                sock.getpeername()
            except OSError:  # not connected yet: our job
                await asyncio.wait_for(loop.sock_connect(sock, addr), self.settings.handshake_timeout)
            return sock
        except (OSError, asyncio.TimeoutError) as exc:
            if sock is not None:
                sock.close()
            err = ConnectFailed(addr, connect_failure_reason(exc), str(exc) or type(exc).__name__)
            self.metrics.handshake_failure(OUTBOUND, err.reason)
            raise err from None
        except BaseException:
            if sock is not None:
                sock.close()
            raise

    def _ended(self, entry: _Conn, end: hbone.End) -> None:
        self.metrics.connections.labels(direction=OUTBOUND).dec()
        if end.how in ERROR_ENDS:
            self.metrics.connection_error(OUTBOUND, error_label(end))
            self.log.info("HBONE to %s:%d ended: %s (%s)", *entry.key[2], end.how, end.reason)
        self._forget(entry)

    def _forget(self, entry: _Conn) -> None:
        entries = self._conns.get(entry.key)
        if entries and entry in entries:
            entries.remove(entry)
            self.metrics.pool_connections.dec()
            if not entries:
                del self._conns[entry.key]


async def answer(response: asyncio.Future, timeout: float):
    """`response`'s result once it has one (its exception raised), or TimeoutError after
    `timeout` s. Cancelling the wait leaves `response` as it is. As
    `wait_for(shield(response), timeout)`, with one future and one timer where those made
    three futures, their callbacks and a coroutine (a new connection's CPU, issue 11)."""
    if not response.done():
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def wake(_=None) -> None:
            if not waiter.done():
                waiter.set_result(None)
        response.add_done_callback(wake)
        timer = loop.call_later(timeout, wake)
        try:
            await waiter
        finally:
            timer.cancel()
            response.remove_done_callback(wake)
        if not response.done():
            raise asyncio.TimeoutError()
    return response.result()


def failure(end: hbone.End, addr: Address, authority: Address, open_timeout: float) -> TunnelError:
    """The pool's error for a stream that ended before its answer, processed by the server
    (`unprocessed` ones are retried instead); its `reason` is the refusal metric's label."""
    if end.how == "refused" and end.status:
        return ConnectRefused(addr, authority, end.status)
    if end.how == "timeout":
        return ResponseTimeout(addr, authority, open_timeout)
    if end.how == "reset":
        return StreamReset(0, end.code, end.reason)
    return ConnectionLost(f"{end.how}: {end.reason}")


def unprocessed(end: hbone.End) -> bool:
    """The server provably never processed the stream: REFUSED_STREAM (also nghttp2's for
    streams above a GOAWAY's last id), or it was never sent (its connection was closing)."""
    return (end.how == "reset" and end.code == 7) or (end.how == "connection_lost" and end.h2_stream == 0)
