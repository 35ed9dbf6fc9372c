"""lab/ipam.py: placement and addresses, kept across `apply`, refused when exhausted."""

from __future__ import annotations

import itertools
import textwrap

import pytest

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import parse_documents
from nodeagent.lab import ipam, spec
from nodeagent.lab.ipam import NodeAlloc, PodAlloc


def state(text: str) -> spec.DesiredState:
    return spec.load(parse_documents(textwrap.dedent(text), "lab.yaml"))


def uids():
    counter = itertools.count(1)
    return lambda: f"uid-{next(counter)}"


def pod(name: str, node: str = "", ns: str = "default") -> str:
    pin = f"nodeName: {node}, " if node else ""
    return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec: {{{pin}containers: [{{name: c, command: [sleep]}}]}}\n---\n")


def service(name: str, ip: str = "") -> str:
    fixed = f"clusterIP: {ip}, " if ip else ""
    return f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{{fixed}ports: [{{port: 80}}]}}\n---\n"


def test_nodes_pods_and_services_get_the_documented_addresses():
    desired = state(pod("a", "node2") + pod("b", "node2") + pod("c") + pod("d") + pod("e")
                    + service("s1") + service("s2", "10.96.0.10") + service("s3"))
    alloc = ipam.allocate(desired, new_uid=uids())
    assert alloc.nodes == {"node1": NodeAlloc(1, "172.30.0.2", "10.244.1.0/24"),
                           "node2": NodeAlloc(2, "172.30.0.3", "10.244.2.0/24")}
    # c: node1 has fewer pods; d: node1 has 1 and node2 2; e: a tie goes to the first node.
    assert alloc.pods == {
        "default/a": PodAlloc("uid-1", "node2", "10.244.2.2"),
        "default/b": PodAlloc("uid-2", "node2", "10.244.2.3"),
        "default/c": PodAlloc("uid-3", "node1", "10.244.1.2"),
        "default/d": PodAlloc("uid-4", "node1", "10.244.1.3"),
        "default/e": PodAlloc("uid-5", "node1", "10.244.1.4"),
    }
    # s2 asked for .10, so the automatic ones skip it.
    assert alloc.services == {"default/s1": "10.96.0.11", "default/s2": "10.96.0.10", "default/s3": "10.96.0.12"}


def test_real_uids_are_uuid4():
    import uuid
    uid = ipam.allocate(state(pod("a"))).pods["default/a"].uid
    assert uuid.UUID(uid).version == 4


def test_previous_allocations_are_kept_and_new_pods_fill_free_addresses():
    first = ipam.allocate(state(pod("a") + pod("b") + service("s1")), new_uid=uids())
    again = ipam.allocate(state(pod("a") + pod("b") + pod("c") + service("s1") + service("s0", "10.96.0.11")),
                          first, new_uid=lambda: "uid-new")
    assert again.nodes == first.nodes
    assert again.pods["default/a"] == first.pods["default/a"]
    assert again.pods["default/b"] == first.pods["default/b"]
    assert again.pods["default/c"] == PodAlloc("uid-new", "node1", "10.244.1.3")
    assert again.services == {"default/s1": "10.96.0.10", "default/s0": "10.96.0.11"}


def test_pod_cidr_exhaustion_names_the_first_pod_that_does_not_fit():
    text = ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: big}\nspec:\n  replicas: 254\n  template:\n"
            "    spec: {nodeName: node1, containers: [{name: c, command: [sleep]}]}\n")
    with pytest.raises(ConfigError) as err:
        ipam.allocate(state(text))
    assert str(err.value) == ("lab.yaml#1 (Deployment default/big, pod big-253): no free pod IP on node node1: "
                              "10.244.1.0/24 is full (put the pod on another node (spec.nodeName) or add nodes)")
    alloc = ipam.allocate(state(text.replace("254", "253")))
    assert alloc.pods["default/big-252"].ip == "10.244.1.254"


@pytest.mark.parametrize("ip, message", [
    ("10.97.0.1", "10.97.0.1 is outside the service range 10.96.0.0/16 (drop it to get one allocated)"),
    ("10.96.255.255", "10.96.255.255 is outside the service range 10.96.0.0/16"),
])
def test_cluster_ip_outside_the_range_is_refused(ip, message):
    with pytest.raises(ConfigError) as err:
        ipam.allocate(state(service("s", ip)))
    assert str(err.value).startswith(f"lab.yaml#1 (Service default/s) spec.clusterIP: {message}")


def test_cluster_ip_taken_twice_is_refused():
    with pytest.raises(ConfigError) as err:
        ipam.allocate(state(service("a", "10.96.0.20") + service("b", "10.96.0.20")))
    assert str(err.value) == ("lab.yaml#2 (Service default/b) spec.clusterIP: 10.96.0.20 is already in use "
                              "(drop it to get a free one allocated)")


def test_running_lab_refuses_moving_a_pod_new_nodes_and_a_new_cluster_ip():
    first = ipam.allocate(state(pod("a", "node1") + service("s")))
    with pytest.raises(ConfigError, match=r"lab.yaml#1 \(Pod default/a\) spec.nodeName: cannot move a running "
                                          r"pod to node2 \(it runs on node1\)"):
        ipam.allocate(state(pod("a", "node2") + service("s")), first)
    with pytest.raises(ConfigError, match=r"\(Service default/s\) spec.clusterIP: cannot change a running "
                                          r"service's ClusterIP \(10.96.0.10\)"):
        ipam.allocate(state(pod("a") + service("s", "10.96.0.50")), first)
    nodes = "apiVersion: v1\nkind: Node\nmetadata: {name: node1}\n---\napiVersion: v1\nkind: Node\nmetadata: {name: n9}\n"
    with pytest.raises(ConfigError, match=r"lab.yaml#2 \(Node n9\): adding a node to a running lab is not supported"):
        ipam.allocate(state(nodes), first)
