"""Compile bpf/*.c with bcc and load the programs in a short-lived process, not the agent.

bcc maps LLVM and clang (~85 MiB of libraries) and leaves ~36 MiB of compiler heap that
a process never gives back, for a compile that happens once (issue 11). So the agent
runs `python -m nodeagent.capture.compiler FD REQUEST` (load_programs): the child
imports bcc, compiles one module per source file, loads every program of
programs.PROGRAMS, sends the program fds over the unix socket FD (SCM_RIGHTS) with a
JSON reply and exits. The agent attaches, links and adopts with those fds through raw
bpf(2) (bpfsys); it never imports bcc. Maps are pinned by bcc (BPF_TABLE_PINNED) in the
child, so they outlive it. A failure comes back as the same typed error
(errors.to_wire/from_wire): bcc prints compiler errors and verifier logs to stderr, so
the child captures fd 2 while bcc runs and puts it in CompileFailed or VerifierRejected.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import types
from typing import Callable, Iterator

import nodeagent
from nodeagent.capture import preflight
from nodeagent.capture.errors import (CaptureError, CompileFailed, NotPrivileged, VerifierRejected,
                                      from_wire, to_wire)
from nodeagent.capture.programs import BY_NAME, PROGRAMS, LoadedPrograms, ProgramSpec

COMPILE_TIMEOUT = 120.0  # seconds, by default (the agent's compile_timeout); a compile takes ~0.7 s on 2 cores
COMPILE_TIMEOUT_MAX = 3600.0  # the most compile_timeout may be
EXIT_GRACE = 10.0  # seconds the child may take to exit once it has answered
_MAX_FDS = 2 * len(PROGRAMS)  # room for more than we expect, so a surplus is seen, not cut
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(nodeagent.__file__)))


# ---- the agent's end ----

def load_programs(bpf_dir: str, flags: list[str], log: logging.Logger,
                  timeout: float = COMPILE_TIMEOUT, programs: tuple[ProgramSpec, ...] = PROGRAMS) -> LoadedPrograms:
    """Compile and load `programs` (default: capture's) in a child process; the fds of
    the loaded programs, by name."""
    started = time.monotonic()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, tempfile.TemporaryFile() as output:
        request = json.dumps({"bpf_dir": bpf_dir, "flags": flags, "programs": [p.name for p in programs]})
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # the child runs this very code
            p for p in (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)}
        try:
            proc = subprocess.Popen([sys.executable, "-m", __name__, str(theirs.fileno()), request],
                                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                    stdout=output, stderr=output, env=env)
        finally:
            theirs.close()
        try:
            data, fds = _receive(ours, proc.pid, timeout)
        except BaseException:  # timed out or interrupted: stop it (ours, by pid)
            proc.kill()
            proc.wait()
            raise
        reply = _reply(data, fds, proc.pid, _exit_status(proc), output, programs)
    names = reply["programs"]
    log.info("%s compiled and loaded by process %d in %.1f s (its peak RSS %.0f MiB)",
             "capture programs" if programs == PROGRAMS else ", ".join(p.name for p in programs), proc.pid, time.monotonic() - started, reply["peak_rss_kib"] / 1024)
    for path, text in reply["warnings"].items():
        log.debug("bcc output for %s:\n%s", path, text)
    try:
        return LoadedPrograms(dict(zip(names, fds)))
    except BaseException:
        _close(fds)
        raise


def _exit_status(proc: subprocess.Popen) -> int:
    """The child's exit status; it exits right after answering (bcc's atexit clean-up)."""
    try:
        return proc.wait(EXIT_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _receive(sock: socket.socket, pid: int, timeout: float) -> tuple[bytes, list[int]]:
    """Everything the child sends until it closes the socket: bytes and fds (CLOEXEC)."""
    data, fds, deadline = bytearray(), [], time.monotonic() + timeout
    try:
        while True:
            sock.settimeout(max(0.0, deadline - time.monotonic()) or 0.001)
            try:
                chunk, ancillary, flags, _ = sock.recvmsg(
                    65536, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                raise CaptureError(f"the compile process {pid} did not answer within {timeout:g} s; "
                                   "it was killed",
                                   "check the machine's load and the kernel headers (scripts/setup)") from None
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += array.array("i", payload[:len(payload) - len(payload) % 4])
            if flags & socket.MSG_CTRUNC:
                raise CaptureError(f"the compile process {pid} sent more than {_MAX_FDS} fds")
            if not chunk:
                return bytes(data), fds
            data += chunk
    except BaseException:
        _close(fds)
        raise


def _reply(data: bytes, fds: list[int], pid: int, rc: int, output,
           programs: tuple[ProgramSpec, ...] = PROGRAMS) -> dict:
    """The child's reply, checked against the fds it sent; its typed error raised."""
    try:
        reply = json.loads(data) if data else None
        if reply is not None and "error" in reply:
            raise from_wire(reply["error"])
        if reply is None:
            output.seek(0)
            said = output.read().decode(errors="replace").strip()[-4000:] or "no output"
            how = f"was killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
            raise CaptureError(f"the compile process {pid} {how} without an answer; its output:\n{said}",
                               "check the kernel headers and bcc (scripts/setup)")
        if sorted(reply["programs"]) != sorted(p.name for p in programs) or len(fds) != len(programs):
            raise CaptureError(f"the compile process {pid} sent programs {reply['programs']} "
                               f"with {len(fds)} fds, not {[p.name for p in programs]}")
    except BaseException:
        _close(fds)
        raise
    return reply


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# ---- the child ----

@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Point fd 2 at a temporary file for the body; yields a reader of what was written
    (bcc and clang write to fd 2 from C)."""
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)

        def read() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")
        try:
            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _load(module, spec: ProgramSpec, output: Callable[[], str]) -> int:
    try:
        return module.load_func(spec.name.encode(), spec.prog_type, attach_type=spec.attach_type).fd
    except Exception as exc:  # bcc raises bare Exception
        if "super-user" in str(exc):
            raise NotPrivileged(["CAP_BPF (loading programs)"]) from None
        reason = str(exc).rsplit(": ", 1)[-1]
        raise VerifierRejected(spec.name, reason, output()) from None


def build(bcc: types.ModuleType, bpf_dir: str, flags: list[str],
          programs: tuple[ProgramSpec, ...] = PROGRAMS) -> tuple[list, dict[str, int], dict[str, str]]:
    """(the bcc modules, which own the fds; program fds by name; bcc's output of a good
    compile by source path). One module per source file."""
    modules, fds, warnings = [], {}, {}
    for source in dict.fromkeys(p.source for p in programs):
        path = os.path.join(bpf_dir, source)
        with _stderr_captured() as output:
            try:
                module = bcc.BPF(src_file=path.encode(), cflags=flags)
            except Exception as exc:  # bcc raises bare Exception
                raise CompileFailed(path, output() or str(exc)) from None
            modules.append(module)
            for spec in (p for p in programs if p.source == source):
                fds[spec.name] = _load(module, spec, output)
            said = output().strip()
        if said:
            warnings[path] = said
    return modules, fds, warnings


def _send(sock: socket.socket, reply: dict, fds: list[int]) -> None:
    data = json.dumps(reply).encode()
    sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])
    sock.sendall(data[sent:])


def main(argv: list[str]) -> int:
    """The child: compile, load, send the fds (or the typed error), exit."""
    fd, request = int(argv[0]), json.loads(argv[1])
    with socket.socket(fileno=fd) as sock:
        try:
            bcc = preflight.check_bcc()
            programs = tuple(BY_NAME[name] for name in request["programs"])
            modules, fds, warnings = build(bcc, request["bpf_dir"], request["flags"], programs)  # held until sent
        except CaptureError as exc:
            _send(sock, {"error": to_wire(exc)}, [])
            return 1
        except Exception as exc:  # a bug or a bcc surprise: still a typed error for the agent
            said = f"compiling the capture programs failed: {exc!r}\n{traceback.format_exc()}"
            _send(sock, {"error": to_wire(CaptureError(said, "a bug in nodeagent or an unexpected bcc: "
                                                             "report it with this message"))}, [])
            return 1
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        _send(sock, {"programs": list(fds), "warnings": warnings, "peak_rss_kib": peak}, list(fds.values()))
    del modules  # the agent holds its own fds now; bcc's atexit clean-up closes these
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
