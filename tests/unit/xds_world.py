"""A small cluster for the waypoint translation tests, and helpers to validate and
translate Istio YAML against it. Namespace `shop` is ambient; `productpage` (node1) calls
`reviews` (v1 on node1, v2 and v3 on node2), `ratings` and `db`."""

from __future__ import annotations

from nodeagent.kube.objects import dump_documents, parse_documents
from nodeagent.model import Model
from nodeagent.xds import resources as rt
from nodeagent.xds.dataplane import Sockets
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.translate.build import Translation, translate
from nodeagent.xds.translate.options import WaypointOptions

RUN = "/run/na-test"
OPTIONS = WaypointOptions(Sockets(RUN))
REVIEWS = "reviews.shop.svc.cluster.local"
RATINGS = "ratings.shop.svc.cluster.local"
DB = "db.shop.svc.cluster.local"
# (name, labels, node, IP, service account)
PODS = [
    ("productpage", {"app": "productpage", "version": "v1"}, "node1", "10.244.1.5", "productpage"),
    ("reviews-v1", {"app": "reviews", "version": "v1"}, "node1", "10.244.1.6", "reviews"),
    ("reviews-v2", {"app": "reviews", "version": "v2"}, "node2", "10.244.2.6", "reviews"),
    ("reviews-v3", {"app": "reviews", "version": "v3"}, "node2", "10.244.2.7", "reviews"),
    ("ratings", {"app": "ratings"}, "node1", "10.244.1.8", "ratings"),
    ("db", {"app": "db"}, "node2", "10.244.2.9", "db"),
]
# (name, VIP, selector, [(port name, port, targetPort)])
SERVICES = [
    ("reviews", "10.96.1.10", {"app": "reviews"}, [("http", 9080, 9080)]),
    ("ratings", "10.96.1.11", {"app": "ratings"}, [("http", 8080, 9000), ("grpc-admin", 9090, 9090)]),
    ("db", "10.96.1.12", {"app": "db"}, [("tcp-postgres", 5432, 5432)]),
]


# A Service whose targetPort is a name: web-1 and web-2 name it (8081, 8082), web-3 does not.
WEB = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.1.20, selector: {app: web}, ports: [{name: http, port: 80, targetPort: http-web}]}
""" + "".join(f"""---
apiVersion: v1
kind: Pod
metadata: {{name: web-{i}, namespace: shop, labels: {{app: web}}}}
spec: {{nodeName: node1, containers: [{{name: c, ports: {ports}}}]}}
status: {{phase: Running, podIP: 10.244.1.{20 + i}}}
""" for i, ports in ((1, "[{name: http-web, containerPort: 8081}]"), (2, "[{name: http-web, containerPort: 8082}]"),
                     (3, "[{containerPort: 8083}]"))) + "---\n"


def _world() -> str:
    docs = [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}]
    docs += [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": n, "namespace": "shop", "labels": labels},
              "spec": {"nodeName": node, "serviceAccountName": sa}, "status": {"podIP": ip, "phase": "Running"}}
             for n, labels, node, ip, sa in PODS]
    docs += [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": n, "namespace": "shop"},
              "spec": {"clusterIP": vip, "selector": sel,
                       "ports": [{"name": pn, "port": p, "targetPort": t} for pn, p, t in ports]}}
             for n, vip, sel, ports in SERVICES]
    return dump_documents(docs)


def doc(kind: str, name: str, spec: str, api: str = "networking.istio.io/v1", namespace: str = "shop") -> str:
    """One Istio document; `spec` is YAML (indented here)."""
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return f"apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{body}\n---\n"


def model(istio_yaml: str = "") -> Model:
    return Model.build(parse_documents(_world() + "---\n" + istio_yaml, "test.yaml"))


def config(istio_yaml: str, previous: IstioConfig | None = None) -> IstioConfig:
    return IstioConfig.build(model(istio_yaml), previous)


def valid(istio_yaml: str) -> IstioConfig:
    built = config(istio_yaml)
    assert built.errors == (), [str(e) for e in built.errors]
    return built


def translation(istio_yaml: str, node: str = "node1", options: WaypointOptions = OPTIONS) -> Translation:
    world = model(istio_yaml)
    built = IstioConfig.build(world)
    assert built.errors == (), [str(e) for e in built.errors]
    return translate(world, node, built, options)


def of(result: Translation, type_url: str) -> dict:
    """The translated resources of one type, by name."""
    return {rt.name_of(m): m for m in result.resources[type_url]}


def clusters(result: Translation) -> dict:
    return of(result, rt.CLUSTER)


def routes(result: Translation) -> dict:
    return of(result, rt.ROUTE)


def listeners(result: Translation) -> dict:
    return of(result, rt.LISTENER)


def endpoints(result: Translation) -> dict:
    return of(result, rt.ENDPOINT)


def chain(listener, name: str):
    return next(c for c in listener.filter_chains if c.name == name)


def network(chain_, index: int = -1):
    """The typed config of a filter chain's network filter (the last one by default)."""
    return rt.unpack(chain_.filters[index].typed_config)
