"""The node's waypoint (L7), as the agent runs it: one Envoy per node, configured over xDS
by the agent and talking to the agent only over unix sockets.

- waypoint.py: `Waypoint`, what the data path holds: the Envoy child (EnvoySupervisor,
  its bootstrap file), the xDS server Envoy dials, the agent's upstream.sock and
  deliver.sock listeners with their PROXY v2 headers, `open()` to Envoy's outbound.sock
  and inbound.sock, the waypoint's metrics and `describe()` for status; composed with
- publisher.py: `Publisher`, what Envoy is told and what it took, with no sockets or
  threads: model → IstioConfig → snapshot, make-before-break of dropped clusters, the
  steering of the snapshot Envoy ACKed, and the resources Envoy refused held out.
- jwks.py: `JwksFetcher`, the keys of RequestAuthentication's jwksUri, fetched by the
  agent into files Envoy reads.
"""
