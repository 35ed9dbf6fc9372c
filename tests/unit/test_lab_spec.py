"""lab/spec.py: lab files → desired state; every bad input a ConfigError naming the
document, object and field."""

from __future__ import annotations

import textwrap

import pytest

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import parse_documents
from nodeagent.lab import lifecycle, spec

NODES = """
apiVersion: v1
kind: Node
metadata: {name: n1}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
"""


def load(text: str, nodes: bool = True) -> spec.DesiredState:
    return spec.load(parse_documents((NODES + "---\n" if nodes else "") + textwrap.dedent(text), "lab.yaml"))


def deployment(replicas="3", node: str = "", extra: str = "") -> str:
    return textwrap.dedent(f"""
    apiVersion: apps/v1
    kind: Deployment
    metadata: {{name: api, namespace: back}}
    spec:
      replicas: {replicas}
      selector: {{matchLabels: {{app: api}}}}
      template:
        metadata: {{labels: {{app: api, tier: be}}}}
        spec:
          {f"nodeName: {node}" if node else ""}
          containers:
          - name: app
            command: [sleep]
            args: ["100"]
            env:
            - {{name: MODE, value: fast}}
            - name: ME
              valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
            ports: [{{name: http, containerPort: 8080}}]
    """) + extra


def test_demo_file_loads_with_its_pods_and_service():
    state = spec.load(lifecycle.read_objects(None))
    assert state.node_names == ["node1", "node2"]
    assert sorted(state.namespaces) == ["default", "legacy", "mesh"]
    assert state.namespaces["mesh"].labels == {"istio.io/dataplane-mode": "ambient"}
    assert [(k, p.node, dict(p.labels)) for k, p in state.pods.items()] == [
        ("mesh/client", "", {"app": "client"}),
        ("legacy/client", "", {"app": "client"}),
        ("mesh/backend-v1-0", "node1", {"app": "backend", "version": "v1"}),
        ("mesh/backend-v2-0", "node2", {"app": "backend", "version": "v2"}),
    ]
    backend = state.pods["mesh/backend-v1-0"].containers[0]
    assert backend.command == ("nodeagent", "lab", "echo", "--port", "8080", "--tcp-port", "9000")
    svc = state.services["mesh/backend"]
    assert [(p.port, p.target_port, p.name) for p in svc.ports] == [(8080, "http", "http"),
                                                                    (9000, "tcp-echo", "tcp-echo")]
    assert dict(svc.selector) == {"app": "backend"}


def test_deployment_pods_round_robin_with_template_labels_and_containers():
    state = load(deployment())
    pods = list(state.pods.values())
    assert [(p.name, p.node, p.owner) for p in pods] == [("api-0", "n1", "api"), ("api-1", "n2", "api"),
                                                        ("api-2", "n1", "api")]
    assert dict(pods[1].labels) == {"app": "api", "tier": "be"}
    app = pods[0].containers[0]
    assert app.command == ("sleep", "100")
    assert app.env == (spec.EnvVar("MODE", "fast"), spec.EnvVar("ME", field_path="status.podIP"))
    assert app.ports == (spec.ContainerPort(8080, "http", "TCP"),)
    assert pods[0].body["metadata"] == {"labels": {"app": "api", "tier": "be"}, "name": "api-0",
                                        "namespace": "back"}


def test_deployment_template_node_name_pins_every_replica():
    assert [p.node for p in load(deployment(node="n2")).pods.values()] == ["n2", "n2", "n2"]


def test_default_nodes_and_implied_namespaces():
    state = load("""
    apiVersion: v1
    kind: Pod
    metadata: {name: p, namespace: team}
    spec: {containers: [{name: c, command: [sleep, infinity]}]}
    """, nodes=False)
    assert state.node_names == ["node1", "node2"]
    assert state.namespaces == {"default": None, "team": None}
    assert [o.kind for o in state.objects] == ["Node", "Node", "Pod"]  # defaults are kept for apply


def test_other_groups_are_stored_unchanged_and_not_run():
    state = load("""
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: deny-all, namespace: mesh}
    spec: {}
    """)
    assert [(o.kind, o.namespace, o.name) for o in state.objects][2:] == [("AuthorizationPolicy", "mesh", "deny-all")]
    assert state.pods == {} and state.services == {}
    assert "mesh" in state.namespaces


POD = """
apiVersion: v1
kind: Pod
metadata: {{name: web, namespace: front}}
spec:
  {spec}
"""

SERVICE = """
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: front}}
spec:
  {spec}
"""

BAD = [
    ("not: [valid", "lab.yaml:10: malformed YAML"),
    ("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: pvc}\n",
     "lab.yaml#3 (PersistentVolumeClaim default/pvc): the lab does not run v1 PersistentVolumeClaim (the lab "
     "runs v1 Node, Namespace, Pod, Service and apps/v1 Deployment, and holds v1 ConfigMap, Secret and "
     "ServiceAccount)"),
    ("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\ndata: {password: not base64!}\n",
     "lab.yaml#3 (Secret default/s) data['password']: is not base64 (encode it (base64 -w0), or put the "
     "text in stringData)"),
    ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {replicas: 3}\n",
     "lab.yaml#3 (ConfigMap default/cm): data['replicas'] must be a string, not int 3"),
    ("apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: s}\n",
     "lab.yaml#3 (StatefulSet default/s): the lab does not run apps/v1 StatefulSet"),
    ("apiVersion: apps/v1beta1\nkind: Deployment\nmetadata: {name: d}\n",
     "lab.yaml#3 (Deployment default/d) apiVersion: Deployment must be apps/v1, not apps/v1beta1"),
    (POD.format(spec="containers: []"),
     "lab.yaml#3 (Pod front/web) spec.containers: no containers"),
    (POD.format(spec="containers: [{name: c, image: nginx}]"),
     "lab.yaml#3 (Pod front/web) spec.containers[0].command: container c has no command "
     "(the lab ignores images and runs command (+ args) as a process: add command: [...])"),
    (POD.format(spec="containers: [{name: c, command: [sleep, 10]}]"),
     "lab.yaml#3 (Pod front/web) spec.containers[0].command[1]: must be a string, got 10 (quote it"),
    (POD.format(spec="containers: [{name: c, command: [x]}, {name: c, command: [y]}]"),
     "lab.yaml#3 (Pod front/web) spec.containers: duplicate container names in ['c', 'c']"),
    (POD.format(spec="{nodeName: n3, containers: [{name: c, command: [x]}]}"),
     "lab.yaml#3 (Pod front/web) spec.nodeName: no node named 'n3' (the lab's nodes are n1, n2)"),
    (POD.format(spec="{restartPolicy: Sometimes, containers: [{name: c, command: [x]}]}"),
     "lab.yaml#3 (Pod front/web) spec.restartPolicy: must be one of Always, OnFailure, Never"),
    (POD.format(spec="containers: [{name: c, command: [x], ports: [{containerPort: 0}]}]"),
     "lab.yaml#3 (Pod front/web) spec.containers[0].ports[0].containerPort: must be an integer from 1 to 65535"),
    (POD.format(spec="containers: [{name: c, command: [x], env: [{name: A, valueFrom: "
                     "{secretKeyRef: {name: s, key: k}}}]}]"),
     "lab.yaml#3 (Pod front/web) spec.containers[0].env[0].valueFrom: unsupported source for A"),
    (POD.format(spec="containers: [{name: c, command: [x], env: [{name: A, value: 1}]}]"),
     "lab.yaml#3 (Pod front/web) spec.containers[0].env[0].value: must be a string, got 1"),
    (deployment(replicas="two"),
     "lab.yaml#3 (Deployment back/api) spec.replicas: must be an integer from 0 to 1000, got 'two'"),
    (deployment(replicas="true"),
     "lab.yaml#3 (Deployment back/api) spec.replicas: must be an integer from 0 to 1000, got True"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {template: {spec: {}}}\n",
     "lab.yaml#3 (Deployment default/d) spec.template.spec.containers: no containers"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {selector: {matchLabels: {a: b}}, "
     "template: {metadata: {labels: {a: c}}, spec: {containers: [{name: c, command: [x]}]}}}\n",
     "lab.yaml#3 (Deployment default/d) spec.selector: does not match spec.template.metadata.labels"),
    (deployment(extra="---\napiVersion: v1\nkind: Pod\nmetadata: {name: api-1, namespace: back}\n"
                      "spec: {containers: [{name: c, command: [x]}]}\n"),
     "lab.yaml#4 (Pod back/api-1): pod name api-1 is already used by lab.yaml#3 (Deployment back/api, pod api-1)"),
    (POD.format(spec="containers: [{name: c, command: [x]}]") + "---\n" + POD.format(spec="containers: []"),
     "lab.yaml#4 (Pod front/web): defined twice (also at lab.yaml#3)"),
    (SERVICE.format(spec="ports: [{port: 70000}]"),
     "lab.yaml#3 (Service front/web): spec.ports[0].port must be a port number 1-65535, not 70000"),
    (SERVICE.format(spec="ports: []"), "lab.yaml#3 (Service front/web) spec.ports: no ports"),
    (SERVICE.format(spec="{type: NodePort, ports: [{port: 80}]}"),
     "lab.yaml#3 (Service front/web) spec.type: 'NodePort' is not supported"),
    (SERVICE.format(spec="{clusterIP: None, ports: [{port: 80}]}"),
     "lab.yaml#3 (Service front/web) spec.clusterIP: headless services are not supported by the lab"),
    (SERVICE.format(spec="{clusterIP: 10.96.0.300, ports: [{port: 80}]}"),
     "lab.yaml#3 (Service front/web): spec.clusterIP '10.96.0.300' is not an IP address"),
    (SERVICE.format(spec="ports: [{port: 80}, {port: 81}]"),
     "lab.yaml#3 (Service front/web) spec.ports[0].name: required when a service has several ports"),
    (SERVICE.format(spec="ports: [{port: 80, protocol: SCTP}]"),
     "lab.yaml#3 (Service front/web) spec.ports[0].protocol: must be TCP or UDP, got 'SCTP'"),
    (SERVICE.format(spec="ports: [{port: 80, targetPort: Not_A_Name}]"),
     "lab.yaml#3 (Service front/web) spec.ports[0].targetPort: 'Not_A_Name' is not a port number or port name"),
    (SERVICE.format(spec="ports: [{name: a, port: 80}, {name: b, port: 80}]"),
     "lab.yaml#3 (Service front/web) spec.ports[1]: duplicate 80 TCP"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m[:70] for _, m in BAD])
def test_bad_input_names_document_object_and_field(text, message):
    with pytest.raises(ConfigError) as err:
        load(text)
    assert str(err.value).startswith(message), str(err.value)


def test_check_commands_names_the_container_whose_command_is_missing():
    state = load(deployment(replicas="1"))
    spec.check_commands(state, lambda cmd: "/bin/sleep" if cmd == "sleep" else None)
    with pytest.raises(ConfigError) as err:
        spec.check_commands(state, lambda cmd: None)
    assert str(err.value) == ("lab.yaml#3 (Deployment back/api, pod api-0) container app command[0]: 'sleep' not "
                              "found (install it or give its full path (the lab runs host executables))")
