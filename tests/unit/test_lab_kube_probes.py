"""Readiness probes of the lab kubelet (nodeagent/lab/kube/probes.py): parsing, kubelet's
threshold counting, the HTTP and TCP checks against a local server, a prober's life."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from nodeagent.errors import ConfigError
from nodeagent.lab.kube import probes


def test_probes_are_read_with_kubelets_defaults_and_named_ports():
    container = {"name": "c", "ports": [{"name": "http", "containerPort": 8080}],
                 "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http",
                                                "httpHeaders": [{"name": "X-A", "value": "b"}]}}}
    assert probes.readiness(container) == probes.Probe("httpGet", port=8080, path="/healthz",
                                                       headers=(("X-A", "b"),))
    tcp = {"name": "c", "readinessProbe": {"tcpSocket": {"port": 53}, "periodSeconds": 2, "failureThreshold": 1,
                                           "initialDelaySeconds": 5, "successThreshold": 2, "timeoutSeconds": 3}}
    assert probes.readiness(tcp) == probes.Probe("tcpSocket", port=53, period=2, failure_threshold=1,
                                                 initial_delay=5, success_threshold=2, timeout=3)
    assert probes.readiness({"name": "c"}) is None
    with pytest.raises(ConfigError, match="readinessProbe: the lab does not run grpc probes"):
        probes.readiness({"name": "c", "readinessProbe": {"grpc": {"port": 9}}})
    with pytest.raises(ConfigError, match="httpGet.port: 'web' is neither"):
        probes.readiness({"name": "c", "readinessProbe": {"httpGet": {"port": "web"}}})


def test_a_result_flips_readiness_after_repeating_its_threshold():
    state = probes.Readiness(probes.Probe("exec", ("true",), success_threshold=2, failure_threshold=3))
    assert [state.record(ok) for ok in (True, False, True, True, False, False, True, False, False, False)] == \
        [False, False, False, True, True, True, True, True, True, False]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.seen.append(self.headers.get("User-Agent"))  # before the answer the check waits for
        self.send_response({"/ok": 200, "/moved": 302, "/bad": 500}[self.path])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_http_and_tcp_checks():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        make = socket.socket
        assert probes.http_check(make, "127.0.0.1", probes.Probe("httpGet", port=port, path="/ok"))
        assert probes.http_check(make, "127.0.0.1", probes.Probe("httpGet", port=port, path="/moved"))
        assert not probes.http_check(make, "127.0.0.1", probes.Probe("httpGet", port=port, path="/bad"))
        assert server.seen == ["kube-probe/1.34"] * 3
        assert probes.tcp_check(make, "127.0.0.1", probes.Probe("tcpSocket", port=port))
    finally:
        server.shutdown()
        server.server_close()
    assert not probes.tcp_check(make, "127.0.0.1", probes.Probe("tcpSocket", port=port))
    assert not probes.http_check(make, "127.0.0.1", probes.Probe("httpGet", port=port, path="/ok"))


def test_a_prober_is_unready_from_each_start_until_probed_again():
    results, started, changes = [True], [(100, 0.0)], []
    clock = [10.0]
    prober = probes.Prober(probes.Probe("exec", ("x",), period=0.05, initial_delay=5),
                           lambda: results[0], lambda: started[0], lambda: changes.append(1), lambda: clock[0])
    prober.thread.start()
    try:
        deadline = time.monotonic() + 5
        while not prober.ready:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started[0] = (101, 10.0)  # restarted: inside its initial delay again
        assert not prober.ready
        time.sleep(0.3)
        assert not prober.ready
        clock[0] = 15.0
        while not prober.ready:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        results[0] = False
        while prober.ready:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert len(changes) == 3  # ready, ready again after the restart, unready
    finally:
        prober.close()
        prober.thread.join()
