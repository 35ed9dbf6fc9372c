"""What the data path knows of the node's waypoint Envoy, whoever runs it: which
connections go through it (`dataplane()`: the steering of the snapshot Envoy last ACKed
completely), how to open a connection to it (`open`), and for how long Envoy may hand
connections back for it (`expecting`, kept in `dataplane.HandOffs`). The agent's Waypoint
(agent/waypoint/) is one; `NoWaypoint` stands for none (`--no-waypoint`): it steers
nothing and refuses to open, so relays never need to ask whether a waypoint exists.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Protocol

from nodeagent.errors import NodeagentError
from nodeagent.xds.dataplane import DataPlane, ProxyHeader, Sockets


class WaypointHandle(Protocol):
    def dataplane(self) -> DataPlane:
        """What Envoy has ACKed: the connections to steer through it (none before the first ACK)."""

    async def open(self, kind: str, header: ProxyHeader) -> socket.socket:
        """A connection to Envoy's `outbound` or `inbound` listener with `header` written;
        a NodeagentError saying why when there is none."""

    def expecting(self, kind: str, header: ProxyHeader) -> contextlib.AbstractContextManager:
        """While this lasts (from before `open` to the end of the relay), Envoy may hand
        back connections for what `header` opened (dataplane.HandOffs)."""


class NoWaypoint:
    """The agent runs no waypoint: nothing is steered to one."""

    def __init__(self) -> None:
        self._dataplane = DataPlane(Sockets(""))

    def dataplane(self) -> DataPlane:
        return self._dataplane

    async def open(self, kind: str, header: ProxyHeader) -> socket.socket:
        raise NodeagentError(f"no waypoint {kind} listener: this agent runs without a waypoint",
                             "run the agent without --no-waypoint for L7 policy and routing")

    def expecting(self, kind: str, header: ProxyHeader) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()
