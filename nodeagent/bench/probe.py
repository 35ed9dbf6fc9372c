"""A tiny TCP probe for measuring capture: run inside pods by the kernel tests and by
`nodeagent bench capture`. Light imports, so it starts fast in any netns.

  python -m nodeagent.bench.probe serve --port 9000
      Greets every connection with the client address as this socket sees it
      ("10.252.0.3:41234\\n") then echoes bytes until EOF. That greeting is how tests
      check that the mesh keeps the client's address, in both directions.
  python -m nodeagent.bench.probe connect HOST:PORT [--count N]
      N sequential connections, each: connect, read the greeting, send a line, read
      it back, close. Prints one JSON object: ok, errors by kind, the peer addresses
      the server reported (counted), latency percentiles in microseconds.
  python -m nodeagent.bench.probe hold HOST:PORT [--no-greeting]
      One long-lived connection: each stdin line is sent and its echo printed; a
      failure prints "error <kind>". Prints "ready <greeting>" once connected.
  python -m nodeagent.bench.probe send HOST:PORT --count N --bytes B [--marker M]
      For an echo server without greeting (the lab echo app's TCP port): N
      connections, each sends exactly B bytes (starting with M), half-closes and
      reads the echo to EOF. JSON: ok (echo complete and equal), errors by kind
      ("mismatch" when something else came back), bytes sent and received.
  python -m nodeagent.bench.probe rr HOST:PORT --count N --size S
      One connection to an echo server, N request/response round trips of S bytes;
      JSON with latency percentiles (microseconds) of the round trips.
  python -m nodeagent.bench.probe sink --port P  /  stream HOST:PORT --bytes B
      Single-stream throughput: `stream` sends B bytes on one connection and
      half-closes; `sink` counts them and answers the count at EOF. JSON: bytes,
      seconds, MiB/s (measured by the sender, until the count came back).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import socket
import subprocess
import sys
import time
from collections import Counter

from nodeagent.bench.timescale import scaled
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


def send(target: tuple[str, int], count: int, size: int, marker: bytes, timeout: float) -> dict:
    payload = (marker + b"." * size)[:size]
    errors: Counter[str] = Counter()
    sent = received = ok = 0
    for _ in range(count):
        try:
            with socket.create_connection(target, timeout=timeout) as sock:
                sock.sendall(payload)
                sent += len(payload)
                sock.shutdown(socket.SHUT_WR)
                echo = _recv_all(sock)
        except (OSError, EOFError) as exc:
            errors[error_kind(exc)] += 1
            continue
        received += len(echo)
        if echo == payload:
            ok += 1
        else:
            errors["mismatch"] += 1
    return {"sent": count, "ok": ok, "errors": dict(errors), "bytes_sent": sent, "bytes_received": received}


def _recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def round_trips(target: tuple[str, int], count: int, size: int, timeout: float) -> dict:
    """`count` echoes of `size` bytes on one connection; latency of each."""
    message, latencies = b"r" * size, []
    with socket.create_connection(target, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(message)
            got = 0
            while got < size:
                chunk = sock.recv(size - got)
                if not chunk:
                    raise EOFError("connection closed")
                got += len(chunk)
            latencies.append((time.perf_counter() - start) * 1e6)
    return {"count": count, "size": size, "latency_us": percentiles(latencies)}


def stream(target: tuple[str, int], total: int, timeout: float) -> dict:
    chunk = b"s" * (1 << 20)
    with socket.create_connection(target, timeout=timeout) as sock:
        start, left = time.perf_counter(), total
        while left > 0:
            left -= sock.send(chunk[:left])
        sock.shutdown(socket.SHUT_WR)
        counted = int(_recv_line(sock))
        seconds = time.perf_counter() - start
    if counted != total:
        raise EOFError(f"the sink counted {counted} bytes of {total}")
    return {"bytes": total, "seconds": seconds, "mib_per_s": total / seconds / (1 << 20)}


async def _sink_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    try:
        while data := await reader.read(1 << 20):
            total += len(data)
        writer.write(f"{total}\n".encode())
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def hold(target: tuple[str, int], timeout: float, greeting: bool = True) -> int:
    try:
        sock = socket.create_connection(target, timeout=timeout)
        print("ready", _recv_line(sock).decode().strip() if greeting else "", flush=True)
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


class HoldClient:
    """Drives `probe hold` running in `proc` (text pipes on stdin and stdout): its greeting,
    then lines echoed back one by one. For tests that keep a connection open meanwhile."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        first = self._line()
        assert first.startswith("ready"), f"probe hold did not connect: {first!r}"
        self.greeting = first.removeprefix("ready").strip()

    def _line(self, timeout: float = 10.0) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], scaled(timeout))
        assert ready, "no answer on the held connection"
        return self.proc.stdout.readline().strip()

    def echo(self, text: str) -> str:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self._line()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(scaled(5))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()


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


async def serve(port: int, handler=_serve_one) -> None:
    server = await asyncio.start_server(handler, "0.0.0.0", port, reuse_address=True, backlog=1024)
    print(f"probe: serving on 0.0.0.0:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.bench.probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("serve", "sink"):
        sub.add_parser(name).add_argument("--port", type=int, default=9000)
    for name in ("connect", "hold", "send", "rr", "stream"):
        p = sub.add_parser(name)
        p.add_argument("target", help="HOST:PORT")
        p.add_argument("--timeout", type=float, default=scaled(5.0))
        p.add_argument("--count", type=int, default=1)
        p.add_argument("--bytes", type=int, default=1024)
        p.add_argument("--size", type=int, default=64)
        p.add_argument("--marker", default="")
        p.add_argument("--no-greeting", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.mode in ("serve", "sink"):
        try:
            asyncio.run(serve(args.port, _serve_one if args.mode == "serve" else _sink_one))
        except KeyboardInterrupt:
            pass
        return 0
    target = _parse_target(args.target)
    if args.mode == "hold":
        return hold(target, args.timeout, greeting=not args.no_greeting)
    if args.mode == "send":
        result = send(target, args.count, args.bytes, args.marker.encode(), args.timeout)
    elif args.mode == "rr":
        result = round_trips(target, args.count, args.size, args.timeout)
    elif args.mode == "stream":
        result = stream(target, args.bytes, args.timeout)
    else:
        result = connect(target, args.count, args.timeout)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
