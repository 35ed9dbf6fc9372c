"""The node agent daemon: `nodeagent run` enrols the node's meshed pods into eBPF capture,
opens the in-pod listeners and relays their connections, over HBONE with the pods'
workload certificates where the other end is meshed, enforcing L4 policy where it is
the destination; `nodeagent status` shows what it is doing. Config (config.py), pod
netns discovery (podns.py), the enrolment reconciler (enrolment.py), the data path
(datapath.py wires destinations, tunnel_outbound, tunnel_inbound, inbound, outbound,
splice, identities, policies, telemetry), metrics, the admin endpoints and the asyncio
main (daemon.py) each live in their own module.
"""
