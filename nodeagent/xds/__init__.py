"""The waypoint's control plane: Istio YAML in, Envoy xDS out, for the one Envoy per node.

`istio/` validates networking.istio.io (and reads security.istio.io, validated by
`nodeagent.policy`) resources into typed form; `translate/` turns a Model plus those
into one node's Envoy resources; `snapshot.py` wraps them in an immutable, versioned,
consistency-checked Snapshot; `cache.py` keeps the last published one per node;
`server.py` serves them over ADS (grpcio, unix socket); `client.py` reads them back;
`bootstrap.py` and `envoy.py` start and supervise Envoy. `dataplane.py` is the contract
between Envoy and the agent's data path (sockets, PROXY v2 and its TLVs).
"""
