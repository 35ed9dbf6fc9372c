"""One HBONE stream (an HTTP/2 CONNECT stream) as a duplex byte stream.

The same object serves two styles. Pulled like asyncio's StreamReader/StreamWriter
(`read`, `readexactly`, `write`, `drain`, `write_eof`, `close`, `wait_closed`), which
is why the server and the pool hand it out as both `reader` and `writer`. Or pushed,
as an `asyncio.Transport`, to a protocol given to `attach()` — what the agent's splice
needs; bytes not yet read are handed to the protocol, so switching loses nothing.

Received bytes are acknowledged to HTTP/2 flow control only once the app has taken
them, so a slow app closes the peer's window instead of growing a buffer (at most one
stream window is held). Writes queue up to `write_buffer` bytes before `drain()` waits
and a pushed protocol gets `pause_writing()`. END_STREAM from the peer is EOF
(`eof_received`); `write_eof()` sends END_STREAM. A reset or a lost connection ends
the stream with StreamReset/ConnectionLost; a reset with NO_ERROR after the peer's
END_STREAM is the RFC 9113 §8.1 "stop sending" and ends it cleanly. A stream that ended
before a protocol was attached still ends that protocol (`connection_lost`), so a relay
started for a stream the client already reset ends at once. An exception from the
attached protocol resets this stream only (RST_STREAM INTERNAL_ERROR); the connection
and its other streams live on.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from nodeagent.tunnel.errors import Overloaded, StreamReset

if TYPE_CHECKING:
    from nodeagent.tunnel.session import Session

NO_ERROR, INTERNAL_ERROR, CANCEL = 0x0, 0x2, 0x8
READ_ALL_CHUNK = 1024 * 1024


def _as_bytes(view: memoryview) -> bytes:
    """The bytes behind `view`, copied only if it is a part of them."""
    return view.obj if len(view) == len(view.obj) and isinstance(view.obj, bytes) else view.tobytes()


class HboneStream(asyncio.Transport):
    def __init__(self, session: "Session", stream_id: int, write_buffer: int, extra: dict, info=None):
        super().__init__(extra)
        self._session = session
        self.stream_id = stream_id
        self.info = info  # the server's StreamInfo; None on the client
        self.status: int | None = None  # the response status, sent (server) or received (client)
        self.response_headers: tuple[tuple[str, str], ...] = ()
        self.response: asyncio.Future = session.loop.create_future()  # client: (status, headers)
        self.bytes_sent = 0  # payload bytes handed to HTTP/2
        self.bytes_received = 0  # payload bytes received from the peer
        self._inbox: collections.deque[list] = collections.deque()  # [memoryview, flow-controlled len]
        self._held = 0  # flow-controlled bytes of the inbox, counted in the receive budget
        self._sent_held = 0  # bytes of the outbox, counted in the send budget
        self._budget_paused = False  # the send budget paused the writer (budget.waiting)
        self._remote_ended = False
        self._eof_delivered = False
        self._protocol: asyncio.BaseProtocol | None = None
        self._reading_paused = False
        self._delivery_scheduled = False
        self._outbox: collections.deque = collections.deque()
        self._outbox_bytes = 0
        self._high, self._low = write_buffer, write_buffer // 4
        self._writing_paused = False
        self._eof_wanted = False
        self._end_sent = False
        self._closing = False
        self._error: BaseException | None = None  # ended the stream both ways
        self._write_error: BaseException | None = None  # ended only our sending
        self._done = False
        self._read_waiter: asyncio.Future | None = None
        self._drain_waiter: asyncio.Future | None = None
        self._closed = session.loop.create_future()

    def __repr__(self) -> str:
        return f"<HboneStream {self.stream_id} {self.get_extra_info('peer_identity')}>"

    # --- pull style ------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes (all until EOF if n < 0); b"" at EOF."""
        if n == 0:
            return b""
        if n < 0:
            chunks = []
            while chunk := await self.read(READ_ALL_CHUNK):
                chunks.append(chunk)
            return b"".join(chunks)
        while not self._inbox:
            if self._error is not None:
                raise self._error
            if self._remote_ended or self._done:
                return b""
            self._read_waiter = self._session.loop.create_future()
            await self._read_waiter
        return self._take_received(n)

    async def readexactly(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = await self.read(n - got)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(chunks), n)
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def at_eof(self) -> bool:
        return (self._remote_ended or self._done) and not self._inbox

    @property
    def ended(self) -> bool:
        """Done both ways, reset (by either side) or its connection lost: nothing more
        goes through it, and `wait_closed()` has returned."""
        return self._done

    async def drain(self) -> None:
        """Wait until the queued writes are below the low-water mark (and the send budget
        lets this stream write)."""
        while (self._outbox_bytes > self._low or self._budget_paused) and not self._done:
            self._drain_waiter = self._session.loop.create_future()
            await self._drain_waiter
        if self._error is not None or self._write_error is not None:
            raise self._error or self._write_error

    @property
    def gone(self) -> tuple[asyncio.Future]:
        """Done once the stream is `ended` (what `wait_closed` waits for)."""
        return (self._closed,)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    @property
    def transport(self) -> "HboneStream":
        """So code written for asyncio's StreamWriter (`writer.transport`) works."""
        return self

    # --- asyncio.Transport ----------------------------------------------------------

    def write(self, data) -> None:
        if self._eof_wanted:
            raise RuntimeError("write() after write_eof() or close()")
        if self._session.is_server and self.status != 200:
            raise RuntimeError("respond(200) before writing to an HBONE stream")
        if not data or self._done or self._end_sent:
            return  # like a socket transport, a write after a reset is dropped; drain() raises
        data = bytes(data) if not isinstance(data, bytes) else data
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        budget = self._session.budget
        self._sent_held = budget.send_add(self._sent_held, len(data))
        self._session.want_send(self)
        if not self._budget_paused and budget.send_full(self._sent_held):
            self._budget_paused = True
            budget.waiting.add(self)
        if (self._outbox_bytes > self._high or self._budget_paused) and not self._writing_paused:
            self._writing_paused = True
            if self._protocol is not None:
                self._protocol.pause_writing()

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def write_eof(self) -> None:
        if self._eof_wanted or self._done:
            return
        self._eof_wanted = True
        self._session.want_send(self)

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """END_STREAM once queued bytes are sent; stop reading (a peer still sending
        gets RST_STREAM NO_ERROR, the HTTP/2 way to say "stop")."""
        if self._closing or self._done:
            return
        self._closing = True
        if self._session.is_server and self.status is None:
            self.respond(503)  # closed before deciding: refuse rather than hang
            return
        self._eof_delivered = True  # nothing more goes to the app
        self._discard_received()
        if not self._end_sent:
            self.write_eof()  # _sent() finishes the close once END_STREAM is out
        elif not self._remote_ended:
            self._session.reset(self, NO_ERROR)
            self._finish(None)
        else:
            self._maybe_finish()

    def abort(self) -> None:
        """RST_STREAM CANCEL now; queued bytes are dropped."""
        if not self._done:
            self._session.reset(self, CANCEL)
            self._finish(None)

    def is_closing(self) -> bool:
        return self._closing or self._done

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._schedule_delivery()

    def is_reading(self) -> bool:
        return not self._reading_paused and not self._done

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._high = high if high is not None else self._high
        self._low = low if low is not None else self._high // 4

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._outbox_bytes

    def get_protocol(self):
        return self._protocol

    def set_protocol(self, protocol) -> None:
        self.attach(protocol)

    def attach(self, protocol: asyncio.BaseProtocol) -> None:
        """Switch to push style: `protocol.connection_made(self)`, then bytes not yet read,
        then whatever arrives. Attach once, and do not read() afterwards."""
        if self._protocol is not None:
            raise RuntimeError("an HBONE stream takes one protocol")
        self._protocol = protocol
        protocol.connection_made(self)
        if self._done:  # reset (or its connection lost) before the protocol came: end it too
            self._session.loop.call_soon(protocol.connection_lost, self._error)
            return
        if self._writing_paused:
            protocol.pause_writing()
        self._schedule_delivery()

    # --- server side ----------------------------------------------------------------

    def respond(self, status: int = 200, headers=(), reason: str | None = None) -> None:
        """Answer the CONNECT (server side, once): 200 opens the stream, anything else
        (401, 403, 503...) refuses it before any data; `reason` labels the refusal in
        metrics (default `status_<status>`)."""
        if not self._session.is_server or self.status is not None:
            raise RuntimeError("respond() is for a server stream, once")
        self.status = status
        if self._done:
            return  # the client reset it first: nothing to answer, nothing opened or refused
        self._session.respond(self, status, headers, reason or f"status_{status}")
        if status != 200:
            self._end_sent = self._eof_wanted = True
            self._finish(None)

    # --- called by the session ------------------------------------------------------

    def _on_response(self, status: int, headers) -> None:
        self.status = status
        self.response_headers = headers
        if not self.response.done():
            self.response.set_result((status, headers))

    def _on_data(self, data: bytes, flow_controlled: int) -> None:
        self.bytes_received += len(data)
        if self._closing or self._done:
            self._session.ack(self, flow_controlled)
            return
        budget = self._session.budget
        if budget.over(self._held, flow_controlled):
            budget.overloaded += 1
            self._session.log.warning("%r: reset: its app had not read %d bytes received when the node's streams "
                                      "held half the receive budget (%d bytes)", self, self._held, budget.limit)
            self._session.ack(self, flow_controlled)  # dropped: the window is the peer's again
            self._overloaded(Overloaded(f"its app had not read {self._held} bytes received when the node's "
                                        f"streams held half the receive budget ({budget.limit} bytes)"))
            return
        self._inbox.append([memoryview(data), flow_controlled])
        self._held = budget.add(self._held, flow_controlled)
        if self._protocol is not None:
            self._deliver()
        else:
            self._wake_reader()

    def _on_end(self) -> None:
        self._remote_ended = True
        if self._protocol is not None:
            self._deliver()
        else:
            self._wake_reader()
        self._maybe_finish()

    def _on_reset(self, error_code: int) -> None:
        if error_code == NO_ERROR and self._remote_ended:
            # The peer stops reading (RFC 9113 8.1): what we received ends cleanly, what we
            # still send fails like a write to a closed socket.
            if not self._end_sent:
                self._write_error = StreamReset(self.stream_id, error_code, "the peer stopped reading")
            self._end_sent = True
            self._drop_outbox()
            self._wake_writer()
            if self._protocol is not None:
                self._deliver(ignore_pause=True)
            else:
                self._wake_reader()
            self._maybe_finish()
        else:
            self._fail(StreamReset(self.stream_id, error_code, "by the peer"))

    def _overloaded(self, exc: BaseException) -> None:
        """Reset (CANCEL) by the receive budget (budget.py): its app lags when the budget is half used."""
        if not self._done:
            self._session.reset(self, CANCEL)
            self._finish(exc)

    def _fail(self, exc: BaseException) -> None:
        if self._done:
            return
        if self._end_sent and self._remote_ended:
            # Complete on the wire (a GOAWAY right behind the last DATA): the app still gets it all.
            if self._protocol is not None:
                self._deliver(ignore_pause=True)
            else:
                self._wake_reader()
            self._maybe_finish()
            return
        self._finish(exc)

    def _take_outgoing(self, limit: int) -> tuple[memoryview | bytes, bool]:
        """Up to `limit` queued bytes and whether END_STREAM goes with them."""
        parts, size = [], 0
        while self._outbox and size < limit:
            head = self._outbox[0]
            room = limit - size
            if len(head) <= room:
                parts.append(self._outbox.popleft())
                size += len(head)
            else:
                view = memoryview(head)
                parts.append(view[:room])
                self._outbox[0] = view[room:]
                size += room
        self._outbox_bytes -= size
        self._sent_held = self._session.budget.send_add(self._sent_held, -size)
        self.bytes_sent += size
        end = self._eof_wanted and not self._outbox and not self._end_sent
        return (parts[0] if len(parts) == 1 else b"".join(parts)), end

    def _wants_send(self) -> bool:
        return not self._done and (bool(self._outbox) or (self._eof_wanted and not self._end_sent))

    def _budget_released(self) -> None:
        """All streams hold under half the send budget: write again once drained."""
        self._session.budget.waiting.discard(self)
        self._budget_paused = False
        self._resume_writing()

    def _sent(self, end: bool) -> None:
        if self._budget_paused and self._session.budget.send_eased(self._sent_held):
            self._session.budget.waiting.discard(self)
            self._budget_paused = False
        if not self._resume_writing():
            return
        if end:
            self._end_sent = True
            if self._closing and not self._remote_ended:
                self._session.reset(self, NO_ERROR)
                self._finish(None)
            else:
                self._maybe_finish()

    def _resume_writing(self) -> bool:
        """The writer goes on once the outbox is down to its low-water mark and the send
        budget does not hold it; False when its protocol failed (the stream ended)."""
        if self._writing_paused and self._outbox_bytes <= self._low and not self._budget_paused:
            self._writing_paused = False
            if self._protocol is not None:
                try:
                    self._protocol.resume_writing()
                except Exception as exc:
                    self._protocol_failed(exc)
                    return False
        if self._drain_waiter is not None and self._outbox_bytes <= self._low and not self._budget_paused:
            self._wake_writer()
        return True

    # --- internals ------------------------------------------------------------------

    def _take_received(self, n: int) -> bytes:
        entry = self._inbox[0]
        view = entry[0]
        if len(view) <= n:
            self._inbox.popleft()
            self._session.taken(self, entry[1])
            data = _as_bytes(view)
        else:
            data = view[:n].tobytes()
            entry[0] = view[n:]
        self._maybe_finish()
        return data

    def _schedule_delivery(self) -> None:
        if not self._delivery_scheduled and self._protocol is not None:
            self._delivery_scheduled = True
            self._session.loop.call_soon(self._deliver_scheduled)

    def _deliver_scheduled(self) -> None:
        self._delivery_scheduled = False
        self._deliver()

    def _deliver(self, ignore_pause: bool = False) -> None:
        protocol = self._protocol
        try:
            while self._inbox and (ignore_pause or not self._reading_paused) and not self._done:
                view, flow_controlled = self._inbox.popleft()
                self._session.taken(self, flow_controlled)
                protocol.data_received(_as_bytes(view))
            if self._remote_ended and not self._inbox and not self._eof_delivered and not self._done:
                self._eof_delivered = True
                if not protocol.eof_received():
                    self.close()
        except Exception as exc:  # the protocol's failure is this stream's, never its connection's
            self._protocol_failed(exc)
            return
        self._maybe_finish()

    def _protocol_failed(self, exc: Exception) -> None:
        self._session.log.warning("%r: its protocol failed, resetting this stream only (INTERNAL_ERROR)", self,
                                  exc_info=exc)
        if not self._done:
            self._session.reset(self, INTERNAL_ERROR)
            self._finish(exc)

    def _discard_received(self) -> None:
        while self._inbox:
            self._session.taken(self, self._inbox.popleft()[1])

    def _drop_outbox(self) -> None:
        self._outbox.clear()
        self._outbox_bytes = 0
        self._session.budget.waiting.discard(self)
        self._budget_paused = False
        self._sent_held = self._session.budget.send_add(self._sent_held, -self._sent_held)

    def _maybe_finish(self) -> None:
        if self._done or not self._end_sent or not self._remote_ended or self._inbox:
            return
        if self._protocol is not None and not self._eof_delivered:
            return
        self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self._error = exc
        self._discard_received()
        self._drop_outbox()
        self._session.stream_done(self)
        self._wake_reader()
        self._wake_writer()
        if not self._closed.done():
            self._closed.set_result(None)
        if not self.response.done():
            self.response.set_exception(exc or StreamReset(self.stream_id, CANCEL, "closed before a response"))
            self.response.exception()  # retrieved: nobody may be waiting
        if self._protocol is not None:
            self._session.loop.call_soon(self._protocol.connection_lost, exc)

    def _wake_reader(self) -> None:
        if self._read_waiter is not None and not self._read_waiter.done():
            self._read_waiter.set_result(None)

    def _wake_writer(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
