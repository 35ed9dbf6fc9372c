"""The native relay engine (native/relay.c, built by scripts/setup with cffi) as asyncio
sees it: `await engine.relay(a, b, abort)` hands two connected stream sockets to the
engine's own thread, which moves their bytes with splice(2) until both directions end,
and returns a SpliceResult (bytes each way, the error that ended it), as the Python path
(agent/proxy/splice.py) does. Ends come back through the engine's notify fd, which the
loop that started the engine watches (loop.add_reader); C never calls into Python.

Ownership: the sockets are detached before the engine gets them (their Python objects
are closed, fileno() -1), so nothing in Python can close or read them behind its back;
the engine closes them when the relay ends. `SpliceResult` lives here, below both paths.
`load()` imports the built module, or raises NativeUnavailable saying why not (not built,
built from other sources than the tree's).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MAX_RELAYS = 65536  # relays open at once; one more is reset (ENOSPC)
DEFAULT_PIPE_SIZE = 256 * 1024  # bytes held per direction at most (docs/design.md: "Larger pipes")
FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)
_BATCH = 256  # ends taken per call
STATS = ("relays_open", "relays_total", "relays_failed", "relays_aborted", "bytes_a_to_b", "bytes_b_to_a",
         "bytes_held", "copy_directions", "pipes", "ends_queued", "wakeups", "empty_reads", "max_relays", "pipe_size",
         "fatal")


@dataclass
class SpliceResult:
    a_to_b: int = 0
    b_to_a: int = 0
    error: BaseException | None = None  # the first error that ended it, if any


class NativeUnavailable(Exception):
    """The native module cannot be used; the message says why and what to do."""


def load():
    """The built cffi module (`ffi`, `lib`), or NativeUnavailable."""
    try:
        from nodeagent.native import _relay
    except ImportError as exc:
        raise NativeUnavailable(f"native module not built ({exc}); run scripts/setup") from None
    built = _relay.ffi.string(_relay.lib.na_build_digest()).decode()
    sources = Path(__file__).resolve().parents[2] / "native"
    if (sources / "relay.c").exists():  # an editable install: the module must match the tree
        from nodeagent.native.build import source_digest

        if built != source_digest(sources):
            raise NativeUnavailable(f"native module {Path(_relay.__file__).name} was built from other sources "
                                    f"than {sources}; rebuild it: scripts/setup")
    return _relay


def relayable(a, b) -> bool:
    """Whether the engine can take this pair: two stream sockets (TCP or unix)."""
    return all(isinstance(s, socket.socket) and s.type == socket.SOCK_STREAM and s.family in FAMILIES
               for s in (a, b))


class _Relay:
    """What an Abort binds to (splice.Abort calls `abort()`)."""

    def __init__(self, engine: "Engine", relay_id: int):
        self.engine = engine
        self.relay_id = relay_id

    def abort(self) -> None:
        self.engine.abort(self.relay_id)


class Engine:
    """One native engine, bound to the running loop that started it. close() resets the
    relays still open (their waiters get ECONNABORTED) and frees the engine."""

    def __init__(self, module, handle, loop: asyncio.AbstractEventLoop):
        self._ffi, self._lib = module.ffi, module.lib
        self._handle = handle
        self._loop = loop
        self._notify_fd = self._lib.na_engine_notify_fd(handle)
        self._ends = self._ffi.new("struct na_end[]", _BATCH)
        self._waiting: dict[int, asyncio.Future] = {}
        self._closed = False
        loop.add_reader(self._notify_fd, self._take_ends)

    @classmethod
    def start(cls, module=None, *, max_relays: int = DEFAULT_MAX_RELAYS, pipe_size: int = DEFAULT_PIPE_SIZE,
              copy_only: bool = False) -> "Engine":
        """Start an engine (its thread) for the running loop; OSError if it cannot."""
        module = module or load()
        ffi, lib = module.ffi, module.lib
        config = ffi.new("struct na_config *", {"max_relays": max_relays, "pipe_size": pipe_size,
                                                "flags": lib.NA_COPY_ONLY if copy_only else 0})
        out = ffi.new("struct na_engine **")
        err = lib.na_engine_new(config, out)
        if err < 0:
            raise OSError(-err, f"cannot start the native relay engine: {os.strerror(-err)}")
        loop = asyncio.get_running_loop()
        try:
            return cls(module, ffi.gc(out[0], lib.na_engine_free), loop)
        except BaseException:
            lib.na_engine_free(out[0])
            raise

    async def relay(self, a: socket.socket, b: socket.socket, abort=None) -> SpliceResult:
        """Relay between connected stream sockets `a` and `b` until both directions end;
        both are the engine's from here on. `abort` (splice.Abort) can end it early."""
        if self._closed:
            raise RuntimeError("the native relay engine is closed")
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("the native relay engine belongs to another event loop")
        relay_id = self._lib.na_relay_add(self._handle, a.detach(), b.detach())
        if relay_id < 0:  # the engine reset and closed both
            return SpliceResult(error=OSError(-relay_id, f"native relay refused: {os.strerror(-relay_id)}"))
        done = self._loop.create_future()
        self._waiting[relay_id] = done
        if abort is not None:
            abort.bind(_Relay(self, relay_id))
        try:
            return await done
        except asyncio.CancelledError:  # the agent is stopping: both peers must see a reset
            self.abort(relay_id)
            raise

    def abort(self, relay_id: int) -> None:
        """Reset both sides of a relay (nothing if it has ended)."""
        if not self._closed:
            self._lib.na_relay_abort(self._handle, relay_id)

    def stats(self) -> dict[str, int]:
        s = self._ffi.new("struct na_stats *")
        if not self._closed:
            self._lib.na_engine_stats(self._handle, s)
        return {name: int(getattr(s, name)) for name in STATS}

    def _take_ends(self) -> None:
        try:
            os.read(self._notify_fd, 8)  # clear the eventfd first: ends queued after it set it again
        except BlockingIOError:
            pass
        lib, ends = self._lib, self._ends
        while True:
            n = lib.na_engine_ends(self._handle, ends, _BATCH)
            for i in range(n):
                end = ends[i]
                waiter = self._waiting.pop(end.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(SpliceResult(end.a_to_b, end.b_to_a, _error(lib, end)))
            if n < _BATCH:
                return

    def close(self) -> None:
        if self._closed:
            return
        self._loop.remove_reader(self._notify_fd)
        self._lib.na_engine_stop(self._handle)
        self._take_ends()
        self._closed = True
        self._ffi.release(self._handle)  # na_engine_free


def _error(lib, end) -> OSError | None:
    if end.how == lib.NA_END_ERROR:
        return OSError(end.error, os.strerror(end.error))  # ECONNRESET -> ConnectionResetError
    if end.how == lib.NA_END_STOPPED:
        return OSError(errno.ECONNABORTED, "the native relay engine stopped")
    return None
