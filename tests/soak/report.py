"""The soak's verdict: the figures side by side (each agent's baseline and end, every
driver's counts, the fabric capture) and the goals of issue 9, each met or missed.
Pure: everything it shows is in the Outcome handed to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fabric import FabricCapture
from footprint import FD_SLACK, Snapshot, fd_limits
from nodeagent.agent.status import table

RSS_GROWTH_LIMIT = 10.0  # percent


@dataclass(frozen=True)
class Outcome:
    lab: str
    warmup: float  # seconds
    load: float  # seconds the load ran
    drained: tuple[float, float]  # seconds waited before the baseline and after the load
    busy: tuple[dict, dict]  # what was still busy when each drain gave up ({} when drained)
    base: Snapshot
    end: Snapshot
    restarts: dict[str, int]  # node -> agent restarts during the soak
    results: dict[str, dict]  # driver name -> load.py's JSON
    capture: FabricCapture  # stopped
    hold: float  # seconds the handshake flood held its connections


def render(o: Outcome) -> str:
    lines = [f"Soak of lab {o.lab}: {o.load / 60:.1f} min of load after a {o.warmup:.0f} s warm-up; "
             f"drained before the baseline in {o.drained[0]:.1f} s{_busy(o.busy[0])}, after the load in "
             f"{o.drained[1]:.1f} s{_busy(o.busy[1])}", "", _agents(o), "", _traffic(o), ""]
    lines += _attacks(o) + [""] + [f"{'ok  ' if ok else 'MISS'}  {text}" for ok, text in goals(o)]
    return "\n".join(lines)


def _agents(o: Outcome) -> str:
    limits, rows = fd_limits(o.base, o.end.pools), []
    for node, b in sorted(o.base.samples.items()):
        e, g = o.end.samples.get(node), growth(o, node)
        rows.append([node, b.pid, f"{b.rss_mib:.1f}", "gone" if e is None else f"{e.rss_mib:.1f}",
                     "-" if g is None else f"{g:+.1f}%", b.fds, "-" if e is None else e.fds, limits[node],
                     f"{o.base.pools.get(node)} -> {o.end.pools.get(node)}", o.restarts[node]])
    return table(["AGENT", "PID", "RSS BASE MiB", "RSS END MiB", "GROWTH", "FDS BASE", "FDS END", "FDS LIMIT",
                  "HBONE POOL", "RESTARTS"], rows)


def _traffic(o: Outcome) -> str:
    rows = []
    for label, name in (("http keep-alive  mesh/client -> backend", "keepalive"),
                        ("http new conn    mesh/client -> backend", "new"),
                        ("tcp echo         mesh/client -> backend", "tcp"),
                        ("control http     legacy/client -> legacy/echo", "control")):
        r = o.results[name]
        rows.append([label, r.get("sent", "-"), r.get("ok", "-"), r["error"] if "error" in r else _counts(r["failed"])])
    return table(["TRAFFIC", "SENT", "OK", "FAILED"], rows)


def _attacks(o: Outcome) -> list[str]:
    r, h, p, c = o.results["resets"], o.results["handshakes"], o.results["plaintext"], o.capture
    other = {k: v for k, v in h.items() if k.startswith("connect_") or k.endswith("_failed")}
    return [
        f"rapid reset      mesh/attacker: {r.get('connections', 0)} HBONE connections, {r.get('resets', 0)} streams "
        f"reset, good stream after them served on {r.get('served', 0)}, GOAWAY {_counts(r.get('goaway'))}, "
        f"failed {_counts(r.get('failed'))}" + _error(r),
        f"handshake flood  legacy/client: {h.get('opened', 0)} connections to :15008 ({h.get('silent', 0)} silent, "
        f"{h.get('garbage', 0)} sending plaintext), closed by the server within {o.hold:g} s "
        f"{h.get('closed_by_server', 0)}, still open {h.get('held_to_end', 0)}, other {_counts(other)}" + _error(h),
        f"plaintext        legacy/client -> STRICT backend: {_counts(p.get('attempts'))} attempts, accepted "
        f"{_counts(p.get('accepted'))}, refused {_counts(p.get('refused'))}" + _error(p),
        f"fabric capture   {c.packets} TCP packets ({c.bytes / 2**20:.0f} MiB), dropped by kernel {c.dropped}, "
        f"secret marker {c.found['secret']}, meshed plaintext packets {c.found['meshed_plaintext']}, control "
        f"marker {c.found['control']}, STRICT-attempt marker {c.found['plain']}"
        + (f" [{c.error}]" if c.error else ""),
    ]


def growth(o: Outcome, node: str) -> float | None:
    """RSS growth of `node`'s agent in percent of its baseline (None: it is gone)."""
    b, e = o.base.samples[node], o.end.samples.get(node)
    return None if e is None else 100.0 * (e.rss_kib - b.rss_kib) / b.rss_kib


def goals(o: Outcome) -> list[tuple[bool, str]]:
    """Each goal: (met, what it is and the figures it was judged on)."""
    nodes = sorted(o.base.samples)
    grown = {n: growth(o, n) for n in nodes}
    limits = fd_limits(o.base, o.end.pools)
    end = {n: o.end.samples.get(n) for n in nodes}
    accepted = o.results["plaintext"].get("accepted")
    mixed = [o.results[k] for k in ("keepalive", "new", "tcp")]
    resets, opened = o.results["resets"].get("resets", 0), o.results["handshakes"].get("opened", 0)
    found, c = o.capture.found, o.capture
    return [
        (all(g is not None and g < RSS_GROWTH_LIMIT for g in grown.values()),
         f"RSS growth < {RSS_GROWTH_LIMIT:g} % on every agent: "
         + ", ".join(f"{n} {'gone' if g is None else f'{g:+.1f}%'}" for n, g in grown.items())),
        (all(end[n] is not None and end[n].fds <= limits[n] for n in nodes),
         f"descriptors back to baseline (limit = baseline + HBONE pool growth + {FD_SLACK}): "
         + ", ".join(f"{n} {o.base.samples[n].fds} -> {end[n].fds if end[n] else 'gone'} (limit {limits[n]})"
                     for n in nodes)),
        (accepted is not None and sum(accepted.values()) == 0 and "error" not in o.results["plaintext"],
         f"0 plaintext accepted by STRICT: {_counts(accepted) if accepted is not None else 'did not run'}"),
        (found["secret"] == 0 and found["meshed_plaintext"] == 0 and c.error is None,
         f"0 plaintext on the fabric: secret marker {found['secret']}, meshed plaintext packets "
         f"{found['meshed_plaintext']}"),
        (c.dropped == 0 and found["control"] > 0,
         f"the capture saw everything: dropped {c.dropped}, plaintext control seen {found['control']} times"),
        (all("error" not in r and r.get("sent", 0) > 0 and r["ok"] == r["sent"] for r in mixed),
         "mixed traffic all answered: " + ", ".join(f"{r.get('ok', 0)}/{r.get('sent', 0)}" for r in mixed)),
        (resets > 0 and opened > 0, f"the attacks ran: {resets} streams reset, {opened} handshake-flood connections"),
        (all(n == 0 for n in o.restarts.values()) and all(end.values()),
         "no agent restarted: " + ", ".join(f"{n} {o.restarts[n]}" for n in nodes)),
    ]


def _counts(counter: dict | None) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counter.items())) if counter else "-"


def _busy(busy: dict) -> str:
    return f" (gave up, still busy: {busy})" if busy else ""


def _error(result: dict) -> str:
    return f" [{result['error']}]" if "error" in result else ""
