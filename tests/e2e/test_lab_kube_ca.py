"""The mesh CA in a cluster (`nodeagent ca --source kube`) on the lab's real API server.

`lab up --kube --no-agents` with two nodes; the mesh's Namespace and RBAC applied from
daemonset/mesh/ as they are installed; the CA runs as the pod of a Deployment whose
command is this venv's `nodeagent ca --source kube` with ServiceAccount nodeagent-ca
(in-cluster config: the token the lab's kubelet mounts). Checked: the root Secret and
the ConfigMap appear and hold the same root; the agents' token (ServiceAccount
nodeagent, audience nodeagent-ca, bound to a pod on kn1) gets a certificate for the
identity of a pod on kn1 and is refused (PERMISSION_DENIED) one of a pod on kn2; a token
of another ServiceAccount, a token for another audience and an agent token bound to no
pod are refused (UNAUTHENTICATED); a restarted CA (its pod deleted, the Deployment makes
another) keeps the same root and still issues.

Requests are made by the agent's own client (identity/workload/client.py CaClient and
credentials.new_request) in a child process inside node kn1's netns, as the agent would
(this file run as `python -m tests.e2e.test_lab_kube_ca` is that child: a JSON request on
stdin, a JSON answer on stdout).

Needs the control plane built (`controlplane/build`, run by scripts/setup): without it
the test is skipped on a developer machine and fails under CI."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import ROOT, Lab, kube_lab_up
from tests.e2e.kubelab import MESH_RBAC, NODEAGENT, container_log, get, kubectl, nodes_yaml, ready

pytestmark = pytest.mark.timeout(400)

SERVER_NAME = "nodeagent-ca.nodeagent-system.svc"

LAB_YAML = nodes_yaml("kn1", "kn2")

OBJECTS = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: db, namespace: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  nodeName: kn1
  serviceAccountName: web
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: lab, command: [sleep, infinity]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop}
spec:
  nodeName: kn2
  serviceAccountName: db
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: lab, command: [sleep, infinity]}
---
# Stands for kn1's agent pod: what the agent's projected CA token is bound to.
apiVersion: v1
kind: Pod
metadata: {name: agent-kn1, namespace: nodeagent-system}
spec:
  nodeName: kn1
  serviceAccountName: nodeagent
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: lab, command: [sleep, infinity]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: nodeagent-ca, namespace: nodeagent-system}
spec:
  replicas: 1
  strategy: {type: Recreate}
  selector:
    matchLabels: {app: nodeagent-ca}
  template:
    metadata:
      labels: {app: nodeagent-ca}
    spec:
      serviceAccountName: nodeagent-ca
      terminationGracePeriodSeconds: 5
      containers:
      - name: ca
        image: lab
        command: [NODEAGENT, -v, ca]  # -v: INFO lines (the Secret loaded or made)
        args: [--source=kube, --listen=0.0.0.0:15012, --namespace=nodeagent-system, --metrics-address=off,
               --token-audience=nodeagent-ca, --agent-service-account=nodeagent-system/nodeagent]
        readinessProbe:
          tcpSocket: {port: 15012}
          periodSeconds: 1
"""


def ca_pods(lab: Lab) -> list[dict]:
    return get(lab, "pods", "-n", "nodeagent-system", "-l", "app=nodeagent-ca")["items"]


def wait_ca(lab: Lab, not_named: str = "", timeout: float = 120) -> dict:
    """The CA's pod once exactly one, not `not_named`, is Running and Ready."""
    deadline = time.monotonic() + timeout
    while True:
        pods = ca_pods(lab)
        running = [p for p in pods if p["metadata"]["name"] != not_named and p["status"].get("phase") == "Running"
                   and ready(p)]
        if len(pods) == 1 and len(running) == 1:
            return running[0]
        if time.monotonic() > deadline:
            log = ca_log(lab, pods[0]) if pods else "no pod"
            pytest.fail(f"no Ready CA pod: {[(p['metadata']['name'], p['status'].get('phase')) for p in pods]}\n{log}")
        time.sleep(0.5)


def ca_log(lab: Lab, pod: dict) -> str:
    path = container_log(lab, "nodeagent-system", pod["metadata"]["name"], "ca")
    return open(path).read()[-4000:] if os.path.exists(path) else f"(no {path})"


@pytest.fixture(scope="module")
def ca_lab(tmp_path_factory: pytest.TempPathFactory):
    with kube_lab_up(tmp_path_factory, LAB_YAML, "cakube") as lab:
        kubectl(lab, "apply", *MESH_RBAC)
        kubectl(lab, "apply", "-f", "-", input=OBJECTS.replace("NODEAGENT", NODEAGENT))
        wait_ca(lab)
        yield lab


def token(lab: Lab, account: str, *args: str) -> str:
    return kubectl(lab, "create", "token", account, "-n", "nodeagent-system", "--duration", "10m",
                   *args).stdout.strip()


def agent_token(lab: Lab, *args: str) -> str:
    return token(lab, "nodeagent", "--audience", "nodeagent-ca", *args)


def root_pem(lab: Lab) -> str:
    return get(lab, "configmap", "nodeagent-ca-root-cert", "-n", "nodeagent-system")["data"]["root-cert.pem"]


def ask(lab: Lab, bearer: str, namespace: str, account: str, timeout: float = 60) -> dict:
    """The CA's answer to kn1's agent asking for ns/<namespace>/sa/<account>, made by a
    child in kn1's netns with the agent's client; retried while the CA is unavailable
    (its pod watch not listed yet)."""
    ip = wait_ca(lab)["status"]["podIP"]
    request = json.dumps({"address": f"{ip}:15012", "root": root_pem(lab), "token": bearer,
                          "identity": [namespace, account], "server_name": SERVER_NAME})
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(["ip", "netns", "exec", f"{lab.name}-n-kn1", sys.executable, "-m",
                               "tests.e2e.test_lab_kube_ca"], input=request, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout)
        if "unavailable" not in answer:
            return answer
        assert time.monotonic() < deadline, (answer, ca_log(lab, wait_ca(lab)))
        time.sleep(0.5)


def secret(lab: Lab) -> dict:
    return get(lab, "secret", "nodeagent-ca-keys", "-n", "nodeagent-system")


def test_the_root_key_is_in_a_secret_and_the_root_certificate_in_a_configmap(ca_lab: Lab):
    found = secret(ca_lab)
    assert found["type"] == "Opaque"
    assert sorted(found["data"]) == ["ca-cert.pem", "ca-key.pem", "root-cert.pem"]
    root = base64.b64decode(found["data"]["root-cert.pem"]).decode()
    assert root == base64.b64decode(found["data"]["ca-cert.pem"]).decode()  # self-signed: the root signs
    assert root_pem(ca_lab) == root
    assert "PRIVATE KEY" not in ca_log(ca_lab, wait_ca(ca_lab))


def test_the_agents_token_gets_identities_of_its_nodes_pods_only(ca_lab: Lab):
    bearer = agent_token(ca_lab, "--bound-object-kind", "Pod", "--bound-object-name", "agent-kn1")
    assert ask(ca_lab, bearer, "shop", "web") == {"issued": "spiffe://cluster.local/ns/shop/sa/web",
                                                  "root": root_pem(ca_lab)}
    refused = ask(ca_lab, bearer, "shop", "db")  # db runs on kn2
    assert refused["refused"] == "PERMISSION_DENIED", refused
    assert "no pod with service account ns/shop/sa/db on node kn1" in refused["message"], refused


@pytest.mark.parametrize("case", ["another service account", "another audience", "bound to no pod"])
def test_other_tokens_are_unauthenticated(ca_lab: Lab, case: str):
    bearer, says = {
        "another service account": (token(ca_lab, "nodeagent-ca", "--audience", "nodeagent-ca"),
                                    "system:serviceaccount:nodeagent-system:nodeagent-ca's"),
        "another audience": (token(ca_lab, "nodeagent", "--bound-object-kind", "Pod",
                                   "--bound-object-name", "agent-kn1"), "the token is not for audience nodeagent-ca"),
        "bound to no pod": (agent_token(ca_lab), "bound to no pod"),
    }[case]
    answer = ask(ca_lab, bearer, "shop", "web")
    assert answer["refused"] == "UNAUTHENTICATED", answer
    assert says in answer["message"], answer


def test_a_restarted_ca_keeps_its_root(ca_lab: Lab):  # last: it replaces the CA's pod
    before, root = secret(ca_lab), root_pem(ca_lab)
    old = wait_ca(ca_lab)["metadata"]["name"]
    kubectl(ca_lab, "delete", "pod", "-n", "nodeagent-system", old, "--wait=true", "--timeout=60s")
    new = wait_ca(ca_lab, not_named=old)
    assert new["metadata"]["name"] != old
    after = secret(ca_lab)
    assert (after["metadata"]["uid"], after["metadata"]["resourceVersion"], after["data"]) == \
        (before["metadata"]["uid"], before["metadata"]["resourceVersion"], before["data"])
    assert root_pem(ca_lab) == root
    assert "loaded CA from Secret nodeagent-system/nodeagent-ca-keys" in ca_log(ca_lab, new)
    bearer = agent_token(ca_lab, "--bound-object-kind", "Pod", "--bound-object-name", "agent-kn1")
    assert ask(ca_lab, bearer, "shop", "web") == {"issued": "spiffe://cluster.local/ns/shop/sa/web", "root": root}


# --- the child: the agent's client, in a node's netns ----------------------------------
async def _child(request: dict) -> dict:
    from cryptography import x509

    from nodeagent.identity import pemfiles
    from nodeagent.identity.errors import CaRefused, CaUnavailable
    from nodeagent.identity.spiffe import Identity, identity_of_certificate
    from nodeagent.identity.workload.client import CaClient
    from nodeagent.identity.workload.credentials import new_request

    identity = Identity("cluster.local", *request["identity"])
    _, csr = new_request(identity)
    client = CaClient(request["address"], request["root"].encode(), lambda: request["token"],
                      request["server_name"], timeout=10)
    try:
        chain = await client.create_certificate(csr, identity)
    except CaRefused as exc:
        return {"refused": exc.code, "message": str(exc)}
    except CaUnavailable as exc:
        return {"unavailable": str(exc)}
    finally:
        await client.close()
    certs = [x509.load_pem_x509_certificate(c.encode()) for c in chain]
    return {"issued": identity_of_certificate(certs[0]).uri, "root": pemfiles.certs_pem(certs[-1:]).decode()}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_child(json.loads(sys.stdin.read())))))
