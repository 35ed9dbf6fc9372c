"""A lab node's view of the machine's paths (nodeagent/lab/kube/nodeview.py) and the
mounts the lab kubelet plans from it for the agent DaemonSet's pod (kubelet.node_mounts,
volumes.mount_script, kubelet.container_argv): hostPaths under /sys/fs/cgroup and
/sys/fs/bpf are the node's subtrees, sources hidden by an earlier mount are bound from
descriptors, a ClusterFirstWithHostNet pod gets the lab's hosts file, a pod without
hostIPC its own /dev/shm."""

from __future__ import annotations

import pytest

from nodeagent.errors import ConfigError
from nodeagent.lab.kube import kubelet, nodeview, security, volumes
from nodeagent.lab.layout import Layout
from nodeagent.lab.spec import PodSpec

HYBRID = Layout("h1ds", cgroup_root="/sys/fs/cgroup/unified")  # cgroup2 beside v1 controllers
UNIFIED = Layout("h1ds", cgroup_root="/sys/fs/cgroup")
POD_DIR = "/run/nodeagent/h1ds/kube/pods/u-1"


@pytest.mark.parametrize("layout, path, seen", [
    (UNIFIED, "/sys/fs/cgroup", "/sys/fs/cgroup/nodeagent-h1ds/hn1"),
    (UNIFIED, "/sys/fs/cgroup/", "/sys/fs/cgroup/nodeagent-h1ds/hn1"),
    (UNIFIED, "/sys/fs/cgroup/kubepods/x", "/sys/fs/cgroup/nodeagent-h1ds/hn1/kubepods/x"),
    (HYBRID, "/sys/fs/cgroup", "/sys/fs/cgroup/unified/nodeagent-h1ds/hn1"),
    (HYBRID, "/sys/fs/cgroup/unified", "/sys/fs/cgroup/unified/nodeagent-h1ds/hn1"),  # the longest root first
    (HYBRID, "/sys/fs/cgroup/unified/a", "/sys/fs/cgroup/unified/nodeagent-h1ds/hn1/a"),
    (HYBRID, "/sys/fs/cgroup/a/../b", "/sys/fs/cgroup/unified/nodeagent-h1ds/hn1/b"),
    (HYBRID, "/sys/fs/bpf", "/sys/fs/bpf/nodeagent-h1ds/hn1"),
    (HYBRID, "/sys/fs/bpf/nodeagent", "/sys/fs/bpf/nodeagent-h1ds/hn1/nodeagent"),
    (HYBRID, "/sys/fs/bpfx", "/sys/fs/bpfx"),  # only whole path components
    (HYBRID, "/sys/fs/cgroupx", "/sys/fs/cgroupx"),
    (HYBRID, "/sys", "/sys"),
    (HYBRID, "/lib/modules", "/lib/modules"),
])
def test_host_paths_as_the_node_sees_them(layout, path, seen):
    assert nodeview.host_path(layout, "hn1", path) == seen


def test_the_nodes_view_never_reaches_the_machines_roots():
    for path in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified", "/sys/fs/bpf", "/sys/fs/cgroup/..", "/sys/fs/bpf/.."):
        seen = nodeview.host_path(HYBRID, "hn2", path)
        assert seen.startswith(("/sys/fs/cgroup/unified/nodeagent-h1ds/hn2", "/sys/fs/bpf/nodeagent-h1ds/hn2")) or \
            seen == "/sys/fs", (path, seen)


def agent_pod(host_network: bool = True, dns_policy: str = "ClusterFirstWithHostNet", mounts: list | None = None):
    return {"metadata": {"name": "nodeagent-x1", "namespace": "nodeagent-system", "uid": "u-1"},
            "spec": {"nodeName": "hn1", "hostNetwork": host_network, "dnsPolicy": dns_policy,
                     "volumes": [{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf", "type": "Directory"}},
                                 {"name": "cgroup", "hostPath": {"path": "/sys/fs/cgroup", "type": "Directory"}},
                                 {"name": "run", "emptyDir": {"medium": "Memory"}},
                                 {"name": "ca-root", "configMap": {"name": "nodeagent-ca-root-cert"}}],
                     "containers": [{"name": "agent", "command": ["nodeagent", "run"], "volumeMounts": mounts or [
                         {"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "HostToContainer"},
                         {"name": "cgroup", "mountPath": "/sys/fs/cgroup"},
                         {"name": "run", "mountPath": "/run/nodeagent"},
                         {"name": "ca-root", "mountPath": "/etc/nodeagent/ca-root", "readOnly": True}]}]}}


def test_the_agent_pods_mounts_are_its_nodes_with_the_labs_hosts_file(tmp_path):
    mounts = kubelet.node_mounts(HYBRID, agent_pod(), "hn1", POD_DIR, "agent", {})
    assert mounts == [volumes.Mount(f"{POD_DIR}/volumes/run", "/run/nodeagent", False),
                      volumes.Mount(f"{POD_DIR}/etc-hosts", "/etc/hosts", False),
                      volumes.Mount("/sys/fs/bpf/nodeagent-h1ds/hn1", "/sys/fs/bpf", False),
                      volumes.Mount("/sys/fs/cgroup/unified/nodeagent-h1ds/hn1", "/sys/fs/cgroup", False),
                      volumes.Mount(f"{POD_DIR}/volumes/ca-root", "/etc/nodeagent/ca-root", True)]
    # the node's own /etc/hosts without ClusterFirstWithHostNet, or when the container mounts one
    assert volumes.Mount(f"{POD_DIR}/etc-hosts", "/etc/hosts", False) not in \
        kubelet.node_mounts(HYBRID, agent_pod(dns_policy="ClusterFirst"), "hn1", POD_DIR, "agent", {})
    (tmp_path / "volumes" / "run").mkdir(parents=True)  # the subPath is made in the volume, as kubelet makes it
    own = kubelet.node_mounts(HYBRID, agent_pod(mounts=[{"name": "run", "mountPath": "/etc/hosts", "subPath": "h"}]),
                              "hn1", str(tmp_path), "agent", {})
    assert [m.target for m in own] == ["/etc/hosts"] and own[0].source == f"{tmp_path}/volumes/run/h"


def test_a_pod_with_its_own_netns_gets_its_sysfs_and_still_the_nodes_cgroup():
    item = agent_pod(host_network=False, mounts=[{"name": "cgroup", "mountPath": "/sys/fs/cgroup"}])
    mounts = kubelet.node_mounts(HYBRID, item, "hn1", POD_DIR, "agent", {})
    hosts = f"/etc/netns/{HYBRID.pod_netns('nodeagent-system', 'nodeagent-x1')}"
    assert mounts == [volumes.Mount(f"{hosts}/hosts", "/etc/hosts", False),  # the lab's DNS, always
                      volumes.Mount("/sys/fs/cgroup/unified/nodeagent-h1ds/hn1", "/sys/fs/cgroup", False)]
    pod = PodSpec("nodeagent-system", "nodeagent-x1", "hn1", {}, {}, ())
    argv = kubelet.container_argv(HYBRID, pod, "hn1", False, mounts, security.plan(item, {"name": "agent"}),
                                  ["sleep", "1"])
    assert argv == [
        "nsenter", f"--net=/run/netns/{HYBRID.pod_netns('nodeagent-system', 'nodeagent-x1')}", "--",
        "unshare", "--mount", "--propagation", "slave", "sh", "-c", " && ".join([
            "exec 3</sys/fs/cgroup/unified/nodeagent-h1ds/hn1",  # opened before the pod's sysfs hides it
            kubelet.SYSFS_MOUNT, kubelet.SHM_MOUNT,
            f"mount --bind {hosts}/hosts /etc/hosts",
            "mount -c --bind /proc/self/fd/3 /sys/fs/cgroup",
            "exec 3<&-"]) + ' && exec "$@"',
        "nodeagent-lab-mounts", "sleep", "1"]
    assert kubelet.SYSFS_MOUNT == "mount -n -t sysfs sysfs /sys"


def test_sources_an_earlier_mount_hides_are_bound_from_descriptors():
    mounts = kubelet.node_mounts(HYBRID, agent_pod(), "hn1", POD_DIR, "agent", {})
    assert volumes.mount_script(mounts, before=["mount -n -t tmpfs shm /dev/shm"]) == " && ".join([
        f"exec 3<{POD_DIR}/etc-hosts 4<{POD_DIR}/volumes/ca-root",  # both below /run/nodeagent, mounted first
        "mount -n -t tmpfs shm /dev/shm",
        f"mount --bind {POD_DIR}/volumes/run /run/nodeagent",
        "mount -c --bind /proc/self/fd/3 /etc/hosts",
        "mount --bind /sys/fs/bpf/nodeagent-h1ds/hn1 /sys/fs/bpf",
        "mount --bind /sys/fs/cgroup/unified/nodeagent-h1ds/hn1 /sys/fs/cgroup",
        "mount -c --bind /proc/self/fd/4 /etc/nodeagent/ca-root",
        "mount -o remount,bind,ro /etc/nodeagent/ca-root",
        "exec 3<&- 4<&-"])
    eight = [volumes.Mount("/run/x", "/run", False)] + [volumes.Mount(f"/run/x/{n}", f"/m{n}", False) for n in range(8)]
    with pytest.raises(ConfigError, match="at most 7 volumes from below another mount"):
        volumes.mount_script(eight)


def test_the_agent_runs_in_its_nodes_netns_with_its_own_mounts_and_shm():
    item = agent_pod(mounts=[{"name": "cgroup", "mountPath": "/sys/fs/cgroup"}])
    plan = security.plan(item, {"name": "agent", "securityContext": {"capabilities": {"drop": ["ALL"],
                                                                                    "add": ["BPF"]}}})
    mounts = kubelet.node_mounts(HYBRID, item, "hn1", POD_DIR, "agent", {})
    pod = PodSpec("nodeagent-system", "nodeagent-x1", "hn1", {}, {}, ())
    argv = kubelet.container_argv(HYBRID, pod, "hn1", True, mounts, plan, ["nodeagent", "run"])
    assert argv == [
        "nsenter", "--net=/run/netns/h1ds-n-hn1", "--", "unshare", "--mount", "--propagation", "slave",
        "sh", "-c", " && ".join([
            kubelet.SHM_MOUNT,
            f"mount --bind {POD_DIR}/etc-hosts /etc/hosts",
            "mount --bind /sys/fs/cgroup/unified/nodeagent-h1ds/hn1 /sys/fs/cgroup"]) + ' && exec "$@"',
        "nodeagent-lab-mounts", "setpriv", "--bounding-set=-all,+bpf", "--", "nodeagent", "run"]
    assert kubelet.SHM_MOUNT == "mount -n -t tmpfs -o mode=1777,size=64m,nosuid,nodev,noexec shm /dev/shm"
    host_ipc = security.plan({"spec": {"hostIPC": True}}, {"name": "agent"})
    assert not host_ipc.own_shm
    assert kubelet.SHM_MOUNT not in kubelet.container_argv(HYBRID, pod, "hn1", True, [], host_ipc, ["true"])
