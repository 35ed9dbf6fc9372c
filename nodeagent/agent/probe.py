"""A tiny TCP probe for measuring capture: run inside pods by the kernel tests and by
`nodeagent bench capture`. Light imports, so it starts fast in any netns.

  python -m nodeagent.agent.probe serve --port 9000
      Greets every connection with the client address as this socket sees it
      ("10.252.0.3:41234\\n") then echoes bytes until EOF. That greeting is how tests
      check that the mesh keeps the client's address, in both directions.
  python -m nodeagent.agent.probe connect HOST:PORT [--count N]
      N sequential connections, each: connect, read the greeting, send a line, read
      it back, close. Prints one JSON object: ok, errors by kind, the peer addresses
      the server reported (counted), latency percentiles in microseconds.
  python -m nodeagent.agent.probe hold HOST:PORT
      One long-lived connection: each stdin line is sent and its echo printed; a
      failure prints "error <kind>". Prints "ready <greeting>" once connected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections import Counter

from nodeagent.lab import request

PAYLOAD = b"ping\n"
PERCENTILES = (50, 90, 99)


def percentiles(values: list[float], points=PERCENTILES) -> dict[str, float]:
    """Nearest-rank percentiles, e.g. {'p50': 12.0, ...}; empty input gives {}."""
    if not values:
        return {}
    ordered = sorted(values)
    return {f"p{p}": ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))] for p in points}


def error_kind(exc: BaseException) -> str:
    """The same names as the lab's request tool; EOF mid-exchange is `closed`."""
    return "closed" if isinstance(exc, EOFError) else request.error_kind(exc)


def _parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _recv_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def exchange(target: tuple[str, int], timeout: float) -> str:
    """One probe connection; returns the peer address the server reported."""
    with socket.create_connection(target, timeout=timeout) as sock:
        greeting = _recv_line(sock).decode().strip()
        sock.sendall(PAYLOAD)
        if _recv_line(sock) != PAYLOAD:
            raise EOFError("echo mismatch")
        return greeting


def connect(target: tuple[str, int], count: int, timeout: float) -> dict:
    errors: Counter[str] = Counter()
    peers: Counter[str] = Counter()
    latencies: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        try:
            greeting = exchange(target, timeout)
        except (OSError, EOFError) as exc:
            errors[error_kind(exc)] += 1
            continue
        latencies.append((time.perf_counter() - start) * 1e6)
        peers[greeting.rpartition(":")[0].strip("[]")] += 1
    return {"sent": count, "ok": len(latencies), "errors": dict(errors), "peers": dict(peers),
            "latency_us": percentiles(latencies)}


def hold(target: tuple[str, int], timeout: float) -> int:
    try:
        sock = socket.create_connection(target, timeout=timeout)
        print("ready", _recv_line(sock).decode().strip(), flush=True)
    except (OSError, EOFError) as exc:
        print("error", error_kind(exc), flush=True)
        return 1
    with sock:
        for line in sys.stdin:
            try:
                sock.sendall(line.encode())
                print(_recv_line(sock).decode().rstrip("\n"), flush=True)
            except (OSError, EOFError) as exc:
                print("error", error_kind(exc), flush=True)
                return 1
    return 0


async def _serve_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    host = f"[{peer[0]}]" if ":" in peer[0] else peer[0]
    try:
        writer.write(f"{host}:{peer[1]}\n".encode())
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    server = await asyncio.start_server(_serve_one, "0.0.0.0", port, reuse_address=True, backlog=1024)
    print(f"probe: serving on 0.0.0.0:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.agent.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, default=9000)
    for name in ("connect", "hold"):
        p = sub.add_parser(name)
        p.add_argument("target", help="HOST:PORT")
        p.add_argument("--timeout", type=float, default=5.0)
        if name == "connect":
            p.add_argument("--count", type=int, default=1)
    args = parser.parse_args(argv)
    if args.mode == "serve":
        try:
            asyncio.run(serve(args.port))
        except KeyboardInterrupt:
            pass
        return 0
    target = _parse_target(args.target)
    if args.mode == "hold":
        return hold(target, args.timeout)
    print(json.dumps(connect(target, args.count, args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
