"""Services the way kube-proxy makes them work: nftables DNAT in every node netns.

Endpoints are the Running pods the selector picks, at the service port's `targetPort`
(a number, or a named container port looked up per pod, so pods without that port are
left out). Each node netns gets one table `nodeagent-lab`, replaced as a whole in one
transaction: ClusterIP:port jumps to a per-service chain that picks an endpoint at
random (`numgen random mod N`), in prerouting (pod traffic) and output (host-network
processes such as the agent). A pod reaching itself through its own service is SNATed
to the pod gateway so the reply comes back through the node (kube-proxy's hairpin
masquerade). New connections to a ClusterIP left un-DNATed (no endpoint, unknown port)
are refused, as kube-proxy does. Text generation is pure; `apply` loads it.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from nodeagent.errors import LabError
from nodeagent.lab.ipam import POD_GATEWAY, SERVICE_CIDR, Allocations
from nodeagent.lab.layout import Layout
from nodeagent.lab.spec import DesiredState, PodSpec, ServicePort, ServiceSpec

TABLE = "nodeagent-lab"
HAIRPIN_MARK = 0x4000  # the bit kube-proxy uses for "masquerade this"


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int


@dataclass(frozen=True)
class Rule:
    """One ClusterIP:port/protocol and the endpoints behind it."""

    service: str  # "ns/name"
    cluster_ip: str
    port: int
    protocol: str
    endpoints: tuple[Endpoint, ...]


def target_port(pod: PodSpec, port: ServicePort) -> int | None:
    """Where `port` lands on `pod`: its number, or the pod's container port of that name."""
    if isinstance(port.target_port, int):
        return port.target_port
    for container in pod.containers:
        for cp in container.ports:
            if cp.name == port.target_port and cp.protocol == port.protocol:
                return cp.port
    return None


def endpoints(svc: ServiceSpec, state: DesiredState, alloc: Allocations,
              running: set[str]) -> dict[ServicePort, tuple[Endpoint, ...]]:
    """Endpoints per service port; `running` holds the keys ("ns/name") of Running pods."""
    selected = [] if not svc.selector else [
        pod for key, pod in sorted(state.pods.items())
        if key in running and pod.namespace == svc.namespace
        and all(pod.labels.get(k) == v for k, v in svc.selector.items())]
    out = {}
    for port in svc.ports:
        found = ((alloc.pods[p.key].ip, target_port(p, port)) for p in selected)
        out[port] = tuple(Endpoint(ip, n) for ip, n in found if n is not None)
    return out


def rules(state: DesiredState, alloc: Allocations, running: set[str]) -> list[Rule]:
    out = []
    for key, svc in sorted(state.services.items()):
        for port, eps in endpoints(svc, state, alloc, running).items():
            out.append(Rule(key, alloc.services[key], port.port, port.protocol, eps))
    return out


def _chain(rule: Rule) -> str:
    return f"svc-{rule.service}/{rule.protocol.lower()}/{rule.port}"


def _service_chains(rule: Rule) -> list[str]:
    chain = _chain(rule)
    picks = ", ".join(f"{i} : goto {chain}/{i}" for i in range(len(rule.endpoints)))
    lines = [f"\tchain {chain} {{\n\t\tnumgen random mod {len(rule.endpoints)} vmap {{ {picks} }}\n\t}}\n"]
    for i, ep in enumerate(rule.endpoints):
        lines.append(f"\tchain {chain}/{i} {{\n"
                     f"\t\tip saddr {ep.ip} meta mark set meta mark | {HAIRPIN_MARK:#x}\n"
                     f"\t\tmeta l4proto {rule.protocol.lower()} dnat to {ep.ip}:{ep.port}\n\t}}\n")
    return lines


def ruleset(rules: list[Rule]) -> str:
    """The whole table, as `nft -f` input that replaces the previous one atomically."""
    served = [r for r in rules if r.endpoints]
    jumps = "".join(f"\t\tip daddr {r.cluster_ip} {r.protocol.lower()} dport {r.port} goto {_chain(r)}\n"
                    for r in served)
    return "".join([
        f"table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n",
        "\tchain prerouting {\n\t\ttype nat hook prerouting priority -100; policy accept;\n\t\tjump services\n\t}\n",
        "\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n",
        "\tchain postrouting {\n\t\ttype nat hook postrouting priority 100; policy accept;\n"
        f"\t\tmeta mark & {HAIRPIN_MARK:#x} == {HAIRPIN_MARK:#x} snat to {POD_GATEWAY}\n\t}}\n",
        "\tchain forward {\n\t\ttype filter hook forward priority 0; policy accept;\n"
        "\t\tct state new jump unserved\n\t}\n",
        "\tchain filter-output {\n\t\ttype filter hook output priority 0; policy accept;\n"
        "\t\tct state new jump unserved\n\t}\n",
        f"\tchain unserved {{\n\t\tip daddr {SERVICE_CIDR} meta l4proto tcp reject with tcp reset\n"
        f"\t\tip daddr {SERVICE_CIDR} reject\n\t}}\n",
        f"\tchain services {{\n{jumps}\t}}\n",
        *[line for r in served for line in _service_chains(r)],
        "}\n",
    ])


def apply(netns: str, text: str) -> None:
    """Load `text` with `nft -f -` inside node netns `netns`."""
    proc = subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=text,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"nft refused the service rules for {netns}: {proc.stderr.strip()}",
                       "the lab needs nftables >= 0.9.4 (scripts/setup installs it)")


def sync(layout: Layout, state: DesiredState, alloc: Allocations, running: set[str],
         extra: tuple[Rule, ...] = ()) -> None:
    """Program every node with the same rules, as kube-proxy does (`extra`: services not
    in the file, such as `kubernetes` of a `--kube` lab)."""
    text = ruleset(rules(state, alloc, running) + list(extra))
    for node in state.node_names:
        apply(layout.node_netns(node), text)


def remove(netns: str) -> None:
    """Delete the table (best effort: the netns may be half made or already gone)."""
    subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "ip", TABLE],
                   capture_output=True)
