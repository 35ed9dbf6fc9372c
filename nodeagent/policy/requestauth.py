"""RequestAuthentication as the L4 engine sees it: the workloads it selects.

JWT validation is HTTP work for the waypoint; the L4 engine only needs to know which
workloads a RequestAuthentication applies to, since their traffic must go through it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.policy.scope import Scope


@dataclass(frozen=True)
class RequestAuthentication:
    name: str
    scope: Scope
    issuers: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.scope.namespace}/{self.name}"
