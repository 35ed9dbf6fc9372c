"""The L4 policy engine: security.istio.io resources validated into a PolicySet that
decides connections (AuthorizationPolicy), gives each pod port its mTLS mode
(PeerAuthentication) and says which workloads need a waypoint for policy. Pure Python,
no I/O: the agent builds a PolicySet from each new Model and asks it per connection."""

from nodeagent.policy.authz import Connection, Decision
from nodeagent.policy.policyset import PolicySet
from nodeagent.policy.scope import DEFAULT_ROOT_NAMESPACE

__all__ = ["Connection", "Decision", "PolicySet", "DEFAULT_ROOT_NAMESPACE"]
