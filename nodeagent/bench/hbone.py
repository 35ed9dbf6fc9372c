"""Micro-benchmark of the HBONE tunnel on loopback: `python -m nodeagent.bench.hbone`.

Measures, through HBONE (pool -> TLS 1.3 + HTTP/2 CONNECT -> server -> handler) and
through a direct TCP connection (asyncio streams), with the same client code on both:
latency of request-response round trips on one stream (p50/p90/p99) and single-stream
throughput (one way, the receiver counts the bytes and answers at EOF). The servers run
in a child process so client and server do not share one CPU; certificates come from a
throwaway nodeagent CA in a temporary directory. Loopback only, no root; the lab-based
benchmark comes with the agent integration.

`--engines` compares the Python HBONE implementation (nodeagent/tunnel) with the native
engine (native/hbone.c, nodeagent/native/hbone.py), each as client and as server (its own
server child): CPU per new connection (connect, TLS, CONNECT, one 64 B round trip, close;
the client's and the server's process CPU, engine thread included, divided by the
connections) and single-stream throughput. The apps at the ends (echo, sink) run in the
same processes, as small as they can be: their CPU is counted too, alike for both.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import multiprocessing
import socket
import ssl
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from nodeagent.identity import tls as identity_tls
from nodeagent.identity.ca import keys as cakeys
from nodeagent.identity.workload import credentials
from nodeagent.identity.ca.signer import CertificateAuthority
from nodeagent.identity.spiffe import Identity
from nodeagent.tunnel import HboneServer, HbonePool, TunnelMetrics, tls

TRUST_DOMAIN = "cluster.local"
ROLES = {role: Identity(TRUST_DOMAIN, "bench", f"bench-{role}") for role in ("server", "client")}
ECHO, SINK = 1, 2  # authority ports (HBONE) choosing the handler
MIB = 1024 * 1024
LOG = logging.getLogger("nodeagent.bench.hbone")


def make_credentials(directory: Path) -> None:
    """A throwaway root (directory/root.pem) and a key + certificate file per role."""
    ca = CertificateAuthority(TRUST_DOMAIN, cakeys.generate_root(TRUST_DOMAIN, dt.datetime.now(dt.timezone.utc)))
    (directory / "root.pem").write_bytes(ca.root_pem)
    for identity in ROLES.values():
        key = ec.generate_private_key(ec.SECP256R1())
        credentials.write(directory, identity, key, [ca.issue(key.public_key(), identity)], ca.root_pem)


def context(directory: Path, role: str) -> ssl.SSLContext:
    return identity_tls.context(directory / credentials.file_name(ROLES[role]),
                                (directory / "root.pem").read_bytes(), server_side=role == "server")


# --- the server side (child process) ----------------------------------------------------

async def _sink(reader, writer) -> None:
    """Read a length, then that many bytes; answer with the count."""
    (expected,) = struct.unpack("!Q", await reader.readexactly(8))
    total = 0
    while total < expected and (data := await reader.read(MIB)):
        total += len(data)
    writer.write(struct.pack("!Q", total))
    await writer.drain()


async def _echo(reader, writer) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def _serve(pipe, directory: Path) -> None:
    async def on_stream(info, reader, writer):
        writer.respond(200)
        await (_echo if info.authority[1] == ECHO else _sink)(reader, writer)

    server = HboneServer(lambda ip: context(directory, "server"), tls.verifier(TRUST_DOMAIN),
                         on_stream, metrics=TunnelMetrics(CollectorRegistry()), log=LOG)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    serving = asyncio.create_task(server.serve_socket(listener))
    plain = [await asyncio.start_server(lambda r, w, h=handler: _close_after(h(r, w), w), "127.0.0.1", 0, ssl=ssl_ctx)
             for ssl_ctx in (None, context(directory, "server")) for handler in (_echo, _sink)]
    pipe.send((listener.getsockname(), *(srv.sockets[0].getsockname() for srv in plain)))
    await asyncio.get_running_loop().run_in_executor(None, pipe.recv)  # until the parent says stop
    await server.close(grace=1.0)
    serving.cancel()
    listener.close()
    for srv in plain:
        srv.close()


async def _close_after(coro, writer) -> None:
    try:
        await coro
    finally:
        writer.close()


def _server_main(pipe, directory: str) -> None:
    asyncio.run(_serve(pipe, Path(directory)))


# --- --engines: Python and native HBONE side by side -------------------------------------

def _sink_thread(sock: socket.socket) -> None:
    """The sink app on a plain socket (blocking, its own thread): length, bytes, count back."""
    with sock:
        sock.setblocking(True)
        head = b""
        while len(head) < 8 and (chunk := sock.recv(8 - len(head))):
            head += chunk
        (expected,) = struct.unpack("!Q", head)
        total, buf = 0, bytearray(MIB)
        while total < expected and (n := sock.recv_into(buf)):
            total += n
        sock.sendall(struct.pack("!Q", total))
        sock.shutdown(socket.SHUT_WR)


async def _echo_socket(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    with sock:
        while data := await loop.sock_recv(sock, 65536):
            await loop.sock_sendall(sock, data)
        sock.shutdown(socket.SHUT_WR)


async def _serve_engine(pipe, directory: Path, engine: str) -> None:
    """A server child of one engine; answers "cpu" with its process CPU time, stops on "stop"."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    if engine == "python":
        async def on_stream(info, reader, writer):
            writer.respond(200)
            await (_echo if info.authority[1] == ECHO else _sink)(reader, writer)

        server = HboneServer(lambda ip: context(directory, "server"), tls.verifier(TRUST_DOMAIN), on_stream,
                             metrics=TunnelMetrics(CollectorRegistry()), log=LOG)
        serving = asyncio.create_task(server.serve_socket(listener))
    else:
        from nodeagent.native.hbone import HboneEngine, leaf_der

        eng = HboneEngine.start()
        creds = (directory / credentials.file_name(ROLES["server"])).read_bytes()
        server_tls = eng.tls(creds, (directory / "root.pem").read_bytes())
        verify = tls.verifier(TRUST_DOMAIN)
        tasks = set()

        def on_request(request):
            app, theirs = socket.socketpair()
            request.accept(theirs)
            if request.authority.endswith(f":{ECHO}"):
                app.setblocking(False)
                task = loop.create_task(_echo_socket(app))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            else:
                threading.Thread(target=_sink_thread, args=(app,), daemon=True).start()

        async def accept_loop():
            while True:
                sock, _ = await loop.sock_accept(listener)
                eng.serve(sock, server_tls, lambda pem: bool(verify(leaf_der(pem))), on_request)
        serving = asyncio.create_task(accept_loop())
    pipe.send(listener.getsockname())
    while (command := await loop.run_in_executor(None, pipe.recv)) == "cpu":
        pipe.send(time.process_time())
    serving.cancel()
    if engine == "python":
        await server.close(grace=1.0)
    else:
        eng.close()
    listener.close()


def _engine_server_main(pipe, directory: str, engine: str) -> None:
    asyncio.run(_serve_engine(pipe, Path(directory), engine))


class _PythonClient:
    """The Python pool, a new one per connection (pooling would hide the connection's cost)."""

    def __init__(self, directory: Path, address):
        self.directory, self.address = directory, address

    def _pool(self) -> HbonePool:
        return HbonePool(lambda ip, port: socket.socket(), lambda source: context(self.directory, "client"),
                         tls.verifier(TRUST_DOMAIN), metrics=TunnelMetrics(CollectorRegistry()), log=LOG)

    async def one_connection(self, message: bytes) -> None:
        pool = self._pool()
        try:
            stream, _ = await pool.open_stream(ROLES["client"].uri, ROLES["server"].uri, self.address,
                                               ("127.0.0.1", ECHO))
            stream.write(message)
            if await stream.readexactly(len(message)) != message:
                raise RuntimeError("echo differs")
            stream.close()
        finally:
            await pool.close()

    async def throughput(self, megabytes: int) -> float:
        pool = self._pool()
        try:
            stream, _ = await pool.open_stream(ROLES["client"].uri, ROLES["server"].uri, self.address,
                                               ("127.0.0.1", SINK))
            return await throughput(stream, stream, megabytes)
        finally:
            await pool.close()

    def close(self) -> None:
        pass


class _NativeClient:
    """The native engine as client: the app is a socket pair end, used blocking (the
    engine's thread relays meanwhile)."""

    def __init__(self, directory: Path, address):
        from nodeagent.native.hbone import HboneEngine

        self.address = address
        self.eng = HboneEngine.start()
        creds = (directory / credentials.file_name(ROLES["client"])).read_bytes()
        self.tls = self.eng.tls(creds, (directory / "root.pem").read_bytes())

    async def _open(self, port: int):
        conn = await self.eng.connect(socket.create_connection(self.address), self.tls, ROLES["server"].uri)
        app, theirs = socket.socketpair()
        stream = conn.open(theirs, f"127.0.0.1:{port}")
        if await stream.response != 200:
            raise RuntimeError("the server refused the CONNECT")
        return conn, stream, app

    async def one_connection(self, message: bytes) -> None:
        conn, stream, app = await self._open(ECHO)
        with app:
            app.sendall(message)
            got = b""
            while len(got) < len(message) and (chunk := app.recv(len(message) - len(got))):
                got += chunk
            if got != message:
                raise RuntimeError("echo differs")
            app.shutdown(socket.SHUT_WR)
            app.recv(1)  # the echo's FIN
        await stream.ended
        conn.close()
        await conn.closed

    async def throughput(self, megabytes: int) -> float:
        conn, stream, app = await self._open(SINK)
        chunk = b"\xab" * MIB
        with app:
            start = time.perf_counter()
            app.sendall(struct.pack("!Q", megabytes * MIB))
            for _ in range(megabytes):
                app.sendall(chunk)
            received = app.recv(8)
            elapsed = time.perf_counter() - start
        (count,) = struct.unpack("!Q", received)
        if count != megabytes * MIB:
            raise RuntimeError(f"the receiver counted {count} bytes, {megabytes * MIB} were sent")
        await stream.ended
        conn.close()
        await conn.closed
        return megabytes * MIB / elapsed / 1e6

    def close(self) -> None:
        self.eng.close()


async def _measure_engine(engine: str, address, directory: Path, pipe, args) -> dict[str, float]:
    client = (_PythonClient if engine == "python" else _NativeClient)(directory, address)
    try:
        message = b"x" * 64
        for _ in range(10):  # warm-up
            await client.one_connection(message)
        pipe.send("cpu")
        server_start, client_start = pipe.recv(), time.process_time()
        for _ in range(args.connections):
            await client.one_connection(message)
        client_cpu = time.process_time() - client_start
        pipe.send("cpu")
        server_mid, client_mid = pipe.recv(), time.process_time()
        server_cpu = server_mid - server_start
        rate = await client.throughput(args.megabytes)
        client_bulk = time.process_time() - client_mid
        pipe.send("cpu")
        server_bulk = pipe.recv() - server_mid
    finally:
        client.close()
    return {"client_ms": client_cpu / args.connections * 1e3, "server_ms": server_cpu / args.connections * 1e3,
            "throughput": rate, "client_mib_ms": client_bulk / args.megabytes * 1e3,
            "server_mib_ms": server_bulk / args.megabytes * 1e3}


def compare_engines(directory: Path, args) -> dict[str, dict[str, float]]:
    results = {}
    ctx = multiprocessing.get_context("spawn")
    for engine in ("python", "native"):
        parent, child = ctx.Pipe()
        server = ctx.Process(target=_engine_server_main, args=(child, str(directory), engine), daemon=True)
        server.start()
        try:
            if not parent.poll(30):
                raise RuntimeError(f"the {engine} benchmark server did not start")
            address = parent.recv()
            results[engine] = asyncio.run(_measure_engine(engine, address, directory, parent, args))
        finally:
            parent.send("stop")
            server.join(5)
            if server.is_alive():
                server.kill()
                server.join()
    return results


def engines_report(results: dict[str, dict[str, float]], args) -> str:
    rows = (("CPU per new connection, client (ms)", "client_ms", "{:14.3f}"),
            ("CPU per new connection, server (ms)", "server_ms", "{:14.3f}"),
            (f"throughput, one stream (MB/s, {args.megabytes} MiB)", "throughput", "{:14.1f}"),
            ("CPU per MiB of that stream, client (ms)", "client_mib_ms", "{:14.3f}"),
            ("CPU per MiB of that stream, server (ms)", "server_mib_ms", "{:14.3f}"))
    lines = [f"HBONE engines, loopback, server in a child process (Python {sys.version.split()[0]}, "
             f"{ssl.OPENSSL_VERSION})", f"{'':44}" + "".join(f"{name:>14}" for name in results)]
    for label, key, fmt in rows:
        lines.append(f"{label:44}" + "".join(fmt.format(results[name][key]) for name in results))
    lines.append(f"({args.connections} connections: connect, TLS 1.3, CONNECT, one 64 B round trip, close; "
                 "process CPU of each side, engine threads and the apps' own work included; on a busy machine "
                 "the throughput is the share of CPU it got, the CPU figures hold)")
    return "\n".join(lines)


# --- the client side --------------------------------------------------------------------

async def latency(reader, writer, round_trips: int, size: int) -> list[float]:
    """Microseconds per write-and-read-back of `size` bytes, after 100 warm-up trips."""
    message = b"x" * size
    samples = []
    for i in range(round_trips + 100):
        start = time.perf_counter_ns()
        writer.write(message)
        await writer.drain()
        await reader.readexactly(size)
        if i >= 100:
            samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


async def throughput(reader, writer, megabytes: int) -> float:
    """MB/s (10^6 bytes) moving `megabytes` MiB one way, until the receiver has counted them."""
    chunk = b"\xab" * MIB
    start = time.perf_counter()
    writer.write(struct.pack("!Q", megabytes * MIB))
    for _ in range(megabytes):
        writer.write(chunk)
        await writer.drain()
    (received,) = struct.unpack("!Q", await reader.readexactly(8))
    elapsed = time.perf_counter() - start
    if received != megabytes * MIB:
        raise RuntimeError(f"the receiver counted {received} bytes, {megabytes * MIB} were sent")
    return megabytes * MIB / elapsed / 1e6


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[89], cuts[98]


async def run_client(addresses, directory: Path, args) -> dict[str, dict]:
    hbone_addr, tcp_echo, tcp_sink, tls_echo, tls_sink = addresses
    client_ctx = context(directory, "client")
    pool = HbonePool(lambda ip, port: socket.socket(), lambda source: context(directory, "client"),
                     tls.verifier(TRUST_DOMAIN), metrics=TunnelMetrics(CollectorRegistry()), log=LOG)

    async def hbone(port):
        return await pool.open_stream(ROLES["client"].uri, ROLES["server"].uri, hbone_addr, ("127.0.0.1", port))

    def direct(addr, ssl_ctx=None):
        return asyncio.open_connection(*addr, ssl=ssl_ctx, server_hostname="127.0.0.1" if ssl_ctx else None)
    results = {}
    try:
        for name, open_echo, open_sink in (
                ("direct TCP", lambda: direct(tcp_echo), lambda: direct(tcp_sink)),
                ("TLS 1.3 only", lambda: direct(tls_echo, client_ctx), lambda: direct(tls_sink, client_ctx)),
                ("HBONE", lambda: hbone(ECHO), lambda: hbone(SINK))):
            reader, writer = await open_echo()
            samples = await latency(reader, writer, args.round_trips, args.size)
            writer.close()
            reader, writer = await open_sink()
            results[name] = {"latency": percentiles(samples), "throughput": await throughput(reader, writer,
                                                                                             args.megabytes)}
            writer.close()
    finally:
        await pool.close()
    return results


def report(results: dict[str, dict], args) -> str:
    names = list(results)
    lines = [f"HBONE micro-benchmark, loopback, server in a child process "
             f"(Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION})",
             f"{'':34}" + "".join(f"{n:>14}" for n in names)]
    for i, p in enumerate(("p50", "p90", "p99")):
        lines.append(f"{f'round trip {p} (µs, {args.size} B)':34}"
                     + "".join(f"{results[n]['latency'][i]:14.1f}" for n in names))
    lines.append(f"{f'throughput (MB/s, {args.megabytes} MiB)':34}"
                 + "".join(f"{results[n]['throughput']:14.1f}" for n in names))
    lines.append(f"({args.round_trips} round trips on one stream each; throughput on one stream, one way)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeagent.bench.hbone", description=__doc__.split("\n")[0])
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="bytes per request and per response")
    parser.add_argument("--megabytes", type=int, default=256, help="MiB for the throughput run")
    parser.add_argument("--engines", action="store_true",
                        help="compare the Python and the native HBONE engines (CPU per connection, throughput)")
    parser.add_argument("--connections", type=int, default=500, help="new connections measured (--engines)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hbone-bench-") as tmp:
        directory = Path(tmp)
        make_credentials(directory)
        if args.engines:
            print(engines_report(compare_engines(directory, args), args))
            return 0
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        server = ctx.Process(target=_server_main, args=(child, tmp), daemon=True)
        server.start()
        try:
            if not parent.poll(30):
                raise RuntimeError("the benchmark server did not start")
            results = asyncio.run(run_client(parent.recv(), directory, args))
        finally:
            parent.send("stop")
            server.join(5)
            if server.is_alive():
                server.kill()
                server.join()
    print(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
