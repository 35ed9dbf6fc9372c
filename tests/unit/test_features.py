"""The kernel feature decision table (capture/features.py) without a kernel: probe
results in, fallbacks and fatal messages out, exact strings; the probes' plumbing
(probes.py) with an injected bpf(2) that refuses everything; and how `nodeagent status`
shows the table."""

from __future__ import annotations

import errno

import pytest

from nodeagent.agent import status
from nodeagent.capture import probes
from nodeagent.capture.errors import MIN_KERNEL, BpfSyscallError, KernelFeatureMissing, NotPrivileged
from nodeagent.capture.features import FEATURES, Probe, decide

ALL_OK = {f.name: Probe(True) for f in FEATURES}


def _with(**missing: str) -> dict[str, Probe]:
    return {**ALL_OK, **{name: Probe(False, detail) for name, detail in missing.items()}}


def test_every_feature_found_means_nothing_to_fall_back_on():
    support = decide(ALL_OK, "6.18.44")
    support.check()
    assert [r.outcome for r in support.rows] == ["ok"] * len(FEATURES)
    assert support.describe()["minimum"] == "5.17"
    assert support.describe()["features"][0] == {
        "name": "maps", "what": "hash, LRU hash and per-CPU array maps", "since": "4.10",
        "used_by": "every program's state", "ok": True, "detail": "", "outcome": "ok"}


def test_the_minimum_kernel_is_the_newest_feature_without_fallback():
    def version(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split("."))
    fatal = [f for f in FEATURES if f.fallback is None]
    assert max((version(f.since) for f in fatal)) == version(MIN_KERNEL)


def test_every_feature_has_its_probe():
    assert all(callable(getattr(probes.Prober, f.name, None)) for f in FEATURES)


def test_same_node_join_missing_falls_back_to_splice():
    support = decide(_with(same_node_join="attach: Invalid argument (errno 22)"), "5.10.0-28-amd64")
    support.check()  # a fallback: the agent runs
    assert not support.has("same_node_join") and support.has("sk_lookup")
    assert support.row("same_node_join").outcome == \
        "missing: fallback: same-node pairs are joined by splice(2) in the agent"
    assert support.why_not("same_node_join") == (
        "sk_skb verdict programs on a sockhash (BPF_SK_SKB_VERDICT, bpf_sk_redirect_hash) need Linux 5.13; "
        "this kernel is 5.10.0-28-amd64 (attach: Invalid argument (errno 22))")


def test_one_missing_feature_without_fallback_stops_the_agent():
    detail = "load an sk_lookup program reading ingress_ifindex: invalid bpf_context access off=64 size=4: " \
             "Permission denied (errno 13)"
    support = decide(_with(sk_lookup_ifindex=detail), "5.10.0-28-amd64")
    assert support.row("sk_lookup_ifindex").outcome == "missing: fatal"
    with pytest.raises(KernelFeatureMissing) as err:
        support.check()
    assert err.value.message == ("missing kernel feature: the ingress_ifindex field of sk_lookup programs needs "
                                 "Linux 5.17; this kernel is 5.10.0-28-amd64")
    assert err.value.hint == ('nodeagent needs Linux >= 5.17 (README, "Kernel requirements"); the probes said: '
                              f"sk_lookup_ifindex: {detail}")


def test_several_missing_features_are_named_in_table_order():
    support = decide(_with(sk_lookup="EINVAL", sk_assign="EINVAL", same_node_join="EINVAL"), "5.4.0")
    with pytest.raises(KernelFeatureMissing) as err:
        support.check()
    assert err.value.message == (
        "missing kernel features: sk_lookup programs need Linux 5.9, bpf_sk_assign of a sockhash socket in "
        "sk_lookup programs needs Linux 5.9; this kernel is 5.4.0")
    assert [r.feature.name for r in support.fatal] == ["sk_lookup", "sk_assign"]


def test_a_feature_not_probed_counts_as_missing():
    results = dict(ALL_OK)
    del results["sockops"]
    support = decide(results, "6.1.0")
    assert support.row("sockops").detail == "not probed"
    with pytest.raises(KernelFeatureMissing, match=r"^missing kernel feature: sockops programs need Linux 4.13;"):
        support.check()


def test_without_kernel_btf_bcc_loads_the_programs_anyway():
    support = decide(_with(btf="no /sys/kernel/btf/vmlinux: No such file or directory (errno 2)"), "5.15.0")
    support.check()
    assert support.row("btf").outcome == "missing: fallback: bcc loads the programs without it (they use no CO-RE)"


def _refuse(err: int):
    def bpf(cmd, attr, what):
        raise BpfSyscallError(what, err)
    return bpf


def test_probes_through_a_bpf_that_refuses_everything(tmp_path):
    results = probes.Prober(_refuse(errno.EINVAL)).run([f.name for f in FEATURES], str(tmp_path))
    assert results["sk_lookup"] == Probe(False, "load an sk_lookup program: Invalid argument (errno 22)")
    assert results["cgroup_bpf"] == Probe(False, f"query the programs on cgroup {tmp_path}: "
                                                 "Invalid argument (errno 22)")
    # SO_NETNS_COOKIE is a socket option, not bpf(2): this kernel answers it
    assert [name for name, found in results.items() if found.ok and name != "so_netns_cookie"] == []
    support = decide(results, "4.4.0")
    assert [r.feature.name for r in support.rows if r.outcome.startswith("missing: fallback")] == [
        "btf", "same_node_join"]


def test_eperm_means_not_privileged_not_a_missing_feature(tmp_path):
    with pytest.raises(NotPrivileged, match=r"CAP_BPF \(create map type 1\)"):
        probes.Prober(_refuse(errno.EPERM)).run([f.name for f in FEATURES], str(tmp_path))


def test_status_shows_each_feature_and_its_outcome():
    kernel = decide(_with(same_node_join="attach: Invalid argument (errno 22)"), "5.15.0").describe()
    text = status.render_text({"node": "n", "source": {}, "capture": {"kernel": kernel}}, now=0)
    lines = text.splitlines()
    start = lines.index("KERNEL FEATURES (Linux 5.15.0; nodeagent needs >= 5.17)")
    assert lines[start + 1].split() == ["FEATURE", "SINCE", "STATUS"]
    assert lines[start + 2].split() == ["maps", "4.10", "ok"]
    assert lines[start + len(FEATURES) + 1].split(None, 2) == [
        "same_node_join", "5.13",
        "missing: fallback: same-node pairs are joined by splice(2) in the agent (attach: Invalid argument (errno 22))"]
    assert lines[start + len(FEATURES) + 2] == ""
