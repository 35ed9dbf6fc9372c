"""Workload identity: SPIFFE IDs, the mesh CA and the agent's certificates.

This package holds what both sides share: `spiffe` names identities, `caproto` is the
CA's wire messages and name, `errors`, `pemfiles` and `tls` (mTLS contexts, the peer's
identity). `ca/` is the CA server (`nodeagent ca`); `workload/` is the agent's side,
which asks it for certificates. Neither imports the other.
"""
