"""Loader lifecycle: close(keep=True) leaves capture in force and a second loader adopts
it (one instance of each program afterwards); close(keep=False) leaves nothing.

Each test has its own attach cgroup and pin dir, so BPF_PROG_QUERY sees only its own
programs.
"""

from __future__ import annotations

import os
import socket
import time

from kernel_sandbox import (accept_all, connector, link, netns_factory, our_programs, pending,
                            throwaway_cgroup, unique)
from nodeagent.capture import bpfsys
from nodeagent.capture.loader import CaptureLoader
from nodeagent.capture.programs import CGROUP_PROGRAMS

POD_IP = "10.79.0.1"


def link_prog_id(path: str) -> int:
    fd = bpfsys.obj_get(path)
    try:
        return bpfsys.link_info(fd).prog_id
    finally:
        os.close(fd)


def connect_captured(pod, cgroup, ports) -> list[int]:
    """Connect from the pod to 10.79.0.2:<ports>; the client ports the agent's 15001
    listener saw (what the agent passes to pop_original_dst)."""
    agent = pod.listener("127.0.0.1", 15001)
    try:
        with connector(cgroup, pod, socket.AF_INET, [("10.79.0.2", p) for p in ports]) as conns:
            assert all(c.ok for c in conns)
            accepted = accept_all(agent, len(ports))
            client_ports = [s.getpeername()[1] for s in accepted]
            for sock in accepted:
                sock.close()
    finally:
        agent.close()
    return client_ports


def test_keep_then_adopt_then_remove(cgroup_dir, pin_dir, make_netns):
    pod, client = make_netns(), make_netns()
    link(pod, client, [f"{POD_IP}/24"], ["10.79.0.2/24"])
    netns_fd = os.open(pod.path, os.O_RDONLY | os.O_CLOEXEC)
    with throwaway_cgroup(cgroup_dir, unique("pod")) as pod_cgroup:
        try:
            _keep_adopt_remove(cgroup_dir, pin_dir, pod, client, netns_fd, pod_cgroup)
        finally:
            os.close(netns_fd)


def _keep_adopt_remove(cgroup, pin_dir, pod, client, netns_fd, pod_cgroup) -> None:
    first = CaptureLoader(cgroup=cgroup, pin_dir=pin_dir)
    first.load()
    first.enrol_netns(pod.cookie)
    inbound1 = pod.listener("0.0.0.0", 15006)
    first.steer_inbound(netns_fd, pod.cookie, [POD_IP], inbound1)
    first_ids = our_programs(cgroup)
    link_pin = os.path.join(first.links_dir, str(pod.cookie))
    first.close(keep=True)

    # Nobody loaded: programs stay attached, maps and link pinned, capture goes on.
    assert our_programs(cgroup) == first_ids and all(len(ids) == 1 for ids in first_ids.values())
    assert sorted(os.listdir(first.maps_dir)) == sorted(
        ["na_pods", "na_origdst_ck", "na_origdst", "na_inbound", "na_enrolled_ips", "na_counters"])
    assert os.path.exists(link_pin)
    while_down = connect_captured(pod, pod_cgroup, [30001, 30002])  # recorded by the old programs

    second = CaptureLoader(cgroup=cgroup, pin_dir=pin_dir)
    second.load()
    try:
        assert second.enrolled_netns() == {pod.cookie}  # adopted without re-enrolling
        now = our_programs(cgroup)
        assert all(len(ids) == 1 for ids in now.values()), now  # old instances detached
        assert all(now[name] != first_ids[name] for name in now)
        sk_lookup_id = next(p["id"] for p in second.stats()["programs"] if p["name"] == "na_sk_lookup")
        assert link_prog_id(link_pin) == sk_lookup_id
        pop = lambda port: second.pop_original_dst(pod.cookie, socket.AF_INET, port)  # noqa: E731
        assert sorted(map(pop, while_down)) == [("10.79.0.2", 30001), ("10.79.0.2", 30002)]
        after = connect_captured(pod, pod_cgroup, [30003, 30004])
        assert sorted(map(pop, after)) == [("10.79.0.2", 30003), ("10.79.0.2", 30004)]

        inbound2 = pod.listener("0.0.0.0", 15007)  # the new agent's listener
        second.steer_inbound(netns_fd, pod.cookie, [POD_IP], inbound2)
        conn = client.new_socket()
        conn.connect((POD_IP, 8080))
        assert pending(inbound2) == 1 and pending(inbound1) == 0
        conn.close()
    finally:
        second.close()
    inbound1.close()
    inbound2.close()
    assert our_programs(cgroup) == {spec.name: [] for spec in CGROUP_PROGRAMS}
    assert not os.path.exists(pin_dir)


def test_context_manager_leaves_nothing(cgroup_dir, pin_dir, make_netns):
    pod = make_netns()
    listener = pod.listener("0.0.0.0", 15006)
    fd = os.open(pod.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir) as capture:
            capture.enrol_netns(pod.cookie, [25])
            capture.steer_inbound(fd, pod.cookie, ["10.79.0.9"], listener)
            assert all(len(ids) == 1 for ids in our_programs(cgroup_dir).values())
            assert {m["name"]: m["entries"] for m in capture.stats()["maps"]} == {
                "na_pods": 1, "na_origdst_ck": 0, "na_origdst": 0, "na_inbound": 1,
                "na_enrolled_ips": 1, "na_counters": 10}
    finally:
        os.close(fd)
        listener.close()
    assert our_programs(cgroup_dir) == {spec.name: [] for spec in CGROUP_PROGRAMS}
    assert not os.path.exists(pin_dir)


def test_adopt_drops_links_of_vanished_netns(cgroup_dir, pin_dir):
    """A pod deleted while no agent runs: the next agent removes its stale link pin."""
    with netns_factory() as make:
        pod = make()
        cookie, listener = pod.cookie, pod.listener("0.0.0.0", 15006)
        fd = os.open(pod.path, os.O_RDONLY | os.O_CLOEXEC)
        first = CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir)
        first.load()
        first.steer_inbound(fd, cookie, ["10.79.0.5"], listener)
        first.close(keep=True)
        os.close(fd)
        listener.close()
    link_pin = os.path.join(pin_dir, "links", str(cookie))
    assert os.path.exists(link_pin)  # netns deleted, pin left behind
    for _ in range(100):  # the kernel cleans up a netns asynchronously
        fd = bpfsys.obj_get(link_pin)
        gone = bpfsys.link_info(fd).netns_ino == 0
        os.close(fd)
        if gone:
            break
        time.sleep(0.05)
    with CaptureLoader(cgroup=cgroup_dir, pin_dir=pin_dir) as second:
        assert os.listdir(second.links_dir) == []
        assert not [p for p in second.stats()["programs"] if p["name"] == "na_sk_lookup"]
