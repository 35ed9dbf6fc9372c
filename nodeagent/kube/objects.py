"""Kubernetes-shaped objects: parse YAML documents into `KubeObject`s.

Both the lab (its input files) and the `files` source (the state directory it watches)
read Kubernetes-shaped YAML. This module does the part they share: split a stream into
documents, check each has apiVersion/kind/metadata.name, expand `kind: List`, and name
the document at fault when something is wrong. Kind-specific validation lives with the
code that understands the kind (lab/spec.py, the Istio translators).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml

from nodeagent.errors import ConfigError

# RFC 1123 label (namespaces, services, most names) and subdomain (pods, deployments).
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

# Cluster-scoped kinds (no metadata.namespace); every other kind lives in a namespace.
CLUSTER_SCOPED = {"Namespace", "Node", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "MutatingWebhookConfiguration",
                  "ValidatingWebhookConfiguration", "PersistentVolume", "StorageClass",
                  "PriorityClass", "IngressClass", "RuntimeClass", "GatewayClass",
                  "APIService", "CertificateSigningRequest"}


@dataclass(frozen=True)
class ObjectKey:
    """Identity of an object: (apiVersion group, kind, namespace, name)."""

    group: str
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {where}"


@dataclass
class KubeObject:
    """One Kubernetes-shaped object, as read. `body` is the whole document."""

    api_version: str
    kind: str
    name: str
    namespace: str  # "" for cluster-scoped kinds
    body: dict[str, Any]
    source: str = ""  # "file.yaml#2" — where it came from, for error messages
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return self.api_version.split("/")[0] if "/" in self.api_version else ""

    @property
    def key(self) -> ObjectKey:
        return ObjectKey(self.group, self.kind, self.namespace, self.name)

    @property
    def spec(self) -> dict[str, Any]:
        spec = self.body.get("spec")
        return spec if isinstance(spec, dict) else {}

    def __str__(self) -> str:
        return str(self.key)


def string_map(value: Any, where: str, what: str) -> dict[str, str]:
    """A map of strings as Kubernetes has them (labels, annotations, selectors); raises
    ConfigError naming `where` and the field `what` otherwise."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(where, f"{what} must be a map of strings, not {type(value).__name__}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str):
            raise ConfigError(where, f"{what} key {k!r} must be a string", "quote it")
        # Kubernetes accepts only strings. Converting YAML numbers and booleans here would
        # be lossy (1.10 -> "1.1", 010 -> "8", yes -> "true") and accept YAML a real
        # API server refuses, so only null (-> "") is let through.
        if v is not None and not isinstance(v, str):
            raise ConfigError(where, f"{what}[{k!r}] must be a string, not {type(v).__name__} {v!r}",
                              f'quote the value: {k}: "{v}"')
        out[k] = v or ""
    return out


def object_from_dict(doc: Any, source: str, default_namespace: str = "default") -> KubeObject:
    """Check the envelope of one document and wrap it. Raises ConfigError naming `source`."""
    if not isinstance(doc, dict):
        raise ConfigError(source, f"expected a Kubernetes object (a map), got {type(doc).__name__}")
    api_version, kind = doc.get("apiVersion"), doc.get("kind")
    if not isinstance(api_version, str) or not api_version:
        raise ConfigError(source, "missing apiVersion", "every object needs apiVersion and kind")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(source, "missing kind", "every object needs apiVersion and kind")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise ConfigError(f"{source} ({kind})", "missing metadata", "add metadata.name")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source} ({kind})", "missing metadata.name")
    where = f"{source} ({kind} {name})"
    if not DNS_SUBDOMAIN.match(name):
        raise ConfigError(where, f"metadata.name {name!r} is not a valid DNS-1123 name",
                          "use lower-case letters, digits, '-' and '.'")
    namespace = ""
    if kind not in CLUSTER_SCOPED:
        namespace = meta.get("namespace") or default_namespace
        if not isinstance(namespace, str) or not DNS_LABEL.match(namespace):
            raise ConfigError(where, f"metadata.namespace {namespace!r} is not a valid namespace name")
    labels = string_map(meta.get("labels"), where, "metadata.labels")
    annotations = string_map(meta.get("annotations"), where, "metadata.annotations")
    return KubeObject(api_version, kind, name, namespace, doc, source, labels, annotations)


def _load(text: str, source: str, syntax: str) -> list[Any]:
    if syntax == "json":
        # PyYAML reads most JSON but not tab indentation, which JSON tools emit.
        try:
            return [json.loads(text)] if text.strip() else []
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}:{exc.lineno}", f"malformed JSON: {exc.msg}") from None
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(where, f"malformed YAML: {problem}") from None


def parse_documents(text: str, source: str, default_namespace: str = "default",
                    syntax: str = "yaml") -> list[KubeObject]:
    """Parse a YAML stream (or, with syntax="json", one JSON document) of objects.

    `---`-separated documents, `kind: List` expanded, empty documents skipped. The first
    bad document raises ConfigError naming `source#index`, so a caller can refuse the
    whole file and keep its last good state.
    """
    out: list[KubeObject] = []
    for index, doc in enumerate(_load(text, source, syntax), start=1):
        if doc is None:
            continue
        where = f"{source}#{index}"
        if isinstance(doc, dict) and doc.get("kind") == "List":
            items = doc.get("items")
            items = [] if items is None else items
            if not isinstance(items, list):
                raise ConfigError(where, "List.items must be a list")
            out.extend(object_from_dict(item, f"{where}.items[{i}]", default_namespace)
                       for i, item in enumerate(items))
        else:
            out.append(object_from_dict(doc, where, default_namespace))
    return out


def parse_each(text: str, source: str, default_namespace: str = "default") -> list[KubeObject | ConfigError]:
    """Like parse_documents, but every document (and List item) on its own: a bad one is
    its ConfigError in the list and the others are still read, for checks that report
    every problem. A malformed YAML stream still raises."""
    out: list[KubeObject | ConfigError] = []
    for index, doc in enumerate(_load(text, source, "yaml"), start=1):
        where = f"{source}#{index}"
        items = [(doc, where)]
        if isinstance(doc, dict) and doc.get("kind") == "List":
            listed = doc.get("items") or []
            if not isinstance(listed, list):
                out.append(ConfigError(where, "List.items must be a list"))
                continue
            items = [(item, f"{where}.items[{i}]") for i, item in enumerate(listed)]
        for item, name in items:
            if item is None:
                continue
            try:
                out.append(object_from_dict(item, name, default_namespace))
            except ConfigError as err:
                out.append(err)
    return out


def dump_documents(objects: Iterable[KubeObject | dict[str, Any]]) -> str:
    """Serialise objects (or raw dicts) as one `---`-separated YAML stream."""
    bodies = [o.body if isinstance(o, KubeObject) else o for o in objects]
    return yaml.safe_dump_all(bodies, sort_keys=False, default_flow_style=False)
