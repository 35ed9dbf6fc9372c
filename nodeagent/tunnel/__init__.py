"""The HBONE tunnel: HTTP/2 CONNECT over mutual TLS 1.3 to a pod's port 15008.

`HboneServer` is the destination side, `HbonePool` the source side; both hand out
`HboneStream`s, duplex byte streams with an asyncio StreamReader/StreamWriter-like API
that are also asyncio transports for the agent's splice. Built on `h2` (HTTP/2 state
machine) and `ssl`; see docs/design.md "HBONE tunnel".
"""

from nodeagent.tunnel.budget import StreamBudget
from nodeagent.tunnel.errors import (ConnectFailed, ConnectionLost, ConnectRefused, HandshakeFailed,
                                     IdentityMismatch, Overloaded, PeerRefused, PoolClosed, ResponseTimeout,
                                     StreamReset, TunnelError)
from nodeagent.tunnel.hbone_client import HbonePool
from nodeagent.tunnel.hbone_server import HboneServer, StreamInfo
from nodeagent.tunnel.metrics import TunnelMetrics
from nodeagent.tunnel.settings import TunnelSettings
from nodeagent.tunnel.stream import HboneStream

__all__ = ["ConnectFailed", "ConnectionLost", "ConnectRefused", "HandshakeFailed", "HboneServer", "HbonePool",
           "HboneStream", "IdentityMismatch", "Overloaded", "PeerRefused", "PoolClosed", "StreamBudget",
           "ResponseTimeout", "StreamInfo", "StreamReset", "TunnelError", "TunnelMetrics", "TunnelSettings"]
