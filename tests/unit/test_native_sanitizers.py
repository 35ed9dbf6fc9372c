"""The native relay engine under sanitizers: tests/unit/relay_sanity.c drives native/
relay.c through its API alone (bytes both ways with FIN over TCP and unix sockets, a
reset passed on, abort, the relay limit, stop with relays open, free; splice and copy
mode), built once with AddressSanitizer + LeakSanitizer + UBSan and once with
ThreadSanitizer (the engine thread against the caller's add/abort/ends). Any report
fails the run (-fno-sanitize-recover, LeakSanitizer at exit)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from engines import ci_enabled

HERE = Path(__file__).resolve().parent
NATIVE = HERE.parents[1] / "native"
SANITIZERS = {"address": "address,undefined", "thread": "thread"}


@pytest.mark.parametrize("name", SANITIZERS)
def test_the_engine_is_clean_under_sanitizers(tmp_path, name):
    gcc = shutil.which("gcc")
    if gcc is None:
        if ci_enabled():
            pytest.fail("CI: gcc is needed to build the native engine (scripts/setup installs it)", pytrace=False)
        pytest.skip("no gcc")
    binary = tmp_path / f"relay_sanity_{name}"
    subprocess.run([gcc, "-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={SANITIZERS[name]}",
                    "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror", "-std=gnu11", f"-I{NATIVE}",
                    str(HERE / "relay_sanity.c"), str(NATIVE / "relay.c"), "-o", str(binary), "-lpthread"],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60,
                         env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "TSAN_OPTIONS": "halt_on_error=1"})
    assert (run.returncode, run.stdout, run.stderr) == (0, "relay_sanity: ok\n", "")
