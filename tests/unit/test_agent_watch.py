"""DirectoryWatch (nodeagent/agent/watch.py) on a real directory with real inotify: every
kind of change below the directory, also in subdirectories created after the watch
started, wakes `wait` on the event itself (waits here have an hour's timeout, so a
return proves the wake-up); `stop` wakes it too; with no change it returns only when its
timeout is up. What the watch cannot see makes it unreliable (the agent then polls):
a queue overflow, a subdirectory it cannot reach, no inotify at all."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from pathlib import Path

import pytest

from identity_fixtures import run
from nodeagent.agent.watch import DirectoryWatch

LOG = logging.getLogger("test.watch")
HOUR = 3600.0  # a wait that returns before this was woken by a change or by stop
GUARD = 30.0  # how long a test waits for a wake-up before it fails


async def start_waiting(watch: DirectoryWatch, stop: asyncio.Event, timeout: float = HOUR) -> asyncio.Task:
    """`watch.wait` running, and asleep: nothing has woken it before the test acts."""
    task = asyncio.ensure_future(watch.wait(stop, timeout))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done(), "woken before anything changed (a stale event?)"
    return task


async def woken_by(watch: DirectoryWatch, change) -> None:
    """`change()` (a filesystem operation) wakes a wait of an hour."""
    stop = asyncio.Event()
    task = await start_waiting(watch, stop)
    change()
    await asyncio.wait_for(task, GUARD)
    assert not stop.is_set()


def inotify_fds() -> set[int]:
    """This process's open inotify descriptors."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                found.add(int(name))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return found


@pytest.fixture
def source(tmp_path) -> Path:
    directory = tmp_path / "cluster"
    directory.mkdir()
    (directory / "pods.yaml").write_text("kind: List\n")
    return directory


@pytest.mark.parametrize("where", [".", "late", "late/deeper"])
def test_a_write_a_rename_and_a_delete_each_wake_the_wait(source, where):
    async def main():
        watch = DirectoryWatch(source, LOG)
        try:
            directory = source / where
            if where != ".":  # created after the watch started: its creation wakes, then it is watched
                await woken_by(watch, lambda: directory.mkdir(parents=True))
            path = directory / "a.yaml"
            await woken_by(watch, lambda: path.write_text("kind: List\n"))  # created
            await woken_by(watch, lambda: path.write_text("kind: List\nitems: []\n"))  # rewritten
            await woken_by(watch, lambda: path.rename(directory / "b.yaml"))
            await woken_by(watch, lambda: os.utime(directory / "b.yaml", (1, 1)))  # touched (attributes)
            await woken_by(watch, lambda: (directory / "b.yaml").unlink())
            assert watch.reliable
        finally:
            watch.close()
    run(main())


def test_hidden_directories_are_not_watched(source):
    """Editors and `kubectl`-style writers keep temporary files in dot-directories."""
    async def main():
        watch = DirectoryWatch(source, LOG)
        try:
            await woken_by(watch, lambda: (source / ".tmp").mkdir())  # in the watched directory itself
            stop = asyncio.Event()
            task = await start_waiting(watch, stop)
            (source / ".tmp" / "x.yaml").write_text("kind: List\n")
            await asyncio.sleep(0.3)  # room for an event (a slow machine only hides a failure)
            assert not task.done()
            stop.set()
            await asyncio.wait_for(task, GUARD)
        finally:
            watch.close()
    run(main())


def test_stop_wakes_the_wait_and_a_set_stop_does_not_wait_at_all(source):
    async def main():
        watch = DirectoryWatch(source, LOG)
        try:
            stop = asyncio.Event()
            task = await start_waiting(watch, stop)
            stop.set()
            await asyncio.wait_for(task, GUARD)
            await asyncio.wait_for(watch.wait(stop, HOUR), GUARD)
        finally:
            watch.close()
    run(main())


def test_with_no_change_the_wait_lasts_its_timeout_and_a_change_counts_once(source):
    async def main():
        watch = DirectoryWatch(source, LOG)
        try:
            stop = asyncio.Event()
            await woken_by(watch, lambda: (source / "pods.yaml").write_text("kind: List\nitems: []\n"))
            started = time.monotonic()
            await asyncio.wait_for(watch.wait(stop, 0.2), GUARD)  # the change was consumed by the wake-up
            assert time.monotonic() - started >= 0.19
        finally:
            watch.close()
    run(main())


def test_close_removes_the_reader_and_closes_the_descriptor(source):
    async def main():
        loop = asyncio.get_running_loop()
        before = inotify_fds()
        watch = DirectoryWatch(source, LOG)
        (fd,) = inotify_fds() - before
        watch.close()
        assert inotify_fds() == before
        assert loop.remove_reader(fd) is False  # nothing was left registered
        watch.close()  # twice is harmless
        stop = asyncio.Event()
        task = await start_waiting(watch, stop)
        (source / "pods.yaml").write_text("kind: List\nitems: []\n")
        await asyncio.sleep(0.3)
        assert not task.done()  # a closed watch reports nothing
        stop.set()
        await asyncio.wait_for(task, GUARD)
        again = DirectoryWatch(source, LOG)  # a new watch may get the same descriptor number
        try:
            await woken_by(again, lambda: (source / "pods.yaml").unlink())
        finally:
            again.close()
    run(main())


def test_an_overflowed_event_queue_makes_the_watch_unreliable(source, caplog):
    """Events were lost: the agent can no longer rely on them and polls."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    files = [source / "a.yaml", source / "b.yaml"]
    for f in files:
        f.write_text("kind: List\n")

    async def main():
        watch = DirectoryWatch(source, LOG)
        try:
            assert watch.reliable
            # The loop does not read while this runs, so the queue fills. Alternating files:
            # inotify merges only identical consecutive events.
            await woken_by(watch, lambda: [os.utime(files[i % 2], (i, i)) for i in range(limit + 10)])
            assert not watch.reliable
            await woken_by(watch, lambda: files[0].unlink())  # still woken by events, for what they are worth
            assert not watch.reliable  # and it stays so
        finally:
            watch.close()
    with caplog.at_level(logging.WARNING, LOG.name):
        run(main())
    assert [r.getMessage() for r in caplog.records] == [
        "inotify event queue overflowed; polling the source from now on"]


def deep_tree(top: Path, depth: int = 18) -> None:
    """Nested 250-character directory names, deeper than PATH_MAX (created relative to
    open directory descriptors, the only way to make them)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d" * 250, dir_fd=fd)
            inner = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def test_a_subdirectory_the_watch_cannot_reach_makes_it_unreliable(source):
    async def main():
        deep_tree(source)
        watch = DirectoryWatch(source, LOG)
        try:
            assert not watch.reliable  # the deepest directories cannot be listed (ENAMETOOLONG)
            await woken_by(watch, lambda: (source / "pods.yaml").unlink())  # the rest is watched
        finally:
            watch.close()
    run(main())


def test_a_directory_not_there_yet_is_polled(tmp_path):
    async def main():
        watch = DirectoryWatch(tmp_path / "later", LOG)
        try:
            assert not watch.reliable
            stop = asyncio.Event()
            started = time.monotonic()
            await asyncio.wait_for(watch.wait(stop, 0.2), GUARD)
            assert time.monotonic() - started >= 0.19
        finally:
            watch.close()
    run(main())


def test_without_inotify_the_watch_only_times_out(source, caplog):
    """inotify_init1 failing (here: EMFILE, the descriptor limit reached) leaves polling."""
    async def main():
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest_free = os.open(os.devnull, os.O_RDONLY)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        try:
            watch = DirectoryWatch(source, LOG)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert not watch.reliable
        stop = asyncio.Event()
        task = await start_waiting(watch, stop)
        (source / "pods.yaml").unlink()
        await asyncio.sleep(0.3)
        assert not task.done()
        stop.set()
        await asyncio.wait_for(task, GUARD)
        watch.close()  # nothing to close
    with caplog.at_level(logging.WARNING, LOG.name):
        run(main())
    assert [r.getMessage() for r in caplog.records] == ["inotify unavailable (Too many open files); polling only"]
