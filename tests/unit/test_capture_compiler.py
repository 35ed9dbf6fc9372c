"""The compile process's protocol without a kernel (issue 11): typed errors survive the
trip (errors.to_wire/from_wire), the reply and its fds cross a socket intact however
long, and what goes wrong with the child itself (no answer, killed, too slow, a wrong
set of programs) is a CaptureError that closes every fd it was sent.
(tests/kernel/test_load_errors.py and test_agent_footprint.py run the real child.)"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import tempfile
import threading

import pytest

from nodeagent.capture import compiler
from nodeagent.capture.errors import (BccMissing, BpfSyscallError, CaptureError, CompileFailed, NotPrivileged,
                                      VerifierRejected, from_wire, to_wire)
from nodeagent.capture.programs import PROGRAMS
from nodeagent.errors import EnvironmentProblem

NAMES = [p.name for p in PROGRAMS]


@pytest.mark.parametrize("err", [
    CompileFailed("/b/connect.c", "connect.c:3:9: error: use of undeclared identifier 'x'"),
    VerifierRejected("na_connect4", "Permission denied", "0: (b7) r0 = 0\nR1 invalid mem access 'scalar'"),
    NotPrivileged(["CAP_BPF (loading programs)"]),
    BpfSyscallError("pin /sys/fs/bpf/x", 17),
    BccMissing("libbcc.so.0: cannot open shared object file"),
])
def test_typed_errors_survive_the_wire(err):
    back = from_wire(json.loads(json.dumps(to_wire(err))))
    assert type(back) is type(err) and isinstance(back, EnvironmentProblem)
    assert str(back) == str(err) and (back.message, back.hint) == (err.message, err.hint)
    assert vars(back) == vars(err)  # log, program, errno, what...


def test_an_unknown_error_type_comes_back_as_a_capture_error():
    back = from_wire({"type": "NodeagentError", "message": "m", "hint": "h", "attrs": {}})
    assert type(back) is CaptureError and str(back) == "m (h)"


def _pipe_fds(count: int) -> list[int]:
    fds = []
    for _ in range(count):
        fds += os.pipe()
    return fds


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_a_long_reply_and_its_fds_cross_the_socket():
    sent = _pipe_fds(2)
    reply = {"programs": NAMES, "warnings": {"/b/connect.c": "w" * 1_000_000}, "peak_rss_kib": 1}
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = threading.Thread(target=lambda: (compiler._send(theirs, reply, sent), theirs.close()))
        sender.start()
        data, fds = compiler._receive(ours, 1, timeout=10)
        sender.join()
    try:
        assert json.loads(data) == reply and len(fds) == len(sent)
        assert all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)  # never into Envoy
        assert [os.fstat(a).st_ino for a in fds] == [os.fstat(b).st_ino for b in sent]
    finally:
        for fd in fds + sent:
            os.close(fd)


def test_the_childs_typed_error_is_raised_and_fds_closed():
    fds = _pipe_fds(1)
    data = json.dumps({"error": to_wire(VerifierRejected("na_sockops", "Invalid argument", "log"))}).encode()
    with tempfile.TemporaryFile() as output, pytest.raises(VerifierRejected) as err:
        compiler._reply(data, fds, 7, 1, output)
    assert err.value.program == "na_sockops" and all(map(_closed, fds))


def test_a_child_killed_before_answering_is_reported_with_its_output():
    with tempfile.TemporaryFile() as output:
        output.write(b"LLVM ERROR: out of memory\n")
        with pytest.raises(CaptureError, match=r"process 7 was killed by signal 9 .*\n.*LLVM ERROR: out of memory"):
            compiler._reply(b"", [], 7, -9, output)


def test_a_reply_without_every_program_is_refused_and_fds_closed():
    fds = _pipe_fds(1)
    data = json.dumps({"programs": NAMES[:2], "warnings": {}, "peak_rss_kib": 1}).encode()
    with tempfile.TemporaryFile() as output, pytest.raises(CaptureError, match="with 2 fds"):
        compiler._reply(data, fds, 7, 0, output)
    assert all(map(_closed, fds))


def test_a_child_too_slow_to_answer_is_killed():
    with pytest.raises(CaptureError, match="did not answer within 0.001 s; it was killed"):
        compiler.load_programs("/nonexistent", [], logging.getLogger("test"), timeout=0.001)


def test_the_child_sends_bcc_missing_as_a_typed_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)
    ours, theirs = socket.socketpair()
    with ours:
        assert compiler.main([str(theirs.detach()), json.dumps({"bpf_dir": "/b", "flags": []})]) == 1
        data, fds = compiler._receive(ours, 1, timeout=10)
    with tempfile.TemporaryFile() as output, pytest.raises(BccMissing, match="python3-bpfcc"):
        compiler._reply(data, fds, 1, 1, output)
