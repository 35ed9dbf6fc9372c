"""One HBONE connection: h2's state machine driven over an asyncio TLS transport.

Shared by the server and the pool. It checks the peer's identity as soon as TLS is up
(nothing is sent to a refused peer), turns h2 events into calls on `HboneStream`s, and
sends queued stream bytes round-robin within the HTTP/2 windows, stopping whenever the
TLS transport's buffer is full (`pause_writing`), so nothing queues without bound. It
also PINGs a silent peer and closes when idle (liveness.py), and turns garbage, a protocol
error or a connection cut mid-frame into a counted, logged close — never an exception
into the event loop. h2 closes the whole connection on any GOAWAY (python-hyper/h2
#1181), so a graceful server drain refuses new streams first and sends GOAWAY last. A
server connection keeps the flood limits of limits.py: the client's stream resets are
counted here, the streams being served by the server. Received DATA counts against the
receive budget shared by the agent's connections (budget.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Callable

import h2.connection
import h2.events as ev
import h2.exceptions
from h2.errors import ErrorCodes

from nodeagent.tunnel.budget import StreamBudget
from nodeagent.tunnel.errors import ConnectionLost, PeerRefused, TunnelError
from nodeagent.tunnel.h2conn import code_name, error_reason, latin1_headers, new_connection, partial_input, start
from nodeagent.tunnel.limits import FloodGuard
from nodeagent.tunnel.liveness import Liveness
from nodeagent.tunnel.metrics import TunnelMetrics
from nodeagent.tunnel.settings import TunnelSettings
from nodeagent.tunnel.stream import HboneStream

TLS_HIGH_WATER = 1024 * 1024  # bytes the TLS transport may hold before streams stop sending
# Bytes waiting for a peer that does not read, past which its frames (PINGs, SETTINGS:
# each answered) are a flood. Above TLS_HIGH_WATER streams no longer send, so what goes on
# growing is answers to the peer's input: nghttp2 counts them (its outbound queue, 1000
# frames) and ends the connection; h2 would queue them for good.
OUTPUT_FLOOD = 4 * TLS_HIGH_WATER

class Session(asyncio.Protocol):
    def __init__(self, *, direction: str, settings: TunnelSettings, metrics: TunnelMetrics,
                 log: logging.Logger, check_peer: Callable[[asyncio.BaseTransport], str], max_streams: int,
                 idle_timeout: float, budget: StreamBudget,
                 on_request: Callable[["Session", ev.RequestReceived], None] | None = None,
                 clock: Callable[[], float] | None = None):
        self.loop = asyncio.get_running_loop()
        self.is_server = on_request is not None
        self.direction, self.settings, self.metrics, self.log = direction, settings, metrics, log
        self._check_peer, self._on_request = check_peer, on_request
        self.conn = new_connection(client_side=not self.is_server, settings=settings, max_streams=max_streams)
        self.max_streams = max_streams
        self.streams: dict[int, HboneStream] = {}
        self.reserved = 0  # pool: streams promised to callers, not yet opened
        self.serving = 0  # server: streams whose handler has not returned (reset ones too)
        self.guard = FloodGuard(settings, metrics, log, direction, clock or self.loop.time, self)
        self.transport: asyncio.Transport | None = None
        self.peer_identity: str | None = None
        self.peer_address = self.local_address = ("?", 0)
        self.refused: TunnelError | None = None  # check_peer said no
        self.lost_exc: BaseException | None = None  # what the transport ended with
        self.error_reason: str | None = None
        self.draining = False  # no new streams on this connection
        self.ready = self.loop.create_future()  # the peer's first SETTINGS arrived
        self.closed = self.loop.create_future()  # the transport is gone
        self._h2_closed = False  # GOAWAY sent or received: h2 accepts no more frames
        self._counted = False
        self._pending: dict[int, HboneStream] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._write_paused = False
        self._flushing = False  # inside _flush() or data_received(): sends are picked up there
        self.liveness = Liveness(self.loop, settings, idle_timeout, ping=self._ping, dead=self._unanswered,
                                 idle=self._idle)
        self.budget = budget  # what all connections' streams may hold of received DATA
        self._handlers = {
            ev.RequestReceived: self._request, ev.ResponseReceived: self._response, ev.DataReceived: self._data,
            ev.StreamEnded: self._ended, ev.StreamReset: self._reset, ev.RemoteSettingsChanged: self._settings,
            ev.ConnectionTerminated: self._goaway_received, ev.PingAckReceived: self._ping_ack,
            ev.WindowUpdated: lambda _: self._flush_soon()}

    def __repr__(self) -> str:
        return f"HBONE {self.direction} {self.peer_address[0]}:{self.peer_address[1]} ({self.peer_identity})"

    # --- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.peer_address = tuple(transport.get_extra_info("peername") or ("?", 0))[:2]
        self.local_address = tuple(transport.get_extra_info("sockname") or ("?", 0))[:2]
        try:
            self.peer_identity = self._check_peer(transport)
        except Exception as exc:  # verify_peer is the caller's code: any failure refuses
            self.refused = exc if isinstance(exc, TunnelError) else PeerRefused(f"{type(exc).__name__}: {exc}")
            transport.abort()
            return
        self._counted = True
        self.metrics.connections.labels(direction=self.direction).inc()
        transport.set_write_buffer_limits(high=TLS_HIGH_WATER)
        start(self.conn, self.settings)
        self._flush()
        self.liveness.start()
        self._update_idle()

    def data_received(self, data: bytes) -> None:
        if self._h2_closed:
            return  # GOAWAY sent or received: the transport is closing, h2 takes nothing more
        self.liveness.heard()
        self._flushing = True  # what the events make streams send goes out in one go below
        try:
            events = self.conn.receive_data(data)
            for event in events:
                handler = self._handlers.get(type(event))
                if handler is not None:
                    handler(event)
                if self._h2_closed:
                    break  # we ended the connection (a limit): the rest of the batch is moot
        except h2.exceptions.ProtocolError as exc:
            self._flushing = False
            if self.conn.state_machine.state != h2.connection.ConnectionState.CLOSED:
                # h2 queues GOAWAY itself, except for errors found before framing (a bad preface)
                self.conn.close_connection(getattr(exc, "error_code", ErrorCodes.PROTOCOL_ERROR))
            self._h2_closed = True
            self._fail_connection(error_reason(exc), f"HTTP/2 protocol error from the peer: {exc}")
            return
        except Exception as exc:  # a bug of ours must cost this connection only
            self._flushing = False
            self.log.exception("%r: internal error handling HTTP/2 input", self)
            self._fail_connection("internal_error", f"internal error: {exc}")
            return
        self._flushing = False
        self._flush()
        if self._write_paused and self.transport is not None \
                and self.transport.get_write_buffer_size() > OUTPUT_FLOOD:
            self._fail_connection("output_flood", f"the peer does not read what its frames make us send "
                                  f"({self.transport.get_write_buffer_size()} bytes wait): a PING or SETTINGS "
                                  "flood? GOAWAY ENHANCE_YOUR_CALM", ErrorCodes.ENHANCE_YOUR_CALM)
            self.abort()  # close() would wait for the peer to read

    def eof_received(self) -> bool:
        return False  # no half-closed HTTP/2 connections: close

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flush_soon()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost_exc = exc
        self._h2_closed = True
        self.liveness.stop()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        if self._counted:
            self.metrics.connections.labels(direction=self.direction).dec()
            self._classify_loss(exc)
        detail = f"{self!r} closed" + (f": {exc}" if exc else "") + (f" ({self.error_reason})" if self.error_reason else "")
        for stream in list(self.streams.values()):
            stream._fail(ConnectionLost(detail))
        if not self.ready.done():
            self.ready.set_exception(exc if exc is not None else ConnectionLost(detail))
            self.ready.exception()  # retrieved: the waiter may have gone
        self.closed.set_result(self.error_reason)

    # --- called by streams, the server and the pool ---------------------------------

    def open_stream(self, authority: str, headers) -> HboneStream:
        """Send a CONNECT (client side); the caller awaits `stream.response`."""
        fields = [(b":method", b"CONNECT"), (b":authority", authority.encode("ascii"))]
        fields += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        try:
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(stream_id, fields)
        finally:
            self.unreserve()  # the reservation becomes the stream, or is given back
        stream = self._add_stream(stream_id, None)
        self._flush()
        return stream

    def accept_stream(self, event: ev.RequestReceived, info) -> HboneStream:
        stream = self._add_stream(event.stream_id, info)
        return stream

    def respond(self, stream: HboneStream, status: int, headers, reason: str) -> None:
        fields = [(b":status", str(status).encode())]
        fields += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        refusal = status != 200
        try:
            self.conn.send_headers(stream.stream_id, fields, end_stream=refusal)
            if refusal and not stream._remote_ended:
                self.conn.reset_stream(stream.stream_id, ErrorCodes.NO_ERROR)  # RFC 9113 8.1: stop sending
        except h2.exceptions.ProtocolError:
            pass  # the peer reset it or the connection is closing: nothing to answer
        if refusal:
            self.metrics.refused(self.direction, reason)
        else:
            self.metrics.streams_opened.labels(direction=self.direction).inc()
        self._flush_soon()

    def refuse(self, stream_id: int, status: int | None, ended: bool) -> None:
        """Answer a request we will not turn into a stream: `status`, or REFUSED_STREAM."""
        try:
            if status is None:
                self.conn.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            else:
                self.conn.send_headers(stream_id, [(b":status", str(status).encode())], end_stream=True)
                if not ended:
                    self.conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self._flush_soon()

    def reset(self, stream: HboneStream, code: int) -> None:
        try:
            self.conn.reset_stream(stream.stream_id, code)
        except h2.exceptions.ProtocolError:
            pass  # already closed
        self._flush_soon()

    def ack(self, stream: HboneStream, flow_controlled: int) -> None:
        if flow_controlled and not self._h2_closed:
            self.conn.acknowledge_received_data(flow_controlled, stream.stream_id)
            self._flush_soon()

    def taken(self, stream: HboneStream, flow_controlled: int) -> None:
        """What `stream` held in its inbox was taken (or dropped): out of the budget, and
        back to the peer's window."""
        stream._held = self.budget.add(stream._held, -flow_controlled)
        self.ack(stream, flow_controlled)

    def reserve(self) -> None:
        """Promise a stream to a pool caller (keeps the idle timer off)."""
        self.reserved += 1
        self._update_idle()

    def unreserve(self) -> None:
        self.reserved -= 1
        self._update_idle()

    def want_send(self, stream: HboneStream) -> None:
        """Send what `stream` queued now, as a socket transport would (the `_flushing`
        loop picks it up when we are already sending or handling input)."""
        self._pending[stream.stream_id] = stream
        if not self._flushing:
            self._flush()

    def stream_done(self, stream: HboneStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None:
            self.metrics.streams.labels(direction=self.direction).dec()
        self._pending.pop(stream.stream_id, None)
        self._update_idle()
        if self.draining and self.is_server and not self.streams:
            self.goaway()

    def drain(self) -> None:
        """Take no new streams; GOAWAY and close once the open ones are done."""
        self.draining = True
        if not self.streams:
            self.goaway()

    def goaway(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        self.draining = True
        if not self._h2_closed and self.transport is not None:
            self._h2_closed = True
            self.conn.close_connection(error_code)
            self._write_out()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def closing(self) -> bool:
        """GOAWAY sent or received, or the transport is gone: h2 takes no more frames."""
        return self._h2_closed

    @property
    def stream_limit(self) -> int:
        return min(self.max_streams, self.conn.remote_settings.max_concurrent_streams)

    @property
    def usable(self) -> bool:
        """Open to new streams (pool side)."""
        return not self.draining and not self.closed.done() and not (
            self.ready.done() and self.ready.exception() is not None)

    # --- h2 events ------------------------------------------------------------------

    def _request(self, event: ev.RequestReceived) -> None:
        if self._on_request is None:
            raise h2.exceptions.ProtocolError("a server sent a request")
        self._on_request(self, event)

    def _response(self, event: ev.ResponseReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            headers = latin1_headers(event.headers)
            status = next((int(v) for k, v in headers if k == ":status"), 0)
            stream._on_response(status, tuple((k, v) for k, v in headers if not k.startswith(":")))

    def _data(self, event: ev.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream._on_data(event.data, event.flow_controlled_length)
        elif event.flow_controlled_length:  # a stream we already gave up: free the connection window
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def _ended(self, event: ev.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            stream._on_end()

    def _reset(self, event: ev.StreamReset) -> None:
        if event.error_code == ErrorCodes.REFUSED_STREAM and not self.is_server:
            self.draining = True  # the server is shutting down: new streams go elsewhere
        stream = self.streams.get(event.stream_id)
        if self.is_server and event.remote_reset and not self._stop_sending(stream, event.error_code) \
                and not self.guard.reset_allowed():
            self._fail_connection("too_many_resets", self.guard.reset_detail(), ErrorCodes.ENHANCE_YOUR_CALM,
                                  last_stream_id=event.stream_id)
            return
        if stream is not None:
            stream._on_reset(event.error_code)

    @staticmethod
    def _stop_sending(stream: HboneStream | None, code: int) -> bool:
        """RST_STREAM NO_ERROR after the client's END_STREAM (or for a stream we no longer
        serve): "stop sending" (RFC 9113 8.1), how a client closes a stream it is done with,
        not a reset to count."""
        return code == ErrorCodes.NO_ERROR and (stream is None or stream._remote_ended)

    def _settings(self, event: ev.RemoteSettingsChanged) -> None:
        if not self.ready.done():
            self.ready.set_result(None)
        self._flush_soon()

    def _ping_ack(self, event: ev.PingAckReceived) -> None:
        self.liveness.pong()

    def _goaway_received(self, event: ev.ConnectionTerminated) -> None:
        self._h2_closed = self.draining = True
        code = code_name(event.error_code)
        if event.error_code != ErrorCodes.NO_ERROR:
            self.error_reason = f"goaway_{code.lower()}"
            self.metrics.connection_error(self.direction, self.error_reason)
            self.log.warning("%r: the peer sent GOAWAY %s %r", self, code, event.additional_data)
        for stream in list(self.streams.values()):
            stream._fail(ConnectionLost(f"{self!r}: the peer sent GOAWAY ({code})",
                                        retryable=stream.stream_id > (event.last_stream_id or 0)))
        self.transport.close()

    # --- sending --------------------------------------------------------------------

    def _flush_soon(self) -> None:
        if self._flush_handle is None and not self._h2_closed:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._h2_closed or self.transport is None or self.transport.is_closing() or self._flushing:
            return
        self._flushing = True
        try:
            while self._pending and not self._write_paused:
                progressed = False
                for stream in list(self._pending.values()):
                    if self._write_paused:
                        break
                    progressed |= self._send_some(stream)
                if not progressed:
                    break
            self._write_out()
        finally:
            self._flushing = False

    def _send_some(self, stream: HboneStream) -> bool:
        """One DATA frame of `stream` as its window allows; False when it cannot move."""
        stream_id = stream.stream_id
        try:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            chunk, end = stream._take_outgoing(window)
            if not chunk and not end:
                return False  # window closed: WindowUpdated brings us back
            self.conn.send_data(stream_id, chunk, end_stream=end)
        except h2.exceptions.ProtocolError:
            self._pending.pop(stream_id, None)  # reset under us; the StreamReset event tells the stream
            return False
        if not stream._wants_send():
            self._pending.pop(stream_id, None)
        stream._sent(end)
        self._write_out()
        return True

    def _write_out(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # --- lifecycle ------------------------------------------------------------------

    def _add_stream(self, stream_id: int, info) -> HboneStream:
        extra = {"peername": self.peer_address, "sockname": self.local_address,
                 "peer_identity": self.peer_identity, "stream_id": stream_id}
        stream = HboneStream(self, stream_id, self.settings.write_buffer, extra, info)
        self.streams[stream_id] = stream
        self.metrics.streams.labels(direction=self.direction).inc()
        self._update_idle()
        return stream

    def _fail_connection(self, reason: str, detail: str, code: int = ErrorCodes.NO_ERROR,
                         last_stream_id: int | None = None) -> None:
        if self.error_reason is None:
            self.error_reason = reason
            self.metrics.connection_error(self.direction, reason)
            self.log.warning("%r: closing: %s", self, detail)
        if not self._h2_closed:  # h2 queued GOAWAY itself on a protocol error
            self._h2_closed = True
            self.conn.close_connection(code, last_stream_id=last_stream_id)
        for stream in list(self.streams.values()):
            stream._fail(ConnectionLost(f"{self!r}: {detail}"))
        self._write_out()
        if self.transport is not None:
            self.transport.close()

    def _classify_loss(self, exc: BaseException | None) -> None:
        if self.error_reason is not None:
            return
        if partial_input(self.conn):
            self.error_reason = "truncated"
        elif exc is not None:
            self.error_reason = "transport_error"
        elif self.streams and not self._h2_closed:
            self.error_reason = "closed_with_open_streams"
        if self.error_reason is not None:
            self.metrics.connection_error(self.direction, self.error_reason)
            self.log.info("%r: connection ended (%s)%s", self, self.error_reason, f": {exc}" if exc else "")

    def _ping(self) -> None:
        if not self._h2_closed:
            self.conn.ping(os.urandom(8))
            self._write_out()

    def _unanswered(self) -> None:
        self._fail_connection("keepalive_timeout", f"no PING answer in {self.settings.keepalive_timeout} s")
        self.abort()

    def _update_idle(self) -> None:
        if self.transport is not None:
            self.liveness.busy(bool(self.streams or self.reserved))

    def _idle(self) -> None:
        if not self.streams and not self.reserved:
            self.log.debug("%r: idle for %s s, closing", self, self.liveness.idle_timeout)
            self.goaway()
