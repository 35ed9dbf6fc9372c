"""The figures of `nodeagent bench mesh`, from the rounds' raw measurements to the table
and the JSON. Pure: no lab, no process.

Per placement (cross-node, same-node) and set-up (direct, nodeagent L4, nodeagent L7
through the client node's waypoint (one per request), nodeagent L7 through the server node's waypoint only, the
Envoy sidecar pair), each round measured every figure of FIGURES. A figure shown
is the median over the rounds; an added latency is the median of the per-round
differences to the direct set-up of the same round (rounds are interleaved, so a slow
moment of the machine hits both sides of a difference). The ratio is nodeagent's shown
figure over the sidecar pair's (none when the anchor's is not positive or nodeagent's
added latency is negative: the noise of the machine, not a cost). Memory is
per node: nodeagent's agent and waypoint Envoy at N meshed pods against N sidecars.

The HTTP sidecar pair reuses its pooled upstream connections for every new client
connection, so its new-connection figures are one loopback accept and pooled requests;
nodeagent L4 carries each client connection end to end (an HBONE stream, a connection to
the app), as a sidecar pair carries a port it does not read. The anchor's TCP proxies on
the app's HTTP port give that L4 anchor (TCP_FIGURES, shown below each table, with L4's
ratio to it); the goals' ratios stay the HTTP pair's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

SETUPS = ("direct", "l4", "l7", "l7s", "envoy")
MESHES = ("l4", "l7", "l7s")  # compared with the anchor
ANCHOR = "envoy"
SETUP_TITLES = {"direct": "DIRECT", "l4": "NODEAGENT L4", "l7": "NODEAGENT L7", "l7s": "L7 SERVER ONLY",
                "envoy": "ENVOY SIDECARS"}
# What the L7 columns measure, said under the tables.
L7_NOTE = ("NODEAGENT L7: a VirtualService and an HTTP AuthorizationPolicy: the client node's waypoint routes and "
           "enforces the server's policy, one waypoint per request (as Istio's ambient waypoint does both), the "
           "agents either side; L7 SERVER ONLY: the HTTP AuthorizationPolicy alone, so only the server node's "
           "waypoint is on the path")
PLACEMENTS = {"cross": "cross-node: client pod on node1, server pod on node2",
              "same": "same-node: client pod and server pod on node1"}
MIB = 1 << 20


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    decimals: int
    added: bool = False  # latency: shown as added to direct's
    higher_better: bool = False
    for_direct: bool = True  # False: direct has no mesh component to measure


FIGURES = (
    Figure("p50_us", "p50 latency, 1 keep-alive connection (us)", 0, added=True),
    Figure("p99_us", "p99 latency, 1 keep-alive connection (us)", 0, added=True),
    Figure("rps", "requests/s, 16 keep-alive connections", 0, higher_better=True),
    Figure("new_p50_us", "p50 latency, new connection per request (us)", 0, added=True),
    Figure("cps", "new connections/s, 16 connections", 0, higher_better=True),
    Figure("gbps", "throughput, 1 TCP stream (Gbit/s)", 2, higher_better=True),
    Figure("cpu_ms_per_1k", "mesh CPU per 1000 requests, 16 conns (ms)", 1, for_direct=False),
)
BY_KEY = {f.key: f for f in FIGURES}
# The anchor's TCP proxies (the L4 anchor), each against nodeagent L4's figure of FIGURES.
TCP_FIGURES = (
    (Figure("tcp_new_p50_us", "p50 latency, new connection per request (us)", 0, added=True), "new_p50_us"),
    (Figure("tcp_cps", "new connections/s, 16 connections", 0, higher_better=True), "cps"),
)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def summarize(rounds: dict[str, list[dict]]) -> dict:
    """{median, table, ratio} of one placement from {set-up: [one dict of figures per round]}."""
    count = len(rounds["direct"])
    if count == 0 or any(len(rounds[s]) != count for s in SETUPS):
        raise ValueError(f"every set-up needs the same number of rounds: { {s: len(rounds[s]) for s in SETUPS} }")
    medians, table = {}, {}
    for setup in SETUPS:
        medians[setup], table[setup] = {}, {}
        for f in FIGURES:
            if setup == "direct" and not f.for_direct:
                medians[setup][f.key] = table[setup][f.key] = None
                continue
            medians[setup][f.key] = median([r[f.key] for r in rounds[setup]])
            if f.added and setup != "direct":
                table[setup][f.key] = median([r[f.key] - d[f.key] for r, d in zip(rounds[setup], rounds["direct"])])
            else:
                table[setup][f.key] = medians[setup][f.key]
    ratio = {s: {f.key: _ratio(table[s][f.key], table[ANCHOR][f.key]) for f in FIGURES} for s in MESHES}
    out = {"median": medians, "table": table, "ratio": ratio}
    if all(f.key in r for r in rounds[ANCHOR] for f, _ in TCP_FIGURES):
        out["tcp_pair"] = _tcp_pair(rounds, table)
    return out


def _tcp_pair(rounds: dict[str, list[dict]], table: dict) -> dict:
    """The L4 anchor's figures (the HTTP pair's rounds measured them too) and nodeagent
    L4's ratio to each; an added latency is to direct's new-connection figure."""
    anchor, ratio = {}, {}
    for f, mesh_key in TCP_FIGURES:
        values = [r[f.key] - d[mesh_key] if f.added else r[f.key]
                  for r, d in zip(rounds[ANCHOR], rounds["direct"])]
        anchor[f.key] = median(values)
        ratio[mesh_key] = _ratio(table["l4"][mesh_key], anchor[f.key])
    return {"table": anchor, "ratio_l4": ratio}


def _ratio(value: float | None, anchor: float | None) -> float | None:
    """value / anchor; None when either is missing, the anchor's is not positive or the
    value negative (an added latency below zero is the machine's noise, not a cost)."""
    if value is None or anchor is None or anchor <= 0 or value < 0:
        return None
    return value / anchor


def rss_summary(samples: dict[int, dict[str, dict[str, int]]], sidecar_bytes: dict[str, int]) -> dict:
    """Memory per node at each pod count. `samples`: {pods per node: {node: {"agent": bytes,
    "waypoint": bytes}}}; `sidecar_bytes`: {sidecar: RSS bytes} of the anchor's sidecars."""
    sidecar = statistics.mean(sidecar_bytes.values()) / MIB
    rows = {}
    for pods, nodes in sorted(samples.items()):
        agent = statistics.mean(n["agent"] for n in nodes.values()) / MIB
        waypoint = statistics.mean(n["waypoint"] for n in nodes.values()) / MIB
        rows[str(pods)] = {"nodes": {node: {k: v / MIB for k, v in n.items()} for node, n in nodes.items()},
                           "agent_mib": agent, "waypoint_mib": waypoint, "nodeagent_mib": agent + waypoint,
                           "sidecars_mib": sidecar * pods, "ratio": (agent + waypoint) / (sidecar * pods)}
    return {"sidecar_mib": sidecar, "sidecars": {k: v / MIB for k, v in sidecar_bytes.items()}, "pods": rows}


# --- text --------------------------------------------------------------------------------
LABEL_WIDTH, CELL_WIDTH = 46, 18


def cell(value: float | None, decimals: int, added: bool = False, ratio: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:+.{decimals}f}" if added else f"{value:.{decimals}f}"
    return f"{text} x{ratio:.2f}" if ratio is not None else text


def row(label: str, cells: list[str]) -> str:
    """One line of a placement's table: the label, then the cells right-aligned."""
    return f"{label:<{LABEL_WIDTH}}" + "".join(f"{c:>{CELL_WIDTH}}" for c in cells)


def placement_lines(placement: str, summary: dict) -> list[str]:
    table, ratio = summary["table"], summary["ratio"]
    lines = [PLACEMENTS[placement],
             row("FIGURE", [SETUP_TITLES[s] for s in SETUPS])]
    for f in FIGURES:
        cells = [cell(table["direct"][f.key], f.decimals)]
        cells += [cell(table[s][f.key], f.decimals, f.added, ratio[s][f.key]) for s in MESHES]
        cells.append(cell(table[ANCHOR][f.key], f.decimals, f.added))
        lines.append(row(f.label, cells))
    if "tcp_pair" in summary:
        lines += tcp_pair_lines(summary)
    return lines


def tcp_pair_lines(summary: dict) -> list[str]:
    """The L4 anchor's rows: nodeagent L4 against the sidecars' TCP proxies."""
    table, tcp = summary["table"], summary["tcp_pair"]
    lines = ["the L4 anchor: the sidecar pair's TCP proxies on the app's port (a new upstream mTLS connection per "
             "client connection,", "as sidecars carry a port they do not read; the HTTP pair above reuses pooled "
             "ones); xN: nodeagent L4's figure over it",
             row("FIGURE", ["DIRECT", SETUP_TITLES["l4"], "ENVOY TCP PAIR"])]
    for f, mesh_key in TCP_FIGURES:
        cells = [cell(table["direct"][mesh_key], f.decimals),
                 cell(table["l4"][mesh_key], f.decimals, f.added, tcp["ratio_l4"][mesh_key]),
                 cell(tcp["table"][f.key], f.decimals, f.added)]
        lines.append(row(f.label, cells))
    return lines


RSS_HEADER = ("MESHED PODS/NODE", "AGENT", "WAYPOINT", "NODEAGENT", "SIDECARS", "RATIO")


def rss_lines(rss: dict) -> list[str]:
    lines = [f"memory per node (RSS, MiB): nodeagent's agent + waypoint Envoy (mean of the nodes) against one "
             f"Envoy sidecar per pod ({rss['sidecar_mib']:.1f} MiB each, measured after the runs)",
             "".join(f"{h:>{w}}" for h, w in zip(RSS_HEADER, (16, 10, 10, 11, 10, 8)))]
    for pods, row in rss["pods"].items():
        values = (pods, f"{row['agent_mib']:.1f}", f"{row['waypoint_mib']:.1f}", f"{row['nodeagent_mib']:.1f}",
                  f"{row['sidecars_mib']:.1f}", f"x{row['ratio']:.2f}")
        lines.append("".join(f"{v:>{w}}" for v, w in zip(values, (16, 10, 10, 11, 10, 8))))
    return lines
