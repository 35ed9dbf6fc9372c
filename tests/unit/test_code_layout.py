"""The package layering of docs/design.md ("Code layout"), read from the imports of every
module (also those inside functions): the lab, the benches and the top-level command sit
on top and no product package imports them; no two packages import each other; no
import cycle between modules; an inbound path never builds on an outbound module."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

import nodeagent

ROOT = Path(nodeagent.__file__).parent
ON_TOP = ("nodeagent.lab", "nodeagent.bench", "nodeagent.cli", "nodeagent.__main__")
SUBPACKAGES = ("nodeagent.agent", "nodeagent.identity")  # their subpackages are layered too


def module_names() -> dict[str, Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


MODULES = module_names()


def imports_of(path: Path) -> set[str]:
    """The nodeagent modules `path` imports at run time: `from pkg import module` counts
    as the module (not the package's __init__); `if TYPE_CHECKING:` blocks do not count."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("nodeagent"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(submodules if len(submodules) == len(node.names) else {node.module, *submodules})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nodeagent"))
    return {name for name in found if name in MODULES}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def package_of(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], itertools.count()

    def visit(v: str) -> None:
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def between(units: dict[str, str]) -> dict[str, set[str]]:
    """The graph of `units` (module → its unit; modules not in it are left out)."""
    edges: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        if name in units:
            edges.setdefault(units[name], set()).update(
                units[t] for t in targets if t in units and units[t] != units[name])
    return edges


def test_the_layout_is_read_from_the_real_tree():
    assert "nodeagent.agent.proxy.outbound" in MODULES and "nodeagent.lab.lifecycle" in MODULES
    assert "nodeagent.agent.proxy.relay" in GRAPH["nodeagent.agent.proxy.inbound"]


def test_no_product_package_imports_the_lab_the_benches_or_the_command():
    product = [n for n in MODULES if n != "nodeagent" and not any(is_under(n, top) for top in ON_TOP)]
    wrong = {n: sorted(t for t in GRAPH[n] if any(is_under(t, top) for top in ON_TOP)) for n in product}
    assert {n: t for n, t in wrong.items() if t} == {}


def test_no_two_packages_import_each_other():
    top = {n: package_of(n, 2) for n in MODULES if n.count(".") >= 1}
    assert cycles(between(top)) == []


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_no_two_subpackages_import_each_other(package):
    depth = package.count(".") + 2
    inner = {n: package_of(n, depth) for n in MODULES
             if is_under(n, package) and n.count(".") >= depth and MODULES[package_of(n, depth)].name == "__init__.py"}
    assert len(set(inner.values())) >= 2
    assert cycles(between(inner)) == []


def test_no_import_cycle_between_modules():
    assert cycles({n: set(t) - {n} for n, t in GRAPH.items()}) == []


def test_an_inbound_path_never_builds_on_an_outbound_module():
    wrong = {n: sorted(t for t in GRAPH[n] if "outbound" in t.rsplit(".", 1)[-1])
             for n in MODULES if "inbound" in n.rsplit(".", 1)[-1]}
    assert {n: t for n, t in wrong.items() if t} == {}
