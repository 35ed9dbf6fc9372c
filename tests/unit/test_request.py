"""The request tool (nodeagent/lab/request.py) against the echo app and against small
loopback servers that misbehave on purpose: exact counts by code, pod, version and error
kind, connection reuse, headers and bodies sent, JSON/text output and exit codes."""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import http.server
import json
import re
import socket
import struct
import threading

import pytest

from lab_echo_process import EchoProcess
from nodeagent.errors import ConfigError
from nodeagent.lab import request
from nodeagent.lab.request import Summary, Target, error_kind, parse_headers, send

ENV = {"POD_NAME": "echo-v2-xyz", "POD_LABELS": json.dumps({"app": "echo", "version": "v2"}),
       "ECHO_SEED": "42"}
SEEDED_503_OF_1000 = 308  # as in test_echo: the count does not depend on request order


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    # Not quiet: the access log tells which client port (so which connection) each request used.
    with EchoProcess(tmp_path_factory.mktemp("echo"), ENV, quiet=False) as proc:
        yield proc


def client_ports(echo: EchoProcess, path: str) -> list[str]:
    return [m[1] for line in echo.access_lines()
            if (m := re.match(r'echo: 127\.0\.0\.1:(\d+) "\S+ (\S+) ', line)) and m[2] == path]


def cli(*argv: str, capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    request.add_arguments(parser)
    code = request.run(parser.parse_args(list(argv)))
    return code, capsys.readouterr().out


def test_100_keep_alive_requests_are_100_counted_on_one_connection(echo, capsys):
    code, out = cli(echo.url("/ka"), "--output", "json", capsys=capsys)
    doc = json.loads(out)
    assert code == 0
    assert set(doc) == {"sent", "codes", "pods", "versions", "errors", "latency_ms"}
    assert (doc["sent"], doc["codes"], doc["pods"], doc["versions"], doc["errors"]) == \
        (100, {"200": 100}, {"echo-v2-xyz": 100}, {"v2": 100}, {})
    assert set(doc["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert 0 < doc["latency_ms"]["p50"] <= doc["latency_ms"]["p90"] <= doc["latency_ms"]["p99"] <= \
        doc["latency_ms"]["max"]
    ports = client_ports(echo, "/ka")
    assert len(ports) == 100 and len(set(ports)) == 1


def test_new_connection_per_request(echo):
    summary = send(echo.url("/nc"), count=50, new_connection=True)
    assert (summary.sent, dict(summary.codes)) == (50, {200: 50})
    ports = client_ports(echo, "/nc")
    assert len(ports) == 50 and len(set(ports)) == 50


def test_concurrency_uses_that_many_connections(echo):
    summary = send(echo.url("/cc?delay=0.02"), count=200, concurrency=4)
    assert (summary.sent, dict(summary.codes)) == (200, {200: 200})
    ports = client_ports(echo, "/cc?delay=0.02")
    assert len(ports) == 200 and len(set(ports)) == 4


def test_seeded_fail_counts_exactly(tmp_path):
    with EchoProcess(tmp_path, ENV) as seeded:
        summary = send(seeded.url("/?fail=0.3"), count=1000, concurrency=8)
    assert summary.sent == 1000
    assert dict(summary.codes) == {200: 1000 - SEEDED_503_OF_1000, 503: SEEDED_503_OF_1000}
    assert dict(summary.pods) == {"echo-v2-xyz": 1000}  # 503s from echo still name the pod
    assert summary.ok


def test_status_codes_are_responses_not_errors(echo, capsys):
    code, out = cli(echo.url("/?status=500"), "-n", "7", capsys=capsys)
    assert code == 0
    assert out.splitlines()[:5] == ["sent      7", "codes     500=7", "pods      echo-v2-xyz=7",
                                    "versions  v2=7", "errors    none"]
    assert re.fullmatch(r"latency   p50=\d+\.\dms p90=\d+\.\dms p99=\d+\.\dms max=\d+\.\dms", out.splitlines()[5])


@contextlib.contextmanager
def recorder(reply: bytes = b"plain text, not echo JSON"):
    """A loopback HTTP server that records (method, path, headers, body) of each request."""
    seen: list[tuple[str, str, dict, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _any(self):
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append((self.command, self.path, dict(self.headers), body))
            self.send_response(201)
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        do_GET = do_POST = do_PUT = _any

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_method_headers_and_body_are_sent(capsys):
    with recorder() as (port, seen):
        code, out = cli(f"http://127.0.0.1:{port}/p?q=1", "-n", "3", "-X", "put", "-d", "hello",
                        "-H", "X-Canary: yes", "-H", "Host: web.shop", "--output", "json", capsys=capsys)
    doc = json.loads(out)
    assert code == 0
    # Not echo JSON: counted by code, no pods or versions.
    assert (doc["sent"], doc["codes"], doc["pods"], doc["versions"]) == (3, {"201": 3}, {}, {})
    assert [(m, p, b) for m, p, _, b in seen] == [("PUT", "/p?q=1", b"hello")] * 3
    assert seen[0][2]["X-Canary"] == "yes" and seen[0][2]["Host"] == "web.shop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_is_an_error_and_exit_1(capsys):
    code, out = cli(f"http://127.0.0.1:{free_port()}/", "-n", "5", "--output", "json", capsys=capsys)
    doc = json.loads(out)
    assert code == 1
    assert (doc["sent"], doc["codes"], doc["errors"]) == (5, {}, {"refused": 5})
    assert doc["latency_ms"] == {"p50": None, "p90": None, "p99": None, "max": None}


@contextlib.contextmanager
def misbehaving(action):
    """A loopback server that runs `action(conn)` on each accepted connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()
    held: list[socket.socket] = []

    def loop():
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            held.append(conn)
            action(conn)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def reset(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
    conn.close()


def close_quietly(conn: socket.socket) -> None:
    conn.recv(65536)
    conn.close()


@pytest.mark.parametrize("action, kind", [(reset, "reset"), (close_quietly, "closed"),
                                          (lambda conn: None, "timeout"),
                                          (lambda conn: conn.sendall(b"NOT HTTP\r\n\r\n"), "protocol")])
def test_error_kinds_from_misbehaving_servers(action, kind):
    with misbehaving(action) as port:
        summary = send(f"http://127.0.0.1:{port}/", count=4, timeout=0.3)
    assert (summary.sent, dict(summary.codes), dict(summary.errors)) == (4, {}, {kind: 4})
    assert not summary.ok


def test_error_kind_names():
    assert error_kind(http.client.RemoteDisconnected("x")) == "closed"
    assert error_kind(ConnectionRefusedError()) == "refused"
    assert error_kind(BrokenPipeError()) == "reset"
    assert error_kind(OSError(errno.ENOTCONN, "not connected")) == "reset"  # shutdown() after an RST
    assert error_kind(socket.timeout()) == "timeout"
    assert error_kind(socket.gaierror(socket.EAI_NONAME, "nope")) == "resolve"
    assert error_kind(OSError(errno.EHOSTUNREACH, "no route")) == "unreachable"
    assert error_kind(http.client.IncompleteRead(b"")) == "protocol"
    assert error_kind(OSError(errno.EACCES, "x")) == "other"


def test_latency_percentiles_nearest_rank():
    summary = Summary(latencies_ms=[float(v) for v in range(100, 0, -1)])
    assert summary.latency() == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert Summary(latencies_ms=[7.0]).latency() == {"p50": 7.0, "p90": 7.0, "p99": 7.0, "max": 7.0}


@pytest.mark.parametrize("url, target", [
    ("http://web.shop:8080/a?b=c", Target("web.shop", 8080, "/a?b=c")),
    ("web", Target("web", 80, "/")),
    ("http://[::1]:81", Target("::1", 81, "/")),
])
def test_target_parse(url, target):
    assert Target.parse(url) == target


@pytest.mark.parametrize("call, message", [
    (lambda: Target.parse("https://web/"), "scheme 'https' is not supported"),
    (lambda: Target.parse("http://web:99999/"), "the port is not a number"),
    (lambda: Target.parse("http:///x"), "no host"),
    (lambda: parse_headers(["NoColon"]), "a header must be 'Name: value'"),
    (lambda: send("http://web/", count=0), "-n: must be at least 1"),
    (lambda: send("http://web/", concurrency=0), "--concurrency: must be at least 1"),
    (lambda: send("http://web/", timeout=0), "--timeout: must be a positive number"),
])
def test_bad_arguments_name_what_is_wrong(call, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        call()
