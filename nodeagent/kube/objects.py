"""Kubernetes-shaped objects: parse YAML documents into `KubeObject`s.

Both the lab (its input files) and the `files` source (the state directory it watches)
read Kubernetes-shaped YAML. This module does the part they share: split a stream into
documents, check each has apiVersion/kind/metadata.name, expand `kind: List`, and name
the document at fault when something is wrong; and read `-f` arguments as kubectl does
(files, directories, `-` for standard input) for `lab apply`/`delete` and `analyze`.
Kind-specific validation lives with the code that understands the kind (lab/spec.py,
the Istio translators).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Iterable

import yaml

from nodeagent.errors import ConfigError

# RFC 1123 label (namespaces, services, most names) and subdomain (pods, deployments).
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")

# Cluster-scoped kinds (no metadata.namespace); every other kind lives in a namespace.
STDIN = "-"  # the -f argument naming standard input
STDIN_NAME = "<stdin>"  # how errors name it
SUFFIXES = (".yaml", ".yml", ".json")  # a directory's files that are read (kubectl's, the files source's)

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


# libyaml's parser (PyYAML's C binding) with the same safe constructors: 10k Pod documents
# parse in ~1/10 of the pure-Python SafeLoader's time. PyYAML without libyaml falls back.
def _unique_keys(base: type) -> type:
    """`base` (a PyYAML safe loader) refusing a mapping that has a key twice, as a strict
    API server and kubectl refuse a field twice: PyYAML keeps the last one silently, so
    `mode: STRICT` then `mode: PERMISSIVE` in one PeerAuthentication was PERMISSIVE with
    no word. Merge keys (`<<`) still merge as YAML says."""
    class Loader(base):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: set = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        duplicate = key in seen
                    except TypeError:  # unhashable: the constructor says so below
                        continue
                    if duplicate:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark, f"found key {key!r} twice",
                            key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep)
    return Loader


SAFE_LOADER = _unique_keys(getattr(yaml, "CSafeLoader", yaml.SafeLoader))
PURE_LOADER = _unique_keys(yaml.SafeLoader)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: a key twice is refused (as _unique_keys does)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"found key {key!r} twice")
        out[key] = value
    return out


def load_all(text: str) -> list[Any]:
    """Every document of a YAML stream, safely: libyaml's parser, and on an error the
    pure-Python one again, for its words (it names the character it found, a tab say,
    where libyaml only says what it could not do), or for its reading where the two
    parsers differ and only libyaml refused."""
    try:
        return list(yaml.load_all(text, Loader=SAFE_LOADER))
    except yaml.YAMLError:
        if not hasattr(yaml, "CSafeLoader"):
            raise
    return list(yaml.load_all(text, Loader=PURE_LOADER))


def _load(text: str, source: str, syntax: str) -> list[Any]:
    if syntax == "json":
        # PyYAML reads most JSON but not tab indentation, which JSON tools emit.
        try:
            return [json.loads(text, object_pairs_hook=_unique_pairs)] if text.strip() else []
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source}:{exc.lineno}", f"malformed JSON: {exc.msg}") from None
        except ValueError as exc:  # _unique_pairs
            raise ConfigError(source, f"malformed JSON: {exc}") from None
    try:
        return load_all(text)
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


DOCUMENT_START = re.compile(r"^---(?:[ \t].*)?$")


def parse_each(text: str, source: str, default_namespace: str = "default") -> list[KubeObject | ConfigError]:
    """Like parse_documents, but every document (and List item) on its own, for checks that
    report every problem: a malformed or invalid one is its ConfigError in the list (with a
    hint when its lines all start at column 0: YAML copied from a page that lost its
    indentation) and the others are still read. Documents are numbered as parse_documents
    numbers them."""
    out: list[KubeObject | ConfigError] = []
    for index, (line, chunk) in enumerate(_documents(text), start=1):
        where = f"{source}#{index}"
        flat = _flat(chunk)
        try:
            docs = [d for d in load_all(chunk) if d is not None]
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f"{source}:{line + mark.line}" if mark is not None else source
            out.append(ConfigError(f"{at} ({where})", f"malformed YAML: {getattr(exc, 'problem', None) or exc}",
                                   flat))
            continue
        for doc in docs:
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
                    message = err.message.removeprefix(f"{err.where}: ")
                    out.append(ConfigError(err.where, message, flat) if flat else err)
    return out


def _documents(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each `---`-separated document, as YAML counts them: the
    part before the first separator counts only when it holds more than comments."""
    chunks: list[tuple[int, list[str]]] = [(1, [])]
    for number, line in enumerate(text.split("\n"), start=1):
        if DOCUMENT_START.match(line):
            chunks.append((number + 1, []))
        else:
            chunks[-1][1].append(line)
    first_line, first = chunks[0]
    if len(chunks) > 1 and all(not l.strip() or l.lstrip().startswith("#") for l in first):
        chunks = chunks[1:]
    return [(n, "\n".join(lines)) for n, lines in chunks]


def _flat(chunk: str) -> str | None:
    """A hint when a document lost its layout: all on one line, or every line of a nesting
    document at column 0."""
    lines = [l for l in chunk.split("\n") if l.strip() and not l.lstrip().startswith("#")]
    if any(re.search(r"\bapiVersion: \S+ kind: ", l) for l in lines):
        return ("the document is on one line: its line breaks were lost (copied from a page?); put each field on "
                "a line of its own, indented as the resource's structure needs")
    nested = sum(l.rstrip().endswith(":") for l in lines)
    if len(lines) > 3 and nested > 1 and not any(l[0] in " \t" for l in lines):
        return ("every line starts at column 0, so nothing nests: the YAML lost its indentation (copied from a "
                "page?); indent it as the resource's structure needs")
    return None


def dump_documents(objects: Iterable[KubeObject | dict[str, Any]]) -> str:
    """Serialise objects (or raw dicts) as one `---`-separated YAML stream."""
    bodies = [o.body if isinstance(o, KubeObject) else o for o in objects]
    return yaml.safe_dump_all(bodies, sort_keys=False, default_flow_style=False)


def expand_paths(paths: Iterable[str], recursive: bool = False) -> list[str]:
    """kubectl's `-f`: a file as given (whatever its name); a directory's *.yaml, *.yml and
    *.json files, sorted (and, with `recursive`, those of its subdirectories: kubectl's
    -R), hidden ones skipped; `-` as is. A path that does not exist is kept: reading it
    says so."""
    out: list[str] = []
    for path in paths:
        if path == STDIN or not os.path.isdir(path):
            out.append(path)
            continue
        found = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
            found += [os.path.join(root, f) for f in files if f.endswith(SUFFIXES) and not f.startswith(".")]
        out += sorted(found)
    return out


@dataclass(frozen=True)
class Input:
    """One file of the input: its text, or why it could not be read."""

    path: str  # as given (`-` for standard input)
    text: str = ""
    error: ConfigError | None = None

    @property
    def name(self) -> str:
        return STDIN_NAME if self.path == STDIN else self.path

    @property
    def syntax(self) -> str:
        return "json" if self.path.endswith(".json") else "yaml"


def read_inputs(paths: Iterable[str], recursive: bool = False, stdin: IO[str] | None = None) -> list[Input]:
    """The files of `-f` arguments (expand_paths) in order, each read whole; one that
    cannot be read (missing, unreadable, not UTF-8) carries its ConfigError instead."""
    out = []
    for path in expand_paths(paths, recursive):
        try:
            if path == STDIN:
                out.append(Input(path, (stdin or sys.stdin).read()))
            else:
                with open(path, encoding="utf-8") as fh:
                    out.append(Input(path, fh.read()))
        except OSError as exc:
            out.append(Input(path, error=ConfigError(path, f"cannot read: {exc.strerror or exc}")))
        except UnicodeDecodeError as exc:
            out.append(Input(path, error=ConfigError(path, f"cannot read: not UTF-8 ({exc.reason})")))
    return out


def resource_type(obj: KubeObject, plural: bool = False) -> str:
    """How kubectl names the object's type in its messages: `virtualservice.networking.istio.io`,
    `deployment.apps`, `pod` (and `virtualservices.networking.istio.io` in NotFound errors)."""
    kind = obj.kind.lower()
    if plural:
        kind = kind + "es" if kind.endswith(("s", "x", "ch", "sh")) else \
            kind[:-1] + "ies" if kind.endswith("y") and kind[-2:-1] not in "aeiou" else kind + "s"
    return f"{kind}.{obj.group}" if obj.group else kind
