"""Benchmarks and test tools, above the product packages (nothing in the product imports
them): `nodeagent bench capture` (capture.py: enrolment latency and per-request capture
overhead on throwaway pods), `nodeagent bench tunnel` (tunnel.py: HBONE against a direct
connection on a lab of its own), `python -m nodeagent.bench.hbone` (the tunnel alone on
loopback), `python -m nodeagent.bench.accesslog` (what reading the waypoint's access log
costs a request) and `python -m nodeagent.bench.waypointcpu` (CPU per 1000 requests
through the routing waypoint on a lab); `sandbox` builds throwaway pods on one real node for
the kernel tests and `probe` is the client the tests run inside pods (send, hold).
"""
