"""nodeagent: a sidecarless (ambient) service mesh data plane for Kubernetes.

One agent per node captures meshed pods' traffic with eBPF, carries it between nodes
in an mTLS tunnel (HBONE) and hands L7 work to one Envoy per node that it configures
over xDS. See docs/design.md.
"""

__version__ = "0.1.0"
