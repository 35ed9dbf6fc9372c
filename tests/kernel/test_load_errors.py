"""What load() says when it cannot load, and what it leaves behind (nothing of its own;
a predecessor's capture untouched).

Broken programs are made by copying bpf/ and breaking one line, then pointing the
loader's bpf_dir at the copy. bcc runs in the loader's compile process
(nodeagent/capture/compiler.py); its errors come back typed, as they were raised there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernel_sandbox import our_programs
from nodeagent.capture.errors import (BpffsMissing, Cgroup2Missing, CompileFailed, PinnedMapMismatch,
                                      VerifierRejected)
from nodeagent.bench.sandbox import scaled
from nodeagent.capture.loader import DEFAULT_BPF_DIR, CaptureLoader
from nodeagent.errors import ConfigError, EnvironmentProblem

FRESH_LOADER = str(Path(__file__).with_name("fresh_loader.py"))
CONNECT4_RETURN = "\treturn na_connect_verdict(code);\n}\n\n/* ::1"


def broken_bpf_dir(tmp_path, replacement: str) -> str:
    """A copy of bpf/ whose na_connect4 ends with `replacement` instead of its return."""
    target = tmp_path / "bpf"
    shutil.copytree(DEFAULT_BPF_DIR, target)
    source = (target / "connect.c").read_text()
    assert CONNECT4_RETURN in source, "connect.c changed: update this test's anchor"
    (target / "connect.c").write_text(source.replace(CONNECT4_RETURN, replacement + "\n}\n\n/* ::1", 1))
    return str(target)


def test_compile_error_carries_clang_output(cgroup_dir, pin_dir, tmp_path):
    loader = CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir,
                           bpf_dir=broken_bpf_dir(tmp_path, "\treturn no_such_symbol;"))
    with pytest.raises(CompileFailed, match="no_such_symbol") as err:
        loader.load()
    assert "connect.c" in str(err.value) and isinstance(err.value, EnvironmentProblem)
    assert not os.path.exists(pin_dir)  # a fresh pin dir is removed again


def test_compile_error_comes_back_from_the_compile_process(cgroup_dir, pin_dir, tmp_path):
    """Issue 11: in a process that never imported bcc, a compile error is the same
    CompileFailed with clang's output, and neither bcc nor LLVM is left mapped there."""
    spec = {"cgroup": cgroup_dir, "pin_dir": pin_dir,
            "bpf_dir": broken_bpf_dir(tmp_path, "\treturn no_such_symbol;")}
    run = subprocess.run([sys.executable, FRESH_LOADER, json.dumps(spec)], capture_output=True, text=True,
                         timeout=scaled(120))
    assert run.returncode == 0, run.stderr
    outcome = json.loads(run.stdout)
    error = outcome["error"]
    assert error["type"] == "CompileFailed" and "connect.c" in error["message"]
    assert "use of undeclared identifier 'no_such_symbol'" in error["message"]  # clang's own words
    assert "no_such_symbol" in error["attrs"]["log"] and error["hint"].startswith("check the kernel headers")
    assert outcome["llvm_or_bcc"] == [] and outcome["bcc_imported"] is False
    assert outcome["children"] == []  # the compile process is gone
    assert our_programs(cgroup_dir) == {"na_connect4": [], "na_connect6": [], "na_sockops": []}
    assert not os.path.exists(pin_dir)


def test_verifier_rejection_carries_the_log(cgroup_dir, pin_dir, tmp_path):
    bad = "\treturn *(int *)(long)ctx->user_ip4; /* a scalar used as a pointer */"
    loader = CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir, bpf_dir=broken_bpf_dir(tmp_path, bad))
    with pytest.raises(VerifierRejected) as err:
        loader.load()
    assert err.value.program == "na_connect4"
    assert "invalid mem access" in str(err.value)  # the kernel's verifier log, verbatim
    assert "Linux >= 5.17" in str(err.value)  # and what to do
    assert our_programs(cgroup_dir) == {"na_connect4": [], "na_connect6": [], "na_sockops": []}
    assert not os.path.exists(pin_dir)


def test_failed_load_leaves_predecessor_in_force(cgroup_dir, pin_dir, tmp_path):
    first = CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir)
    first.load()
    first.enrol_netns(4242)
    first.close(keep=True)
    before = our_programs(cgroup_dir)
    broken = CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir,
                           bpf_dir=broken_bpf_dir(tmp_path, "\treturn *(int *)0;"))
    with pytest.raises(VerifierRejected):
        broken.load()
    broken.close()  # owns nothing: must not touch the predecessor's pins
    assert our_programs(cgroup_dir) == before
    with CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir) as third:
        assert third.enrolled_netns() == {4242}


def test_pinned_map_of_another_layout_is_refused(cgroup_dir, pin_dir):
    os.makedirs(os.path.join(pin_dir, "maps"))
    subprocess.run(["bpftool", "map", "create", os.path.join(pin_dir, "maps", "na_pods"), "type", "hash",
                    "key", "8", "value", "20", "entries", "512", "name", "na_pods"], check=True)
    with pytest.raises(PinnedMapMismatch, match=r"na_pods .*max entries\) is \(1, 8, 20, 512\)"):
        CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir).load()
    assert os.path.exists(os.path.join(pin_dir, "maps", "na_pods"))  # not ours to remove


def test_environment_problems_name_the_fix(cgroup_dir, pin_dir, tmp_path):
    with pytest.raises(Cgroup2Missing, match="does not exist"):
        CaptureLoader(cgroup=cgroup_dir + "/missing", pin_dir=pin_dir).load()
    with pytest.raises(Cgroup2Missing, match="not on a cgroup2 mount"):
        CaptureLoader(cgroup=str(tmp_path), pin_dir=pin_dir).load()
    with pytest.raises(BpffsMissing, match="scripts/setup"):
        CaptureLoader(cgroup=cgroup_dir, pin_dir=str(tmp_path / "pins")).load()
    with pytest.raises(ConfigError, match="pin_dir"):
        CaptureLoader(cgroup=cgroup_dir, pin_dir='/sys/fs/bpf/a"b')
    assert not os.path.exists(pin_dir)
