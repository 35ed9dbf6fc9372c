"""Where a captured outbound connection goes: the source agent's routing decision.

`resolve(model, dst, balancer)` reads the original destination against the model:
- a Service ClusterIP and one of its ports: the agent load-balances (round-robin per
  service port, over the Running endpoints that have the port; a named `targetPort` is
  looked up in each pod's container ports, as kube-proxy does) and connects to the
  chosen endpoint's IP and target port itself;
- a pod IP: that pod, on the port asked for;
- anything else (outside the cluster, a node, an unknown IP): the original destination.
`Target.meshed` says whether the endpoint is a meshed pod, which means HBONE; otherwise
plain TCP (passthrough). Pure: no I/O, the balancer's counters are its only state.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from nodeagent.model import Model, Pod, Service, ServicePort

Address = tuple[str, int]


@dataclass(frozen=True)
class Target:
    address: Address  # where the upstream connection goes (for HBONE: the :authority)
    pod: Pod | None = None  # the endpoint, when the model knows it
    service: Service | None = None  # when the client asked for a Service
    meshed: bool = False  # the endpoint is a meshed pod: reach it over HBONE


class NoEndpoint(Exception):
    """A Service port with no Running endpoint that has its target port."""

    def __init__(self, service: Service, port: int):
        self.service = service
        self.port = port
        super().__init__(f"service {service.namespace}/{service.name} port {port} has no ready endpoint")


@dataclass
class RoundRobin:
    """Next endpoint per (namespace, service, port); survives endpoint changes (the
    counter keeps running, the list is re-read each time)."""

    _next: dict[tuple[str, str, int], itertools.count] = field(default_factory=dict)

    def pick(self, key: tuple[str, str, int], candidates: list[tuple[Pod, int]]) -> tuple[Pod, int]:
        counter = self._next.setdefault(key, itertools.count())
        return candidates[next(counter) % len(candidates)]


def resolve(model: Model, dst: Address, balancer: RoundRobin) -> Target:
    """The target of a connection to `dst`; NoEndpoint for a service port without one."""
    service, service_port = _service_port(model, dst)
    if service_port is not None:
        return _balance(model, service, service_port, balancer)
    return _direct(model, dst, service)


def endpoints(model: Model, dst: Address) -> list[Target]:
    """Every target `resolve` may pick for `dst`, in the balancer's order ([] for a
    service port without an endpoint)."""
    service, service_port = _service_port(model, dst)
    if service_port is not None:
        return [Target((pod.ip, number), pod=pod, service=service, meshed=model.is_meshed(pod))
                for pod, number in _candidates(model, service, service_port)]
    return [_direct(model, dst, service)]


def _service_port(model: Model, dst: Address) -> tuple[Service | None, ServicePort | None]:
    service = model.service_by_ip(dst[0])
    if service is None:
        return None, None
    return service, next((p for p in service.ports if p.port == dst[1] and p.protocol == "TCP"), None)


def _direct(model: Model, dst: Address, service: Service | None) -> Target:
    """`dst` itself: a port that is not the service's (as kube-proxy, no rewrite), a pod, or
    an address the model does not know."""
    if service is not None:
        return Target(dst, service=service)
    pod = model.pod_by_ip(dst[0])
    if pod is not None:
        return Target(dst, pod=pod, meshed=model.is_meshed(pod))
    return Target(dst)


def _candidates(model: Model, service: Service, port: ServicePort) -> list[tuple[Pod, int]]:
    return [(pod, number) for pod in model.endpoints(service) if (number := port.target_on(pod)) is not None]


def _balance(model: Model, service: Service, port: ServicePort, balancer: RoundRobin) -> Target:
    candidates = _candidates(model, service, port)
    if not candidates:
        raise NoEndpoint(service, port.port)
    pod, number = balancer.pick((service.namespace, service.name, port.port), candidates)
    return Target((pod.ip, number), pod=pod, service=service, meshed=model.is_meshed(pod))

