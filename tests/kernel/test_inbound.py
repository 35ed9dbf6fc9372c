"""Inbound steering with the real sk_lookup program.

A pod netns (10.78.0.1, fd78::1) with app listeners on several ports and the agent's
listener on 15006; a client netns (10.78.0.2, fd78::2) on the other end of a veth.
Steered connections must arrive at 15006 with getsockname() == the original
destination; loopback, the agent's own ports and excluded ports are left alone; with
the listener gone the enrolled IP fails closed; unsteering restores direct delivery.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from kernel_sandbox import accept_all, counted, link, pending
from nodeagent.errors import ConfigError

POD_IP, POD_IP6 = "10.78.0.1", "fd78::1"
APP_PORTS = (80, 3306, 5000, 8080, 9090)


class Pod:
    """The pod netns, its client peer, app listeners and the agent's 15006 listener."""

    def __init__(self, make_netns, family: int = socket.AF_INET):
        self.ns, self.client = make_netns(), make_netns()
        link(self.ns, self.client, [f"{POD_IP}/24", f"{POD_IP6}/64"], ["10.78.0.2/24", "fd78::2/64"])
        self.apps = {port: self.ns.listener("::", port, socket.AF_INET6) for port in APP_PORTS}
        self.agent = self.ns.listener("::" if family == socket.AF_INET6 else "0.0.0.0", 15006, family)
        self.fd = os.open(self.ns.path, os.O_RDONLY | os.O_CLOEXEC)

    def connect_from_client(self, ip: str, port: int) -> socket.socket:
        sock = self.client.new_socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
        sock.connect((ip, port))
        return sock

    def close(self) -> None:
        for sock in (*self.apps.values(), self.agent):
            sock.close()
        os.close(self.fd)


@pytest.fixture
def pod(make_netns):
    p = Pod(make_netns)
    try:
        yield p
    finally:
        p.close()


def test_50_connections_steered_with_original_destination(capture, pod):
    capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP], pod.agent)
    before = capture.stats()["counters"]
    clients = [pod.connect_from_client(POD_IP, APP_PORTS[i % len(APP_PORTS)]) for i in range(50)]
    local = sorted(s.getsockname()[:2] for s in accept_all(pod.agent, 50))
    assert local == sorted((POD_IP, APP_PORTS[i % len(APP_PORTS)]) for i in range(50))
    assert counted(capture, before) == {"steered": 50}
    assert sum(pending(app) for app in pod.apps.values()) == 0
    for sock in clients:
        sock.close()
    capture.unsteer_inbound(pod.ns.cookie, [POD_IP])


def test_ipv6_and_dual_stack_listener(capture, make_netns):
    p = Pod(make_netns, family=socket.AF_INET6)  # [::]:15006, dual-stack
    try:
        capture.steer_inbound(p.fd, p.ns.cookie, [POD_IP, POD_IP6], p.agent)
        before = capture.stats()["counters"]
        for ip in (POD_IP6, POD_IP) * 5:
            p.connect_from_client(ip, 8080).close()
        local = sorted(s.getsockname()[0] for s in accept_all(p.agent, 10))
        assert local == sorted([f"::ffff:{POD_IP}"] * 5 + [POD_IP6] * 5)
        assert counted(capture, before) == {"steered": 10}
        capture.unsteer_inbound(p.ns.cookie, [POD_IP, POD_IP6])
    finally:
        p.close()


def test_not_steered_loopback_the_tunnel_port_and_excluded(capture, pod):
    """Not steered: the pod to itself, the tunnel port (the agent's HBONE listener takes
    it) and excluded ports. The agent's other ports are: an app listening on the pod IP's
    15001 (the agent binds 127.0.0.1:15001 only) or on the admin port (never bound in the
    pod) took plaintext from anybody while the steering skipped them."""
    capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP], pod.agent, exclude_ports=[9090])
    tunnel = pod.ns.listener("0.0.0.0", 15008)
    squatter = pod.ns.listener(POD_IP, 15001)
    before = capture.stats()["counters"]
    inside = pod.ns.new_socket()
    inside.connect((POD_IP, 8080))  # the pod to its own IP: over lo
    pod.connect_from_client(POD_IP, 15008).close()  # the agent's tunnel port
    pod.connect_from_client(POD_IP, 9090).close()  # excluded
    pod.connect_from_client(POD_IP, 15001).close()  # an agent port the agent does not listen on here
    assert pending(pod.apps[8080]) == 1 and pending(tunnel) == 1 and pending(pod.apps[9090]) == 1
    assert (pending(squatter), pending(pod.agent)) == (0, 1)
    assert counted(capture, before) == {"inbound_excluded": 1, "steered": 1}
    inside.close()
    tunnel.close()
    squatter.close()
    capture.unsteer_inbound(pod.ns.cookie, [POD_IP])


@pytest.mark.parametrize("client_ip,pod_ip", [("10.78.0.2", POD_IP), ("fd78::2", POD_IP6)], ids=["v4", "v6"])
def test_agent_delivery_bound_to_lo_not_steered(capture, pod, client_ip, pod_ip):
    """The agent's delivery recipe (docs/design.md): mark, IP_TRANSPARENT with the
    client's IP, SO_BINDTODEVICE lo, and the fwmark table 539 in the pod netns."""
    v6 = ":" in pod_ip
    pod.agent.close()
    pod.agent = pod.ns.listener("::", 15006, socket.AF_INET6)  # dual-stack
    capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP, POD_IP6], pod.agent)
    for family_flag, any_addr in (("-4", "0.0.0.0/0"), ("-6", "::/0")):
        pod.ns.ip(family_flag, "rule", "add", "fwmark", "0x539", "lookup", "539")
        pod.ns.ip(family_flag, "route", "add", "local", any_addr, "dev", "lo", "table", "539")
    subprocess.run(["ip", "netns", "exec", pod.ns.name, "sysctl", "-qw", "net.ipv4.tcp_fwmark_accept=1"], check=True)
    before = capture.stats()["counters"]
    sock = pod.ns.new_socket(socket.AF_INET6 if v6 else socket.AF_INET)
    sock.setsockopt(socket.IPPROTO_IPV6 if v6 else socket.SOL_IP, 75 if v6 else 19, 1)  # IP(V6)_TRANSPARENT
    sock.setsockopt(socket.SOL_SOCKET, 36, 0x539)  # SO_MARK
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    sock.bind((client_ip, 0))
    sock.connect((pod_ip, 8080))
    accepted, peer = pod.apps[8080].accept()
    assert peer[0].removeprefix("::ffff:") == client_ip  # the app sees the real client
    assert counted(capture, before) == {}
    accepted.close()
    sock.close()
    capture.unsteer_inbound(pod.ns.cookie, [POD_IP, POD_IP6])


def test_fail_closed_without_listener_then_unsteer(capture, pod):
    capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP], pod.agent)
    pod.agent.close()  # the agent is gone; the IP stays enrolled
    before = capture.stats()["counters"]
    for port in (8080, 80, 5000):
        with pytest.raises(ConnectionRefusedError):
            pod.connect_from_client(POD_IP, port)
    assert counted(capture, before) == {"dropped_failclosed": 3}
    assert sum(pending(app) for app in pod.apps.values()) == 0

    capture.unsteer_inbound(pod.ns.cookie, [POD_IP])
    assert not os.path.exists(os.path.join(capture.links_dir, str(pod.ns.cookie)))
    before = capture.stats()["counters"]
    pod.connect_from_client(POD_IP, 8080).close()
    assert pending(pod.apps[8080]) == 1
    assert counted(capture, before) == {}


def test_steer_again_replaces_listener(capture, pod):
    capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP], pod.agent)
    pod.agent.close()
    pod.agent = pod.ns.listener("0.0.0.0", 15006)  # a restarted agent's new listener
    capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP], pod.agent)
    pod.connect_from_client(POD_IP, 80).close()
    assert pending(pod.agent) == 1
    links = [p for p in capture.stats()["programs"] if p["attach_point"].startswith(f"netns {pod.ns.cookie} ")]
    assert len(links) == 1  # re-steering reused the link
    capture.unsteer_inbound(pod.ns.cookie, [POD_IP])


def test_listener_checked_before_steering(capture, pod):
    not_listening = pod.ns.new_socket()
    with pytest.raises(ConfigError, match="not a listening TCP socket"):
        capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP], not_listening)
    with pytest.raises(ConfigError, match="IPv4 socket cannot take IPv6"):
        capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP6], pod.agent)
    with pytest.raises(ConfigError, match="at most 8"):
        capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP], pod.agent, exclude_ports=range(1, 10))
    not_listening.close()
    assert not os.path.exists(os.path.join(capture.links_dir, str(pod.ns.cookie)))
