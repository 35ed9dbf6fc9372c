"""The control plane's keys and certificates, made by the lab as kubeadm makes them.

One CA (ECDSA P-256, 10 years) signs the API server's serving certificate (the names
and IPs pods and nodes reach it by: `kubernetes.default.svc…`, the `kubernetes`
Service's ClusterIP, the control plane's fabric address, loopback) and a client
certificate per user: `kubernetes-admin` in `system:masters` (the admin kubeconfig),
`system:kube-controller-manager`, `system:kube-scheduler`, and `system:node:<node>` in
`system:nodes` for each node (the lab acts as its kubelet, under the Node authorizer and
NodeRestriction). The service-account signing key is RSA 2048 (RS256 tokens, the
default every client verifies). Keys are 0600 (`pemfiles.write_private`); every user
gets a kubeconfig with its certificate inline.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeagent.identity import pemfiles

CLUSTER = "nodeagent-lab"
CA_DAYS = 3650
LEAF_DAYS = 365
SERVICE_DOMAIN = "cluster.local"
API_NAMES = ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
             f"kubernetes.default.svc.{SERVICE_DOMAIN}", "localhost")
ADMIN = ("kubernetes-admin", "system:masters")
CONTROLLER_MANAGER = ("system:kube-controller-manager", None)
SCHEDULER = ("system:kube-scheduler", None)
KUBE_PROXY = ("system:kube-proxy", None)  # bound to system:node-proxier by the default RBAC


def node_user(node: str) -> tuple[str, str]:
    return f"system:node:{node}", "system:nodes"


@dataclass(frozen=True)
class Pki:
    """Where the control plane's material lives (`<state>/kube/pki/`)."""

    directory: str

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @property
    def ca_cert(self) -> str:
        return self.path("ca.crt")

    @property
    def ca_key(self) -> str:
        return self.path("ca.key")

    @property
    def sa_key(self) -> str:
        return self.path("sa.key")

    @property
    def sa_pub(self) -> str:
        return self.path("sa.pub")

    def cert(self, name: str) -> str:
        return self.path(f"{name}.crt")

    def key(self, name: str) -> str:
        return self.path(f"{name}.key")

    def kubeconfig(self, name: str) -> str:
        return self.path(f"{name}.kubeconfig")


def _name(common: str, org: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
    return x509.Name(parts + [x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime, days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _make_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"{CLUSTER}-ca")
    cert = (_builder(name, name, key.public_key(), now, CA_DAYS)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert: x509.Certificate, subject: x509.Name, now: dt.datetime, server_names: list | None = None):
    key = ec.generate_private_key(ec.SECP256R1())
    usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names else [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (_builder(subject, ca_cert.subject, key.public_key(), now, LEAF_DAYS)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                            content_commitment=False, data_encipherment=False, key_agreement=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(server_names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def server_names(addresses: list[str]) -> list:
    return [x509.DNSName(n) for n in API_NAMES] + [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]


def kubeconfig(server: str, ca_pem: bytes, user: str, cert_pem: bytes, key_pem: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": CLUSTER, "preferences": {},
        "clusters": [{"name": CLUSTER, "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)}}],
        "contexts": [{"name": CLUSTER, "context": {"cluster": CLUSTER, "user": user}}],
    }, sort_keys=False)


def provision(pki: Pki, server: str, addresses: list[str], users: dict[str, tuple[str, str | None]],
              now: dt.datetime | None = None) -> None:
    """Make the CA, the API server's certificate for `addresses` (plus API_NAMES), the
    service-account key pair, and per entry of `users` (file stem -> (CN, O)) a client
    certificate and a kubeconfig pointing at `server`."""
    now = now or dt.datetime.now(dt.timezone.utc)
    pemfiles.private_dir(Path(pki.directory))
    ca_key, ca_cert = _make_ca(now)
    ca_pem = _pem_cert(ca_cert)
    pemfiles.write_private(Path(pki.ca_key), pemfiles.key_pem(ca_key))
    pemfiles.write_private(Path(pki.ca_cert), ca_pem, mode=0o644)
    key, cert = _leaf(ca_key, ca_cert, _name("kube-apiserver"), now, server_names(addresses))
    pemfiles.write_private(Path(pki.key("apiserver")), pemfiles.key_pem(key))
    pemfiles.write_private(Path(pki.cert("apiserver")), _pem_cert(cert), mode=0o644)
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pemfiles.write_private(Path(pki.sa_key), pemfiles.key_pem(sa))
    pemfiles.write_private(Path(pki.sa_pub), sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), mode=0o644)
    for stem, (common, org) in users.items():
        key, cert = _leaf(ca_key, ca_cert, _name(common, org), now)
        key_pem, cert_pem = pemfiles.key_pem(key), _pem_cert(cert)
        pemfiles.write_private(Path(pki.key(stem)), key_pem)
        pemfiles.write_private(Path(pki.cert(stem)), cert_pem, mode=0o644)
        config = kubeconfig(server, ca_pem, common, cert_pem, key_pem)
        pemfiles.write_private(Path(pki.kubeconfig(stem)), config.encode())
