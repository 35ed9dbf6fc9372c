"""The ports a delivery may bind in a pod netns (inpod.sockets.PortRange): the
ephemeral range less ip_local_reserved_ports, as the sysctl shows them."""

from __future__ import annotations

import collections
import random

import pytest

from nodeagent.agent.inpod.sockets import PortRange


@pytest.mark.parametrize("reserved, free", [
    ("\n", ((40000, 40255),)),  # none reserved: the sysctl reads as an empty line
    ("8080,9000-9100\n", ((40000, 40255),)),  # all outside the range
    ("40000-40009,40100,40250-41000\n", ((40010, 40099), (40101, 40249))),
    ("39000-40000,40255\n", ((40001, 40254),)),  # overlapping either end
    ("40100,40010-40020,40015\n", ((40000, 40009), (40021, 40099), (40101, 40255))),  # unsorted, nested
    ("40000-40255\n", ()),
])
def test_reserved_ports_are_left_out_of_the_range(reserved, free):
    ports = PortRange.of(40000, 40255, reserved)
    assert ports.free == free and ports.size == sum(b - a + 1 for a, b in free)


def test_every_free_port_is_drawn_alike_and_no_reserved_one():
    random.seed(11)
    ports = PortRange.of(100, 109, "101,103-107")  # free: 100, 102, 108, 109
    drawn = collections.Counter(ports.draw() for _ in range(4000))
    assert set(drawn) == {100, 102, 108, 109}
    assert all(900 <= n <= 1100 for n in drawn.values()), drawn
