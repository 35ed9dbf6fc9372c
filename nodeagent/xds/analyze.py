"""`nodeagent analyze`: check Istio YAML offline with the checks the agents apply.

Reads files, directories (their *.yaml, *.yml, *.json; below them too with -R) and
standard input (`-`) as kubectl reads -f, every document on its own; builds the Model, validates every Istio
resource (IstioConfig: every problem of a resource at once, each with its field path;
kinds the mesh does not implement get their verdict, xds/istio/kinds.py) and translates
the waypoint of every node in the input (references to hosts, ports or subsets that do
not exist, keys Envoy will not fetch, patches that apply nowhere). When the input holds
no cluster object (Service, Pod or a workload such as a Deployment) references are not
checked, since every host would look unknown; with workloads, a subset whose labels
select none of a service's workloads is reported too.

The result is one verdict per Istio resource, in input order: its problems (error,
warning; info for remarks that never fail), or "ok". Pure apart from reading the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject, parse_each, read_inputs
from nodeagent.model import Model
from nodeagent.policy.schema import Field, resource_name
from nodeagent.xds.dataplane import Sockets
from nodeagent.xds.istio import kinds
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.istio.fields import Note, destination
from nodeagent.xds.translate.build import translate
from nodeagent.xds.translate.context import Context
from nodeagent.xds.translate.options import WaypointOptions
from nodeagent.xds.translate.services import Catalog

ERROR, WARNING, INFO = "error", "warning", "info"
# Kinds whose pod template gives the labels of the pods they run.
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


@dataclass(frozen=True)
class Problem:
    severity: str
    error: ConfigError

    def __str__(self) -> str:
        return f"{self.severity}: {self.error}"


@dataclass(frozen=True)
class Verdict:
    """One Istio resource and every problem found in it (none: ok)."""

    name: str  # resource_name: `file#n (Kind ns/name)`
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return all(p.severity == INFO for p in self.problems)

    def lines(self) -> list[str]:
        failing = [str(p) for p in self.problems if p.severity != INFO]
        notes = [str(p) for p in self.problems if p.severity == INFO]
        return ([f"ok: {self.name}"] if self.ok else failing) + notes


@dataclass(frozen=True)
class Analysis:
    problems: tuple[Problem, ...]  # every problem, resources' and the input's
    resources: int  # Istio resources read
    translated: bool  # whether references were checked
    rows: tuple[Verdict | Problem, ...] = ()  # in input order: each resource's verdict, each bad document
    unattached: tuple[Problem, ...] = ()  # problems of no one resource (an invalid Service), last

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == WARNING]

    @property
    def verdicts(self) -> list[Verdict]:
        return [row for row in self.rows if isinstance(row, Verdict)]

    def lines(self) -> list[str]:
        return [line for row in self.rows for line in (row.lines() if isinstance(row, Verdict) else [str(row)])] + \
            [str(p) for p in self.unattached]


def analyze_files(paths: list[str], stdin=None, recursive: bool = False) -> Analysis:
    """The input in order (kube/objects.py reads `-f` as kubectl does): objects, and a
    Problem for each file or document that could not be read."""
    items: list[KubeObject | Problem] = []
    for given in read_inputs(paths, recursive, stdin):
        if given.error is not None:
            items.append(Problem(ERROR, given.error))
            continue
        items += [Problem(ERROR, i) if isinstance(i, ConfigError) else i for i in parse_each(given.text, given.name)]
    return analyze(items)


def analyze(items: list[KubeObject | Problem]) -> Analysis:
    """Every object of `items` (in input order, with the problems of what could not be read)."""
    objects = [i for i in items if isinstance(i, KubeObject)]
    unread = [i for i in items if isinstance(i, Problem)]
    try:
        model = Model.build(objects)
    except ConfigError as err:  # an invalid Pod or Service: Istio checks need a model
        return Analysis((*unread, Problem(ERROR, err)), 0, False, tuple(unread), (Problem(ERROR, err),))
    config = IstioConfig.build(model)
    found = [Problem(ERROR, e) for e in config.errors] + [_remark(w) for w in config.warnings]
    workloads = _workloads(objects, model)
    translated = bool(model.services or workloads)
    if translated:
        seen = {str(p.error) for p in found}
        for warning in _references(model, config, workloads):
            if str(warning) not in seen:
                seen.add(str(warning))
                found.append(_remark(warning))
    return _verdicts(items, unread, found, translated)


def _remark(warning: ConfigError) -> Problem:
    return Problem(INFO if isinstance(warning, Note) else WARNING, warning)


def _verdicts(items: list[KubeObject | Problem], unread: list[Problem], found: list[Problem],
              translated: bool) -> Analysis:
    """Each Istio resource's problems (`found`) gathered under it, in input order, with
    the documents that could not be read (`unread`) where they stand."""
    names = [resource_name(o) for o in items if isinstance(o, KubeObject) and kinds.is_istio(o)]
    attached: dict[str, list[Problem]] = {n: [] for n in names}
    unattached = []
    for problem in found:
        owner = next((n for n in names if problem.error.where == n or problem.error.where.startswith(n + " ")), None)
        (attached[owner] if owner is not None else unattached).append(problem)
    rows: list[Verdict | Problem] = []
    for item in items:
        if isinstance(item, Problem):
            rows.append(item)
        elif kinds.is_istio(item):
            rows.append(Verdict(resource_name(item), tuple(attached[resource_name(item)])))
    return Analysis((*unread, *found), len(names), translated, tuple(rows), tuple(unattached))


def _references(model: Model, config: IstioConfig, workloads: Mapping[str, list[dict]]) -> list[ConfigError]:
    """The translation's warnings for every node (or none), the destinations of refused
    VirtualServices, then subsets selecting no workload."""
    options = WaypointOptions(Sockets("/run/nodeagent/waypoint"))
    found: list[ConfigError] = []
    for node in sorted({p.node for p in model.pods.values()}) or [""]:
        found += translate(model, node, config, options).warnings
    found += _refused_destinations(Context(model, config, options, ""))
    if workloads:
        found += _empty_subsets(model, config, workloads)
    return found


def _refused_destinations(ctx: Context) -> list[ConfigError]:
    """A refused VirtualService is not translated, but the hosts and subsets its routes
    name are checked all the same (as the translation checks them), so one analyze run
    shows every problem of it."""
    start = len(ctx.warnings)
    for obj in ctx.model.resources.get("VirtualService", ()):
        if obj.group != kinds.NETWORKING or ("VirtualService", obj.namespace, obj.name) in ctx.config.entries:
            continue
        for path, value in _destination_fields(obj.spec):
            try:
                dest = destination(Field(resource_name(obj), path, value))
            except ConfigError:
                continue  # its own error is reported by validation
            services = ctx.catalog.resolve(dest.host, obj.namespace)
            port = dest.port or (services[0].ports[0].port if len(services) == 1 and services[0].ports else 0)
            ctx.destination(dest, obj.namespace, port, f"{resource_name(obj)} {path}")
    return ctx.warnings[start:]


def _destination_fields(spec: dict) -> Iterable[tuple[str, object]]:
    """(path, value) of every destination a VirtualService's routes and mirrors name."""
    for section in ("http", "tcp"):
        routes = spec.get(section)
        for i, route in enumerate(routes if isinstance(routes, list) else ()):
            if not isinstance(route, dict):
                continue
            targets = route.get("route")
            for j, target in enumerate(targets if isinstance(targets, list) else ()):
                if isinstance(target, dict) and "destination" in target:
                    yield f"spec.{section}[{i}].route[{j}].destination", target["destination"]
            if "mirror" in route:
                yield f"spec.{section}[{i}].mirror", route["mirror"]
            mirrors = route.get("mirrors")
            for j, mirror in enumerate(mirrors if isinstance(mirrors, list) else ()):
                if isinstance(mirror, dict) and "destination" in mirror:
                    yield f"spec.{section}[{i}].mirrors[{j}].destination", mirror["destination"]


def _workloads(objects: list[KubeObject], model: Model) -> dict[str, list[dict]]:
    """namespace → the label sets of its pods: the Pods given and the pod templates of
    Deployments and other workload controllers."""
    out: dict[str, list[dict]] = {}
    for pod in model.pods.values():
        out.setdefault(pod.namespace, []).append(dict(pod.labels))
    for obj in objects:
        if obj.kind in WORKLOADS and obj.group in ("apps", "batch"):
            template = (obj.spec.get("template") or {}) if isinstance(obj.spec.get("template"), dict) else {}
            labels = (template.get("metadata") or {}).get("labels") or {}
            if isinstance(labels, dict):
                out.setdefault(obj.namespace, []).append({str(k): str(v) for k, v in labels.items()})
    return out


def _empty_subsets(model: Model, config: IstioConfig, workloads: Mapping[str, list[dict]]) -> list[ConfigError]:
    catalog = Catalog(model, config, lambda _: None)
    found = []
    for service in catalog.by_host.values():
        rule = catalog.rule(service)
        if rule is None or not service.selector:
            continue
        pods = [labels for labels in workloads.get(service.namespace, ()) if _selects(service.selector, labels)]
        for subset in rule.subsets:
            if not any(_selects(subset.labels, labels) for labels in pods):
                wanted = ", ".join(f"{k}={v}" for k, v in sorted(subset.labels.items()))
                found.append(ConfigError(f"{subset.where}.labels",
                                         f"subset {subset.name!r} ({wanted}) selects none of the workloads of "
                                         f"{service.hostname} in the input",
                                         "requests routed to it fail with 503 (no healthy upstream) until such "
                                         "pods run"))
    return found


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
