"""The node agent: `nodeagent run` enrols the node's meshed pods into eBPF capture, opens
the in-pod listeners and relays their connections, over HBONE with the pods' workload
certificates where the other end is meshed, enforcing policy where it is the
destination; `nodeagent status` shows what it is doing.

At this level, the control: `daemon` (the asyncio main: sources, reconcile, readiness),
`config` (every setting), `configwork` (the config thread), `watch` (inotify on the
source), `admin` (/metrics, /debug/status, readiness), `metrics`, `logs`, `status` and
`cli`; `datapath` wires the parts below once. By role below it: `inpod/` (enrolment and
the pods' network namespaces), `proxy/` (the relays: the data path) and `waypoint/` (the
node's Envoy, its xDS publisher and the JWKS it needs).
"""
