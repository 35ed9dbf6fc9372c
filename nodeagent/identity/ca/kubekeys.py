"""The CA's signing material in a cluster: a Secret, and the root in a ConfigMap.

The Secret (default nodeagent-system/nodeagent-ca-keys, type Opaque) holds the state
directory's layout under the same keys (ca-cert.pem, ca-key.pem, root-cert.pem, optional
cert-chain.pem), so an operator can create it beforehand with an intermediate under
their own root, as Istio's `cacerts`. Absent at start, a self-signed root is generated
and the Secret created; a 409 AlreadyExists means another CA replica won the race, and
its root is read back and used, so two replicas never make two roots. A Secret that
exists but is incomplete or inconsistent is refused, never overwritten (that would
orphan every issued certificate). The key is never logged.

The root certificate is then published in the ConfigMap (default
nodeagent-system/nodeagent-ca-root-cert, key root-cert.pem) that the agents mount and
users read; it is created, or updated when it differs from the Secret's root.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import logging
from typing import Any

from nodeagent.errors import ConfigError
from nodeagent.identity import pemfiles
from nodeagent.identity.ca import keys
from nodeagent.kube.client import Conflict, KubeClient, NotFound

ROOT_CERT_KEY = "root-cert.pem"  # the ConfigMap's key, as Istio's istio-ca-root-cert
LABELS = {"app.kubernetes.io/name": "nodeagent-ca", "app.kubernetes.io/part-of": "nodeagent"}


def _path(kind: str, namespace: str, name: str | None = None) -> str:
    return f"/api/v1/namespaces/{namespace}/{kind}" + (f"/{name}" if name else "")


def secret_files(secret: dict[str, Any], where: str) -> dict[str, bytes]:
    """The Secret's data, decoded: name -> bytes."""
    files = {}
    for name, value in (secret.get("data") or {}).items():
        try:
            files[name] = base64.b64decode(str(value), validate=True)
        except (ValueError, binascii.Error):
            raise ConfigError(where, f"data {name} is not base64") from None
    return files


def secret_body(namespace: str, name: str, material: keys.SigningMaterial) -> dict[str, Any]:
    data = {k: base64.b64encode(v).decode() for k, v in keys.to_files(material).items()}
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "labels": LABELS}, "data": data}


async def load_or_create(client: KubeClient, namespace: str, name: str, trust_domain: str,
                         now: dt.datetime, log: logging.Logger) -> keys.SigningMaterial:
    """The material of Secret namespace/name, made (a new self-signed root) if absent."""
    where = f"Secret {namespace}/{name}"
    try:
        secret = await client.get(_path("secrets", namespace, name), where)
    except NotFound:
        material = keys.generate_root(trust_domain, now)
        try:
            await client.post(_path("secrets", namespace), where, secret_body(namespace, name, material))
        except Conflict:
            log.info("%s was created by another CA meanwhile; using its root", where)
            secret = await client.get(_path("secrets", namespace, name), where)
        else:
            log.info("generated a self-signed mesh root for %s, kept in %s (expires %s)", trust_domain, where,
                     material.root.not_valid_after_utc.isoformat())
            return material
    material = keys.from_files(secret_files(secret, where), where, now)
    log.info("loaded CA from %s (%s, signer expires %s)", where,
             "self-signed root" if material.self_signed else "intermediate under an external root",
             material.not_after.isoformat())
    return material


async def publish_root(client: KubeClient, namespace: str, name: str, material: keys.SigningMaterial,
                       log: logging.Logger) -> None:
    """Make ConfigMap namespace/name hold the root certificate under root-cert.pem."""
    where = f"ConfigMap {namespace}/{name}"
    pem = pemfiles.certs_pem([material.root]).decode()
    for _ in range(3):  # a concurrent writer (another replica) makes create or update conflict
        try:
            current = await client.get(_path("configmaps", namespace, name), where)
        except NotFound:
            body = {"apiVersion": "v1", "kind": "ConfigMap", "data": {ROOT_CERT_KEY: pem},
                    "metadata": {"name": name, "namespace": namespace, "labels": LABELS}}
            try:
                await client.post(_path("configmaps", namespace), where, body)
            except Conflict:
                continue
            log.info("published the root certificate in %s", where)
            return
        if (current.get("data") or {}).get(ROOT_CERT_KEY) == pem:
            return
        current["data"] = {**(current.get("data") or {}), ROOT_CERT_KEY: pem}
        try:
            await client.put(_path("configmaps", namespace, name), where, current)
        except Conflict:
            continue
        log.warning("%s held another root certificate; replaced it with the Secret's", where)
        return
    raise ConfigError(where, "changed under the CA three times in a row", "is another CA running?")
