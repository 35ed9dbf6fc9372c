"""The kernel lab runner (tests/vm/run, issue 15, item 3) on Debian bullseye's 5.10: the
VM boots under software emulation, the feature probes inside it refuse the kernel with
the agent's exact message, the runner prints that as bullseye's one line, exits 1, runs
no tests there and leaves no qemu behind. ~25 s with the kernel cached (the first run
also fetches it from deb.debian.org into /var/cache/nodeagent/vm)."""

from __future__ import annotations

import json
import pathlib
import subprocess

RUN = pathlib.Path(__file__).resolve().parents[1] / "vm" / "run"
CACHE = pathlib.Path("/var/cache/nodeagent/vm")


def _qemu_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "qemu-system-x86"], capture_output=True, text=True)
    return {int(pid) for pid in out.stdout.split()}


def test_bullseye_stops_at_the_probes_with_the_agents_message(tmp_path):
    before = _qemu_pids()
    out = subprocess.run([str(RUN), "--kernel", "bullseye", "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 1, out.stderr[-2000:]
    kernel = json.loads((CACHE / "kernels" / "bullseye" / "kernel.json").read_text())
    release, package, version = kernel["release"], kernel["package"], kernel["version"]
    assert release.startswith("5.10.") and package == f"linux-image-{release}"
    message = ("missing kernel features: the ingress_ifindex field of sk_lookup programs needs Linux 5.17, "
               f"the SO_NETNS_COOKIE socket option needs Linux 5.14; this kernel is {release} "
               '(nodeagent needs Linux >= 5.17 (README, "Kernel requirements"); the probes said: '
               "sk_lookup_ifindex: load an sk_lookup program reading ingress_ifindex: invalid bpf_context access "
               "off=64 size=4: Permission denied (errno 13); so_netns_cookie: getsockopt(SO_NETNS_COOKIE): "
               "Protocol not available (errno 92))")
    [line] = out.stdout.splitlines()
    assert line.startswith(
        f"bullseye {release} ({package} {version}): stopped by the feature probes: {message}; "
        "probes 11/14 ok (sk_lookup_ifindex: missing: fatal; so_netns_cookie: missing: fatal; "
        "same_node_join: missing: fallback: same-node pairs are joined by splice(2) in the agent); boot "), line
    results = tmp_path / "bullseye"
    assert (results / "uname").read_text().strip() == release
    assert (results / "preflight.rc").read_text().strip() == "1"
    assert (results / "preflight.err").read_text().strip().splitlines()[-1] == message
    probes = json.loads((results / "preflight.json").read_text())
    assert probes["release"] == release and probes["minimum"] == "5.17"
    assert not (results / "junit.xml").exists()  # no test ran on a refused kernel
    assert _qemu_pids() <= before
