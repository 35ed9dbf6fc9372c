"""Test helper: the echo app as a real process on 127.0.0.1 ephemeral ports.

The tests run `python -m nodeagent.lab.echo` exactly as the lab would (env vars, argv,
SIGTERM), with stderr in a file rather than a pipe so a chatty access log can never block
it. The process is always stopped, also when a test fails (context manager).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

STARTUP = re.compile(r"^echo: listening http=127\.0\.0\.1:(\d+) tcp=127\.0\.0\.1:(\d+) pod=(\S+)$", re.M)
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def child_env(extra: dict[str, str] | None) -> dict[str, str]:
    """A minimal environment (no POD_* from the test runner) plus `extra`."""
    return {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": os.pathsep.join(sys.path), **(extra or {})}


class EchoProcess:
    def __init__(self, workdir: Path, env: dict[str, str] | None = None, quiet: bool = True,
                 args: tuple[str, ...] = ()):
        self.log_path = workdir / f"echo-{time.monotonic_ns()}.log"
        self.env = child_env(env)
        self.argv = [sys.executable, "-m", "nodeagent.lab.echo", "--bind", "127.0.0.1",
                     "--port", "0", "--tcp-port", "0", *(["--quiet"] if quiet else []), *args]
        self.proc: subprocess.Popen | None = None
        self.http_port = self.tcp_port = 0

    def __enter__(self) -> "EchoProcess":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        try:
            self._wait_started()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = STARTUP.search(self.log())
            if match:
                self.http_port, self.tcp_port = int(match[1]), int(match[2])
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"echo exited with {self.proc.returncode}: {self.log()}")
            time.sleep(0.02)
        raise RuntimeError(f"echo did not start within {START_TIMEOUT}s: {self.log()}")

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if not line.startswith("echo: listening")]

    def stop(self) -> int:
        """SIGTERM and wait; a process that does not exit in time is killed and reported."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"echo ignored SIGTERM for {STOP_TIMEOUT}s") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)


def run_echo(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run echo to completion (for start-up failures), bounded in time."""
    return subprocess.run([sys.executable, "-m", "nodeagent.lab.echo", *args], env=child_env(env), cwd=workdir,
                          capture_output=True, text=True, timeout=START_TIMEOUT)
