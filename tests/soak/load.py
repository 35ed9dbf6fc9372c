"""The soak's load, one kind per process, run inside a lab pod by soak.py through
`nodeagent lab exec`. Each kind runs rounds at a fixed cadence for --seconds (or until
SIGTERM/SIGINT), never faster, then prints one JSON object of counts on stdout:
`load.py --seconds S KIND ARGS...`, KIND one of:

  http-keepalive URL --rate N --marker M    N GETs a second on one kept connection
  http-new URL --rate N --marker M          N POSTs a second, a connection each
  tcp HOST:PORT --rate N --marker M         N echo connections a second, 1000 bytes
  resets IP CERT ROOT --streams S --burst B --burst-every K
      a certified HBONE connection a second to IP:15008: S CONNECT streams to IP:8080
      each reset (RST_STREAM CANCEL) right behind its HEADERS, every K-th connection B of
      them, then one good stream that must still get 200 (or the connection ends with
      GOAWAY: counted by error code)
  handshakes IP --concurrent N --hold H
      each round N TCP connections to IP:15008, alternately silent and sending bytes
      that are not a ClientHello, held H seconds, then closed
  plaintext IP --rate N --marker M
      N plaintext HTTP requests (new connection each) to IP:8080 and N TCP sends to
      IP:9000 a second; `accepted` counts those that got any answer from the app

The marker goes into the request headers, the POST body and the TCP payload, so a
capture can tell whether those bytes ever crossed the fabric in the clear. The code
that speaks each protocol is the project's own: nodeagent.lab.request, the probe's
send, tests/e2e/http_hold.py and tests/kernel/hbone_attacker.py (imported, not copied).
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import h2.errors
import h2.exceptions

TESTS = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(TESTS / "kernel"), str(TESTS / "e2e")]

from hbone_attacker import PORT as TUNNEL_PORT, Streams, tls_context  # noqa: E402
from http_hold import HeldClient  # noqa: E402

from nodeagent.bench import probe  # noqa: E402
from nodeagent.lab import request  # noqa: E402

MARKER_HEADER = "X-Soak-Marker"
TCP_BYTES = 1000
TIMEOUT = 5.0
GARBAGE = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"  # plaintext HTTP where a ClientHello belongs


def rounds(seconds: float, interval: float, stop: threading.Event):
    """Round numbers, one every `interval` seconds at most, for `seconds` or until `stop`.
    A round that overran is not made up for: the rate stays bounded."""
    start = time.monotonic()
    number = 0
    while not stop.is_set() and time.monotonic() - start < seconds:
        began = time.monotonic()
        yield number
        number += 1
        stop.wait(max(0.0, began + interval - time.monotonic()))


def http_keepalive(args, stop: threading.Event) -> dict:
    client, out = HeldClient(args.url, timeout=TIMEOUT), Counter()
    for _ in rounds(args.seconds, 1.0, stop):
        result = client.round(args.rate, {MARKER_HEADER: args.marker})
        _count_http(out, result["sent"], result["codes"], result["errors"])
    if client.conn is not None:
        client.conn.close()
    return {**_http_summary(out), "connections": client.connections}


def http_new(args, stop: threading.Event) -> dict:
    out = Counter()
    for _ in rounds(args.seconds, 1.0, stop):
        summary = request.send(args.url, args.rate, new_connection=True, headers={MARKER_HEADER: args.marker},
                               method="POST", body=f"body {args.marker}".encode(), timeout=TIMEOUT)
        _count_http(out, summary.sent, {str(k): v for k, v in summary.codes.items()}, summary.errors)
    return _http_summary(out)


def _count_http(out: Counter, sent: int, codes: dict, errors: dict) -> None:
    out["sent"] += sent
    for code, n in codes.items():
        out["ok" if str(code) == "200" else f"status_{code}"] += n
    for kind, n in errors.items():
        out[kind] += n


def _http_summary(out: Counter) -> dict:
    failed = {k: v for k, v in out.items() if k not in ("sent", "ok")}
    return {"sent": out["sent"], "ok": out["ok"], "failed": failed}


def tcp(args, stop: threading.Event) -> dict:
    host, _, port = args.target.rpartition(":")
    sent = ok = 0
    failed: Counter = Counter()
    for _ in rounds(args.seconds, 1.0, stop):
        result = probe.send((host, int(port)), args.rate, TCP_BYTES, args.marker.encode(), TIMEOUT)
        sent, ok = sent + result["sent"], ok + result["ok"]
        failed.update(result["errors"])
    return {"sent": sent, "ok": ok, "failed": dict(failed)}


def resets(args, stop: threading.Event) -> dict:
    out: Counter = Counter()
    goaway: Counter = Counter()
    for number in rounds(args.seconds, 1.0, stop):
        count = args.burst if args.burst_every and number % args.burst_every == args.burst_every - 1 else args.streams
        out["connections"] += 1
        try:
            outcome = _reset_round(args.ip, args.root, args.cert, count)
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError) as exc:
            out[f"error_{request.error_kind(exc) if isinstance(exc, OSError) else type(exc).__name__}"] += 1
            continue
        out["resets"] += count
        if outcome == 200:
            out["served"] += 1
        elif str(outcome).startswith("goaway "):
            goaway[outcome.removeprefix("goaway ")] += 1
        else:
            out[f"good_stream_{outcome}".replace(" ", "_")] += 1
    return {**{k: out[k] for k in ("connections", "resets", "served")}, "goaway": dict(goaway),
            "failed": {k: v for k, v in out.items() if k not in ("connections", "resets", "served")}}


def _reset_round(ip: str, root: str, cert: str, count: int) -> int | str:
    """One connection: `count` streams reset behind their HEADERS, written at once, then a
    good stream; its status, or 'goaway CODE' when the server ended the connection."""
    raw = socket.create_connection((ip, TUNNEL_PORT), timeout=TIMEOUT)
    with tls_context(root, cert).wrap_socket(raw) as sock:  # the cert is read again: rotation-safe
        streams = Streams(sock)
        authority = f"{ip}:8080"
        for _ in range(count):
            stream_id = streams.conn.get_next_available_stream_id()
            streams.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
            streams.conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        status = streams.response(streams.connect(authority))  # connect() writes the resets first
        if streams.goaway is not None:
            return f"goaway {h2.errors.ErrorCodes(streams.goaway).name}"
        return status


def handshakes(args, stop: threading.Event) -> dict:
    out: Counter = Counter()
    for _ in rounds(args.seconds, args.hold, stop):
        held = []
        for i in range(args.concurrent):
            try:
                sock = socket.create_connection((args.ip, TUNNEL_PORT), timeout=TIMEOUT)
            except OSError as exc:
                out[f"connect_{request.error_kind(exc)}"] += 1
                continue
            out["opened"] += 1
            if i % 2:
                try:
                    sock.sendall(GARBAGE)
                    out["garbage"] += 1
                except OSError:
                    out["garbage_send_failed"] += 1
            else:
                out["silent"] += 1
            held.append(sock)
        stop.wait(args.hold)
        for sock in held:
            out["closed_by_server" if _closed_by_peer(sock) else "held_to_end"] += 1
            sock.close()
    return dict(out)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server has ended the connection (EOF, reset, or an alert then EOF)."""
    sock.setblocking(False)
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(65536):
                return True
    except OSError:
        return True
    return False


def plaintext(args, stop: threading.Event) -> dict:
    attempts, accepted, refused = Counter(), Counter(), Counter()
    for _ in rounds(args.seconds, 1.0, stop):
        summary = request.send(f"http://{args.ip}:8080/", args.rate, new_connection=True,
                               headers={MARKER_HEADER: args.marker}, timeout=TIMEOUT)
        attempts["http"] += summary.sent
        accepted["http"] += sum(summary.codes.values())  # any answer came from the app
        refused.update({f"http_{k}": v for k, v in summary.errors.items()})
        for _ in range(args.rate):
            result = probe.send((args.ip, 9000), 1, TCP_BYTES, args.marker.encode(), TIMEOUT)
            attempts["tcp"] += 1
            if result["bytes_received"]:
                accepted["tcp"] += 1
            else:
                refused.update({f"tcp_{k}": v for k, v in result["errors"].items()})
    return {"attempts": dict(attempts), "accepted": {"http": accepted["http"], "tcp": accepted["tcp"]},
            "refused": dict(refused)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, required=True, help="how long to run")
    sub = parser.add_subparsers(dest="kind", required=True)
    for name, func, target in (("http-keepalive", http_keepalive, "url"), ("http-new", http_new, "url"),
                               ("tcp", tcp, "target"), ("plaintext", plaintext, "ip")):
        p = sub.add_parser(name)
        p.add_argument(target)
        p.add_argument("--rate", type=int, default=10, help="per second")
        p.add_argument("--marker", default="")
        p.set_defaults(func=func)
    p = sub.add_parser("resets")
    p.add_argument("ip")
    p.add_argument("cert", help="key and certificate chain (PEM) of a mesh identity")
    p.add_argument("root", help="the mesh root certificate")
    p.add_argument("--streams", type=int, default=20, help="streams reset per connection")
    p.add_argument("--burst", type=int, default=300, help="streams reset on every --burst-every-th connection")
    p.add_argument("--burst-every", type=int, default=10, help="0: no bursts")
    p.set_defaults(func=resets)
    p = sub.add_parser("handshakes")
    p.add_argument("ip")
    p.add_argument("--concurrent", type=int, default=100, help="connections held per round")
    p.add_argument("--hold", type=float, default=5.0, help="seconds each round holds them")
    p.set_defaults(func=handshakes)
    return parser


def main() -> int:
    args = _parser().parse_args()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    result = args.func(args, stop)
    print(json.dumps({"kind": args.kind, "seconds": round(time.monotonic() - started, 1), **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
