"""Workload identity: SPIFFE IDs, the mesh CA and the agent's certificates.

`spiffe` names identities; `ca` signs (no transport), `cakeys` keeps the CA's keys on
disk, `caauth` decides who may get which identity, `server` serves Istio's
IstioCertificateService over gRPC/TLS (`nodeagent ca`). On the agent side `client`
calls that service, `manager` keeps one certificate per local service account fresh and
`credentials`/`tls` turn a certificate into files and ssl contexts.
"""
