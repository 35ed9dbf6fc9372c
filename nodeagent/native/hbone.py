"""The native HBONE engine (native/hbone.c: TLS 1.3 with libssl, HTTP/2 CONNECT with
libnghttp2, its own thread) as asyncio sees it. The agent takes it with the setting
`hbone_engine` (agent/proxy/hbone_native.py; the default, auto, takes it when built,
else the Python tunnel/ path).

Python keeps the decisions: it hands the engine connected sockets (detached: the
engine closes them) and answers what the engine asks. Client side: `await
engine.connect(sock, tls, expected_identity)` is a `ClientConnection` once TLS is up and
the server's single URI SAN equals `expected_identity`; `conn.open(sock, authority,
headers)` sends a CONNECT and relays `sock` once the answer is 200 (`stream.response`,
then `stream.ended`); `conn.open(None, ...)` waits for the socket, given by
`stream.carry(sock)` once the answer is known (the agent's outbound relay). A pod's
outbound listener may be the engine's too (`engine.listen`): it accepts, reads the original
destination from the capture map and opens the stream itself on an out-route
(`Listener.route`), telling the engine's `listener_owner` afterwards (ListenerOwner). Server side: `engine.serve(sock, tls, admit, on_request)` runs the
handshake; `admit(chain_pem)` says whether the peer's identity may connect (its return is
the verdict); `on_request(request)` gets each CONNECT and must `request.accept(sock)` or
`request.refuse(status)` (at once or later); `request.cancelled` is set when the client
reset it before the answer. `carry(sock, abort)` on either kind of stream gives it its
socket and waits for the end: a SpliceResult as the relays' splice returns (a_to_b = bytes
from the socket to the peer), ended early by a splice.Abort. Ends come back as `End`s (bytes each way,
how, HTTP/2 code, reason). Events arrive through the engine's notify fd, read by the
loop that started it; C never calls into Python.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from nodeagent.native import NativeUnavailable, SpliceResult
from nodeagent.resets import reset
from nodeagent.tunnel.settings import TunnelSettings

DEFAULT_MAX_CONNS = 16384
DEFAULT_LINGER = 1.0  # seconds a cleanly ended connection reads on until its peer's EOF (native/hbone.c linger_start)
DEFAULT_STREAM_BUFFER = 256 * 1024  # bytes read from a plain socket held per stream (the Python path's write_buffer)
_BATCH = 256
HOW = {1: "closed", 2: "reset", 3: "socket_error", 4: "aborted", 5: "refused", 6: "connection_lost", 7: "tls",
       8: "identity", 9: "timeout", 10: "protocol_error", 11: "flood", 12: "goaway", 13: "io_error", 14: "stopped",
       15: "keepalive", 16: "truncated", 17: "overload"}
CLEAN = ("closed", "aborted")  # ends a relay reports without an error (aborted: policy revocation, as splice.Abort)
STATS = ("conns_open", "conns_total", "handshakes_pending", "streams_open", "streams_total", "bytes_to_peer",
         "bytes_from_peer", "bytes_held", "bytes_held_peak", "stream_held_peak", "tls_failures", "refused_streams",
         "flood_goaways", "events_queued", "received_held", "received_held_peak", "streams_overloaded", "write_buffers", "send_held", "send_held_peak", "streams_send_waiting",
         "frames_direct", "frames_copied", "received_direct", "received_copied", "stream_buffers", "buffers_released", "lingering", "lingered", "h2_held", "streams_delivered", "route_failures",
         "route_sockets", "listeners", "accepted", "streams_routed", "handed_back", "tls_empty_reads", "fatal")


def load():
    """The built cffi module `_hbone`, or NativeUnavailable saying why not."""
    try:
        from nodeagent.native import _hbone
    except ImportError as exc:
        raise NativeUnavailable(f"native HBONE module not built ({exc}); run scripts/setup") from None
    built = _hbone.ffi.string(_hbone.lib.nh_build_digest()).decode()
    sources = Path(__file__).resolve().parents[2] / "native"
    if (sources / "hbone.c").exists():
        from nodeagent.native.build import hbone_digest

        if built != hbone_digest(sources):
            raise NativeUnavailable(f"native module {Path(_hbone.__file__).name} was built from other sources "
                                    f"than {sources}; rebuild it: scripts/setup")
    return _hbone


def tls_library(module) -> str:
    """The TLS library `module` (load()'s) runs, as it names itself: "OpenSSL 3.5.5 27 Jan 2026"."""
    return module.ffi.string(module.lib.nh_tls_library()).decode()


NO_ENDPOINT = 0xFFFFFFFF  # NH_NO_ENDPOINT: a listener's connection that met no current out-route
NO_LIMIT = 0xFFFFFFFF  # nh_listen_room's "no limit"


class ListenerOwner(Protocol):
    """Who hears of the engine's listeners' connections (HboneEngine.listener_owner), from
    the engine's events, in order. `dst` is (ip, port) or None (none recorded); `tag` and
    `endpoint` name the out-route and its endpoint a connection went by or missed on
    (endpoint NO_ENDPOINT: none)."""

    def accepted(self, listener: int, sock: socket.socket, dst: tuple[str, int] | None, client_port: int,
                 tag: int, endpoint: int) -> None:
        """A connection the engine did not open a stream for: the caller's to handle."""

    def opened(self, listener: int, stream: int, conn: int, dst: tuple[str, int], client_port: int, tag: int,
               endpoint: int, authority: str) -> None:
        """A stream the engine opened on an out-route was answered 200 and relays."""

    def ended(self, listener: int, stream: int, end: "End", sock: socket.socket | None, conn: int,
              dst: tuple[str, int], client_port: int, tag: int, endpoint: int) -> None:
        """A routed stream ended: after `opened` (sock None), or before its 200 with the
        client's socket handed back as the CONNECT left it (refused, reset, unprocessed,
        no answer in time)."""

    def accept_failed(self, listener: int, error: int, pause: float | None) -> None:
        """accept(2) failed: `pause` seconds the listener stops (None: it goes on)."""


class HboneFailed(Exception):
    """A connection or stream ended before it could be used; `end` says how."""

    def __init__(self, end: "End"):
        super().__init__(f"{end.how}: {end.reason}" + (f" (HTTP/2 code {end.code})" if end.code else "")
                         + (f" (status {end.status})" if end.status else ""))
        self.end = end


@dataclass(frozen=True)
class End:
    how: str  # HOW's names
    reason: str = ""
    error: int = 0  # errno
    code: int = 0  # HTTP/2 error code
    status: int = 0  # HTTP status (refusals)
    to_peer: int = 0  # stream: bytes read from its socket and sent
    from_peer: int = 0  # stream: bytes received and written to its socket
    h2_stream: int = 0  # stream: its HTTP/2 id, 0 when it was never sent


class Tls:
    """Credentials for new connections (rotation: make a new one; old connections keep theirs)."""

    def __init__(self, engine: "HboneEngine", key_chain_pem: bytes, trust_pem: bytes):
        ffi, lib = engine._ffi, engine._lib
        out, err = ffi.new("struct nh_tls **"), ffi.new("const char **")
        rc = lib.nh_tls_new(key_chain_pem, len(key_chain_pem), trust_pem, len(trust_pem), out, err)
        if rc < 0:
            why = ffi.string(err[0]).decode() if err[0] != ffi.NULL else os.strerror(-rc)
            raise ValueError(f"native HBONE credentials: {why}")
        self.handle = ffi.gc(out[0], lib.nh_tls_free)


class NativeStream:
    def __init__(self, engine: "HboneEngine", stream_id: int, conn: "_Connection | None" = None):
        self.engine, self.id, self.conn = engine, stream_id, conn
        self.response: asyncio.Future = engine._loop.create_future()  # client: the status
        self.ended: asyncio.Future = engine._loop.create_future()  # End
        self.holds_copy = False  # client: opened with a copy of its socket (ClientConnection.open_with_copy)

    def reset(self) -> None:
        self.engine._lib.nh_stream_reset(self.engine._handle, self.id)

    abort = reset  # what a splice.Abort calls (policy revocation)

    def _give(self, sock: socket.socket) -> None:
        """Client: the socket of a stream opened without one; a stream opened with a copy
        already relays it, and the caller's copy is closed."""
        if self.holds_copy:
            sock.close()
            return
        rc = self.engine._lib.nh_stream_attach(self.engine._handle, self.id, sock.detach())
        if rc < 0:
            raise OSError(-rc, f"native HBONE attach: {os.strerror(-rc)}")

    async def carry(self, sock: socket.socket, abort=None) -> SpliceResult:
        """Hand `sock` to the stream and wait until it ends; the engine moves the bytes.
        `abort` (a splice.Abort) resets both; cancelling resets both too."""
        if abort is not None:
            abort.bind(self)
        try:
            if sock is not None:  # None: a CONNECT the engine delivered on a route has its socket
                self._give(sock)
        except OSError as exc:
            self.reset()
            return SpliceResult(error=exc)
        try:
            end = await asyncio.shield(self.ended)
        except asyncio.CancelledError:  # the agent is stopping: both peers see a reset
            self.reset()
            raise
        return SpliceResult(end.to_peer, end.from_peer, None if end.how in CLEAN else reset_error(end))


class Request(NativeStream):
    """An inbound CONNECT; answer with accept(sock) or refuse(status). One the engine
    delivered on a route (`delivered`: the local port of the route's socket it connected)
    is answered and relaying already: carry(None) waits for its end, reset() takes it back."""

    def __init__(self, engine: "HboneEngine", stream_id: int, conn: "ServerConnection", headers,
                 delivered: int | None = None, generation: int = 0):
        super().__init__(engine, stream_id, conn)
        self.generation = generation  # delivered: the generation of the route it went by
        self.cancelled: asyncio.Future = engine._loop.create_future()  # the client reset it before the answer
        self.authority = headers[0][1] if headers and headers[0][0] == ":authority" else ""
        self.headers = tuple(h for h in headers if h[0] != ":authority")
        self.delivered = delivered

    def accept(self, sock: socket.socket) -> None:
        rc = self.engine._lib.nh_stream_accept(self.engine._handle, self.id, sock.detach())
        if rc < 0:
            raise OSError(-rc, f"native HBONE accept: {os.strerror(-rc)}")

    _give = accept  # carry(sock): answer 200 and relay

    def refuse(self, status: int = 0) -> None:
        self.engine._lib.nh_stream_refuse(self.engine._handle, self.id, status)


class _Connection:
    def __init__(self, engine: "HboneEngine", conn_id: int):
        self.engine, self.id = engine, conn_id
        self.up: asyncio.Future = engine._loop.create_future()  # the peer's chain, PEM
        self.closed: asyncio.Future = engine._loop.create_future()  # End
        self.streams: set[int] = set()  # ids of its streams that have not ended

    def close(self, abort: bool = False) -> None:
        """GOAWAY once the open streams end, or (abort) reset everything now."""
        self.engine._lib.nh_conn_close(self.engine._handle, self.id, int(abort))


class ClientConnection(_Connection):
    def open(self, sock: socket.socket | None, authority: str, headers=()) -> NativeStream:
        """CONNECT `authority` with `headers` ((name, value) pairs); `sock` relays once 200
        (None: the socket comes with `stream.carry`)."""
        return self._open(sock.detach() if sock is not None else -1, authority, headers)

    def open_with_copy(self, sock: socket.socket, authority: str, headers=()) -> NativeStream:
        """As open, with a copy of `sock`'s descriptor: the engine relays it as soon as the
        200 arrives, with no round through the caller. Before that it only peeks (the first
        bytes go out with the CONNECT and leave the socket with the 200), so a refused
        stream leaves `sock` as it was, but for SO_LINGER: the engine ends its copy
        with a reset, which resets.linger_default undoes before `sock` is offered again.
        The caller closes its copy (`carry` does) or resets it (refused)."""
        stream = self._open(os.dup(sock.fileno()), authority, headers)
        stream.holds_copy = True
        return stream

    def _open(self, fd: int, authority: str, headers) -> NativeStream:
        packed = b"".join(k.lower().encode("latin-1") + b"\0" + v.encode("latin-1") + b"\0" for k, v in headers)
        rc = self.engine._lib.nh_stream_open(self.engine._handle, self.id, fd, authority.encode("ascii"),
                                             packed, len(packed))
        if rc < 0:
            raise OSError(-rc, f"native HBONE open: {os.strerror(-rc)}")
        stream = NativeStream(self.engine, rc, self)
        self.engine._streams[rc] = stream
        self.streams.add(rc)
        return stream


class ServerConnection(_Connection):
    def __init__(self, engine, conn_id, admit: Callable[[bytes], bool], on_request: Callable[[Request], None],
                 on_refused: Callable[[str, int], None] | None = None):
        super().__init__(engine, conn_id)
        self.admit, self.on_request, self.on_refused = admit, on_request, on_refused
        self.refused = {"max_streams": 0, "draining": 0}  # streams the engine refused without asking

    def route(self, authority: str, address: tuple[str, int], socks: list[socket.socket], generation: int) -> None:
        """More sockets (bound, not connected) for CONNECTs to `authority` on this
        connection, connected to `address` by the engine itself while its generation is
        `generation` (hbone.h, Routes), in one command; the engine owns them from here, and
        closes those it cannot take."""
        if not socks:
            raise ValueError("a route needs a socket")
        fds = self.engine._ffi.new("int[]", [sock.detach() for sock in socks])
        rc = self.engine._lib.nh_conn_route(self.engine._handle, self.id, authority.encode("ascii"),
                                            address[0].encode("ascii"), address[1], fds, len(fds), generation)
        if rc < 0:
            raise OSError(-rc, f"native HBONE route: {os.strerror(-rc)}")


class Listener:
    """A pod's outbound listener the engine accepts on (HboneEngine.listen)."""

    def __init__(self, engine: "HboneEngine", listener_id: int):
        self.engine, self.id = engine, listener_id
        self.closed = False

    def route(self, dst: tuple[str, int], conns: list[int], authorities: list[str], tag: int,
              generation: int) -> None:
        """The out-route for original destination `dst`: endpoint i is client connection
        conns[i] (0: none) with :authority authorities[i]; [] removes it."""
        packed = b"".join(a.encode("ascii") + b"\0" for a in authorities)
        rc = self.engine._lib.nh_out_route(self.engine._handle, self.id, dst[0].encode("ascii"), dst[1],
                                           self.engine._ffi.new("uint64_t[]", conns) if conns else
                                           self.engine._ffi.NULL, packed, len(packed), len(conns), tag, generation)
        if rc < 0:
            raise OSError(-rc, f"native HBONE out-route: {os.strerror(-rc)}")

    def room(self, room: int | None, seen: int) -> None:
        """The engine may open streams for `room` more connections (None: no limit),
        counted from the `seen`-th routed open the owner heard of."""
        rc = self.engine._lib.nh_listen_room(self.engine._handle, self.id,
                                             NO_LIMIT if room is None else min(room, NO_LIMIT - 1), seen)
        if rc < 0:
            raise OSError(-rc, f"native HBONE listener room: {os.strerror(-rc)}")

    def close(self, accept_queued: bool = True) -> None:
        """Stop accepting (accept_queued: what is queued first); streams opened go on."""
        if not self.closed:
            self.closed = True
            self.engine._lib.nh_listen_close(self.engine._handle, self.id, int(accept_queued))


class HboneEngine:
    """One native HBONE engine bound to the running loop that started it."""

    def __init__(self, module, handle, loop: asyncio.AbstractEventLoop):
        self._ffi, self._lib = module.ffi, module.lib
        self._handle, self._loop = handle, loop
        self._notify_fd = self._lib.nh_engine_notify_fd(handle)
        self._events = self._ffi.new("struct nh_event[]", _BATCH)
        self._conns: dict[int, _Connection] = {}
        self._streams: dict[int, NativeStream] = {}
        self._closed = False
        self._stopping = False
        self.listener_owner: ListenerOwner | None = None  # hears of the listeners' connections
        loop.add_reader(self._notify_fd, self._take_events)

    @classmethod
    def start(cls, settings: TunnelSettings = TunnelSettings(), *, module=None, max_conns: int = DEFAULT_MAX_CONNS,
              stream_buffer: int = DEFAULT_STREAM_BUFFER, client_idle: float = 0.0,
              server_idle: float = 0.0, linger: float = DEFAULT_LINGER) -> "HboneEngine":
        """An engine with `settings`' windows, limits and keepalive (PING after
        keepalive_interval, give up after keepalive_timeout); connections without streams
        close after `client_idle` / `server_idle` seconds (0: never), as the pool's and
        the server's idle_timeout; one the engine ends cleanly reads until its peer's EOF
        for at most `linger` seconds before its socket closes (0: at once)."""
        module = module or load()
        ffi, lib = module.ffi, module.lib
        config = ffi.new("struct nh_config *", {
            "max_conns": max_conns, "max_streams": settings.max_concurrent_streams,
            "stream_window": settings.stream_window, "connection_window": settings.connection_window,
            "max_frame_size": settings.max_frame_size, "stream_buffer": stream_buffer,
            "max_resets": settings.max_stream_resets, "reset_window_ms": int(settings.stream_reset_window * 1000),
            "handshake_timeout_ms": int(settings.server_handshake_timeout * 1000),
            "client_handshake_timeout_ms": int(settings.handshake_timeout * 1000),
            "max_pending_handshakes": settings.max_pending_handshakes,
            "keepalive_interval_ms": int(settings.keepalive_interval * 1000),
            "keepalive_timeout_ms": int(settings.keepalive_timeout * 1000),
            "client_idle_ms": int(client_idle * 1000), "server_idle_ms": int(server_idle * 1000),
            "linger_ms": int(linger * 1000),
            "receive_budget": settings.receive_budget, "send_budget": settings.send_budget,
            "open_timeout_ms": int(settings.open_timeout * 1000)})
        out = ffi.new("struct nh_engine **")
        rc = lib.nh_engine_new(config, out)
        if rc < 0:
            raise OSError(-rc, f"cannot start the native HBONE engine: {os.strerror(-rc)}")
        return cls(module, ffi.gc(out[0], lib.nh_engine_free), asyncio.get_running_loop())

    def tls(self, key_chain_pem: bytes, trust_pem: bytes) -> Tls:
        return Tls(self, key_chain_pem, trust_pem)

    async def connect(self, sock: socket.socket, tls: Tls, expected_identity: str) -> ClientConnection:
        """A client connection on connected `sock`, up (TLS done, identity checked)."""
        rc = self._lib.nh_conn_client(self._handle, sock.detach(), tls.handle, expected_identity.encode())
        if rc < 0:
            raise OSError(-rc, f"native HBONE connect: {os.strerror(-rc)}")
        conn = self._conns[rc] = ClientConnection(self, rc)
        await conn.up
        return conn

    def serve(self, sock: socket.socket, tls: Tls, admit: Callable[[bytes], bool],
              on_request: Callable[[Request], None],
              on_refused: Callable[[str, int], None] | None = None) -> ServerConnection:
        """Serve accepted `sock`; OSError(EBUSY) when too many handshakes are pending (reset).
        `on_refused(why, count)` hears of the streams the engine refused without asking
        (`max_streams`, `draining`)."""
        rc = self._lib.nh_conn_server(self._handle, sock.detach(), tls.handle)
        if rc < 0:
            raise OSError(-rc, f"native HBONE serve: {os.strerror(-rc)}")
        conn = self._conns[rc] = ServerConnection(self, rc, admit, on_request, on_refused)
        return conn

    def listen(self, sock: socket.socket, map_fd: int, netns_cookie: int) -> Listener:
        """Accept on listening `sock` with original destinations from BPF map `map_fd` (the
        engine takes copies of both: the caller closes its own); `listener_owner` hears of
        its connections."""
        rc = self._lib.nh_listen(self._handle, os.dup(sock.fileno()), os.dup(map_fd), netns_cookie)
        if rc < 0:
            raise OSError(-rc, f"native HBONE listen: {os.strerror(-rc)}")
        return Listener(self, rc)

    def reset_stream(self, stream_id: int) -> None:
        """RST_STREAM CANCEL a stream of the engine's own (an out-route's), its socket reset."""
        self._lib.nh_stream_reset(self._handle, stream_id)

    def set_out_generation(self, generation: int) -> None:
        """What decides the source's routes changed: the out-routes given before are not used."""
        self._lib.nh_out_generation(self._handle, generation)

    def set_generation(self, generation: int) -> None:
        """What decides delivery changed: the routes given before are no longer used."""
        self._lib.nh_engine_generation(self._handle, generation)

    def stats(self) -> dict[str, int]:
        s = self._ffi.new("struct nh_stats *")
        if not self._closed:
            self._lib.nh_engine_stats(self._handle, s)
        return {name: int(getattr(s, name)) for name in STATS}

    def close(self) -> None:
        if self._closed:
            return
        self._loop.remove_reader(self._notify_fd)
        self._lib.nh_engine_stop(self._handle)
        self._stopping = True  # sockets handed back now are reset: nothing takes them any more
        self._take_events()
        self._closed = True
        self._ffi.release(self._handle)

    # --- events -------------------------------------------------------------------

    def _take_events(self) -> None:
        try:
            os.read(self._notify_fd, 8)
        except BlockingIOError:
            pass
        while True:
            n = self._lib.nh_engine_events(self._handle, self._events, _BATCH)
            for i in range(n):
                ev = self._events[i]
                data = self._ffi.unpack(ev.data, ev.data_len) if ev.data != self._ffi.NULL else b""
                self._lib.nh_event_release(self._events + i)
                self._dispatch(ev, data)
            if n < _BATCH:
                return

    def _dispatch(self, ev, data: bytes) -> None:
        lib = self._lib
        if ev.listener:
            self._listener_event(ev, data)
        elif ev.type == lib.NH_EV_CONN_UP:
            conn = self._conns.get(ev.conn)
            if conn is None:
                return
            _settle(conn.up, data)
            if isinstance(conn, ServerConnection):
                try:
                    verdict = bool(conn.admit(data))
                except Exception:  # the caller's check: any failure refuses
                    verdict = False
                lib.nh_conn_verdict(self._handle, conn.id, int(verdict))
        elif ev.type == lib.NH_EV_CONN_END:
            conn = self._conns.pop(ev.conn, None)
            if conn is not None:
                end = _end(ev, data)
                if not conn.up.done():
                    conn.up.set_exception(HboneFailed(end))
                    conn.up.exception()
                _settle(conn.closed, end)
        elif ev.type in (lib.NH_EV_REQUEST, lib.NH_EV_DELIVERED):
            conn = self._conns.get(ev.conn)
            parts = data.split(b"\0")[:-1]
            headers = tuple((parts[i].decode("latin-1"), parts[i + 1].decode("latin-1"))
                            for i in range(0, len(parts) - 1, 2))
            delivered = ev.code if ev.type == lib.NH_EV_DELIVERED else None
            if conn is None:  # not one of ours (stopping): no answer but a reset
                if delivered is None:
                    lib.nh_stream_refuse(self._handle, ev.stream, 0)
                else:
                    lib.nh_stream_reset(self._handle, ev.stream)
                return
            request = self._streams[ev.stream] = Request(self, ev.stream, conn, headers, delivered, ev.tag)
            conn.streams.add(ev.stream)
            try:
                conn.on_request(request)
            except Exception:
                if delivered is None:
                    request.refuse(503)
                else:
                    request.reset()
        elif ev.type == lib.NH_EV_RESPONSE:
            stream = self._streams.get(ev.stream)
            if stream is not None:
                _settle(stream.response, ev.status)
        elif ev.type == lib.NH_EV_REFUSED:
            conn = self._conns.get(ev.conn)
            if isinstance(conn, ServerConnection):
                why = "max_streams" if ev.how == lib.NH_REFUSED_CAP else "draining"
                conn.refused[why] += ev.status
                if conn.on_refused is not None:
                    conn.on_refused(why, ev.status)
        elif ev.type == lib.NH_EV_REQUEST_RESET:
            stream = self._streams.get(ev.stream)
            if isinstance(stream, Request):
                _settle(stream.cancelled, ev.code)
        elif ev.type == lib.NH_EV_STREAM_END:
            stream = self._streams.pop(ev.stream, None)
            if stream is not None:
                if stream.conn is not None:
                    stream.conn.streams.discard(ev.stream)
                end = _end(ev, data)
                if not stream.response.done():
                    stream.response.set_exception(HboneFailed(end))
                    stream.response.exception()
                _settle(stream.ended, end)


    def _listener_event(self, ev, data: bytes) -> None:
        """An event of a listener's connection, for the listener owner; a socket handed back
        that nobody takes is reset."""
        lib, owner = self._lib, self.listener_owner
        sock = None
        if ev.handed:
            sock = socket.socket(fileno=ev.fd)
            if owner is None or self._stopping:
                reset(sock)
                sock = None
                if ev.type == lib.NH_EV_ACCEPTED:
                    return
        if owner is None:
            return
        raw = self._ffi.string(ev.dst)
        dst = (raw.decode("ascii"), ev.dst_port) if raw else None
        if ev.type == lib.NH_EV_ACCEPTED:
            owner.accepted(ev.listener, sock, dst, ev.client_port, ev.tag, ev.endpoint)
        elif ev.type == lib.NH_EV_OUT_OPENED:
            owner.opened(ev.listener, ev.stream, ev.conn, dst, ev.client_port, ev.tag, ev.endpoint,
                         data.decode("ascii", "replace"))
        elif ev.type == lib.NH_EV_STREAM_END:
            owner.ended(ev.listener, ev.stream, _end(ev, data), sock, ev.conn, dst, ev.client_port, ev.tag,
                        ev.endpoint)
        elif ev.type == lib.NH_EV_ACCEPT_FAILED:
            owner.accept_failed(ev.listener, ev.error, ev.how / 1000 if ev.how else None)


def leaf_der(chain_pem: bytes) -> bytes:
    """The DER of the first (leaf) certificate of a chain in PEM, as NH_EV_CONN_UP gives it
    (what tunnel/tls.py's `verify_peer` takes)."""
    end = b"-----END CERTIFICATE-----"
    first = chain_pem[:chain_pem.index(end) + len(end)]
    return ssl.PEM_cert_to_DER_cert(first.decode("ascii"))


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _end(ev, data: bytes) -> End:
    return End(HOW.get(ev.how, str(ev.how)), data.decode("utf-8", "replace"), ev.error, ev.code, ev.status,
               ev.to_peer, ev.from_peer, ev.h2_stream)


def reset_error(end: End) -> OSError | None:
    """The OSError a relay would report for this end (None when clean)."""
    if end.how == "closed":
        return None
    return OSError(end.error or errno.ECONNRESET, end.reason or end.how)
