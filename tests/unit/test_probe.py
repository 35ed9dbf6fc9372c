"""The probe's modes for the tunnel tests and benchmark, on loopback: send (exact bytes,
echo checked), rr (round trips on one connection), stream + sink (throughput)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from nodeagent.bench import probe


class Servers:
    """An echo server (no greeting, like the lab echo app's TCP port) and a probe sink."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def echo(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        async def start():
            self.echo = await asyncio.start_server(echo, "127.0.0.1", 0)
            self.sink = await asyncio.start_server(probe._sink_one, "127.0.0.1", 0)
            self.ready.set()
        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def port(self, server) -> int:
        return server.sockets[0].getsockname()[1]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def servers():
    s = Servers()
    yield s
    s.close()


def test_send_counts_exact_bytes_and_checks_the_echo(servers):
    target = ("127.0.0.1", servers.port(servers.echo))
    result = probe.send(target, 3, 1000, b"MARKER-1", 5)
    assert result == {"sent": 3, "ok": 3, "errors": {}, "bytes_sent": 3000, "bytes_received": 3000}
    sink = ("127.0.0.1", servers.port(servers.sink))  # answers a count, not an echo
    assert probe.send(sink, 2, 10, b"", 5)["errors"] == {"mismatch": 2}


def test_send_to_a_closed_port_counts_refusals():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert probe.send(("127.0.0.1", port), 2, 10, b"", 1)["errors"] == {"refused": 2}


def test_round_trips_and_stream(servers):
    rr = probe.round_trips(("127.0.0.1", servers.port(servers.echo)), 50, 64, 5)
    assert rr["count"] == 50 and set(rr["latency_us"]) == {"p50", "p90", "p99"}
    assert 0 < rr["latency_us"]["p50"] <= rr["latency_us"]["p99"]
    st = probe.stream(("127.0.0.1", servers.port(servers.sink)), 3 << 20, 5)
    assert st["bytes"] == 3 << 20 and st["seconds"] > 0 and st["mib_per_s"] > 0
