"""`-f` as kubectl reads it, for `lab up/apply/delete` and `analyze` (kube/objects.py):
several files, directories (sorted, not recursive unless -R), `-` for standard input;
the later file wins for an object given twice; one malformed file refuses the whole
input naming the file and line. Also how `lab delete` names objects (kubectl's words)
and what an agent's status still holds of deleted objects (lab/verdicts.py)."""

from __future__ import annotations

import io

import pytest

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import expand_paths, parse_documents, read_inputs, resource_type
from nodeagent.lab import lifecycle, verdicts

VS = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec: {hosts: [reviews], http: [{route: [{destination: {host: reviews, subset: %s}}]}]}
"""
NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"


def tree(tmp_path):
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    (tmp_path / "dir" / "b.yaml").write_text(VS % "v2")
    (tmp_path / "dir" / "a.yml").write_text(NS)
    (tmp_path / "dir" / "c.json").write_text(  # tab-indented JSON, which YAML would refuse
        '{\n\t"apiVersion": "v1", "kind": "Namespace",\n\t"metadata": {"name": "j"}}')
    (tmp_path / "dir" / "notes.txt").write_text("not yaml: [")
    (tmp_path / "dir" / ".hidden.yaml").write_text("not yaml: [")
    (tmp_path / "dir" / "sub" / "d.yaml").write_text(VS % "v3")
    return tmp_path / "dir"


def test_a_directory_gives_its_yaml_and_json_files_sorted_and_its_subdirectories_only_with_recursive(tmp_path):
    d = tree(tmp_path)
    assert expand_paths([str(d)]) == [str(d / "a.yml"), str(d / "b.yaml"), str(d / "c.json")]
    assert expand_paths([str(d)], recursive=True) == [str(d / "a.yml"), str(d / "b.yaml"), str(d / "c.json"),
                                                      str(d / "sub" / "d.yaml")]
    # Files as given, whatever their name, in argument order; `-` as is; a missing path kept.
    assert expand_paths([str(d / "notes.txt"), "-", str(d / "nope")]) == [str(d / "notes.txt"), "-", str(d / "nope")]


def test_inputs_are_read_in_order_with_standard_input_and_unreadable_files_carry_their_error(tmp_path):
    d = tree(tmp_path)
    inputs = read_inputs([str(d / "b.yaml"), "-", str(d / "nope.yaml")], stdin=io.StringIO(NS))
    assert [(i.name, i.text, i.error) for i in inputs[:2]] == [(str(d / "b.yaml"), VS % "v2", None),
                                                              ("<stdin>", NS, None)]
    assert str(inputs[2].error) == f"{d / 'nope.yaml'}: cannot read: No such file or directory"


def test_lab_reads_several_files_and_the_later_file_wins(tmp_path):
    d = tree(tmp_path)
    (tmp_path / "later.yaml").write_text(VS % "v9")
    objects = lifecycle.read_objects([str(d), str(tmp_path / "later.yaml")])
    assert [(o.kind, o.name, o.source) for o in objects] == [
        ("Namespace", "shop", "a.yml#1"), ("VirtualService", "reviews", "later.yaml#1"), ("Namespace", "j", "c.json#1")]
    assert objects[1].spec["http"][0]["route"][0]["destination"]["subset"] == "v9"
    recursive = lifecycle.read_objects([str(d)], recursive=True)
    assert [o.source for o in recursive] == ["a.yml#1", "d.yaml#1", "c.json#1"]  # d.yaml (v3) replaced b.yaml's


def test_standard_input_is_read_for_dash(tmp_path):
    objects = lifecycle.read_objects(["-"], stdin=io.StringIO(NS + "---\n" + VS % "v1"))
    assert [(o.kind, o.source) for o in objects] == [("Namespace", "<stdin>#1"), ("VirtualService", "<stdin>#2")]


def test_a_malformed_file_refuses_the_whole_input_with_its_file_and_line(tmp_path):
    d = tree(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(NS + "---\napiVersion: v1\nkind: Namespace\nmetadata:\n\tname: x\n")
    with pytest.raises(ConfigError, match=r"^bad\.yaml:8: malformed YAML: found character .\\t. that cannot start"):
        lifecycle.read_objects([str(d), str(bad)])
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read: No such file or directory"):
        lifecycle.read_objects([str(d), str(tmp_path / "nope.yaml")])


def test_an_object_twice_in_one_file_is_still_refused_and_an_empty_input_too(tmp_path):
    (tmp_path / "twice.yaml").write_text(NS + "---\n" + NS)
    with pytest.raises(ConfigError, match=r"twice.yaml#2 \(Namespace shop\): defined twice"):
        lifecycle.read_objects([str(tmp_path / "twice.yaml")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no objects in the input"):
        lifecycle.read_objects([str(tmp_path / "empty")])


def test_objects_are_named_as_kubectl_names_them():
    objects = parse_documents(NS + "---\n" + VS % "v1" + "---\napiVersion: security.istio.io/v1\n"
                              "kind: AuthorizationPolicy\nmetadata: {name: p}\n---\napiVersion: apps/v1\n"
                              "kind: Deployment\nmetadata: {name: d}\n---\napiVersion: networking.istio.io/v1\n"
                              "kind: Gateway\nmetadata: {name: g}\n", "x.yaml")
    assert [resource_type(o) for o in objects] == ["namespace", "virtualservice.networking.istio.io",
                                                   "authorizationpolicy.security.istio.io", "deployment.apps",
                                                   "gateway.networking.istio.io"]
    assert [resource_type(o, plural=True) for o in objects] == [
        "namespaces", "virtualservices.networking.istio.io", "authorizationpolicies.security.istio.io",
        "deployments.apps", "gateways.networking.istio.io"]


def status(built_at: float = 10.0, in_sync: bool = True, **parts) -> dict:
    return {"policy": {"built_at": built_at, "resources": parts.get("policies", {}), "errors": parts.get("errors", []),
                       "kinds": {"errors": parts.get("kinds", []), "warnings": []}},
            "waypoint": {"built_at": built_at, "xds": {"in_sync": in_sync}, "resources": parts.get("routes", {}),
                         "errors": [], "warnings": parts.get("warnings", [])},
            "pods": parts.get("pods", []), "waiting": []}


def test_what_an_agent_still_holds_of_deleted_objects():
    keys = ["VirtualService shop/reviews", "Gateway shop/gw", "AuthorizationPolicy shop/deny"]
    pods = {"shop/web"}
    assert verdicts.held(keys, pods, None, 5.0) == ["(its status: the agent does not answer)"]
    assert verdicts.held(keys, pods, status(built_at=4.0), 5.0) == [
        "(its configuration, not rebuilt since the delete yet)"]
    assert verdicts.held(keys, pods, status(in_sync=False), 5.0) == [
        "(its configuration, not rebuilt since the delete yet)"]
    assert verdicts.held(keys, pods, status(), 5.0) == []
    holding = status(routes={"VirtualService shop/reviews": "d"}, kinds=["x.yaml#1 (Gateway shop/gw) kind: ..."],
                     errors=["x.yaml#2 (AuthorizationPolicy shop/deny) spec.action: ..."],
                     pods=[{"namespace": "shop", "name": "web"}])
    assert verdicts.held(keys, pods, holding, 5.0) == keys + ["Pod shop/web"]
    assert verdicts.held([], set(), None, 5.0) == []  # nothing the agents could hold: nothing to wait for
