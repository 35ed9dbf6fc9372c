"""`$(VAR)` expansion as kubelet does it (nodeagent/lab/expansion.py) and where the lab
applies it: a container's env values (each with the variables before it, then the
Services'), its command and args (processes.command_of), a volume's subPathExpr."""

from __future__ import annotations

import pytest

from nodeagent.errors import ConfigError
from nodeagent.lab import expansion, processes
from nodeagent.lab.kube import volumes
from nodeagent.lab.spec import Container, EnvVar, PodSpec

FIELDS = {"metadata.name": "nodeagent-x1", "metadata.namespace": "nodeagent-system", "metadata.uid": "u-1",
          "spec.nodeName": "hn1", "spec.serviceAccountName": "nodeagent", "status.podIP": "172.30.0.2",
          "status.hostIP": "172.30.0.2"}
POD = PodSpec("nodeagent-system", "nodeagent-x1", "hn1", {}, {}, ())


@pytest.mark.parametrize("text, expanded", [
    ("$(A)", "x"),
    ("--node=$(NODE_NAME)", "--node=hn1"),
    ("$(A)$(A)-$(A)", "xx-x"),
    ("$$(A)", "$(A)"),  # escaped: the literal reference
    ("$$$(A)", "$x"),
    ("$$$$", "$$"),
    ("$(UNDEFINED)", "$(UNDEFINED)"),  # kept as written
    ("$(EMPTY)", ""),  # defined as empty
    ("$", "$"),
    ("a$", "a$"),
    ("$x$(A)", "$xx"),  # a `$` that starts no reference stays
    ("$(", "$("),  # unterminated
    ("$(A", "$(A"),
    ("$($(A))", "$($(A))"),  # the name is everything up to the first `)`: "$(A"
    ("no references", "no references"),
])
def test_expand_as_kubelet(text, expanded):
    assert expansion.expand(text, {"A": "x", "NODE_NAME": "hn1", "EMPTY": ""}) == expanded


def test_first_mapping_wins_and_escape_round_trips():
    assert expansion.expand("$(A)/$(B)", {"A": "first"}, {"A": "second", "B": "b"}) == "first/b"
    for value in ("$(A)", "$$", "a$b$", "$(A)$$(B)$"):
        assert expansion.expand(expansion.escape(value), {"A": "x", "B": "y"}) == value
    assert expansion.references("$(A) $$(B) $(C) $(") == ["A", "C"]


def test_the_daemonsets_args_get_the_downward_api_values():
    agent = Container("agent", ("nodeagent", "run", "--node=$(NODE_NAME)", "--admin-address=$(NODE_IP):15020",
                                "--literal=$$(NODE_IP)", "--unknown=$(NOPE)"),
                      (EnvVar("NODE_NAME", field_path="spec.nodeName"), EnvVar("NODE_IP", field_path="status.hostIP")))
    assert processes.command_of(agent, FIELDS, True) == [
        "nodeagent", "run", "--node=hn1", "--admin-address=172.30.0.2:15020", "--literal=$(NODE_IP)",
        "--unknown=$(NOPE)"]


def test_env_values_see_the_variables_before_them_and_the_services():
    c = Container("c", ("true",), (EnvVar("A", "a"), EnvVar("B", "$(A)-$(C)"), EnvVar("C", "c"),
                                   EnvVar("API", "$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"),
                                   EnvVar("POD", field_path="metadata.name"), EnvVar("REF", "$(POD)")))
    env = processes.declared_env(c, FIELDS, True)
    assert {k: env[k] for k in ("A", "B", "C", "API", "POD", "REF")} == {
        "A": "a", "B": "a-$(C)", "C": "c", "API": "10.96.0.1:443", "POD": "nodeagent-x1", "REF": "nodeagent-x1"}
    # without --kube there are no Service variables to expand
    assert processes.declared_env(c, FIELDS, False)["API"] == "$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"
    assert processes.pod_env(POD, c, FIELDS, True)["B"] == "a-$(C)"


def test_sub_path_expr_is_expanded_and_a_missing_variable_refused(tmp_path):
    item = {"metadata": {"name": "p", "namespace": "n", "uid": "u-1"},
            "spec": {"volumes": [{"name": "logs", "emptyDir": {}}],
                     "containers": [{"name": "main", "volumeMounts": [
                         {"name": "logs", "mountPath": "/var/log/app", "subPathExpr": "$(POD_NAME)/$$x"}]}]}}
    (tmp_path / "volumes" / "logs").mkdir(parents=True)
    mounts = volumes.container_mounts(item, "main", str(tmp_path), {"POD_NAME": "p"})
    assert mounts == [volumes.Mount(f"{tmp_path}/volumes/logs/p/$x", "/var/log/app", False)]
    with pytest.raises(ConfigError, match=r"subPathExpr '\$\(POD_NAME\)/\$\$x': missing value for POD_NAME"):
        volumes.container_mounts(item, "main", str(tmp_path), {"POD_NAME": ""})
