"""What every relay of the data path reads, built once and handed to each at
construction (as ztunnel's `ProxyInputs`): nothing is assigned into a relay afterwards.

`waypoint` always exists: the node's Waypoint, or `NoWaypoint` when the agent runs
without one (`--no-waypoint`). Either says what Envoy has ACKed (`dataplane()`: nothing,
before the first ACK or without Envoy, so no connection is steered to it) and opens a
connection to it or says why it cannot (WaypointUnavailable-style NodeagentError).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.metrics import AgentMetrics
from nodeagent.agent.proxy.admission import InboundConnections
from nodeagent.agent.proxy.identities import WorkloadIdentities
from nodeagent.agent.proxy.policies import PolicyState
from nodeagent.agent.proxy.splice import Splicer
from nodeagent.agent.proxy.telemetry import Telemetry
from nodeagent.agent.proxy.steering import WaypointHandle
from nodeagent.memory import MemoryGuard
from nodeagent.model import Model


@dataclass(frozen=True)
class ProxyInputs:
    model: Callable[[], Model]  # the model in force
    pod_at: Callable[[str], PodContext | None]  # the enrolled pod at an IP (the model's pod as enrolled now)
    policies: PolicyState  # the policies in force (read at accept time)
    identities: WorkloadIdentities  # workload certificates of this node's pods
    telemetry: Telemetry  # Istio's TCP metrics and the flow log
    connections: InboundConnections  # connections sent on to a pod, re-checked on changes
    waypoint: WaypointHandle  # the node's waypoint, or NoWaypoint
    metrics: AgentMetrics  # the agent's own counters
    agent_ports: frozenset[int]  # the agent's own ports: never a destination
    splicer: Splicer  # which engine moves the bytes: native for socket pairs, or Python
    memory: MemoryGuard  # the agent's memory limit: over it, nothing new is taken (nodeagent/memory.py)
