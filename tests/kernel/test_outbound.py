"""Outbound capture with the real programs: connect4/6 + sockops + pop_original_dst.

A client process in a throwaway cgroup (under the attach cgroup) and a throwaway pod
netns connects to a peer netns; a listener at 127.0.0.1:15001 / [::1]:15001 in the
pod netns plays the agent. Counts are exact; counters are compared as deltas because
the programs (and their pinned counters) are shared by the module.
"""

from __future__ import annotations

import socket

import pytest


from kernel_sandbox import accept_all, connector, counted, pending, throwaway_cgroup, unique

OUTBOUND = 15001


@pytest.fixture
def pod_cgroup(module_cgroup: str):
    """A pod's cgroup below the attach cgroup (programs there apply to descendants)."""
    with throwaway_cgroup(module_cgroup, unique("pod")) as path:
        yield path


@pytest.fixture
def enrolled(capture, pod_and_peer):
    pod, peer = pod_and_peer
    capture.enrol_netns(pod.cookie)
    try:
        yield pod, peer
    finally:
        capture.remove_netns(pod.cookie)


def check_captured(capture, pod, listener, conns, family) -> None:
    """Every connection arrived at the agent's listener and maps to its original target."""
    assert all(c.ok for c in conns), [c.error for c in conns if not c.ok]
    by_client_port = {c.local[1]: c.target for c in conns}
    for sock in accept_all(listener, len(conns)):
        with sock:
            client_port = sock.getpeername()[1]
            assert capture.pop_original_dst(pod.cookie, family, client_port) == by_client_port.pop(client_port)
            assert capture.pop_original_dst(pod.cookie, family, client_port) is None  # popped
    assert by_client_port == {}


@pytest.mark.parametrize("family,dst_ip,lo", [(socket.AF_INET, "10.77.0.2", "127.0.0.1"),
                                              (socket.AF_INET6, "fd77::2", "::1")], ids=["v4", "v6"])
def test_100_connections_captured_with_original_destination(capture, enrolled, pod_cgroup, family, dst_ip, lo):
    pod, peer = enrolled
    agent = pod.listener(lo, OUTBOUND, family)
    app = peer.listener(dst_ip, 20000, family)  # only reached if capture failed
    targets = [(dst_ip, 20000 + i) for i in range(100)]
    before = capture.stats()["counters"]
    with connector(pod_cgroup, pod, family, targets) as conns:
        assert {c.peer for c in conns} == {(lo, OUTBOUND)}
        check_captured(capture, pod, agent, conns, family)
    assert counted(capture, before) == {"captured": 100, "origdst_recorded": 100}
    assert pending(app) == 0


def test_v4_mapped_destination_comes_back_as_ipv4(capture, enrolled, pod_cgroup):
    pod, _ = enrolled
    agent = pod.listener("::1", OUTBOUND, socket.AF_INET6)
    targets = [("::ffff:10.77.0.2", 21000 + i) for i in range(10)]
    with connector(pod_cgroup, pod, socket.AF_INET6, targets) as conns:
        assert all(c.ok for c in conns)
        for sock in accept_all(agent, 10):
            with sock:
                dst = capture.pop_original_dst(pod.cookie, socket.AF_INET6, sock.getpeername()[1])
                assert dst is not None and dst[0] == "10.77.0.2" and 21000 <= dst[1] < 21010


def reach_peer(capture, pod, peer, cgroup, family, dst_ip, port, count, mark=0) -> dict:
    """`count` connections that must reach the peer untouched; the counter delta."""
    agent = pod.listener("127.0.0.1" if family == socket.AF_INET else "::1", OUTBOUND, family)
    app = peer.listener(dst_ip, port, family)
    before = capture.stats()["counters"]
    with connector(cgroup, pod, family, [(dst_ip, port)] * count, mark=mark) as conns:
        assert all(c.ok and c.peer == (dst_ip, port) for c in conns), conns[:3]
        assert len(accept_all(app, count)) == count
    assert pending(agent) == 0
    agent.close()
    app.close()
    return counted(capture, before)


def test_unmeshed_netns_not_captured(capture, pod_and_peer, pod_cgroup):
    pod, peer = pod_and_peer  # never enrolled
    assert reach_peer(capture, pod, peer, pod_cgroup, socket.AF_INET, "10.77.0.2", 7000, 20) == {}


@pytest.mark.parametrize("mark", [0x539, 0x1539], ids=["mark", "delivery-mark"])
def test_agent_marked_socket_not_captured(capture, enrolled, pod_cgroup, mark):
    pod, peer = enrolled
    counted = reach_peer(capture, pod, peer, pod_cgroup, socket.AF_INET, "10.77.0.2", 7000, 20, mark=mark)
    assert counted == {"skipped_mark": 20}


def test_other_marks_are_captured(capture, enrolled, pod_cgroup):
    pod, _ = enrolled
    agent = pod.listener("127.0.0.1", OUTBOUND)
    before = capture.stats()["counters"]
    with connector(pod_cgroup, pod, socket.AF_INET, [("10.77.0.2", 7000 + i) for i in range(5)], mark=0x53a) as conns:
        check_captured(capture, pod, agent, conns, socket.AF_INET)
    assert counted(capture, before) == {"captured": 5, "origdst_recorded": 5}


def test_loopback_not_captured(capture, enrolled, pod_cgroup):
    pod, _ = enrolled
    total: dict[str, int] = {}
    for family, lo in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1"), (socket.AF_INET, "127.3.2.1")):
        app = pod.listener(lo, 7000, family)
        before = capture.stats()["counters"]
        with connector(pod_cgroup, pod, family, [(lo, 7000)] * 10) as conns:
            assert all(c.ok and c.peer == (lo, 7000) for c in conns)
            assert len(accept_all(app, 10)) == 10
        app.close()
        for name, value in counted(capture, before).items():
            total[name] = total.get(name, 0) + value
    assert total == {"skipped_loopback": 30}


def test_excluded_port_not_captured(capture, pod_and_peer, pod_cgroup):
    pod, peer = pod_and_peer
    capture.enrol_netns(pod.cookie, exclude_outbound_ports=[7001, 7002])
    try:
        counted = reach_peer(capture, pod, peer, pod_cgroup, socket.AF_INET6, "fd77::2", 7002, 15)
    finally:
        capture.remove_netns(pod.cookie)
    assert counted == {"skipped_excluded": 15}


def test_remove_netns_stops_capture(capture, pod_and_peer, pod_cgroup):
    pod, peer = pod_and_peer
    capture.enrol_netns(pod.cookie)
    assert pod.cookie in capture.enrolled_netns()
    agent = pod.listener("127.0.0.1", OUTBOUND)
    before = capture.stats()["counters"]
    with connector(pod_cgroup, pod, socket.AF_INET, [("10.77.0.2", 7000)] * 5) as conns:
        check_captured(capture, pod, agent, conns, socket.AF_INET)
    assert counted(capture, before) == {"captured": 5, "origdst_recorded": 5}
    agent.close()

    capture.remove_netns(pod.cookie)
    assert pod.cookie not in capture.enrolled_netns()
    assert reach_peer(capture, pod, peer, pod_cgroup, socket.AF_INET, "10.77.0.2", 7000, 5) == {}
