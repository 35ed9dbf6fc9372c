"""`nodeagent analyze`: check Istio YAML offline with the checks the waypoint applies.

Reads the files as the agent's sources read them, builds the Model, validates every
Istio resource (IstioConfig: errors reject a resource) and translates the waypoint of
every node in the input (warnings: references to unknown hosts, ports or subsets,
unresolvable ports, keys Envoy will not fetch, patches that apply nowhere). Files
without any Service are checked without the translation step, since every host would
look unknown. Pure apart from reading the files.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject, parse_documents
from nodeagent.model import Model
from nodeagent.xds.dataplane import Sockets
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.translate.build import translate
from nodeagent.xds.translate.options import WaypointOptions

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Problem:
    severity: str
    error: ConfigError

    def __str__(self) -> str:
        return f"{self.severity}: {self.error}"


@dataclass(frozen=True)
class Analysis:
    problems: tuple[Problem, ...]
    resources: int  # Istio resources read
    translated: bool  # whether references were checked

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == ERROR]


def analyze_files(paths: list[str]) -> Analysis:
    objects: list[KubeObject] = []
    problems: list[Problem] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                objects += parse_documents(fh.read(), path)
        except OSError as exc:
            problems.append(Problem(ERROR, ConfigError(path, f"cannot read: {exc.strerror}")))
        except ConfigError as err:
            problems.append(Problem(ERROR, err))
    return analyze(objects, problems)


def analyze(objects: list[KubeObject], problems: list[Problem] | None = None) -> Analysis:
    problems = list(problems or [])
    try:
        model = Model.build(objects)
    except ConfigError as err:  # an invalid Pod or Service: Istio checks need a model
        return Analysis(tuple(problems + [Problem(ERROR, err)]), 0, False)
    config = IstioConfig.build(model)
    problems += [Problem(ERROR, e) for e in config.errors] + [Problem(WARNING, w) for w in config.warnings]
    translated = bool(model.services)
    if translated:
        options = WaypointOptions(Sockets("/run/nodeagent/waypoint"))
        nodes = sorted({p.node for p in model.pods.values()}) or [""]
        seen = {str(p.error) for p in problems}
        for node in nodes:
            for warning in translate(model, node, config, options).warnings:
                if str(warning) not in seen:
                    seen.add(str(warning))
                    problems.append(Problem(WARNING, warning))
    return Analysis(tuple(problems), sum(len(v) for v in model.resources.values()), translated)
