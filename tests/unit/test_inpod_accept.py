"""In-pod listeners when accept(2) fails. For want of descriptors or memory (EMFILE,
ENFILE, ENOBUFS, ENOMEM) the connection stays queued and the socket readable: the
listener used to retry at once and spun the agent's loop (62,000 failed accepts and log
lines in 0.5 s, every other pod's connections waiting behind them). Now it stops watching
the socket for its pause, then accepts what waits; an error that is one queued
connection's (ECONNABORTED...) is skipped at once. Failures are counted per direction and
errno, and logged at once, then at most every LOG_INTERVAL for all listeners together.
accept(2) fails on cue here (a socket whose accept raises the errno given); the
connections are real."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from nodeagent.agent.inpod.sockets import AcceptFailures, InPodListener
from nodeagent.throttle import LOG_INTERVAL, Throttle


class Pod:
    def track(self, direction: str, task: asyncio.Task) -> None:
        pass

    def __str__(self) -> str:
        return "mesh/client"


class FailingListener(socket.socket):
    """A listening socket whose accept raises OSError(code) for each code in `errors` first."""

    def __init__(self):
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.errors: list[int] = []
        self.calls = 0
        self.bind(("127.0.0.1", 0))
        self.listen(8)
        self.setblocking(False)

    def accept(self):
        self.calls += 1
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, "failed on cue")
        return super().accept()


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def recorder():
    log = logging.getLogger("test.inpod_accept")
    log.propagate = False
    lines = Lines()
    log.handlers[:] = [lines]
    return log, lines


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class Accepting:
    """An outbound listener whose accept fails with `errors` first (pause: an hour), one
    client connected to it; `got` is set once the handler has the connection."""

    def __init__(self, errors: list[int]):
        self.log, self.lines = recorder()
        self.counted: list[tuple[str, str]] = []
        self.sock = FailingListener()
        self.sock.errors = errors
        self.got = asyncio.Event()

    async def handler(self, ctx, conn) -> None:
        conn.close()
        self.got.set()

    async def __aenter__(self) -> "Accepting":
        self.listener = InPodListener(self.sock, Pod(), "outbound", self.handler, self.log,
                                      AcceptFailures(self.log, lambda d, r: self.counted.append((d, r))), pause=3600)
        self.listener.start()
        self.client = socket.create_connection(self.sock.getsockname())
        return self

    async def __aexit__(self, *exc) -> None:
        self.listener.close()
        self.client.close()


def test_running_out_of_descriptors_pauses_the_listener_instead_of_spinning():
    async def main():
        async with Accepting([errno.EMFILE] * 1000) as a:  # failing until the test says otherwise
            for _ in range(100):  # loop rounds: the queued connection keeps the socket readable
                await asyncio.sleep(0)
            assert a.sock.calls == 1  # before: one failed accept (and one log line) per round
            assert a.counted == [("outbound", "accept_emfile")]
            assert len(a.lines.lines) == 1
            assert "accept on 127.0.0.1:%d failed" % a.sock.getsockname()[1] in a.lines.lines[0]
            assert "OPEN FILES" in a.lines.lines[0] and "pauses 3600 s" in a.lines.lines[0]
            # Descriptors are back; the pause ends: the queued connection is accepted.
            a.sock.errors.clear()
            a.listener._paused.cancel()
            a.listener._resume()
            await asyncio.wait_for(a.got.wait(), 10)
            assert a.sock.calls == 3  # the accept, and the one that found the queue empty
    run(main())


def test_the_pause_ends_by_itself_and_what_waited_is_accepted():
    async def main():
        log, lines = recorder()
        sock = FailingListener()
        sock.errors = [errno.ENFILE, errno.ENOBUFS, errno.ENOMEM]
        got: list[socket.socket] = []
        both = asyncio.Event()

        async def handler(ctx, conn):
            got.append(conn)
            if len(got) == 2:
                both.set()

        failures = AcceptFailures(log, clock=lambda: 0.0)
        listener = InPodListener(sock, Pod(), "inbound", handler, log, failures, pause=0.01)
        listener.start()
        clients = [socket.create_connection(sock.getsockname()) for _ in range(2)]
        try:
            await asyncio.wait_for(both.wait(), 10)
            assert sock.errors == []
            assert len(lines.lines) == 1  # three failures within the interval: one line, the first
        finally:
            listener.close()
            for conn in got + clients:
                conn.close()
    run(main())


def test_a_connection_aborted_in_the_queue_does_not_stop_the_next():
    async def main():
        async with Accepting([errno.ECONNABORTED, errno.EPROTO]) as a:
            await asyncio.wait_for(a.got.wait(), 10)  # no pause: it would take an hour
            assert a.listener._paused is None
            assert a.counted == [("outbound", "accept_econnaborted"), ("outbound", "accept_eproto")]
            assert "the next queued one is accepted" in a.lines.lines[0]
    run(main())


def test_closing_a_paused_listener_cancels_its_pause():
    async def main():
        log, _ = recorder()
        sock = FailingListener()
        sock.errors = [errno.EMFILE] * 10

        async def handler(ctx, conn):
            conn.close()

        listener = InPodListener(sock, Pod(), "outbound", handler, log, pause=3600)
        listener.start()
        client = socket.create_connection(sock.getsockname())
        try:
            for _ in range(10):
                await asyncio.sleep(0)
            pause = listener._paused
            assert pause is not None
            listener.close()  # accepts what is queued: fails again, and stays closed
            assert pause.cancelled() and listener._paused is None and sock.fileno() == -1
            assert sock.calls == 2
        finally:
            client.close()
    run(main())


def test_listeners_share_one_report_per_interval():
    log, lines = recorder()
    now = [100.0]
    counted = []
    failures = AcceptFailures(log, lambda d, r: counted.append(r), clock=lambda: now[0])
    sockets = [FailingListener() for _ in range(2)]
    try:
        listeners = [InPodListener(s, Pod(), "outbound", None, log, failures) for s in sockets]
        for i in range(5):
            failures.failed(listeners[i % 2], OSError(errno.EMFILE, "Too many open files"), 0.1)
        assert len(lines.lines) == 1 and " 1 failed accept(s)" in lines.lines[0]
        now[0] += LOG_INTERVAL
        failures.failed(listeners[1], OSError(errno.EMFILE, "Too many open files"), 0.1)
        assert len(lines.lines) == 2 and " 5 failed accept(s)" in lines.lines[1]
        assert counted == ["accept_emfile"] * 6
    finally:
        for s in sockets:
            s.close()


def test_throttle_reports_the_first_then_at_most_once_per_interval_with_the_count():
    now = [0.0]
    throttle = Throttle(10.0, lambda: now[0])
    assert throttle.due() == 1
    assert [throttle.due() for _ in range(3)] == [0, 0, 0]
    now[0] = 9.9
    assert throttle.due() == 0
    now[0] = 10.0
    assert throttle.due() == 5  # the four held back and this one
    now[0] = 25.0
    assert throttle.due() == 1
