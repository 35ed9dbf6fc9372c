"""The mesh CA server (`nodeagent ca`): signs workload certificates for node agents.

`signer` checks a CSR and signs (no transport), `keys` keeps the CA's keys on disk,
`auth` decides who may get which identity, `server` serves Istio's
IstioCertificateService over gRPC/TLS, `config` names every setting and `cli` runs it.
"""
