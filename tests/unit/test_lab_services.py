"""lab/services.py: endpoints (Running pods, named target ports) and the exact nft table."""

from __future__ import annotations

import textwrap

from nodeagent.kube.objects import parse_documents
from nodeagent.lab import ipam, services, spec
from nodeagent.lab.services import Endpoint, Rule

LAB = """
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: shop, labels: {app: web}}
spec:
  nodeName: node1
  containers:
  - {name: c, command: [x], ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: shop, labels: {app: web}}
spec:
  nodeName: node2
  containers:
  - {name: c, command: [x], ports: [{name: http, containerPort: 9090}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: elsewhere, labels: {app: web}}
spec: {nodeName: node2, containers: [{name: c, command: [x]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: raw, port: 81, targetPort: 7000}
  - {name: dns, port: 53, targetPort: dns, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: shop}
spec: {ports: [{port: 80}]}
"""


def lab():
    desired = spec.load(parse_documents(textwrap.dedent(LAB), "lab.yaml"))
    return desired, ipam.allocate(desired)


def test_rules_resolve_named_ports_per_pod_and_skip_pods_that_lack_them():
    desired, alloc = lab()
    running = {"shop/web-a", "shop/web-b", "elsewhere/other"}
    assert services.rules(desired, alloc, running) == [
        Rule("shop/manual", "10.96.0.11", 80, "TCP", ()),  # no selector: no endpoints
        Rule("shop/web", "10.96.0.10", 80, "TCP", (Endpoint("10.244.1.2", 8080), Endpoint("10.244.2.2", 9090))),
        Rule("shop/web", "10.96.0.10", 81, "TCP", (Endpoint("10.244.1.2", 7000), Endpoint("10.244.2.2", 7000))),
        Rule("shop/web", "10.96.0.10", 53, "UDP", (Endpoint("10.244.1.2", 53),)),
    ]


def test_only_running_pods_are_endpoints():
    desired, alloc = lab()
    eps = services.endpoints(desired.services["shop/web"], desired, alloc, {"shop/web-b"})
    assert [(p.port, e) for p, e in eps.items()] == [(80, (Endpoint("10.244.2.2", 9090),)),
                                                    (81, (Endpoint("10.244.2.2", 7000),)), (53, ())]


EXPECTED = """\
table ip nodeagent-lab
delete table ip nodeagent-lab
table ip nodeagent-lab {
\tchain prerouting {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\tjump services
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tjump services
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tmeta mark & 0x4000 == 0x4000 snat to 169.254.1.1
\t}
\tchain forward {
\t\ttype filter hook forward priority 0; policy accept;
\t\tct state new jump unserved
\t}
\tchain filter-output {
\t\ttype filter hook output priority 0; policy accept;
\t\tct state new jump unserved
\t}
\tchain unserved {
\t\tip daddr 10.96.0.0/16 meta l4proto tcp reject with tcp reset
\t\tip daddr 10.96.0.0/16 reject
\t}
\tchain services {
\t\tip daddr 10.96.0.11 tcp dport 80 goto svc-shop/web/tcp/80
\t\tip daddr 10.96.0.11 udp dport 53 goto svc-shop/web/udp/53
\t}
\tchain svc-shop/web/tcp/80 {
\t\tnumgen random mod 2 vmap { 0 : goto svc-shop/web/tcp/80/0, 1 : goto svc-shop/web/tcp/80/1 }
\t}
\tchain svc-shop/web/tcp/80/0 {
\t\tip saddr 10.244.1.2 meta mark set meta mark | 0x4000
\t\tmeta l4proto tcp dnat to 10.244.1.2:8080
\t}
\tchain svc-shop/web/tcp/80/1 {
\t\tip saddr 10.244.2.2 meta mark set meta mark | 0x4000
\t\tmeta l4proto tcp dnat to 10.244.2.2:9090
\t}
\tchain svc-shop/web/udp/53 {
\t\tnumgen random mod 1 vmap { 0 : goto svc-shop/web/udp/53/0 }
\t}
\tchain svc-shop/web/udp/53/0 {
\t\tip saddr 10.244.1.2 meta mark set meta mark | 0x4000
\t\tmeta l4proto udp dnat to 10.244.1.2:53
\t}
}
"""


def test_ruleset_text_is_exact_and_leaves_unserved_ports_to_the_reject_chain():
    rules = [
        Rule("shop/manual", "10.96.0.10", 80, "TCP", ()),
        Rule("shop/web", "10.96.0.11", 80, "TCP", (Endpoint("10.244.1.2", 8080), Endpoint("10.244.2.2", 9090))),
        Rule("shop/web", "10.96.0.11", 53, "UDP", (Endpoint("10.244.1.2", 53),)),
    ]
    assert services.ruleset(rules) == EXPECTED


def test_ruleset_without_services_still_replaces_the_table():
    text = services.ruleset([])
    assert text.startswith("table ip nodeagent-lab\ndelete table ip nodeagent-lab\n")
    assert "\tchain services {\n\t}\n}\n" in text and "svc-" not in text
