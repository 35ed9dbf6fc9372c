"""constraints.txt is complete (issue 10): every distribution installed in the interpreter
running the tests (.venv, made by scripts/setup) is pinned there at exactly its installed
version, every pin is installed at its version, and every dependency pyproject.toml names
(`dependencies` and the `test` extra) is pinned there at a version its range allows. A
package installed by hand, a dependency added without a pin, or a pin edited without
re-running scripts/setup fails here; scripts/lock refreshes the pins.

Not pinned, so not checked:
- nodeagent, the project itself: installed editable from this tree (and its egg-info in
  the repository root is on sys.path when pytest runs from there).
- pip, setuptools, wheel: `python -m venv` installs them from the interpreter's own
  ensurepip bundle, not pip from the constraints; `pip freeze` (so scripts/lock) leaves
  them out, and their versions follow the Python that made the venv.
- Debian's bcc: scripts/setup links the package directory into site-packages with no
  dist-info, so it is no installed distribution (the PyPI `bcc` is another project)."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
PYPROJECT = ROOT / "pyproject.toml"
NOT_PINNED = {"nodeagent", "pip", "setuptools", "wheel"}
PIN = re.compile(r"^([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==(\S+)$")


def normalize(name: str) -> str:
    """PEP 503: lower case, every run of -, _ and . one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> tuple[dict[str, str], list[str]]:
    """constraints.txt → ({normalized name: version}, [problems]). Comments (whole-line or
    after a space) and blank lines are ignored; every other line must be name==version
    and name each distribution once."""
    pins: dict[str, str] = {}
    problems = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*", "", raw).strip()
        if not line:
            continue
        match = PIN.match(line)
        if match is None:
            problems.append(f"line {number}: {raw!r} is not name==version")
            continue
        name = normalize(match[1])
        if name in pins:
            problems.append(f"line {number}: {match[1]} pinned twice")
        pins[name] = match[2]
    return pins, problems


def installed() -> dict[str, set[str]]:
    """{normalized name: {versions}} of the distributions this interpreter sees, but the
    unpinned ones (a name found twice on sys.path keeps both versions)."""
    found: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name is None or normalize(name) in NOT_PINNED:
            continue
        found.setdefault(normalize(name), set()).add(dist.version)
    return found


def declared() -> list[Requirement]:
    """pyproject.toml's dependencies and test extra that apply to this interpreter."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    entries = project["dependencies"] + project["optional-dependencies"]["test"]
    requirements = [Requirement(entry) for entry in entries]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": "test"})]


def pins() -> dict[str, str]:
    pinned, problems = parse_pins(CONSTRAINTS.read_text())
    assert not problems, "constraints.txt: " + "; ".join(problems)
    return pinned


def where() -> str:
    if sys.prefix == sys.base_prefix:
        return f"{sys.executable} (not a venv: run the tests with .venv/bin/python, made by scripts/setup)"
    return sys.prefix


def test_every_installed_distribution_is_pinned_at_its_version() -> None:
    pinned = pins()
    unpinned = sorted(f"{name}=={'/'.join(sorted(versions))}" for name, versions in installed().items()
                      if name not in pinned)
    other = sorted(f"{name}: installed {'/'.join(sorted(versions))}, pinned {pinned[name]}"
                   for name, versions in installed().items()
                   if name in pinned and versions != {pinned[name]})
    problems = []
    if unpinned:
        problems.append(f"not in constraints.txt: {unpinned} (installed by hand? a new dependency? "
                        "scripts/lock pins the whole set)")
    if other:
        problems.append(f"at other versions than constraints.txt pins: {other} (scripts/setup installs the pins)")
    assert not problems, f"installed in {where()}: " + "; ".join(problems)


def test_every_pin_is_installed() -> None:
    missing = sorted(f"{name}=={version}" for name, version in pins().items() if name not in installed())
    assert not missing, (f"pinned in constraints.txt but not installed in {where()}: {missing} "
                         "(a dependency dropped? scripts/lock; or run scripts/setup)")


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pinned = pins()
    requirements = declared()
    assert requirements, "pyproject.toml declares no dependencies: the parse is wrong"
    unpinned = sorted(str(r) for r in requirements if normalize(r.name) not in pinned)
    outside = sorted(f"{r} but pinned {pinned[normalize(r.name)]}" for r in requirements
                     if normalize(r.name) in pinned
                     and not r.specifier.contains(Version(pinned[normalize(r.name)]), prereleases=True))
    problems = []
    if unpinned:
        problems.append(f"pyproject.toml declares, constraints.txt does not pin: {unpinned}")
    if outside:
        problems.append(f"constraints.txt pins outside pyproject.toml's range: {outside}")
    assert not problems, "; ".join(problems) + " (scripts/lock resolves and pins them)"


def test_setup_installs_from_the_constraints() -> None:
    setup = (ROOT / "scripts" / "setup").read_text()
    assert re.search(r'pip"? install [^\n]*-c "\$ROOT/constraints\.txt"', setup), \
        "scripts/setup no longer passes constraints.txt to pip install"


def test_parse_pins_normalizes_and_refuses_what_is_not_a_pin() -> None:
    pinned, problems = parse_pins("# header\n\nPyYAML==6.0.4  # comment\nenvoy_data_plane==2.2.0\n"
                                  "pytest>=8\nzope.interface==7.0\nenvoy-data-plane==2.2.0\n")
    assert pinned == {"pyyaml": "6.0.4", "envoy-data-plane": "2.2.0", "zope-interface": "7.0"}
    assert problems == ["line 5: 'pytest>=8' is not name==version", "line 7: envoy-data-plane pinned twice"]
    assert normalize("Foo__Bar.-baz") == "foo-bar-baz"
