"""Names and paths of everything a lab makes, in one place.

`lab up` creates by these names and `lab down` removes by their prefixes (not only by
recorded state), so a crash or a half-finished `up` never leaves anything it cannot
find again. Everything carries the lab name: netns `<lab>-fabric`, `<lab>-n-<node>`,
`<lab>-p-<ns>-<pod>`, `<lab>-cp` (the control plane of `--kube`); cgroups under
`<cgroup2-root>/nodeagent-<lab>/`; bpffs under `/sys/fs/bpf/nodeagent-<lab>/`; state
under `/run/nodeagent/<lab>/`; hosts files under `/etc/netns/<pod-netns>/`. Pure:
nothing here touches the machine.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from nodeagent.errors import ConfigError

DEFAULT_NAME = "nalab"
NAME_ENV = "NODEAGENT_LAB"  # overrides DEFAULT_NAME
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,7}\Z")

RUN_ROOT = "/run/nodeagent"
BPFFS_ROOT = "/sys/fs/bpf"
ETC_NETNS = "/etc/netns"  # `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc/*
NETNS_MAX = 40  # longer netns names are truncated and get a hash suffix


def default_name() -> str:
    return os.environ.get(NAME_ENV) or DEFAULT_NAME


def agent_socket(lab: str | None, node: str) -> str:
    """The admin socket of node `node`'s agent in lab `lab` (default: default_name()).
    `nodeagent status --node` reads it: nodeagent/cli.py hands this to the agent's
    commands, so no product package imports the lab."""
    return Layout(check_name(lab or default_name()), cgroup_root="").agent_socket(node)


def xds_socket(lab: str, node: str) -> str:
    """The xDS socket of node `node`'s waypoint in lab `lab` (`proxy-config --lab`)."""
    return os.path.join(Layout(check_name(lab), cgroup_root="").waypoint_dir(node), "xds.sock")


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise ConfigError(f"lab name {name!r}", "must match [a-z][a-z0-9]{0,7}",
                          "use a short lower-case name such as 'nalab' or 'test1'")
    return name


def short_hash(text: str, length: int = 8) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:length]


def _bounded(name: str, identity: str, hashed: bool) -> str:
    """`name` if short and unambiguous, else its prefix plus a hash of `identity`."""
    if not hashed and len(name) <= NETNS_MAX:
        return name
    return f"{name[:NETNS_MAX - 9].rstrip('-')}-{short_hash(identity)}"


@dataclass(frozen=True)
class Layout:
    name: str
    cgroup_root: str  # the cgroup2 mount point
    run_root: str = RUN_ROOT
    bpffs_root: str = BPFFS_ROOT
    etc_netns: str = ETC_NETNS

    # --- network namespaces ------------------------------------------------------
    @property
    def netns_prefix(self) -> str:
        return f"{self.name}-"

    @property
    def fabric_netns(self) -> str:
        return f"{self.name}-fabric"

    def node_netns(self, node: str) -> str:
        return _bounded(f"{self.name}-n-{node}", node, hashed=False)

    def pod_netns(self, namespace: str, pod: str) -> str:
        # A '-' in the namespace would make `<ns>-<pod>` ambiguous, so such names get
        # a hash of the pair; plain ones stay readable.
        return _bounded(f"{self.name}-p-{namespace}-{pod}", f"{namespace}/{pod}",
                        hashed="-" in namespace)

    def hosts_dir(self, netns: str) -> str:
        return os.path.join(self.etc_netns, netns)

    def hosts_file(self, netns: str) -> str:
        return os.path.join(self.hosts_dir(netns), "hosts")

    # --- cgroups (kubelet naming: .../kubepods/pod<uid>/) ------------------------
    @property
    def lab_cgroup(self) -> str:
        return os.path.join(self.cgroup_root, f"nodeagent-{self.name}")

    @property
    def supervisor_cgroup(self) -> str:
        return os.path.join(self.lab_cgroup, "supervisor")

    def node_cgroup(self, node: str) -> str:
        return os.path.join(self.lab_cgroup, node)

    def kubepods_cgroup(self, node: str) -> str:
        return os.path.join(self.node_cgroup(node), "kubepods")

    def pod_cgroup(self, node: str, uid: str) -> str:
        return os.path.join(self.kubepods_cgroup(node), f"pod{uid}")

    def system_cgroup(self, node: str) -> str:
        return os.path.join(self.node_cgroup(node), "system")

    # --- bpffs -------------------------------------------------------------------
    @property
    def bpffs_dir(self) -> str:
        return os.path.join(self.bpffs_root, f"nodeagent-{self.name}")

    def node_bpffs(self, node: str) -> str:
        return os.path.join(self.bpffs_dir, node)

    # --- state directory ---------------------------------------------------------
    @property
    def state_dir(self) -> str:
        return os.path.join(self.run_root, self.name)

    @property
    def lab_json(self) -> str:
        return os.path.join(self.state_dir, "lab.json")

    @property
    def runtime_json(self) -> str:
        return os.path.join(self.state_dir, "runtime.json")

    @property
    def cluster_dir(self) -> str:
        return os.path.join(self.state_dir, "cluster")

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.state_dir, "logs")

    @property
    def agents_dir(self) -> str:
        return os.path.join(self.state_dir, "agents")

    def agent_socket(self, node: str) -> str:
        return os.path.join(self.agents_dir, f"{node}.sock")

    def container_log(self, namespace: str, pod: str, container: str) -> str:
        return os.path.join(self.logs_dir, f"{namespace}_{pod}_{container}.log")

    def agent_log(self, node: str) -> str:
        return os.path.join(self.logs_dir, f"agent-{node}.log")

    def flow_log(self, node: str) -> str:
        return os.path.join(self.logs_dir, f"flows-{node}.log")

    # --- the mesh CA and the agents' identities ----------------------------------
    @property
    def ca_dir(self) -> str:
        """The CA's keys (Istio cacerts layout, 0700)."""
        return os.path.join(self.state_dir, "ca")

    @property
    def ca_log(self) -> str:
        return os.path.join(self.logs_dir, "ca.log")

    @property
    def root_cert(self) -> str:
        """The mesh root the agents trust (a copy of the CA's, as a ConfigMap would carry)."""
        return os.path.join(self.state_dir, "root-cert.pem")

    @property
    def tokens_dir(self) -> str:
        return os.path.join(self.state_dir, "tokens")

    @property
    def ca_tokens(self) -> str:
        """node -> token, the CA's --tokens file."""
        return os.path.join(self.tokens_dir, "ca-tokens.yaml")

    def node_token(self, node: str) -> str:
        return os.path.join(self.tokens_dir, f"{node}.token")

    def identity_dir(self, node: str) -> str:
        """The node agent's workload keys and certificates."""
        return os.path.join(self.state_dir, "identity", node)

    def waypoint_dir(self, node: str) -> str:
        """The node's waypoint: xDS and Envoy <-> agent sockets, bootstrap, Envoy log."""
        return os.path.join(self.state_dir, "waypoint", node)

    @property
    def supervisor_log(self) -> str:
        return os.path.join(self.logs_dir, "supervisor.log")

    # --- the Kubernetes control plane (`lab up --kube`) ---------------------------
    @property
    def controlplane_netns(self) -> str:
        return f"{self.name}-cp"

    @property
    def controlplane_cgroup(self) -> str:
        return os.path.join(self.lab_cgroup, "controlplane")

    @property
    def kube_dir(self) -> str:
        """Everything of the control plane: pki/ (keys, certificates, kubeconfigs), etcd/."""
        return os.path.join(self.state_dir, "kube")

    @property
    def kube_pki_dir(self) -> str:
        return os.path.join(self.kube_dir, "pki")

    @property
    def etcd_dir(self) -> str:
        return os.path.join(self.kube_dir, "etcd")

    @property
    def admin_kubeconfig(self) -> str:
        return os.path.join(self.kube_pki_dir, "admin.kubeconfig")

    def controlplane_log(self, component: str) -> str:
        return os.path.join(self.logs_dir, f"{component}.log")


def host_veth(namespace: str, pod: str) -> str:
    """Node-side veth of a pod (15 characters at most, like Calico's `cali…`)."""
    return f"na{short_hash(f'{namespace}/{pod}', 11)}"


def fabric_veth(index: int) -> str:
    """Fabric-side veth of node number `index` (names are local to the fabric netns)."""
    return f"node{index}"
