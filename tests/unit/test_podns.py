"""Pod netns discovery from /proc/*/cgroup, on fake /proc trees (no root needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nodeagent.agent.inpod import podns
from nodeagent.agent.inpod.podns import PodNetnsResolver, PodNotFound
from nodeagent.netns import NetnsError

UID = "0b5a2c1e-7f3d-4e8a-9c6b-1d2e3f4a5b6c"
UID2 = "11111111-2222-3333-4444-555555555555"


def test_cgroupfs_naming():
    path = f"/kubepods/burstable/pod{UID}/0123456789abcdef"
    assert podns.uids_in_cgroup_path(path) == {UID}
    assert podns.uids_in_cgroup_path(f"/nodeagent-lab/n1/kubepods/pod{UID}") == {UID}


def test_systemd_naming():
    slice_uid = UID.replace("-", "_")
    path = (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{slice_uid}.slice/"
            "cri-containerd-0123.scope")
    assert podns.uids_in_cgroup_path(path) == {UID}
    assert podns.uids_in_cgroup_path(f"/kubepods.slice/kubepods-pod{slice_uid}.slice") == {UID}


def test_non_pod_paths():
    assert podns.uids_in_cgroup_path("/") == set()
    assert podns.uids_in_cgroup_path("/system.slice/sshd.service") == set()
    assert podns.uids_in_cgroup_path("/kubepods/burstable") == set()


def test_cgroup_file_every_hierarchy():
    v1 = f"12:memory:/kubepods/burstable/pod{UID}/abc\n11:cpu:/kubepods/burstable/pod{UID}/abc\n0::/\n"
    assert podns.uids_of_cgroup_file(v1) == {UID}
    v2 = f"0::/kubepods.slice/kubepods-pod{UID2.replace('-', '_')}.slice/cri.scope\n"
    assert podns.uids_of_cgroup_file(v2) == {UID2}
    assert podns.uids_of_cgroup_file("garbage\n\n") == set()


class FakeProc:
    """A /proc tree: <pid>/cgroup and <pid>/ns/net (a plain file; its inode is the 'cookie')."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir()
        self.own = root / "own-net"
        self.own.write_text("")

    def add(self, pid: int, cgroup: str, netns_file: Path | None = None) -> Path:
        d = self.root / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "cgroup").write_text(cgroup)
        net = d / "ns" / "net"
        if netns_file is not None:
            os.link(netns_file, net)
        else:
            net.write_text("")
        return net

    def addresses(self, pid: int, fib_trie: str | None = None, if_inet6: str | None = None) -> None:
        """What /proc/<pid>/net says of the local addresses of its netns."""
        net = self.root / str(pid) / "net"
        net.mkdir(exist_ok=True)
        if fib_trie is not None:
            (net / "fib_trie").write_text(fib_trie)
        if if_inet6 is not None:
            (net / "if_inet6").write_text(if_inet6)

    def remove(self, pid: int) -> None:
        d = self.root / str(pid)
        for p in sorted(d.rglob("*"), key=lambda p: -len(p.parts)):
            p.rmdir() if p.is_dir() else p.unlink()
        d.rmdir()

    def resolver(self) -> PodNetnsResolver:
        return PodNetnsResolver(str(self.root), str(self.own), cookie_of=lambda fd: os.fstat(fd).st_ino)


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path / "proc")


def test_resolves_first_process_of_pod(proc):
    proc.add(1, "0::/init.scope\n")
    net = proc.add(42, f"0::/n/kubepods/pod{UID}\n")
    proc.add(43, f"0::/n/kubepods/pod{UID}/c2\n")
    r = proc.resolver()
    found = r.resolve(UID)
    assert found.pid == 42 and found.cookie == net.stat().st_ino and found.uid == UID
    r.close()
    assert found.fd == -1


def test_resolve_many_and_missing(proc):
    proc.add(10, f"0::/kubepods-pod{UID.replace('-', '_')}.slice\n")
    proc.add(11, f"0::/n/kubepods/pod{UID2}\n")
    r = proc.resolver()
    out = r.resolve_many([UID, UID2, "missing-uid"])
    assert out[UID].pid == 10 and out[UID2].pid == 11
    assert isinstance(out["missing-uid"], PodNotFound)
    assert "retrying" in str(out["missing-uid"])
    r.close()


def test_cache_and_re_resolve_when_pid_gone(proc):
    proc.add(42, f"0::/n/kubepods/pod{UID}\n")
    r = proc.resolver()
    first = r.resolve(UID)
    assert r.resolve(UID) is first  # cached while pid 42 is still in the pod
    proc.remove(42)
    proc.add(77, f"0::/n/kubepods/pod{UID}\n")
    second = r.resolve(UID)
    assert second.pid == 77 and second is not first and first.fd == -1
    r.close()


def test_re_resolve_when_pid_reused_elsewhere(proc):
    proc.add(42, f"0::/n/kubepods/pod{UID}\n")
    r = proc.resolver()
    r.resolve(UID)
    proc.remove(42)
    proc.add(42, "0::/system.slice/other.service\n")  # same pid, another process
    with pytest.raises(PodNotFound):
        r.resolve(UID)
    r.close()


def test_host_network_pod_is_refused(proc):
    proc.add(5, f"0::/n/kubepods/pod{UID}\n", netns_file=proc.own)
    r = proc.resolver()
    with pytest.raises(NetnsError, match="hostNetwork"):
        r.resolve(UID)
    r.close()


def test_unreadable_entries_are_skipped(proc):
    (proc.root / "self").mkdir()
    (proc.root / "99").mkdir()  # vanished process: no cgroup file
    proc.add(100, f"0::/n/kubepods/pod{UID}\n")
    r = proc.resolver()
    assert r.resolve(UID).pid == 100
    r.close()


def fib_trie(*local: str) -> str:
    """/proc/PID/net/fib_trie of a netns with these local IPv4 addresses (and lo's)."""
    rows = "".join(f"     |-- {ip}\n        /32 host LOCAL\n" for ip in ("127.0.0.1", *local))
    return f"Main:\n  +-- 0.0.0.0/0 3 0 5\nLocal:\n  +-- 0.0.0.0/0 3 0 5\n{rows}"


def test_a_process_in_a_netns_of_its_own_is_not_the_pods(proc):
    """A process of the pod with a netns of its own (unshare -n) and a lower PID than the
    pod's others: its netns (no pod IP) is not the pod's. The first process whose netns
    holds the pod's IP is taken. (The lowest PID's was: the agent captured an empty netns
    and left the pod's own uncaptured.)"""
    own_net = proc.root.parent / "private-netns"
    own_net.write_text("")
    proc.add(40, f"0::/n/kubepods/pod{UID}/c1\n", own_net)  # unshare -n, the lowest PID
    proc.addresses(40, fib_trie=fib_trie())
    pod_net = proc.add(41, f"0::/n/kubepods/pod{UID}/pause\n")
    proc.addresses(41, fib_trie=fib_trie("10.244.1.5"))
    r = proc.resolver()
    found = r.resolve_many([UID], {UID: "10.244.1.5"})[UID]
    assert (found.pid, found.cookie) == (41, pod_net.stat().st_ino)
    r.close()
    r = proc.resolver()
    assert r.resolve_many([UID])[UID].pid == 40  # no IP to look for: the first, as before
    r.close()


def test_ipv6_addresses_are_read_from_if_inet6(proc):
    proc.add(40, f"0::/n/kubepods/pod{UID}\n")
    proc.addresses(40, if_inet6="00000000000000000000000000000001 01 80 10 80       lo\n")
    proc.add(41, f"0::/n/kubepods/pod{UID}\n")
    proc.addresses(41, if_inet6="fd000000000000000000000000000005 02 40 00 80     eth0\n")
    r = proc.resolver()
    assert r.resolve_many([UID], {UID: "fd00::5"})[UID].pid == 41
    r.close()


def test_no_netns_holding_the_ip_is_not_found_yet_and_unreadable_ones_fall_back_to_the_first(proc):
    proc.add(40, f"0::/n/kubepods/pod{UID}\n")
    proc.addresses(40, fib_trie=fib_trie("10.244.9.9"))
    r = proc.resolver()
    missing = r.resolve_many([UID], {UID: "10.244.1.5"})[UID]
    assert isinstance(missing, NetnsError) and "holding its IP 10.244.1.5" in str(missing)
    proc.add(41, f"0::/n/kubepods/pod{UID}\n")  # its addresses cannot be read
    assert r.resolve_many([UID], {UID: "10.244.1.5"})[UID].pid == 41
    r.close()
