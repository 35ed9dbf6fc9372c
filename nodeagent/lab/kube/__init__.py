"""The lab's real Kubernetes control plane (`nodeagent lab up --kube`).

`pki` makes the cluster's CA, certificates, service-account key and kubeconfigs;
`controlplane` finds the binary `controlplane/build` made and says how each component
runs, in the control plane's own netns at the fabric's free `.1`; `api` is a small
client of the API server for the lab's own calls; `nodes` registers the lab's nodes and
keeps their leases, as each node's kubelet would.
"""
