"""The echo app (nodeagent/lab/echo.py, lab/http1.py) as a real process on loopback:
exact answer keys and values, keep-alive, bodies, status/delay/fail, the --status default
code, malformed requests, TCP echo, concurrency, access log, SIGTERM and start-up errors."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import socket
import threading
import time

import pytest

from lab_echo_process import EchoProcess, run_echo
from nodeagent.errors import ConfigError
from nodeagent.lab.echo import Echo, Identity, Shape
from nodeagent.lab.http1 import BadRequest

KEYS = {"pod", "namespace", "node", "labels", "method", "path", "headers", "remote_addr", "service_account"}
ENV = {"POD_NAME": "echo-v1-abc", "POD_NAMESPACE": "shop", "NODE_NAME": "node-a",
       "POD_LABELS": json.dumps({"app": "echo", "version": "v1"}), "SERVICE_ACCOUNT": "echo-sa"}
SEED = "42"
SEEDED_503_OF_1000 = 308  # random.Random("42"): draws below 0.3 among the first 1000


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    with EchoProcess(tmp_path_factory.mktemp("echo"), ENV) as proc:
        yield proc


def connect(echo: EchoProcess) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", echo.http_port, timeout=10)
    conn.connect()
    return conn


def ask(conn: http.client.HTTPConnection, path: str = "/", method: str = "GET", **kw):
    conn.request(method, path, **kw)
    response = conn.getresponse()
    body = response.read()
    return response, (json.loads(body) if body else None)


def raw_exchange(echo: EchoProcess, data: bytes) -> bytes:
    """Send raw bytes, then read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", echo.http_port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_answer_has_exactly_the_keys_and_the_pod_identity(echo):
    conn = connect(echo)
    response, doc = ask(conn, "/some/path?x=1&y=two", headers={"X-Test": "abc", "X-Multi": "1"})
    assert response.status == 200
    assert response.getheader("content-type") == "application/json"
    assert set(doc) == KEYS
    client = conn.sock.getsockname()
    assert doc == {"pod": "echo-v1-abc", "namespace": "shop", "node": "node-a",
                   "labels": {"app": "echo", "version": "v1"}, "method": "GET", "path": "/some/path?x=1&y=two",
                   "headers": {"host": f"127.0.0.1:{echo.http_port}", "accept-encoding": "identity",
                               "x-test": "abc", "x-multi": "1"},
                   "remote_addr": f"{client[0]}:{client[1]}", "service_account": "echo-sa"}
    conn.close()


def test_defaults_without_identity_env(tmp_path):
    with EchoProcess(tmp_path) as bare:
        _, doc = ask(connect(bare))
    assert (doc["pod"], doc["namespace"], doc["node"], doc["labels"], doc["service_account"]) == \
        (socket.gethostname(), "default", "", {}, "default")


def test_keep_alive_and_methods_with_bodies(echo):
    conn = connect(echo)
    port = conn.sock.getsockname()[1]
    seen = []
    for method, kw in [("POST", {"body": b"x" * 100_000}),
                       ("PUT", {"body": iter([b"abc", b"d" * 70_000]), "encode_chunked": True}),
                       ("DELETE", {}), ("OPTIONS", {}), ("PURGE", {"body": b""}), ("GET", {})]:
        response, doc = ask(conn, f"/m/{method}", method, **kw)
        assert response.status == 200 and not response.will_close
        seen.append((doc["method"], doc["path"], doc["remote_addr"]))
    # One connection served all of them: same client port every time.
    assert seen == [(m, f"/m/{m}", f"127.0.0.1:{port}") for m in ("POST", "PUT", "DELETE", "OPTIONS", "PURGE", "GET")]
    conn.close()


def test_head_has_length_but_no_body(echo):
    conn = connect(echo)
    response, doc = ask(conn, "/h", "HEAD")
    assert response.status == 200 and doc is None
    assert int(response.getheader("content-length")) > 100
    response, doc = ask(conn, "/after-head")  # the connection is still in step
    assert doc["path"] == "/after-head"


def test_pipelined_requests_and_connection_close(echo):
    out = raw_exchange(echo, b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                             b"GET /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 3
    assert [json.loads(part.split(b"\r\n\r\n", 1)[1])["path"] for part in out.split(b"HTTP/1.1 ")[1:]] == \
        ["/one", "/two", "/three"]
    assert out.split(b"HTTP/1.1 ")[3].lower().count(b"connection: close") == 1


def test_http10_closes_unless_keep_alive(echo):
    out = raw_exchange(echo, b"GET /a HTTP/1.0\r\n\r\nGET /ignored HTTP/1.0\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 1 and b"connection: close" in out


def test_expect_100_continue(echo):
    with socket.create_connection(("127.0.0.1", echo.http_port), timeout=10) as sock:
        sock.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("request_bytes, status, reason", [
    (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
    (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP/2.0 is not served here"),
    (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400, "malformed header line"),
    (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400, "malformed header line"),
    (b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\nabc", 400, "is not one non-negative integer"),
    (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "is not one non-negative integer"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "is not supported"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "malformed chunk size line"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n", 400, "not followed by CRLF"),
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 431, "too long"),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n", 431, "more than 100 headers"),
])
def test_malformed_requests_are_answered_and_closed(echo, request_bytes, status, reason):
    out = raw_exchange(echo, request_bytes)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"connection: close" in head
    doc = json.loads(body)
    assert reason in doc["error"] and doc["pod"] == "echo-v1-abc"


def test_both_framings_answer_then_close(echo):
    out = raw_exchange(echo, b"POST / HTTP/1.1\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 OK") == 1 and b"/smuggled" not in out


@pytest.mark.parametrize("code", [201, 302, 418, 500, 503, 599])
def test_status_parameter(echo, code):
    response, doc = ask(connect(echo), f"/s?status={code}")
    assert response.status == code and doc["path"] == f"/s?status={code}" and doc["pod"] == "echo-v1-abc"


def test_status_204_has_no_body(echo):
    conn = connect(echo)
    response, doc = ask(conn, "/?status=204")
    assert response.status == 204 and doc is None and response.getheader("content-length") is None
    assert ask(conn, "/next")[1]["path"] == "/next"


@pytest.mark.parametrize("query, name", [("status=abc", "status"), ("status=199", "status"),
                                         ("status=600", "status"), ("status=2e2", "status"),
                                         ("delay=-1", "delay"), ("delay=nan", "delay"), ("delay=301", "delay"),
                                         ("fail=1.5", "fail"), ("fail=x", "fail")])
def test_bad_parameters_get_400_naming_them(echo, query, name):
    conn = connect(echo)
    response, doc = ask(conn, f"/?{query}")
    assert response.status == 400
    assert doc["error"].startswith(f"query parameter {name} must be a number from ")
    assert ask(conn, "/still-open")[0].status == 200  # a bad parameter is not a bad connection


def test_delay(echo):
    conn = connect(echo)
    started = time.monotonic()
    response, _ = ask(conn, "/?delay=0.3")
    assert response.status == 200 and time.monotonic() - started >= 0.3
    assert ask(conn, "/?delay=0&status=202")[0].status == 202


def test_delay_sleeps_exactly_what_the_query_asks_and_delay_0_not_at_all():
    """In process, with the sleep recorded instead of waited: no wall-clock bound."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def main() -> list[bytes]:
        echo_app = Echo(Identity("echo-v1-abc"), random.Random(1), None, sleep=sleep)
        server = await asyncio.start_server(echo_app.connection(echo_app.serve_http), "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            heads = []
            for target in ("/?delay=0.3", "/?delay=0&status=202", "/?delay=2.5&status=201", "/plain"):
                writer.write(f"GET {target} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length:")))
                await reader.readexactly(length)
                heads.append(head.split(b"\r\n")[0])
            writer.close()
            return heads
        finally:
            server.close()
            await server.wait_closed()
    heads = asyncio.run(main())
    assert heads == [b"HTTP/1.1 200 OK", b"HTTP/1.1 202 Accepted", b"HTTP/1.1 201 Created", b"HTTP/1.1 200 OK"]
    assert slept == [0.3, 2.5]


def test_fail_fraction_is_seedable(tmp_path):
    with EchoProcess(tmp_path, {**ENV, "ECHO_SEED": SEED}) as seeded:
        conn = connect(seeded)
        ask(conn, "/no-draw")  # requests without `fail` take no draw from the RNG
        codes = [ask(conn, "/?fail=0.3&status=201")[0].status for _ in range(1000)]
    assert set(codes) == {201, 503}
    failed = codes.count(503)
    assert failed == SEEDED_503_OF_1000
    # Binomial(1000, 0.3): mean 300, sd 14.5; the seeded count must be a plausible one.
    assert 300 - 4 * 14.5 < failed < 300 + 4 * 14.5


def test_named_draw_streams_do_not_depend_on_other_clients(tmp_path):
    """draws=NAME takes its own stream, random.Random(f"{ECHO_SEED}/{NAME}"): what others
    sent to the pod (default stream, other names) changes none of its draws."""
    def expected(name: str, n: int) -> list[int]:
        rng = random.Random(f"{SEED}/{name}")
        return [503 if rng.random() < 0.3 else 200 for _ in range(n)]

    with EchoProcess(tmp_path, {**ENV, "ECHO_SEED": SEED}) as seeded:
        conn = connect(seeded)
        mine = [ask(conn, "/?fail=0.3&draws=mine")[0].status for _ in range(100)]
        for _ in range(50):  # others interleave on the default stream and another name
            ask(conn, "/?fail=0.5")
            ask(conn, "/?fail=0.5&draws=theirs")
        mine += [ask(conn, "/?fail=0.3&draws=mine")[0].status for _ in range(100)]
        response, doc = ask(conn, "/?fail=0.3&draws=no%20spaces")
    assert mine == expected("mine", 200)
    assert response.status == 400 and doc["error"].startswith("query parameter draws must be")


def test_fail_bounds(echo):
    conn = connect(echo)
    assert {ask(conn, "/?fail=0")[0].status for _ in range(50)} == {200}
    assert {ask(conn, "/?fail=1")[0].status for _ in range(50)} == {503}
    assert ask(conn, "/?fail=1")[1]["pod"] == "echo-v1-abc"  # a 503 still says who answered


def test_default_status_makes_an_always_failing_endpoint(tmp_path):
    with EchoProcess(tmp_path, ENV, args=("--status", "503")) as failing:
        conn = connect(failing)
        answers = [ask(conn, path) for path in ("/", "/any/path", "/?fail=0", "/?delay=0")]
        assert [(r.status, doc["pod"], doc["path"]) for r, doc in answers] == [
            (503, "echo-v1-abc", p) for p in ("/", "/any/path", "/?fail=0", "/?delay=0")]
        assert not answers[-1][0].will_close  # a 503 of ours is no reason to drop the connection
        # The query still says otherwise: status= wins, and so do bad parameters.
        assert ask(conn, "/?status=200")[0].status == 200
        assert ask(conn, "/?status=404")[0].status == 404
        response, doc = ask(conn, "/?status=600")
        assert response.status == 400 and doc["error"].startswith("query parameter status must be")
        assert ask(conn, "/?fail=1&status=201")[0].status == 503


def test_default_status_with_fail_draws(tmp_path):
    with EchoProcess(tmp_path, {**ENV, "ECHO_SEED": SEED}, args=("--status", "202")) as seeded:
        conn = connect(seeded)
        codes = [ask(conn, "/?fail=0.3")[0].status for _ in range(1000)]
    # The same draws as test_fail_fraction_is_seedable; what did not fail has the --status code.
    assert (codes.count(503), codes.count(202)) == (SEEDED_503_OF_1000, 1000 - SEEDED_503_OF_1000)


def test_default_status_204_has_no_body(tmp_path):
    with EchoProcess(tmp_path, ENV, args=("--status", "204")) as empty:
        conn = connect(empty)
        response, doc = ask(conn, "/")
        assert response.status == 204 and doc is None and response.getheader("content-length") is None
        assert ask(conn, "/?status=200")[1]["path"] == "/?status=200"


@pytest.mark.parametrize("value", ["199", "600", "abc", "2e2", ""])
def test_bad_default_status_fails_at_start(tmp_path, value):
    done = run_echo(tmp_path, "--bind", "127.0.0.1", "--port", "0", "--tcp-port", "0", "--status", value)
    assert done.returncode == 2
    assert f"argument --status: must be a number from 200 to 599, not {value!r}" in done.stderr


def test_many_concurrent_connections(echo):
    results: list[int] = []
    lock = threading.Lock()

    def one():
        status = ask(connect(echo), "/?delay=0.5")[0].status
        with lock:
            results.append(status)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(200)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    # 200 requests that each wait 0.5 s: served one after another this would take 100 s.
    assert results == [200] * 200
    assert time.monotonic() - started < 10


def test_tcp_echo_until_peer_closes(echo):
    payload = os.urandom(1_000_000)
    with socket.create_connection(("127.0.0.1", echo.tcp_port), timeout=10) as sock:
        sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)),
                                  daemon=True)
        sender.start()
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
        sender.join(10)
    assert bytes(received) == payload


def test_tcp_echo_interactive(echo):
    with socket.create_connection(("127.0.0.1", echo.tcp_port), timeout=10) as sock:
        for word in (b"ping", b"pong", b"x" * 10):
            sock.sendall(word)
            got = b""
            while len(got) < len(word):
                got += sock.recv(100)
            assert got == word


def test_access_log_and_sigterm(tmp_path):
    with EchoProcess(tmp_path, ENV, quiet=False) as loud:
        conn = connect(loud)
        port = conn.sock.getsockname()[1]
        ask(conn, "/a")
        ask(conn, "/b?status=404")
        idle_tcp = socket.create_connection(("127.0.0.1", loud.tcp_port), timeout=10)
        # An idle keep-alive connection and an open TCP echo must not hold up SIGTERM.
        assert loud.stop() == 0
        idle_tcp.close()
        lines = loud.access_lines()
    assert len(lines) == 2
    assert lines[0].startswith(f'echo: 127.0.0.1:{port} "GET /a HTTP/1.1" 200 ')
    assert lines[1].startswith(f'echo: 127.0.0.1:{port} "GET /b?status=404 HTTP/1.1" 404 ')


def test_bad_pod_labels_fail_at_start(tmp_path):
    done = run_echo(tmp_path, "--bind", "127.0.0.1", "--port", "0", env={"POD_LABELS": "[1, 2]"})
    assert done.returncode == 1
    assert "echo: error: POD_LABELS: must be a JSON object of strings, not '[1, 2]'" in done.stderr


def test_port_in_use_fails_at_start(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_echo(tmp_path, "--bind", "127.0.0.1", "--port", str(port), "--tcp-port", "0")
    assert done.returncode == 1
    assert f"echo: error: bind 127.0.0.1 port {port}: Address already in use" in done.stderr


def test_identity_from_env():
    assert Identity.from_env({"POD_NAME": "p", "POD_LABELS": ""}) == Identity("p")
    with pytest.raises(ConfigError, match=r"POD_LABELS: is not JSON"):
        Identity.from_env({"POD_LABELS": "{version: v1}"})
    with pytest.raises(ConfigError, match=r"POD_LABELS: must be a JSON object of strings"):
        Identity.from_env({"POD_LABELS": '{"version": 1}'})


def test_shape_from_target():
    assert Shape.from_target("/x") == Shape(200, 0.0, None)
    assert Shape.from_target("/x?status=404&delay=0.25&fail=0") == Shape(404, 0.25, 0.0)
    assert Shape.from_target("/x?status=500&status=201") == Shape(201, 0.0, None)  # the last one counts
    assert Shape.from_target("/x", 503) == Shape(503, 0.0, None)
    assert Shape.from_target("/x?status=200&fail=0.5", 503) == Shape(200, 0.0, 0.5)
    with pytest.raises(BadRequest):
        Shape.from_target("/x?delay=inf")
