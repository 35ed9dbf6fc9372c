"""A rolling update's hand-over between two agents in one pod netns, with the real
sk_lookup program and the agent's own listener and routing code.

The old and the new agent each open the pod's listeners (`inpod.listeners`: SO_REUSEPORT)
and enrol the pod's routing (`podrouting.install`: tcp_migrate_req=1); the new one points
the inbound steering at its own 15006 listener while the old one still listens. Clients
connect (inbound to app ports, steered; outbound to 127.0.0.1:15001) and nobody accepts,
so the reuseport groups spread the connections over both agents' accept queues. Then the
old agent closes its listeners: every connection must reach the new agent's listeners,
alive (it answers, the client reads the answer) and with its original destination, none
reset. The same with tcp_migrate_req=0 resets the old agent's queued connections: the
check can tell.
"""

from __future__ import annotations

import os
import socket

import pytest

from kernel_sandbox import link
from nodeagent import netns
from nodeagent.agent.inpod import podrouting
from nodeagent.agent.inpod import sockets as inpod
from nodeagent.agent.inpod.sockets import ListenSpec

POD_IP, CLIENT_IP = "10.79.0.1", "10.79.0.2"
APP_PORTS = (80, 8080)
COUNT = 64  # per direction: with two listeners, no chance that the old one got none
SPECS = [ListenSpec("127.0.0.1", 15001), ListenSpec("0.0.0.0", 15006), ListenSpec(POD_IP, 15008, freebind=True)]
ROUTING = podrouting.RoutingSpec(0x1539, (socket.AF_INET,))


class Pod:
    def __init__(self, make_netns):
        self.ns, self.client = make_netns(), make_netns()
        link(self.ns, self.client, [f"{POD_IP}/24"], [f"{CLIENT_IP}/24"])
        self.fd = os.open(self.ns.path, os.O_RDONLY | os.O_CLOEXEC)
        self.sockets: list[socket.socket] = []

    def agent(self) -> dict[int, socket.socket]:
        """One agent's listeners, by port."""
        socks = inpod.listeners(self.fd, SPECS)
        self.sockets += socks
        return {sock.getsockname()[1]: sock for sock in socks}

    def connect(self, where, ip: str, port: int, payload: bytes) -> socket.socket:
        sock = where.new_socket()
        self.sockets.append(sock)
        sock.connect((ip, port))
        sock.sendall(payload)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        os.close(self.fd)


@pytest.fixture
def pod(make_netns):
    p = Pod(make_netns)
    try:
        yield p
    finally:
        p.close()


def accept_queued(listener: socket.socket) -> list[socket.socket]:
    """Every connection waiting in the listener's accept queue (the handshakes on a veth
    and on lo are done when connect() returns, and a migration is done at close())."""
    taken = []
    try:
        while True:
            conn = listener.accept()[0]
            conn.settimeout(5)
            taken.append(conn)
    except BlockingIOError:
        return taken


def hand_over(capture, pod: Pod, migrate: bool) -> tuple[dict, dict]:
    """Old and new agent listening, connections queued on both, the old one closes:
    how many clients were answered by the new agent, by kind; its accepted sockets and
    the clients reset, by kind."""
    podrouting.install(pod.fd, ROUTING)
    if not migrate:
        inpod_sysctl(pod, "0")
    old = pod.agent()
    capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP], old[15006])
    new = pod.agent()  # binds beside the old one: SO_REUSEPORT
    capture.steer_inbound(pod.fd, pod.ns.cookie, [POD_IP], new[15006])  # the new agent takes over steering
    clients = {"inbound": [pod.connect(pod.client, POD_IP, APP_PORTS[i % 2], b"in%d" % i) for i in range(COUNT)],
               "outbound": [pod.connect(pod.ns, "127.0.0.1", 15001, b"out%d" % i) for i in range(COUNT)]}
    for sock in old.values():
        sock.close()  # the old agent's shutdown: listeners first, nothing accepted
    accepted = {"inbound": accept_queued(new[15006]), "outbound": accept_queued(new[15001])}
    answered, reset = {}, {}
    for kind, conns in accepted.items():
        for conn in conns:
            pod.sockets.append(conn)
            conn.sendall(b"ok:" + conn.recv(16))
    for kind, socks in clients.items():
        answered[kind], reset[kind] = [], []
        for sock in socks:
            try:
                answer = sock.recv(32)
            except ConnectionResetError:
                reset[kind].append(sock)
                continue
            (answered[kind] if answer.startswith(b"ok:") else reset[kind]).append(sock)
    return {k: len(v) for k, v in answered.items()}, {"accepted": accepted, "reset": reset}


def inpod_sysctl(pod: Pod, value: str) -> None:
    with netns.entered(pod.fd):
        with open(podrouting.MIGRATE_REQ, "w") as f:
            f.write(value)


def migrate_req(pod: Pod) -> str:
    with netns.entered(pod.fd):
        with open(podrouting.MIGRATE_REQ) as f:
            return f.read().strip()


def test_enrolment_routing_sets_tcp_migrate_req_and_removal_resets_it(pod):
    assert migrate_req(pod) == "0"
    podrouting.install(pod.fd, ROUTING)
    assert migrate_req(pod) == "1"
    podrouting.remove(pod.fd, ROUTING)
    assert migrate_req(pod) == "0"


def test_two_agents_listen_side_by_side_and_the_old_one_hands_over_every_queued_connection(capture, pod):
    answered, seen = hand_over(capture, pod, migrate=True)
    assert answered == {"inbound": COUNT, "outbound": COUNT}
    assert seen["reset"] == {"inbound": [], "outbound": []}
    inbound = sorted(conn.getsockname()[:2] for conn in seen["accepted"]["inbound"])
    assert inbound == sorted((POD_IP, APP_PORTS[i % 2]) for i in range(COUNT))  # original destinations kept


def test_without_tcp_migrate_req_the_old_agents_queue_is_reset(capture, pod):
    answered, seen = hand_over(capture, pod, migrate=False)
    lost = {kind: len(socks) for kind, socks in seen["reset"].items()}
    assert lost["inbound"] > 0 and lost["outbound"] > 0, lost  # the old agent had some: the check can tell
    assert {k: answered[k] + lost[k] for k in answered} == {"inbound": COUNT, "outbound": COUNT}
