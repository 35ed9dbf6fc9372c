"""The data path: the relays of captured connections, wired once by agent/datapath.py.

`outbound` (15001: destinations.resolve, then HBONE via `tunnel_outbound` or plain TCP),
`inbound` (15006: plaintext, PeerAuthentication and AuthorizationPolicy, then delivery)
and `tunnel_inbound` (15008: the HBONE server) build on `relay` (splice and the shared
failure handling) and `delivery` (into the pod, or to the waypoint). Each reads one
frozen `inputs.ProxyInputs`: the model, the enrolled pods, the policies in force
(`policies`), the workload certificates (`identities`), telemetry, the delivered
connections `admission` re-checks, and the waypoint's steering (`steering`).
"""
