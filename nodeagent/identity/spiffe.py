"""SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

`Identity` is what the mesh authenticates and authorizes: the CA issues one per
Kubernetes service account, the tunnel presents the source workload's and reads the
peer's from its certificate (`identity_of_certificate`). Only the Kubernetes form
(ns/<ns>/sa/<sa>) is accepted, as in Istio and ztunnel; a malformed ID is a ConfigError
naming the ID and what is wrong with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

from nodeagent.errors import ConfigError
from nodeagent.identity.errors import CertificateIdentityError
from nodeagent.kube.objects import DNS_LABEL, DNS_SUBDOMAIN

SCHEME = "spiffe://"
# A node agent's own identity is `spiffe://<td>/nodeagent/node/<node name>`: what it
# presents when it vouches for one of its pods' requests whose destination's HTTP policy
# its waypoint enforced (one waypoint per request). The CA issues it only to that node's
# agent (identity/ca/auth.py); it is no workload's form, so no workload certificate can
# say it, and an agent of a version before it refuses the handshake (it takes only the
# ns/sa form) rather than read the node as a workload principal. Held as an Identity of
# the reserved namespace NODE_NAMESPACE, whose ns/sa form is refused.
NODE_NAMESPACE = "nodeagent-node"
NODE_PATH = "nodeagent/node"
# SPIFFE ID spec: a trust domain is lowercase letters, digits, '.', '-' and '_'.
TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}\Z")


def trust_domain_problem(value: str) -> str | None:
    """What is wrong with `value` as a trust domain, or None."""
    if not isinstance(value, str) or not TRUST_DOMAIN.match(value):
        return f"trust domain {value!r} may hold only lowercase letters, digits, '.', '-' and '_'"
    return None


def parse_trust_domain(raw: str) -> str:
    """A trust domain setting (the agent's and the CA's): `raw`, or ValueError saying what is wrong."""
    problem = trust_domain_problem(raw)
    if problem:
        raise ValueError(problem)
    return raw


@dataclass(frozen=True, order=True)
class Identity:
    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        problem = _problem(self.trust_domain, self.namespace, self.service_account)
        if problem:
            raise ConfigError(f"SPIFFE ID {self.uri}", problem)

    @property
    def uri(self) -> str:
        if self.namespace == NODE_NAMESPACE:
            return f"{SCHEME}{self.trust_domain}/{NODE_PATH}/{self.service_account}"
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def node(self) -> str | None:
        """The node whose agent this identity is (NODE_NAMESPACE), or None: a workload's."""
        return self.service_account if self.namespace == NODE_NAMESPACE else None

    @property
    def short(self) -> str:
        """`ns/<ns>/sa/<sa>` (a node's: `nodeagent/node/<node>`), the trust-domain-free form
        used in messages."""
        if self.namespace == NODE_NAMESPACE:
            return f"{NODE_PATH}/{self.service_account}"
        return f"ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str, where: str | None = None) -> "Identity":
        """The identity of `uri`; ConfigError naming `where` (default: the URI) otherwise."""
        where = where or f"SPIFFE ID {uri!r}"
        if not isinstance(uri, str) or not uri.startswith(SCHEME):
            raise ConfigError(where, f"must start with {SCHEME}",
                              "expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")
        parts = uri[len(SCHEME):].split("/")
        if len(parts) == 4 and "/".join(parts[1:3]) == NODE_PATH:  # a node agent's own
            parts = [parts[0], "ns", NODE_NAMESPACE, "sa", parts[3]]
        elif len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise ConfigError(where, "is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")
        elif parts[2] == NODE_NAMESPACE:
            raise ConfigError(where, f"namespace {NODE_NAMESPACE} is the node agents' (spiffe://<trust-domain>/"
                                     f"{NODE_PATH}/<node>), no workload's")
        problem = _problem(parts[0], parts[2], parts[4])
        if problem:
            raise ConfigError(where, problem)
        return cls(parts[0], parts[2], parts[4])


def _problem(trust_domain: str, namespace: str, service_account: str) -> str | None:
    """What is wrong with these parts of a SPIFFE ID, or None."""
    if trust_domain_problem(trust_domain):
        return trust_domain_problem(trust_domain)
    if not isinstance(namespace, str) or not DNS_LABEL.match(namespace):
        return f"namespace {namespace!r} is not a Kubernetes namespace name (DNS-1123 label)"
    if not isinstance(service_account, str) or not DNS_SUBDOMAIN.match(service_account):
        return f"service account {service_account!r} is not a Kubernetes name (DNS-1123 subdomain)"
    return None


def uri_sans(names: x509.SubjectAlternativeName) -> list[str]:
    """Every URI in a SAN extension (SPIFFE or not)."""
    return names.get_values_for_type(x509.UniformResourceIdentifier)


def identity_of_certificate(cert: x509.Certificate) -> Identity:
    """The SPIFFE identity a workload certificate carries: exactly one URI SAN, a valid
    spiffe:// ID. Other SAN types (the CA's own DNS names) are allowed beside it."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateIdentityError(f"certificate {cert.serial_number:x} has no SubjectAlternativeName",
                                       "it is not a mesh workload certificate") from None
    uris = uri_sans(san)
    if len(uris) != 1:
        raise CertificateIdentityError(
            f"certificate {cert.serial_number:x} has {len(uris)} URI SANs, a workload certificate has exactly one")
    try:
        return Identity.parse(uris[0])
    except ConfigError as exc:
        raise CertificateIdentityError(f"certificate {cert.serial_number:x}: {exc}") from None


def node_identity(trust_domain: str, node: str) -> Identity:
    """The identity of node `node`'s agent (NODE_NAMESPACE)."""
    return Identity(trust_domain, NODE_NAMESPACE, node)
