"""Settings of one node's translation, named and checked once.

`sockets` is where Envoy and the agent meet (see dataplane.py). `jwks_files` maps a
RequestAuthentication `jwksUri` to a local file holding that JWKS: Envoy never fetches
keys, so whoever fetched them (the agent, an operator) leaves them there; a URI with no
file gets a key set no token can match (every token 401), as istiod does when its fetch
fails. `target_port` resolves a Service port's targetPort for a pod (the model's
ServicePort.target_on unless a test hands in another).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Mapping

from nodeagent.errors import ConfigError
from nodeagent.model import Pod, ServicePort
from nodeagent.policy import jwkset
from nodeagent.policy.scope import DEFAULT_ROOT_NAMESPACE
from nodeagent.xds.dataplane import Sockets


def target_port(pod: Pod, port: ServicePort) -> int | None:
    return port.target_on(pod)


@dataclass(frozen=True)
class WaypointOptions:
    sockets: Sockets
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    connect_timeout: timedelta = timedelta(seconds=10)  # Istio's default
    jwks_files: Mapping[str, str] = field(default_factory=dict)
    target_port: Callable[[Pod, ServicePort], int | None] = target_port

    def __post_init__(self) -> None:
        if self.connect_timeout <= timedelta(0):
            raise ConfigError("waypoint connect_timeout", f"{self.connect_timeout} must be positive")


def read_jwks(path: str, where: str) -> str:
    """The JWKS text in `path`; raises ConfigError naming `where` when it is not one."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, ValueError) as exc:
        raise ConfigError(where, f"cannot read a JWKS from {path}: {exc}") from None
    problem = jwkset.problem(text)
    if problem is not None:
        raise ConfigError(where, f"{path} {problem}", jwkset.HINT)
    return text
