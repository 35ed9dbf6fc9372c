"""The kernel feature probes (capture/features.py, probes.py) on this kernel: every
feature the programs use is found with one small load each, without bcc or LLVM in the process; a probe
made to fail (an injected failing bpf(2)) stops the loader before anything is loaded,
with the exact message, or — for the same-node join — leaves capture whole and the join
to splice; a live agent's status shows every probe."""

from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from kernel_sandbox import our_programs
from nodeagent.bench.sandbox import Sandbox, scaled
from nodeagent.capture import bpfsys, features, preflight, probes
from nodeagent.capture.errors import BpfSyscallError, CaptureError, KernelFeatureMissing
from nodeagent.capture.loader import CaptureLoader

RELEASE = os.uname().release


def _failing(what_fails: str, err: int, said: str = ""):
    """bpf(2) as the kernel answers it, except the call named `what_fails`."""
    def bpf(cmd, attr, what):
        if what == what_fails:
            raise BpfSyscallError(f"{what}{said}", err)
        return bpfsys.call(cmd, attr, what)
    return bpf


# What probing costs, as the bpf(2) calls it makes (its time is a few ms on the host,
# ~85 ms under software emulation: not asserted): one tiny map or program per feature,
# no compiler. A new probe adds its calls here.
PROBE_CALLS = {
    "create map type 1": 1, "create map type 6": 1, "create map type 9": 1, "create a sockhash": 3,
    "load a cgroup/connect program (attach type 10)": 1, "load a cgroup/connect program (attach type 11)": 1,
    "load a cgroup/connect4 program calling bpf_get_socket_cookie": 1,
    "load a sockops program calling bpf_get_socket_cookie": 1,
    "load a cgroup/connect4 program calling bpf_get_netns_cookie": 1, "load a sockops program": 1,
    "query the programs on cgroup {cgroup}": 1, "load an sk_lookup program": 2,
    "load an sk_lookup program reading ingress_ifindex": 1, "load an sk_lookup program assigning a sockhash socket": 1,
    "link an sk_lookup program into a netns (BPF_LINK_CREATE)": 1, "update a netns link (BPF_LINK_UPDATE)": 1,
    "read a netns link's info": 1, "load BTF": 1, "load an sk_skb program calling bpf_sk_redirect_hash": 1,
    "attach an sk_skb program to a sockhash (BPF_SK_SKB_VERDICT)": 1, "detach it again": 1,
}


def test_every_feature_is_found_on_this_kernel_with_one_small_load_each(cgroup_dir):
    calls: dict[str, int] = {}

    def counted(cmd, attr, what):
        calls[what] = calls.get(what, 0) + 1
        return bpfsys.call(cmd, attr, what)

    started = time.perf_counter()
    support = features.probe(cgroup_dir, counted)
    print(f"probing took {(time.perf_counter() - started) * 1000:.1f} ms")
    assert [(r.feature.name, r.detail) for r in support.rows if not r.ok] == []
    assert support.release == RELEASE
    assert calls == {what.format(cgroup=cgroup_dir): n for what, n in PROBE_CALLS.items()}


def test_a_refused_probe_keeps_the_verifiers_reason():
    prober = probes.Prober()
    past_the_end = probes._insn(0x61, 2, 1, 4000) + probes.RETURN_1  # r2 = *(u32 *)(ctx + 4000)
    with pytest.raises(BpfSyscallError) as err:
        prober.load("load an sk_lookup program reading past its context", probes.PROG_SK_LOOKUP, past_the_end,
                    bpfsys.ATTACH_SK_LOOKUP)
    assert err.value.message == ("load an sk_lookup program reading past its context: invalid bpf_context "
                                 "access off=4000 size=4: Permission denied (errno 13)")


def test_probing_maps_no_bcc_or_llvm(cgroup_dir):
    code = ("import sys; from nodeagent.capture import features; "
            f"s = features.probe({cgroup_dir!r}); s.check(); "
            "maps = open('/proc/self/maps').read(); "
            "print('bcc' in sys.modules, any(n in maps for n in ('libbcc', 'libLLVM', 'libclang')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(60), check=True)
    assert out.stdout.split() == ["False", "False"]


def test_a_missing_feature_stops_the_loader_before_anything_loads(cgroup_dir, pin_dir, monkeypatch):
    said = ": invalid bpf_context access off=64 size=4"
    bpf = _failing("load an sk_lookup program reading ingress_ifindex", errno.EACCES, said)
    real = features.probe
    monkeypatch.setattr(preflight.features, "probe", lambda cgroup, _bpf: real(cgroup, bpf))
    loader = CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir)
    with pytest.raises(KernelFeatureMissing) as err:
        loader.load()
    assert err.value.message == ("missing kernel feature: the ingress_ifindex field of sk_lookup programs "
                                 f"needs Linux 5.17; this kernel is {RELEASE}")
    assert err.value.hint == (
        'nodeagent needs Linux >= 5.17 (README, "Kernel requirements"); the probes said: sk_lookup_ifindex: '
        "load an sk_lookup program reading ingress_ifindex: invalid bpf_context access off=64 size=4: "
        "Permission denied (errno 13)")
    assert not os.path.exists(pin_dir)
    assert our_programs(cgroup_dir) == {"na_connect4": [], "na_connect6": [], "na_sockops": []}


def test_without_the_same_node_join_capture_loads_and_the_join_says_why(cgroup_dir, pin_dir, monkeypatch):
    attach = "attach an sk_skb program to a sockhash (BPF_SK_SKB_VERDICT)"
    bpf = _failing(attach, errno.EINVAL)
    real = features.probe
    monkeypatch.setattr(preflight.features, "probe", lambda cgroup, _bpf: real(cgroup, bpf))
    with CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir) as loader:
        assert [len(ids) for ids in our_programs(cgroup_dir).values()] == [1, 1, 1]
        with pytest.raises(CaptureError) as err:
            loader.sockmap_join()
        assert str(err.value) == (
            "sk_skb verdict programs on a sockhash (BPF_SK_SKB_VERDICT, bpf_sk_redirect_hash) need Linux 5.13; "
            f"this kernel is {RELEASE} ({attach}: Invalid argument (errno 22)) "
            "(splice(2) joins same-node pairs instead)")
        kernel = loader.stats()["kernel"]
        assert kernel["release"] == RELEASE and kernel["minimum"] == "5.17"
        assert {f["name"]: f["outcome"] for f in kernel["features"] if f["outcome"] != "ok"} == {
            "same_node_join": "missing: fallback: same-node pairs are joined by splice(2) in the agent"}
        assert len(kernel["features"]) == len(features.FEATURES)


def test_a_live_agent_shows_every_probe_in_status(tmp_path):
    sb = Sandbox(f"test-{secrets.token_hex(3)}", workdir=tmp_path)
    try:
        sb.setup()
        sb.write_pods()
        sb.start_agent()
        sb.wait_for(lambda s: s["ready"], 20, "agent ready")
        run = [sys.executable, "-m", "nodeagent", "status", "--socket", str(sb.admin_socket)]
        kernel = json.loads(subprocess.run(run + ["-o", "json"], capture_output=True, text=True,
                                           check=True).stdout)["capture"]["kernel"]
        assert (kernel["release"], kernel["minimum"]) == (RELEASE, "5.17")
        assert [(f["name"], f["outcome"]) for f in kernel["features"]] == [(f.name, "ok") for f in features.FEATURES]
        lines = subprocess.run(run, capture_output=True, text=True, check=True).stdout.splitlines()
        start = lines.index(f"KERNEL FEATURES (Linux {RELEASE}; nodeagent needs >= 5.17)")
        rows = [line.split() for line in lines[start + 2:start + 2 + len(features.FEATURES)]]
        assert rows == [[f.name, f.since, "ok"] for f in features.FEATURES]
    finally:
        left = sb.close()
        assert left == [] and sb.leftovers() == []


def test_the_probe_command_prints_one_line_per_feature(cgroup_dir):
    out = subprocess.run([sys.executable, "-m", "nodeagent.capture.preflight", "--cgroup", cgroup_dir],
                         capture_output=True, text=True, timeout=scaled(60))
    assert (out.returncode, out.stderr) == (0, "")
    assert [line.split() for line in out.stdout.splitlines()] == [[f.name, f.since, "ok"] for f in features.FEATURES]
