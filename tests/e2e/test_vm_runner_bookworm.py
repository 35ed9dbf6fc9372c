"""The kernel lab runner (tests/vm/run, issue 15, item 3) on a kernel other than the
host's, in CI: Debian bookworm's 6.1, the oldest Debian kernel the agent supports, boots
under software emulation, the probes find all 14 features, and the probe tests pass
inside it (all but the live agent's, which takes ~6 min under emulation: README, "Kernel
lab"). The runner prints bookworm's one line, exits 0 and leaves no qemu behind.
~3 min with the kernel cached (the first run also fetches it from deb.debian.org into
/var/cache/nodeagent/vm)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import xml.etree.ElementTree as ET

import pytest

RUN = pathlib.Path(__file__).resolve().parents[1] / "vm" / "run"
CACHE = pathlib.Path("/var/cache/nodeagent/vm")
PROBE_TESTS = [
    "test_every_feature_is_found_on_this_kernel_with_one_small_load_each",
    "test_a_refused_probe_keeps_the_verifiers_reason",
    "test_probing_maps_no_bcc_or_llvm",
    "test_a_missing_feature_stops_the_loader_before_anything_loads",
    "test_without_the_same_node_join_capture_loads_and_the_join_says_why",
    "test_the_probe_command_prints_one_line_per_feature",
]


def _qemu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "qemu-system-x86"], capture_output=True, text=True)
    return {int(pid) for pid in out.stdout.split()}


@pytest.mark.timeout(1800)  # the first run fetches the kernel; TCG on a loaded machine
def test_bookworm_passes_the_probes_and_their_tests(tmp_path):
    before = _qemu_pids()
    out = subprocess.run([str(RUN), "--kernel", "bookworm", "--results", str(tmp_path), "--timeout", "1500", "--",
                          "tests/kernel/test_features_probe.py", "-k", "not live_agent"],
                         capture_output=True, text=True, timeout=1800)
    kernel = json.loads((CACHE / "kernels" / "bookworm" / "kernel.json").read_text())
    release, package, version = kernel["release"], kernel["package"], kernel["version"]
    assert release.startswith("6.1.") and package == f"linux-image-{release}"
    [line] = out.stdout.splitlines()
    assert line.startswith(f"bookworm {release} ({package} {version}): 6 passed, 0 failed, 0 errors, 0 skipped; "
                           "probes 14/14 ok; boot "), (line, out.stderr[-2000:])
    assert out.returncode == 0
    results = tmp_path / "bookworm"
    assert (results / "uname").read_text().strip() == release
    assert (results / "preflight.rc").read_text().strip() == "0"
    probes = json.loads((results / "preflight.json").read_text())
    assert probes["release"] == release
    cases = {case.get("name"): [child.tag for child in case] for case in ET.parse(results / "junit.xml").iter("testcase")}
    assert cases == {name: [] for name in PROBE_TESTS}
    assert _qemu_pids() <= before
