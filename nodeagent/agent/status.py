"""`nodeagent status`: what an agent is doing, read from its admin socket and shown as
JSON or as aligned text tables (enrolled pods, pods waiting, workload certificates,
policies in force and refused, HBONE connections, the data path's engine, the kernel
features the probes found, programs, maps and their fill, counters, source errors).
Rendering is a pure function of the status JSON.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, Iterable, Sequence

from nodeagent.agent.config import DEFAULT_ADMIN_SOCKET

LabSocket = Callable[[str | None, str], str]  # (lab name or None for the default, node) → socket


def socket_path(socket: str | None, node: str | None, lab: str | None, lab_socket: LabSocket) -> str:
    """--socket wins; --node [--lab] names a lab agent's socket (`lab_socket`, the lab's
    naming, handed in by the top-level command); else the default."""
    if socket:
        return socket
    if node:
        return lab_socket(lab, node)
    return DEFAULT_ADMIN_SOCKET


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns aligned to their widest cell; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("%"))
        return True
    except ValueError:
        return False


def _ago(when: float | None, now: float) -> str:
    return "-" if not when else f"{max(0.0, now - when):.1f}s ago"


def _section(title: str, body: str) -> str:
    return f"{title}\n{body}" if body else f"{title}\n  (none)"


def _fill(entries: Any, max_entries: Any) -> str:
    try:
        return f"{100.0 * float(entries) / float(max_entries):.1f}%"
    except (TypeError, ValueError, ZeroDivisionError):
        return "-"


def _value(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _at_exit(owner: dict[str, Any] | None) -> list[str]:
    """--on-exit=owner: who owns the agent's pod and what exit would do now."""
    if owner is None:
        return []
    return [f"at exit (owner {owner.get('owner') or 'not read yet'}): {owner.get('at_exit')}"]


def _addresses(pod: dict[str, Any]) -> str:
    """The IP the mesh carries, and a dual-stack pod's other-family ones it refuses."""
    refused = pod.get("refused_ips") or []
    return pod["ip"] + (f" (refused: {', '.join(refused)}, dual-stack)" if refused else "")


def render_text(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    src = status.get("source", {})
    capture = status.get("capture", {})
    out = [f"agent on node {status.get('node')}: pid {status.get('pid')}, version {status.get('version')}, "
           f"{'ready' if status.get('ready') else 'NOT ready'}, started {_ago(status.get('started_at'), now)}",
           f"source {src.get('location')}: {src.get('pods_on_node', 0)} pods on this node, "
           f"model changed {_ago(src.get('model_changed_at'), now)}",
           *_at_exit(src.get("owner")),
           *(f"not ready: {reason}" for reason in status.get("not_ready") or []), ""]
    out.append(_section("ENROLLED PODS", table(
        ["NAMESPACE", "NAME", "IP", "NETNS COOKIE", "ACTIVE OUT", "ACTIVE IN", "ENROLLED"],
        [[p["namespace"], p["name"], _addresses(p), p["netns_cookie"], p.get("active", {}).get("outbound", 0),
          p.get("active", {}).get("inbound", 0), _ago(p.get("enrolled_at"), now)]
         for p in status.get("pods", [])]) if status.get("pods") else ""))
    out.append("")
    out.append(_section("WAITING PODS", table(
        ["NAMESPACE", "NAME", "UID", "INBOUND", "REASON"],
        [[w["namespace"], w["name"], w.get("uid") or "-", w.get("inbound", "-"), w["reason"]]
         for w in status.get("waiting", [])])
        if status.get("waiting") else ""))
    out.append("")
    out.extend(_mesh_sections(status, now))
    if "error" in capture:
        out.append(f"CAPTURE\n  cannot read capture state: {capture['error']}")
    else:
        out.extend(_kernel_lines(capture.get("kernel")))
        programs = capture.get("programs", [])
        out.append(_section("PROGRAMS", table(
            ["NAME", "ID", "ATTACHED TO"],
            [[p.get("name"), p.get("id"), p.get("attach_point")] for p in programs]) if programs else ""))
        out.append("")
        maps = capture.get("maps", [])
        out.append(_section("MAPS", table(
            ["NAME", "ENTRIES", "MAX ENTRIES", "FILL"],
            [[m.get("name"), m.get("entries"), m.get("max_entries"), _fill(m.get("entries"), m.get("max_entries"))]
             for m in maps]) if maps else ""))
        kernel = capture.get("counters", {})
        if kernel:
            out.append("")
            out.append(_section("CAPTURE COUNTERS (kernel)", table(
                ["NAME", "VALUE"], [[k, _value(v)] for k, v in sorted(kernel.items())])))
    out.append("")
    counters = status.get("counters", {})
    out.append(_section("AGENT COUNTERS", table(
        ["NAME", "VALUE"], [[k, _value(v)] for k, v in sorted(counters.items())]) if counters else ""))
    errors = src.get("errors", {})
    out.append("")
    out.append(_section("SOURCE ERRORS", "\n".join(f"  {f}: {m}" for f, m in sorted(errors.items()))))
    return "\n".join(out) + "\n"


def _kernel_lines(kernel: dict[str, Any] | None) -> list[str]:
    """What the feature probes found at start: each feature, the release that has it,
    ok or missing and what the agent does instead (followed by a blank line)."""
    if not kernel:
        return []
    rows = [[f["name"], f["since"], f["outcome"] + (f" ({f['detail']})" if f.get("detail") else "")]
            for f in kernel.get("features", [])]
    title = f"KERNEL FEATURES (Linux {kernel.get('release')}; nodeagent needs >= {kernel.get('minimum')})"
    return [_section(title, table(["FEATURE", "SINCE", "STATUS"], rows) if rows else ""), ""]


def _expires(when: float | None, now: float) -> str:
    return "-" if not when else f"in {max(0.0, when - now) / 3600:.1f}h"


def _mesh_sections(status: dict[str, Any], now: float) -> list[str]:
    """Certificates, policies and tunnel connections (each followed by a blank line)."""
    identity, policy = status.get("identity", {}), status.get("policy", {})
    if identity.get("enabled") is False:
        certs = "  mTLS off: no --ca-address"
    else:
        certs = table(["IDENTITY", "VALID", "EXPIRES", "ROTATES", "FAILURES", "LAST ERROR"],
                      [[i["identity"], "yes" if i.get("valid") else "NO", _expires(i.get("not_after"), now),
                        _expires(i.get("refresh_at"), now), i.get("failures", 0), i.get("error") or "-"]
                       for i in identity.get("identities", [])]) if identity.get("identities") else ""
    policies = table(["POLICY", "DIGEST"], sorted(policy.get("resources", {}).items())) \
        if policy.get("resources") else ""
    tunnel = status.get("tunnel", {})
    return [_section("WORKLOAD CERTIFICATES", certs), "", _section("POLICIES IN FORCE", policies), "",
            _section("POLICY ERRORS", "\n".join(f"  {e}" for e in policy.get("errors", []))), "",
            f"HBONE: {tunnel.get('pooled_connections', 0)} pooled outbound connections, "
            f"{tunnel.get('inbound_connections', 0)} inbound", *_memory_line(status.get("memory")),
            *_open_files_line(status.get("open_files")), "",
            *_data_path_lines(status.get("data_path")),
            *_waypoint_sections(status.get("waypoint"), policy.get("kinds") or {})]


def _open_files_line(files: dict[str, int] | None) -> list[str]:
    if not files:
        return []
    return [f"OPEN FILES: {files['open']} of {files['limit']} ({100 * files['open'] / files['limit']:.0f} %)"]


def _memory_line(memory: dict[str, Any] | None) -> list[str]:
    """What the agent and its waypoint hold, against the container's limit (nodeagent/memory.py)."""
    if not memory or memory.get("usage_bytes") is None:
        return []
    usage, limit, peak = memory["usage_bytes"] >> 20, memory["limit_bytes"], memory["peak_bytes"] >> 20
    sockets = (f"{memory['socket_bytes'] >> 20} MiB of it socket buffers" if memory.get("socket_bytes") is not None
               else "socket buffers not read: no memory cgroup")
    if memory.get("pipe_bytes"):
        sockets += f", {memory['pipe_bytes'] >> 10} KiB in relay pipes"
    if limit is None:
        line = (f"MEMORY: agent and waypoint {usage} MiB resident and in socket buffers ({sockets}, peak {peak}); "
                "no limit (memory_limit_mib=off)")
    else:
        share = (f"{usage} MiB of the {limit >> 20} MiB limit ({100 * memory['usage_bytes'] / limit:.0f} %, {sockets}, "
                 f"peak {peak})")
        line = (f"MEMORY: OVERLOADED, {share}: new connections of pods over their share (from "
                f"{memory['full_at'] * 100:.0f} %: of every pod) are refused until under "
                f"{memory['recover_at'] * 100:.0f} %" if memory["overloaded"] else
                f"MEMORY: {share}; new connections are refused from {memory['overload_at'] * 100:.0f} % for pods "
                f"over their share, from {memory['full_at'] * 100:.0f} % for all ({memory['overload_episodes']} "
                "times so far)")
    return [line, *_shed_line(memory), *_held_line(memory)]


def _shed_line(memory: dict[str, Any]) -> list[str]:
    """Whether the agent resets the sockets holding the most memory at FULL, and how many it did."""
    shedding = memory.get("shedding")
    if shedding is None:
        return []
    done = (f"; {memory['shed_sockets']} reset so far ({memory['shed_bytes'] >> 20} MiB)"
            if memory.get("shed_sockets") else "")
    if shedding == "on":
        return [f"  from {memory['full_at'] * 100:.0f} % the connections holding the most socket memory are "
                f"reset{done}"]
    return [f"  SHEDDING {shedding.upper()}: open connections can take the agent past its limit{done}"]


def _held_line(memory: dict[str, Any]) -> list[str]:
    """How many connections the agent relays, and for which pods the most (of how many
    one pod may hold)."""
    most = memory.get("most_held") or []
    if not memory.get("connections_held"):
        return []
    cap = memory.get("per_pod_cap")
    return [f"  {memory['connections_held']} connections relayed; the most for "
            + ", ".join(f"{m['pod']} ({m['connections']})" for m in most)
            + (f"; at most {cap} a pod (max_connections_per_pod)" if cap else "; no cap per pod")]


def _data_path_lines(data_path: dict[str, Any] | None) -> list[str]:
    """Which engine moves the relays' bytes and why; the native engine's limits and counters."""
    if not data_path:
        return []
    lines = [f"DATA PATH: {data_path['summary']} [data_path_engine={data_path['setting']}]"]
    engine = data_path.get("native")
    if engine:
        lines.append(f"  native engine: {engine['relays_open']} relays open (max {engine['max_relays']}), "
                     f"{engine['relays_total']} total, {engine['relays_failed']} failed, "
                     f"{engine['relays_aborted']} aborted; {engine['bytes_held']} bytes held "
                     f"(at most {engine['pipe_size']} per direction)")
    receive = (data_path.get("hbone") or {}).get("receive")
    if receive:
        line = (f"  HBONE receive budget: {receive['received_held']} received bytes held (peak "
                f"{receive['received_held_peak']}, budget {receive['receive_budget']}); "
                f"{receive['streams_overloaded']} streams reset for it")
        if "send_budget" in receive:
            line += (f"; send budget: {receive['send_held']} bytes from the apps held (peak "
                     f"{receive['send_held_peak']}, budget {receive['send_budget']}); "
                     f"{receive['streams_send_waiting']} streams waiting for it")
        lines.append(line)
    native = (data_path.get("hbone") or {}).get("native")
    if native:
        lines.append(f"  HBONE engine: {native['streams_total']} streams, {native['streams_delivered']} of them "
                     f"delivered by the engine on the agent's routes; {native['route_sockets']} route sockets "
                     f"held, {native['route_failures']} route connects left to the agent")
    return ["\n".join(lines), ""]


def _waypoint_sections(waypoint: dict[str, Any] | None, kinds: dict[str, list[str]]) -> list[str]:
    """The node's waypoint: Envoy, xDS, what is steered through it, its configuration.
    Without one, the verdicts on Istio kinds the agent does not read (`kinds`, from the
    policy state), which the waypoint's configuration problems list otherwise."""
    if not waypoint:
        problems = [f"  error: {e}" for e in kinds.get("errors", [])] + \
            [f"  warning: {w}" for w in kinds.get("warnings", [])]
        return ["WAYPOINT: off (--no-waypoint): L4 only", "",
                _section("ISTIO KINDS NOT READ", "\n".join(problems)), ""]
    envoy, xds, steered = waypoint["envoy"], waypoint["xds"], waypoint["dataplane"]
    state = f"running, pid {envoy['pid']}" if envoy["running"] else f"NOT RUNNING (last exit {envoy['last_exit']})"
    sync = "in sync" if xds["in_sync"] else ("NOT CONNECTED" if not xds["connected"] else "syncing")
    lines = [f"  envoy      {state}, {envoy['restarts']} restarts, user {envoy.get('user', '-')}, "
             f"admin {envoy['admin']}, log {envoy['log']}",
             f"  xds        version {xds['version']}, accepted {xds['accepted']}, {sync}, {xds['nacks']} NACKs",
             f"  steered    outbound {', '.join(steered['outbound']) or '-'}; inbound {', '.join(steered['inbound']) or '-'}",
             f"  sent       {waypoint['connections']['outbound']} outbound, {waypoint['connections']['inbound']} inbound"]
    enforced = steered.get("enforced") or {}
    if enforced:  # one waypoint per request: these routes enforce their endpoints' HTTP policy
        lines.append(f"  enforces   the HTTP policy of the pods behind {', '.join(enforced)} (their node's "
                     "waypoint skipped: one waypoint per request)")
    unsolicited = waypoint.get("unsolicited", {})
    if any(unsolicited.values()):
        lines.append(f"  REFUSED    {unsolicited['upstream']} upstream, {unsolicited['deliver']} deliver connections "
                     "Envoy handed back for none the agent sent it (see the agent's log)")
    if "access_log" in waypoint:
        log = waypoint["access_log"]
        lines.append(f"  requests   {log['lines']} logged by Envoy ({log['unreadable']} unreadable), "
                     f"read from {log['path']}")
    if xds.get("snapshot_error"):
        lines.append(f"  SNAPSHOT REFUSED: {xds['snapshot_error']}")
    for uri, key in sorted(waypoint.get("jwks", {}).get("uris", {}).items()):
        lines.append(f"  jwks       {uri}: {'fetched' if key.get('path') else 'NOT FETCHED'}"
                     + (f" (last error: {key['error']})" if key.get("error") else ""))
    resources = table(["RESOURCE", "DIGEST"], sorted(waypoint.get("resources", {}).items())) \
        if waypoint.get("resources") else ""
    problems = [f"  error: {e}" for e in waypoint.get("errors", [])] + \
        [f"  warning: {w}" for w in waypoint.get("warnings", [])]
    return [_section("WAYPOINT", "\n".join(lines)), "", _section("WAYPOINT CONFIG IN FORCE", resources), "",
            _section("WAYPOINT CONFIG PROBLEMS", "\n".join(problems)), ""]


def render(status: dict[str, Any], output: str) -> str:
    if output == "json":
        return json.dumps(status, indent=2, sort_keys=True) + "\n"
    return render_text(status)
