"""Micro-benchmark of the data path's socket<->socket relay on loopback, native engine
against the Python path: `python -m nodeagent.bench.relay`.

The relay under test runs in this process exactly as the agent runs it (asyncio accepts,
connects upstream, then `Splicer.splice`); load comes from other processes, so this
process's CPU time is the relay's alone. Measured through the relay and directly (no
relay, the floor):
- stream: iperf3 for S seconds on 1 connection and on 8 (iperf3 is in scripts/setup);
- round trips: 64 B request/response on one connection (p50/p99), from a child process;
- connections: fresh connection + one 64 B round trip + close, one after another (p50,
  connections per second), from the child;
- relay CPU: user+system seconds of this process (its asyncio loop and the native
  engine's thread) per GiB streamed, per connection and per round trip.
`native-copy` (the native engine told never to splice, its read/write fallback) can be
added to --engines to see what splice itself brings. Loopback only, no root. Figures go
in docs/design.md ("Native data path").

Usage: python -m nodeagent.bench.relay [--rounds 3] [--seconds 3] [--round-trips 5000]
       [--connections 2000] [--engines python,native[,native-copy]] [--pipe-size BYTES]
       [--output text|json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time

from nodeagent import native
from nodeagent.agent.proxy.splice import Splicer

LOG = logging.getLogger("bench.relay")
MiB = 1 << 20
MSG = 64
STREAMS = 8


# --- the child: servers and clients ---------------------------------------------------------

def _serve(listener: socket.socket, handle) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)


def _connect(address) -> socket.socket:
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def _round_trips(address, count: int) -> list[float]:
    msg, times = b"x" * MSG, []
    with _connect(address) as sock:
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(msg)
            _exactly(sock, MSG)
            times.append(time.perf_counter() - start)
    return times


def _connections(address, count: int) -> list[float]:
    msg, times = b"x" * MSG, []
    for _ in range(count):
        start = time.perf_counter()
        with _connect(address) as sock:
            sock.sendall(msg)
            _exactly(sock, MSG)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)  # the echo server's EOF: the connection is done end to end
        times.append(time.perf_counter() - start)
    return times


def _scenario(name: str, targets: dict, args: dict) -> dict:
    if name == "rtt":
        rtt = _round_trips(targets["echo"], args["round_trips"])
        return {"rtt_p50": _pct(rtt, 50), "rtt_p99": _pct(rtt, 99)}
    start = time.perf_counter()
    conns = _connections(targets["echo"], args["connections"])
    return {"conn_rate": args["connections"] / (time.perf_counter() - start), "conn_p50": _pct(conns, 50)}


def _pct(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100)[p - 1] * 1e6 if len(values) > 1 else values[0] * 1e6


def child(conn) -> None:
    """The echo server and the clients: tells the server's address, then runs each
    scenario it is sent against the targets it is sent (the server itself, or a relay)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    threading.Thread(target=_serve, args=(listener, _echo), daemon=True).start()
    conn.send({"echo": listener.getsockname()})
    while (message := conn.recv()) is not None:
        name, targets, args = message
        conn.send(_scenario(name, targets, args))


SCENARIOS = ("stream_1", "stream_8", "rtt", "conn")


def iperf3(address, seconds: int, streams: int) -> float:
    """MiB/s iperf3 moved to `address` (an iperf3 server, or a relay to one); retried
    while the server is not listening yet."""
    for attempt in range(50):
        out = subprocess.run(["iperf3", "-c", address[0], "-p", str(address[1]), "-t", str(seconds),
                              "-P", str(streams), "-J"], capture_output=True, text=True, timeout=seconds + 30)
        report = json.loads(out.stdout)
        if "unable to connect" not in report.get("error", ""):
            break
        time.sleep(0.1)
    if "error" in report:
        raise RuntimeError(f"iperf3: {report['error']}")
    return report["end"]["sum_received"]["bytes"] / report["end"]["sum_received"]["seconds"] / MiB


async def _run(name: str, conn, targets: dict, args: dict) -> dict:
    """One scenario: streams by iperf3 from here, the rest by the child."""
    if name.startswith("stream_"):
        streams = 1 if name == "stream_1" else STREAMS
        mib_s = await asyncio.get_running_loop().run_in_executor(None, iperf3, targets["iperf3"], args["seconds"],
                                                                   streams)
        return {name: mib_s, f"{name}_mib": mib_s * args["seconds"]}
    return await _ask(conn, name, targets, args)


# --- this process: the relay under test --------------------------------------------------------

async def _relay_listener(splicer: Splicer, upstream, tasks: set) -> socket.socket:
    """A listener whose connections are relayed to `upstream` as the agent relays them."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setblocking(False)

    async def accept() -> None:
        while True:
            client, _ = await loop.sock_accept(listener)
            tasks.add(loop.create_task(one(client)))

    async def one(client: socket.socket) -> None:
        up = socket.socket()
        up.setblocking(False)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(up, upstream)
        await splicer.splice(client, up)

    tasks.add(loop.create_task(accept()))
    return listener


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _ask(conn, *message):
    conn.send(message)
    return await asyncio.get_running_loop().run_in_executor(None, conn.recv)


async def direct(conn, servers: dict, args: dict) -> dict:
    figures = {}
    for name in SCENARIOS:
        figures.update(await _run(name, conn, servers, args))
    return figures


async def measure(engine: str, conn, servers: dict, args: dict) -> dict:
    """Every scenario through a relay of `engine`, with this process's CPU seconds for
    the streams and the connections."""
    options = {} if engine == "python" else {"copy_only": engine == "native-copy", "pipe_size": args["pipe_size"]}
    splicer = Splicer("python" if engine == "python" else "native", LOG, **options)
    await splicer.start()
    tasks: set[asyncio.Task] = set()
    listeners = {name: await _relay_listener(splicer, address, tasks) for name, address in servers.items()}
    relays = {name: lst.getsockname() for name, lst in listeners.items()}
    figures, cpu = {"engine": splicer.describe()["summary"]}, {}
    try:
        for name in SCENARIOS:
            before = _cpu()
            figures.update(await _run(name, conn, relays, args))
            cpu[name] = _cpu() - before
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in listeners.values():
            listener.close()
        splicer.close()
    streamed_gib = (figures["stream_1_mib"] + figures["stream_8_mib"]) / 1024
    figures["cpu_per_gib"] = (cpu["stream_1"] + cpu["stream_8"]) / streamed_gib
    figures["cpu_per_conn"] = cpu["conn"] / args["connections"] * 1e6
    figures["cpu_per_rtt"] = cpu["rtt"] / args["round_trips"] * 1e6
    return figures


async def run(args: dict) -> dict:
    loop = asyncio.get_running_loop()
    server, port = await loop.run_in_executor(None, iperf3_server, args["iperf3_port"])
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=child, args=(theirs,), daemon=True)
    proc.start()
    try:
        servers = await loop.run_in_executor(None, ours.recv)
        servers["iperf3"] = ("127.0.0.1", port)
        rounds: dict[str, list[dict]] = {"direct": [], **{engine: [] for engine in args["engines"]}}
        for _ in range(args["rounds"]):  # interleaved, so a busy moment hits every column alike
            rounds["direct"].append(await direct(ours, servers, args))
            for engine in args["engines"]:
                rounds[engine].append(await measure(engine, ours, servers, args))
        ours.send(None)
        return {column: _medians(figures) for column, figures in rounds.items()}
    finally:
        server.terminate()
        server.wait()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _medians(rounds: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in rounds) if isinstance(value, (int, float)) else value
            for key, value in rounds[0].items()}


ROWS = [("stream, 1 connection (MiB/s)", "stream_1", "{:.0f}"),
        (f"stream, {STREAMS} connections (MiB/s)", "stream_8", "{:.0f}"),
        ("64 B round trip p50 (us)", "rtt_p50", "{:.0f}"),
        ("64 B round trip p99 (us)", "rtt_p99", "{:.0f}"),
        ("new connection + 64 B round trip p50 (us)", "conn_p50", "{:.0f}"),
        ("connections per second, sequential", "conn_rate", "{:.0f}")]


RELAY_ROWS = [("relay CPU per GiB streamed (s)", "cpu_per_gib", "{:.2f}"),
              ("relay CPU per connection (us)", "cpu_per_conn", "{:.0f}"),
              ("relay CPU per 64 B round trip (us)", "cpu_per_rtt", "{:.1f}")]


def render(results: dict, args: dict) -> str:
    columns = list(results)
    width = max(len(r[0]) for r in ROWS + RELAY_ROWS) + 2
    lines = [f"relay bench: loopback, iperf3 {args['seconds']:g} s on 1 and on {STREAMS} connections, "
             f"{args['round_trips']} round trips, {args['connections']} connections; medians of "
             f"{args['rounds']} interleaved rounds; native pipe size {args['pipe_size']} B",
             "".ljust(width) + "".join(c.rjust(12) for c in columns)]
    for label, key, fmt in ROWS:
        lines.append(label.ljust(width) + "".join(fmt.format(results[c][key]).rjust(12) for c in columns))
    for label, key, fmt in RELAY_ROWS:
        lines.append(label.ljust(width) + "".join(("-" if c == "direct" else fmt.format(results[c][key])).rjust(12)
                                                  for c in columns))
    lines += [f"{c}: {results[c]['engine']}" for c in columns if c != "direct"]
    return "\n".join(lines)


def iperf3_server(port: int) -> tuple[subprocess.Popen, int]:
    """An iperf3 server listening on `port` (0: a free one), and its port. A port found
    free can be taken before iperf3 binds it (iperf3 then exits): another free port is
    tried, up to 5."""
    for _ in range(5):
        chosen = port or _free_port()
        server = subprocess.Popen(["iperf3", "-s", "-p", str(chosen)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while server.poll() is None and time.monotonic() < deadline:
            if _listening(chosen):
                return server, chosen
            time.sleep(0.01)
        server.kill()
        server.wait()
        if port:
            break
    raise RuntimeError(f"iperf3 -s did not listen on {port or 'a free port'} (taken?)")


def _listening(port: int) -> bool:
    """Whether a socket of this netns listens on TCP `port` (/proc/net/tcp, tcp6: state 0A)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="native vs python socket<->socket relay on loopback")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are their medians")
    parser.add_argument("--seconds", type=int, default=3, help="whole seconds of each iperf3 run (at least 1)")
    parser.add_argument("--iperf3-port", type=int, default=0, help="port of the bench's iperf3 server "
                        "(default: a free one)")
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--pipe-size", type=int, default=native.DEFAULT_PIPE_SIZE,
                        help="the native engine's bytes held per direction (default %(default)s)")
    parser.add_argument("--engines", default="python,native", help="comma-separated: python, native, native-copy")
    parser.add_argument("--output", "-o", choices=("text", "json"), default="text")
    ns = parser.parse_args(argv)
    if ns.seconds < 1:
        parser.error("--seconds must be at least 1 (iperf3 runs 0 seconds as forever)")
    args = {"rounds": ns.rounds, "seconds": ns.seconds, "iperf3_port": ns.iperf3_port, "pipe_size": ns.pipe_size,
            "round_trips": ns.round_trips,
            "connections": ns.connections,
            "engines": [e for e in ns.engines.split(",") if e]}
    results = asyncio.run(run(args))
    print(json.dumps(results, indent=2) if ns.output == "json" else render(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
