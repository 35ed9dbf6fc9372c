"""kube/objects.py: YAML/JSON streams into KubeObjects, and the error each bad document
gets (it must name the file, the document or line, and the field)."""

from __future__ import annotations

import json

import pytest

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import ObjectKey, dump_documents, parse_documents

POD = """
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web, version: v2}
  annotations: {note: hello}
spec: {nodeName: node-a}
"""


def test_single_document_fields():
    [obj] = parse_documents(POD, "pods.yaml")
    assert (obj.api_version, obj.kind, obj.name, obj.namespace) == ("v1", "Pod", "web-1", "shop")
    assert obj.labels == {"app": "web", "version": "v2"}
    assert obj.annotations == {"note": "hello"}
    assert obj.spec == {"nodeName": "node-a"}
    assert obj.source == "pods.yaml#1"
    assert obj.key == ObjectKey("", "Pod", "shop", "web-1")
    assert str(obj) == "Pod shop/web-1"


def test_multi_document_stream_skips_empty_documents():
    text = "---\n" + POD + "---\n---\n# only a comment\n---\n" + POD.replace("web-1", "web-2")
    objs = parse_documents(text, "f.yaml")
    assert [o.name for o in objs] == ["web-1", "web-2"]
    # Indexes count empty documents too (a leading `---` opens the first one), so they
    # match the count of documents an editor shows.
    assert [o.source for o in objs] == ["f.yaml#1", "f.yaml#4"]


def test_empty_stream_is_no_objects():
    assert parse_documents("", "f.yaml") == []
    assert parse_documents("---\n---\n", "f.yaml") == []


def test_list_is_expanded_with_item_sources():
    text = """
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
- {apiVersion: v1, kind: Service, metadata: {name: web, namespace: shop}}
"""
    objs = parse_documents(text, "l.yaml")
    assert [(o.kind, o.name, o.namespace) for o in objs] == [("Namespace", "shop", ""), ("Service", "web", "shop")]
    assert objs[1].source == "l.yaml#1.items[1]"
    assert parse_documents("apiVersion: v1\nkind: List\nitems:\n", "l.yaml") == []


@pytest.mark.parametrize("items", ["items: {}", "items: nope"])
def test_list_items_must_be_a_list(items):
    with pytest.raises(ConfigError, match=r"l\.yaml#1: List\.items must be a list"):
        parse_documents(f"apiVersion: v1\nkind: List\n{items}\n", "l.yaml")


def test_bad_item_in_list_names_its_index():
    text = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: ok}}\n- {kind: Pod}\n"
    with pytest.raises(ConfigError, match=r"l\.yaml#1\.items\[1\]: missing apiVersion"):
        parse_documents(text, "l.yaml")


def test_malformed_yaml_names_the_line():
    text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: [a, b\n  namespace: x\n"
    with pytest.raises(ConfigError) as info:
        parse_documents(text, "bad.yaml")
    assert str(info.value).startswith("bad.yaml:5: malformed YAML: ")
    assert info.value.where == "bad.yaml:5"


def test_unsafe_yaml_tags_are_refused():
    with pytest.raises(ConfigError, match=r"bad\.yaml:1: malformed YAML: could not determine a constructor"):
        parse_documents("!!python/object/apply:os.system ['true']\n", "bad.yaml")


@pytest.mark.parametrize("doc, message", [
    ({"kind": "Pod", "metadata": {"name": "a"}}, "f#1: missing apiVersion"),
    ({"apiVersion": "", "kind": "Pod", "metadata": {"name": "a"}}, "f#1: missing apiVersion"),
    ({"apiVersion": "v1", "metadata": {"name": "a"}}, "f#1: missing kind"),
    ({"apiVersion": "v1", "kind": "Pod"}, "f#1 (Pod): missing metadata"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": "a"}, "f#1 (Pod): missing metadata"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {}}, "f#1 (Pod): missing metadata.name"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": 7}}, "f#1 (Pod): missing metadata.name"),
])
def test_missing_envelope_fields(doc, message):
    with pytest.raises(ConfigError) as info:
        parse_documents(json.dumps(doc), "f")
    assert str(info.value).startswith(message)


def test_document_that_is_not_a_map():
    with pytest.raises(ConfigError, match=r"f#1: expected a Kubernetes object \(a map\), got list"):
        parse_documents("- a\n- b\n", "f")


@pytest.mark.parametrize("name", ["Web", "web_1", "-web", "web-", "a" * 254, "we b"])
def test_bad_names_are_refused(name):
    text = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}})
    with pytest.raises(ConfigError, match="is not a valid DNS-1123 name"):
        parse_documents(text, "f")


@pytest.mark.parametrize("name", ["a", "web-1", "web.v1", "0abc", "a" * 253])
def test_good_names(name):
    [obj] = parse_documents(json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}}), "f")
    assert obj.name == name


@pytest.mark.parametrize("namespace", ["Shop", "shop.v1", "a" * 64, 5])
def test_bad_namespaces_are_refused(namespace):
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": namespace}}
    with pytest.raises(ConfigError, match=r"f#1 \(Pod a\): metadata.namespace .* is not a valid namespace name"):
        parse_documents(json.dumps(doc), "f")


@pytest.mark.parametrize("labels, message", [
    ("[a, b]", "metadata.labels must be a map of strings, not list"),
    ("{version: 1.10}", "metadata.labels['version'] must be a string, not float 1.1"),
    ("{version: 2}", "metadata.labels['version'] must be a string, not int 2"),
    ("{enabled: yes}", "metadata.labels['enabled'] must be a string, not bool True"),
    ("{app: {name: x}}", "metadata.labels['app'] must be a string, not dict"),
    ("{1: a}", "metadata.labels key 1 must be a string"),
])
def test_bad_label_types_are_refused(labels, message):
    text = f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels: {labels}\n"
    with pytest.raises(ConfigError) as info:
        parse_documents(text, "f")
    assert str(info.value).startswith(f"f#1 (Pod a): {message}")


def test_bad_annotation_type_says_to_quote_it():
    text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  annotations: {ports: 9000}\n"
    with pytest.raises(ConfigError, match=r"metadata\.annotations\['ports'\] must be a string.*quote the value: ports: \"9000\""):
        parse_documents(text, "f")


def test_null_label_value_is_empty_string():
    [obj] = parse_documents("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels: {x: , y: 'z'}\n", "f")
    assert obj.labels == {"x": "", "y": "z"}


def test_default_namespace():
    text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"
    assert parse_documents(text, "f")[0].namespace == "default"
    assert parse_documents(text, "f", default_namespace="shop")[0].namespace == "shop"
    explicit = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: other}\n"
    assert parse_documents(explicit, "f", default_namespace="shop")[0].namespace == "other"


@pytest.mark.parametrize("kind", ["Namespace", "Node", "ClusterRole", "CustomResourceDefinition",
                                  "ValidatingWebhookConfiguration"])
def test_cluster_scoped_kinds_have_no_namespace(kind):
    text = f"apiVersion: v1\nkind: {kind}\nmetadata: {{name: x, namespace: ignored}}\n"
    [obj] = parse_documents(text, "f", default_namespace="shop")
    assert obj.namespace == ""
    assert str(obj) == f"{kind} x"


def test_group_of_api_version():
    text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
    [obj] = parse_documents(text, "f")
    assert obj.group == "networking.istio.io"
    assert obj.key == ObjectKey("networking.istio.io", "VirtualService", "default", "r")


def test_json_syntax_accepts_tab_indentation():
    doc = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "labels": {"app": "x"}}}
    [obj] = parse_documents(json.dumps(doc, indent="\t"), "p.json", syntax="json")
    assert obj.labels == {"app": "x"}
    assert parse_documents(" \n", "p.json", syntax="json") == []


def test_malformed_json_names_the_line():
    with pytest.raises(ConfigError, match=r"^p\.json:3: malformed JSON: "):
        parse_documents('{\n"apiVersion": "v1",\n"kind": }\n', "p.json", syntax="json")


def test_dump_round_trips():
    objs = parse_documents(POD + "---\n" + POD.replace("web-1", "web-2"), "f")
    again = parse_documents(dump_documents(objs), "g")
    assert [o.body for o in again] == [o.body for o in objs]
    assert parse_documents(dump_documents([{"apiVersion": "v1", "kind": "Namespace",
                                            "metadata": {"name": "n"}}]), "g")[0].name == "n"


def test_yaml_is_read_by_libyaml_and_reads_as_pythons_loader_reads_it():
    """Streams are parsed by libyaml's parser (PyYAML's wheel carries it; ~10x faster on
    large manifests), with PyYAML's safe constructors: the Istio YAML users bring and
    the YAML-specific forms (anchors, merge keys, tags of the core schema, multi-line
    strings) read exactly as PyYAML's pure-Python SafeLoader reads them. An error is
    still worded by the pure-Python loader (test_lab_inputs: a tab is named)."""
    import pathlib

    import yaml

    from nodeagent.kube import objects

    assert issubclass(objects.SAFE_LOADER, yaml.CSafeLoader)  # refusing keys twice (test_files_source)
    awkward = """
base: &base {app: web, port: 8080, on: yes, off: no, when: 2026-12-06, hex: 0x1F, none: ~}
pod:
  <<: *base
  text: |
    two lines,
    kept
  folded: >
    one
    line
  quoted: "tab\\there"
  list: [1, 2.5, .inf, -.nan, true, null]
---
---
- just a list
"""
    seeds = sorted((pathlib.Path(__file__).parent / "xds_seeds").glob("*.yaml"))
    assert len(seeds) >= 10
    for text in [awkward] + [path.read_text() for path in seeds]:
        fast, slow = objects.load_all(text), list(yaml.safe_load_all(text))
        assert repr(fast) == repr(slow)  # repr: nan != nan
