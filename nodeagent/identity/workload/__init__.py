"""The agent's side of workload identity: certificates for the pods on this node.

`client` calls the mesh CA, `manager` keeps one certificate per local service account
fresh (and adopts the key files an earlier agent left), `credentials` turns an issued
chain into a checked key file and ssl contexts.
"""
