"""What this kernel offers the capture programs, found by real probes before anything loads.

Each row of FEATURES is one program type, attach type, helper, map type or link kind
that bpf/*.c and the loader use, with the first Linux release that has it and, where
the agent has one, its fallback. `probe()` runs one probe per row (probes.py: minimal
programs, maps and links through raw bpf(2), no bcc or LLVM, a few ms in all);
`decide()` is pure: probe results in, a KernelSupport out, which says per row ok /
missing → fallback / missing → fatal, and raises KernelFeatureMissing naming each
missing feature and the release that brings it. See docs/design.md, "Kernel feature
probing".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from nodeagent.capture import bpfsys
from nodeagent.capture.errors import MIN_KERNEL, KernelFeatureMissing
from nodeagent.capture.probes import Probe, Prober, Syscall


@dataclass(frozen=True)
class Feature:
    name: str
    what: str  # subject of "... need(s) Linux X"
    since: str  # first Linux release that has it
    used_by: str
    fallback: str | None = None  # what the agent does without it; None: it cannot run
    verb: str = "need"


FEATURES = (
    Feature("maps", "hash, LRU hash and per-CPU array maps", "4.10", "every program's state"),
    Feature("sockhash", "sockhash maps", "4.18", "inbound steering (na_inbound)"),
    Feature("cgroup_sock_addr", "cgroup/connect4 and cgroup/connect6 programs", "4.17", "outbound capture"),
    Feature("socket_cookie", "bpf_get_socket_cookie in cgroup/connect and sockops programs", "4.19",
            "original destinations"),
    Feature("netns_cookie", "bpf_get_netns_cookie in cgroup/connect programs", "5.7",
            "outbound capture (which netns is meshed)"),
    Feature("sockops", "sockops programs", "4.13", "original destinations"),
    Feature("cgroup_bpf", "BPF programs on a cgroup v2 (BPF_PROG_QUERY)", "4.15", "attaching capture"),
    Feature("sk_lookup", "sk_lookup programs", "5.9", "inbound steering"),
    Feature("sk_lookup_ifindex", "the ingress_ifindex field of sk_lookup programs", "5.17",
            "inbound steering (loopback is never steered)", verb="needs"),
    Feature("sk_assign", "bpf_sk_assign of a sockhash socket in sk_lookup programs", "5.9", "inbound steering",
            verb="needs"),
    Feature("netns_links", "BPF links of sk_lookup programs into a network namespace", "5.9",
            "inbound steering (pinned links survive restarts)"),
    Feature("so_netns_cookie", "the SO_NETNS_COOKIE socket option", "5.14", "finding pod netns by cookie",
            verb="needs"),
    Feature("btf", "BTF (BPF_BTF_LOAD and /sys/kernel/btf/vmlinux, CONFIG_DEBUG_INFO_BTF=y)", "5.4",
            "bcc's program loading (line info in verifier logs)", verb="needs",
            fallback="bcc loads the programs without it (they use no CO-RE)"),
    Feature("same_node_join", "sk_skb verdict programs on a sockhash (BPF_SK_SKB_VERDICT, bpf_sk_redirect_hash)",
            "5.13", "the same-node fast path's in-kernel join",
            fallback="same-node pairs are joined by splice(2) in the agent"),
)
BY_NAME = {f.name: f for f in FEATURES}


# ---- decision (pure) ----

@dataclass(frozen=True)
class Row:
    feature: Feature
    ok: bool
    detail: str

    @property
    def outcome(self) -> str:
        if self.ok:
            return "ok"
        return f"missing: fallback: {self.feature.fallback}" if self.feature.fallback else "missing: fatal"


@dataclass(frozen=True)
class KernelSupport:
    release: str
    rows: tuple[Row, ...]

    def row(self, name: str) -> Row:
        return next(r for r in self.rows if r.feature.name == name)

    def has(self, name: str) -> bool:
        return self.row(name).ok

    @property
    def fatal(self) -> list[Row]:
        return [r for r in self.rows if not r.ok and r.feature.fallback is None]

    def why_not(self, name: str) -> str:
        """One missing feature in a sentence: what, the release that brings it, this one."""
        row = self.row(name)
        f = row.feature
        return f"{f.what} {f.verb} Linux {f.since}; this kernel is {self.release} ({row.detail})"

    def check(self) -> None:
        """Raise KernelFeatureMissing naming every missing feature that has no fallback."""
        fatal = self.fatal
        if not fatal:
            return
        needs = ", ".join(f"{r.feature.what} {r.feature.verb} Linux {r.feature.since}" for r in fatal)
        said = "; ".join(f"{r.feature.name}: {r.detail}" for r in fatal)
        raise KernelFeatureMissing(
            f"missing kernel feature{'s' if len(fatal) > 1 else ''}: {needs}; this kernel is {self.release}",
            f"nodeagent needs Linux >= {MIN_KERNEL} (README, \"Kernel requirements\"); the probes said: {said}")

    def describe(self) -> dict:
        return {"release": self.release, "minimum": MIN_KERNEL,
                "features": [{"name": r.feature.name, "what": r.feature.what, "since": r.feature.since,
                              "used_by": r.feature.used_by, "ok": r.ok, "detail": r.detail,
                              "outcome": r.outcome} for r in self.rows]}


def decide(results: dict[str, Probe], release: str) -> KernelSupport:
    """Probe results (by feature name) → what the agent can use; a feature not probed is missing."""
    rows = []
    for feature in FEATURES:
        found = results.get(feature.name, Probe(False, "not probed"))
        rows.append(Row(feature, found.ok, found.detail))
    return KernelSupport(release, tuple(rows))


def probe(cgroup: str, bpf: Syscall = bpfsys.call, release: str | None = None) -> KernelSupport:
    """Probe this kernel (every row of FEATURES) and decide; nothing raised for missing features."""
    return decide(Prober(bpf).run([f.name for f in FEATURES], cgroup), release or os.uname().release)
