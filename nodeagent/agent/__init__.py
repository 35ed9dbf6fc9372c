"""The node agent daemon: `nodeagent run` enrols the node's meshed pods into eBPF capture,
opens the in-pod listeners and relays their connections; `nodeagent status` shows what it
is doing. Config (config.py), pod netns discovery (podns.py), the enrolment reconciler
(enrolment.py), the relays (outbound.py, inbound.py, splice.py), metrics, the admin
endpoints and the asyncio main (daemon.py) each live in their own module.
"""
