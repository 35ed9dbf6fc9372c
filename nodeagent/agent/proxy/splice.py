"""Move bytes both ways between two connected sockets until both directions are done.

Used by the outbound and inbound relays. Built on asyncio transports so each direction
has a bounded buffer: when one side's write buffer passes HIGH_WATER the other side
stops reading (TCP back-pressure reaches the sender). A FIN is passed on as a FIN
(half-close), so request/response protocols that shut down their write side keep
working; a reset or error on one side aborts the other, so a peer sees a reset where
the original connection was reset — also when passing the FIN on fails because the
other socket was reset while we were not reading it (ENOTCONN from shutdown). Returns
the byte counts for telemetry. One side may be an HBONE stream instead of a socket: it
is an asyncio transport of its own (nodeagent.tunnel.HboneStream.attach). An `Abort`
handed in ends the splice from outside (both sides reset, the counts still returned),
e.g. when a policy change revokes it.

`Splicer` is what the relays call (issue 11): it sends a pair of stream sockets to the
native engine (nodeagent.native: C, splice(2), its own thread) when the agent runs one
(`data_path_engine` auto and the module built, or native), everything else — an HBONE
stream side, or no native engine — through `splice` here. Both keep the semantics above
and share their tests.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from nodeagent import native
from nodeagent.errors import ConfigError
from nodeagent.native import SpliceResult
from nodeagent.resets import linger_reset

HIGH_WATER = 64 * 1024  # bytes buffered towards one side before the other stops reading
ENGINES = ("auto", "native", "python")  # the data_path_engine setting


class Abort:
    """Ends a splice from outside: both sides are reset, and the splice returns with the
    bytes counted so far. Calling it before the splice has started ends it as it starts."""

    def __init__(self):
        self.requested = False
        self._pipe = None  # a _Pipe, or a native relay: anything with abort()

    def __call__(self) -> None:
        self.requested = True
        if self._pipe is not None:
            self._pipe.abort()

    def bind(self, pipe) -> None:
        self._pipe = pipe
        if self.requested:
            pipe.abort()


class _Side(asyncio.Protocol):
    """One socket of the pair; forwards what it reads to `other`."""

    def __init__(self, pipe: "_Pipe", name: str):
        self.pipe = pipe
        self.name = name
        self.other: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.read_eof = False
        self.lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.pipe.aborted:
            _reset(transport)
            return
        transport.set_write_buffer_limits(high=HIGH_WATER)
        transport.pause_reading()  # until both sides exist
        self.pipe.ready(self)

    def data_received(self, data: bytes) -> None:
        self.pipe.count(self, len(data))
        self.other.transport.write(data)

    def eof_received(self) -> bool:
        if not self.read_eof:
            self.read_eof = True
            if not self.other.lost and self.other.transport.can_write_eof():
                try:
                    self.other.transport.write_eof()
                except OSError as exc:  # its socket was reset while paused (ENOTCONN): this pair only
                    self.pipe.fail(exc)
                    return True
            self.pipe.maybe_finish()
        return True  # keep the transport: the other direction may still be flowing

    def pause_writing(self) -> None:
        if not self.other.lost:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.other.lost and not self.other.read_eof:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.pipe.lost(self, exc)


class _Pipe:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.a = _Side(self, "a")
        self.b = _Side(self, "b")
        self.a.other, self.b.other = self.b, self.a
        self.result = SpliceResult()
        self.done = loop.create_future()
        self._ready = 0
        self.aborted = False

    def ready(self, side: _Side) -> None:
        self._ready += 1
        if self._ready == 2 and not self.aborted:
            self.a.transport.resume_reading()
            self.b.transport.resume_reading()

    def abort(self) -> None:
        """Reset both sides (one not connected yet is reset when it connects)."""
        self.aborted = True
        for side in (self.a, self.b):
            if not side.lost and side.transport is not None:
                _reset(side.transport)

    def fail(self, exc: BaseException) -> None:
        """A socket error of ours (not seen by a transport): record it and reset both sides."""
        if self.result.error is None:
            self.result.error = exc
        self.abort()

    def count(self, side: _Side, n: int) -> None:
        if side is self.a:
            self.result.a_to_b += n
        else:
            self.result.b_to_a += n

    def maybe_finish(self) -> None:
        # Both directions saw FIN: close once the buffered bytes are written.
        if self.a.read_eof and self.b.read_eof:
            for side in (self.a, self.b):
                if not side.lost:
                    side.transport.close()

    def lost(self, side: _Side, exc: BaseException | None) -> None:
        if exc is not None and self.result.error is None:
            self.result.error = exc
        other = side.other
        if not other.lost and other.transport is not None:
            if exc is not None:
                _reset(other.transport)  # pass the reset on
            else:
                other.transport.close()
        if self.a.lost and self.b.lost and not self.done.done():
            self.done.set_result(self.result)


async def splice(a: socket.socket, b, abort: Abort | None = None) -> SpliceResult:
    """Relay between connected socket `a` and `b`, a connected socket or an HBONE stream
    (an asyncio transport that takes a protocol); both are ended on return. `abort`, when
    given, can end it early."""
    loop = asyncio.get_running_loop()
    pipe = _Pipe(loop)
    if abort is not None:
        abort.bind(pipe)
    a.setblocking(False)
    try:
        await loop.connect_accepted_socket(lambda: pipe.a, sock=a)
    except BaseException:
        if isinstance(b, socket.socket):
            b.close()
        else:
            b.abort()
        raise
    if not isinstance(b, socket.socket):
        b.attach(pipe.b)
        return await _finish(pipe)
    b.setblocking(False)
    try:
        await loop.connect_accepted_socket(lambda: pipe.b, sock=b)
    except BaseException:
        pipe.a.transport.abort()
        raise
    return await _finish(pipe)


async def _finish(pipe: _Pipe) -> SpliceResult:
    try:
        return await asyncio.shield(pipe.done)
    except asyncio.CancelledError:  # the agent is stopping: both peers must see a reset, not a clean end
        for side in (pipe.a, pipe.b):
            if not side.lost and side.transport is not None:
                _reset(side.transport)
        raise


def _reset(transport: asyncio.BaseTransport) -> None:
    """Abort `transport` so that its peer sees a reset: a socket's with RST (SO_LINGER 0;
    a plain close would send FIN, which reads as a clean end), an HBONE stream's with
    RST_STREAM."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        linger_reset(sock)
    transport.abort()


class Splicer:
    """Which engine moves the bytes of the agent's relays, chosen once from the
    `data_path_engine` setting: `auto` (native when the module is built and starts,
    else python), `native` (required: ConfigError at start-up without it) or `python`.
    HBONE stream hops always take the Python path (the native TLS/HTTP/2 step is next).
    The engine starts in `start()` on the agent's loop; until then, and after close(),
    every pair goes through the Python path."""

    def __init__(self, setting: str, log: logging.Logger, **engine_options):
        self.setting = setting
        self.log = log
        self.options = engine_options  # for native.Engine.start: max_relays, pipe_size, copy_only
        self.engine: native.Engine | None = None
        self._module = None
        self.why = "data_path_engine=python"
        if setting != "python":
            try:
                self._module = native.load()
                self.why = "the native engine has not started yet"
            except native.NativeUnavailable as exc:
                if setting == "native":
                    raise ConfigError("setting data_path_engine", f"is native, but {exc}",
                                      "build it (scripts/setup) or set data_path_engine to auto or python") from None
                self.why = str(exc)

    async def start(self) -> None:
        """Start the native engine on the running loop, if one was chosen."""
        if self._module is None or self.engine is not None:
            return
        try:
            self.engine = native.Engine.start(self._module, **self.options)
            self.why = f"data_path_engine={self.setting}: the native module is built from this tree's native/"
        except OSError as exc:
            if self.setting == "native":
                raise ConfigError("setting data_path_engine", f"is native, but {exc}",
                                  "see the error, or set data_path_engine to auto or python") from None
            self.why = str(exc)
            self.log.warning("data path: python relays: %s", exc)

    async def splice(self, a: socket.socket, b, abort: Abort | None = None) -> SpliceResult:
        """As `splice` (same arguments, same result), by the chosen engine. A native HBONE
        stream (nodeagent.native.hbone, setting hbone_engine) moves its own bytes: `a` goes to it."""
        carry = getattr(b, "carry", None)
        if carry is not None:
            return await carry(a, abort)
        if self.engine is not None and native.relayable(a, b):
            return await self.engine.relay(a, b, abort)
        return await splice(a, b, abort)

    def describe(self) -> dict:
        """For status: the engine in use, why, and the native engine's limits and counters."""
        if self.engine is not None:
            summary = "native (socket pairs); python for HBONE streams"
        else:
            summary = f"python: {self.why}"
        return {"engine": "native" if self.engine is not None else "python", "setting": self.setting,
                "summary": summary, "why": self.why,
                "native": self.engine.stats() if self.engine is not None else None}

    def close(self) -> None:
        """Stop the native engine: relays still open are reset."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            self.why = "stopped"
