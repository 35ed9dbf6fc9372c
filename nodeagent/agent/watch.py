"""Wake the agent as soon as the `files` source directory changes (inotify), so an
enrolment follows a label change in milliseconds rather than a poll interval.

`reliable` says whether every change reaches the agent this way (inotify set up, every
directory watched, no event queue overflow): then the agent rescans only on events and
every resync interval; otherwise it polls at the poll interval, so a missed event (a
filesystem without inotify, a watch limit reached) only costs latency. Python has no
inotify binding, hence ctypes.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import struct
from pathlib import Path

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF, IN_ONLYDIR = 0x400, 0x800, 0x1000000
IN_Q_OVERFLOW, IN_IGNORED = 0x4000, 0x8000
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
MASK = (IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ATTRIB
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)


class DirectoryWatch:
    def __init__(self, directory: Path, log: logging.Logger):
        self.directory = directory
        self.log = log
        self._changed = asyncio.Event()
        self.reliable = False  # every change is reported (else the agent polls)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            self.log.warning("inotify unavailable (%s); polling only", os.strerror(ctypes.get_errno()))
            return
        self.reliable = self._add_watches()
        asyncio.get_running_loop().add_reader(self._fd, self._on_events)

    def _add_watches(self) -> bool:
        """Watch the directory and every subdirectory; False when one could not be."""
        if not self.directory.is_dir():
            return False  # not there yet: polling finds it
        complete = True

        def unlistable(exc: OSError) -> None:
            nonlocal complete
            complete = False

        for root, dirs, _files in os.walk(self.directory, onerror=unlistable):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            # Re-adding an existing watch is harmless (same descriptor), so no bookkeeping.
            if self._libc.inotify_add_watch(self._fd, os.fsencode(root), MASK) < 0:
                complete = False
                self.log.warning("cannot watch %s (%s); polling covers it",
                                 root, os.strerror(ctypes.get_errno()))
        return complete

    def _on_events(self) -> None:
        overflow = False
        try:
            while True:
                data = os.read(self._fd, 65536)
                if not data:
                    break
                overflow |= _overflowed(data)
        except BlockingIOError:
            pass
        if overflow:
            self.log.warning("inotify event queue overflowed; polling the source from now on")
        # New subdirectories (cheap: one walk per burst of events).
        self.reliable = self._add_watches() and self.reliable and not overflow
        self._changed.set()

    async def wait(self, stop: asyncio.Event, timeout: float) -> None:
        """Return on a change, on `stop`, or after `timeout` seconds, whichever is first."""
        waiters = [asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        self._changed.clear()

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


def _overflowed(data: bytes) -> bool:
    """Whether the inotify events in `data` include IN_Q_OVERFLOW (events were lost)."""
    offset = 0
    while offset + 16 <= len(data):
        _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
        if mask & IN_Q_OVERFLOW:
            return True
        offset += 16 + length
    return False
