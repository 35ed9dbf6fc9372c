"""The lab's Kubernetes control plane: where it runs, what it is given, how each part starts.

It runs in a netns of its own, `<lab>-cp`, linked to the fabric bridge like a node and
holding the fabric's free address `.1` (172.30.0.1): every node netns reaches it on the
fabric, and every pod through its node (the control plane routes each node's pod CIDR
back via that node). Nothing of it is in the machine's own netns, so `lab kubectl` runs
kubectl inside `<lab>-cp`.

Four processes of the one binary `controlplane/build` makes (their own upstream flags):
etcd on the netns' loopback (plain HTTP: only the API server there talks to it, data in
`kube/etcd/`), kube-apiserver on :6443 (Node and RBAC authorization, NodeRestriction,
service-account tokens signed by the lab's key, services from 10.96.0.0/16, so the
`kubernetes` Service is 10.96.0.1), kube-controller-manager and kube-scheduler (no
leader election: one of each). Pods reach it as in a cluster through the `kubernetes`
Service: the lab's service rules DNAT 10.96.0.1:443 to it on every node, pods resolve
`kubernetes.default.svc…`, containers get kubelet's `KUBERNETES_SERVICE_*` variables.
The lab's supervisor runs them in cgroup
`nodeagent-<lab>/controlplane/` and restarts them with backoff; it starts the controller
manager and the scheduler once the API server is ready (`ApiReadiness`), so they never
start against an API server that has not bootstrapped its RBAC roles yet. `lab down`
stops them with the rest of the lab and removes `kube/` with the state directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from nodeagent import netns
from nodeagent.errors import EnvironmentProblem, LabError
from nodeagent.lab import dns, services, topology
from nodeagent.lab.ipam import FABRIC_CIDR, SERVICE_CIDR, NodeAlloc
from nodeagent.lab.kube import pki
from nodeagent.lab.kube.api import ApiClient, Credentials
from nodeagent.lab.layout import Layout

ADDRESS = str(FABRIC_CIDR.network_address + 1)  # the fabric's .1, which no node takes
API_PORT = 6443
CONTROLLER_MANAGER_PORT = 10257  # their /healthz, on the control plane's loopback
SCHEDULER_PORT = 10259
KUBERNETES_SERVICE_IP = str(SERVICE_CIDR.network_address + 1)  # the `kubernetes` Service
ETCD_URL = "http://127.0.0.1:2379"
FABRIC_VETH = "cp"  # its veth in the fabric netns, beside the nodes' `node<i>`
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
API_CLIENTS = ("kube-controller-manager", "kube-scheduler")  # started once the API server is ready
BINARY_ENV = "NODEAGENT_CONTROLPLANE"  # a control plane binary to use instead of the cached build
REPO_BUILD = Path(__file__).resolve().parents[3] / "controlplane" / "build"


def server() -> str:
    return f"https://{ADDRESS}:{API_PORT}"


# The `kubernetes` Service (default/kubernetes, 10.96.0.1:443 -> the API server), which
# the API server creates and kube-proxy serves: the lab's service rules DNAT it on every
# node, pods resolve its names, and containers get kubelet's variables for it, so
# client-go's in-cluster config finds the API server.
def service_rules(kube: bool) -> tuple[services.Rule, ...]:
    if not kube:
        return ()
    return (services.Rule("default/kubernetes", KUBERNETES_SERVICE_IP, 443, "TCP",
                          (services.Endpoint(ADDRESS, API_PORT),)),)


def service_names(kube: bool) -> tuple[dns.Name, ...]:
    return (dns.Name("default", "kubernetes", KUBERNETES_SERVICE_IP),) if kube else ()


def service_env() -> dict[str, str]:
    """What kubelet sets in every container for the `kubernetes` Service."""
    return {"KUBERNETES_SERVICE_HOST": KUBERNETES_SERVICE_IP, "KUBERNETES_SERVICE_PORT": "443",
            "KUBERNETES_SERVICE_PORT_HTTPS": "443", "KUBERNETES_PORT": f"tcp://{KUBERNETES_SERVICE_IP}:443",
            "KUBERNETES_PORT_443_TCP": f"tcp://{KUBERNETES_SERVICE_IP}:443",
            "KUBERNETES_PORT_443_TCP_PROTO": "tcp", "KUBERNETES_PORT_443_TCP_PORT": "443",
            "KUBERNETES_PORT_443_TCP_ADDR": KUBERNETES_SERVICE_IP}


def binary() -> str:
    """The control plane binary: $NODEAGENT_CONTROLPLANE, else the one scripts/setup built."""
    path = os.environ.get(BINARY_ENV)
    if path:
        if not os.access(path, os.X_OK):
            raise EnvironmentProblem(f"${BINARY_ENV}={path} is not an executable file")
        return path
    if not REPO_BUILD.exists():
        raise EnvironmentProblem(f"the control plane's sources are not beside this nodeagent ({REPO_BUILD})",
                                 f"run from a clone of the repository, or set ${BINARY_ENV}")
    proc = subprocess.run([str(REPO_BUILD), "--print"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise EnvironmentProblem("the Kubernetes control plane is not built for this checkout",
                                 "run scripts/setup without --no-kube (the first build takes several minutes)")
    return proc.stdout.strip()


def users(nodes: list[str]) -> dict[str, tuple[str, str | None]]:
    """Kubeconfig stem -> (CN, O) of every client certificate the lab makes."""
    out = {"admin": pki.ADMIN, "controller-manager": pki.CONTROLLER_MANAGER, "scheduler": pki.SCHEDULER,
           "kube-proxy": pki.KUBE_PROXY}
    out.update({f"node-{node}": pki.node_user(node) for node in nodes})
    return out


def provision(layout: Layout, nodes: list[str]) -> None:
    """Keys, certificates and kubeconfigs under `kube/pki/`, and an empty `kube/etcd/`."""
    pki.provision(pki.Pki(layout.kube_pki_dir), server(), [ADDRESS, KUBERNETES_SERVICE_IP, "127.0.0.1"],
                  users(nodes))
    os.makedirs(layout.etcd_dir, mode=0o700)


def build_netns(layout: Layout, nodes: dict[str, NodeAlloc]) -> None:
    """`<lab>-cp` on the fabric bridge at ADDRESS, routing each node's pod CIDR via the node."""
    name = layout.controlplane_netns
    topology.create_netns(name)
    with topology.rtnl(layout.fabric_netns) as fab:
        fab.link("add", ifname=FABRIC_VETH, kind="veth",
                 peer={"ifname": "eth0", "net_ns_fd": netns.named_path(name)})
        bridge = fab.link_lookup(ifname=topology.BRIDGE)[0]
        fab.link("set", index=fab.link_lookup(ifname=FABRIC_VETH)[0], master=bridge, state="up")
    with topology.rtnl(name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.link("set", index=eth0, state="up")
        ipr.addr("add", index=eth0, address=ADDRESS, prefixlen=FABRIC_CIDR.prefixlen)
        for alloc in nodes.values():
            ipr.route("add", dst=alloc.pod_cidr, gateway=alloc.fabric_ip, oif=eth0)


def _in_netns(layout: Layout, argv: list[str]) -> list[str]:
    # nsenter --net, not `ip netns exec`: keep the machine's mounts (and /etc/hosts).
    return ["nsenter", f"--net={netns.named_path(layout.controlplane_netns)}", "--", *argv]


def argv(layout: Layout, binary_path: str, component: str) -> list[str]:
    """The command line of one component, run in the control plane's netns."""
    keys = pki.Pki(layout.kube_pki_dir)
    if component == "etcd":
        flags = [f"--data-dir={layout.etcd_dir}", f"--listen-client-urls={ETCD_URL}",
                 "--listen-peer-urls=http://127.0.0.1:2380", "--name=lab"]
    elif component == "kube-apiserver":
        flags = [f"--advertise-address={ADDRESS}", f"--secure-port={API_PORT}", f"--etcd-servers={ETCD_URL}",
                 f"--client-ca-file={keys.ca_cert}", f"--tls-cert-file={keys.cert('apiserver')}",
                 f"--tls-private-key-file={keys.key('apiserver')}",
                 f"--service-account-key-file={keys.sa_pub}", f"--service-account-signing-key-file={keys.sa_key}",
                 f"--service-account-issuer=https://kubernetes.default.svc.{pki.SERVICE_DOMAIN}",
                 f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=Node,RBAC",
                 "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true", "--profiling=false"]
    elif component == "kube-controller-manager":
        kubeconfig = keys.kubeconfig("controller-manager")
        flags = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                 f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1",
                 f"--secure-port={CONTROLLER_MANAGER_PORT}", "--leader-elect=false",
                 f"--service-account-private-key-file={keys.sa_key}", f"--root-ca-file={keys.ca_cert}",
                 "--use-service-account-credentials=true", f"--cluster-signing-cert-file={keys.ca_cert}",
                 f"--cluster-signing-key-file={keys.ca_key}", f"--service-cluster-ip-range={SERVICE_CIDR}",
                 "--allocate-node-cidrs=false", "--profiling=false"]
    elif component == "kube-scheduler":
        kubeconfig = keys.kubeconfig("scheduler")
        flags = [f"--kubeconfig={kubeconfig}", f"--authentication-kubeconfig={kubeconfig}",
                 f"--authorization-kubeconfig={kubeconfig}", "--bind-address=127.0.0.1",
                 f"--secure-port={SCHEDULER_PORT}", "--leader-elect=false", "--profiling=false"]
    else:
        raise ValueError(f"no control plane component {component!r}")
    return _in_netns(layout, [binary_path, component, *flags])


def kubectl_argv(layout: Layout, binary_path: str, args: list[str]) -> list[str]:
    return _in_netns(layout, [binary_path, "kubectl", f"--kubeconfig={layout.admin_kubeconfig}", *args])


def credentials(layout: Layout, user: str) -> Credentials:
    keys = pki.Pki(layout.kube_pki_dir)
    return Credentials(keys.ca_cert, keys.cert(user), keys.key(user))


def admin_client(layout: Layout) -> ApiClient:
    """The API server as the lab's admin, from the control plane's netns."""
    return ApiClient(ADDRESS, API_PORT, netns.named_path(layout.controlplane_netns), credentials(layout, "admin"))


def node_client(layout: Layout, node: str) -> ApiClient:
    """The API server as node `node`'s kubelet (`system:node:<node>`), from that node's netns."""
    return ApiClient(ADDRESS, API_PORT, netns.named_path(layout.node_netns(node)), credentials(layout, f"node-{node}"))


def proxy_client(layout: Layout) -> ApiClient:
    """The API server as kube-proxy (`system:kube-proxy`), from the control plane's netns."""
    return ApiClient(ADDRESS, API_PORT, netns.named_path(layout.controlplane_netns), credentials(layout, "kube-proxy"))


class ApiReadiness:
    """Whether the API server is ready: `/readyz` answers 200, which it does only once
    every post-start hook has run, `rbac/bootstrap-roles` included. Before that the
    controller manager, whose identity the bootstrap roles and bindings authorize, can
    be refused reading `extension-apiserver-authentication` and exit. Once true, stays
    true (a restart of the API server finds the roles in etcd)."""

    def __init__(self, layout: Layout, timeout: float = 1.0):
        self.layout, self.timeout, self.ready = layout, timeout, False

    def __call__(self) -> bool:
        if not self.ready:
            client = ApiClient(ADDRESS, API_PORT, netns.named_path(self.layout.controlplane_netns),
                               credentials(self.layout, "admin"), timeout=self.timeout)
            self.ready = client.healthy("/readyz")[0]
        return self.ready


def problems(layout: Layout) -> list[str]:
    """What of the control plane is not serving yet (empty: all of it)."""
    cp = netns.named_path(layout.controlplane_netns)
    found = []
    ready, said = admin_client(layout).healthy("/readyz")
    if not ready:
        found.append(f"kube-apiserver not ready: {said.splitlines()[-1] if said else 'no answer'}")
    for component, port in (("kube-controller-manager", CONTROLLER_MANAGER_PORT), ("kube-scheduler", SCHEDULER_PORT)):
        healthy, said = ApiClient("127.0.0.1", port, cp, None).healthy("/healthz")
        if not healthy:
            found.append(f"{component} not healthy: {said.splitlines()[-1] if said else 'no answer'}")
    return found


def wait_ready(layout: Layout, out: Callable[[str], None], timeout: float, poll: float = 0.2) -> float:
    """Wait until the API server is ready and the controller manager and scheduler are
    healthy; returns the seconds it took. LabError naming what is not, after `timeout`."""
    started = time.monotonic()
    shown = None
    while True:
        found = problems(layout)
        if not found:
            return time.monotonic() - started
        if found[0] != shown:
            out(f"control plane: {found[0]}")
            shown = found[0]
        if time.monotonic() - started > timeout:
            logs = ", ".join([layout.supervisor_log] + [layout.controlplane_log(c) for c in COMPONENTS])
            raise LabError(f"the control plane is not ready after {timeout:.0f}s: {'; '.join(found)}",
                           f"see {logs}; the lab stays up")
        time.sleep(poll)


def _is_component(pid: int, layout: Layout) -> bool:
    """True if `pid` is alive and one of lab `layout.name`'s control plane processes."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return len(args) > 2 and args[1] in COMPONENTS and any(layout.kube_dir in a for a in args)


def stop(layout: Layout, pids: list[int], grace: float = 5.0) -> int:
    """SIGTERM the control plane's recorded processes (checked by command line, since
    pids get reused), SIGKILL those left after `grace`; returns how many were running."""
    live = [p for p in pids if p and _is_component(p, layout)]
    for pid in live:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_is_component(p, layout) for p in live):
        if time.monotonic() > deadline:
            for pid in live:
                if _is_component(pid, layout):
                    os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.05)
    return len(live)
