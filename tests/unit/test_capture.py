"""Capture layer without a kernel: struct conversions, argument checks, preflight
checks against fake mount tables and paths. (tests/kernel has the real programs.)"""

from __future__ import annotations

import ctypes
import socket

import pytest

from nodeagent.capture import preflight
from nodeagent.capture.errors import (BccMissing, BpffsMissing, BtfMissing, Cgroup2Missing,
                                      KernelHeadersMissing, VerifierRejected)
from nodeagent.capture.loader import CaptureLoader
from nodeagent.capture.programs import cflags
from nodeagent.capture.structs import Addr, OrigDst, Pod
from nodeagent.errors import ConfigError, EnvironmentProblem, NodeagentError

MOUNTS = """\
sysfs /sys sysfs rw 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0
bpf /sys/fs/bpf bpf rw 0 0
tmpfs /run/with\\040space tmpfs rw 0 0
"""


@pytest.fixture
def mounts(tmp_path):
    path = tmp_path / "mounts"
    path.write_text(MOUNTS)
    return str(path)


@pytest.mark.parametrize("ip,family", [("10.1.2.3", socket.AF_INET), ("fd00::7", socket.AF_INET6)])
def test_addr_round_trip_keeps_network_order(ip, family):
    key = Addr.of(ip)
    assert key.family == family and key.ip() == ip
    assert bytes(key.addr)[:4] == socket.inet_pton(family, ip)[:4]


def test_v4_mapped_destination_reads_as_ipv4():
    value = OrigDst(dst=Addr.of("::ffff:10.0.0.9"), port=socket.htons(8080))
    assert value.destination() == ("10.0.0.9", 8080)


def test_pod_value_fills_unused_ports_with_zero():
    assert list(Pod.of(1, [80, 443]).exclude_ports) == [80, 443, 0, 0, 0, 0, 0, 0]
    assert ctypes.sizeof(Pod) == 20


def test_loader_arguments_are_checked():
    with pytest.raises(ConfigError, match="pin_dir"):
        CaptureLoader(cgroup="/sys/fs/cgroup", pin_dir="relative/dir")
    with pytest.raises(ConfigError, match="must differ"):
        CaptureLoader(cgroup="/sys/fs/cgroup", pin_dir="/sys/fs/bpf/x", inbound_port=15001)
    with pytest.raises(ConfigError, match="mark"):
        CaptureLoader(cgroup="/sys/fs/cgroup", pin_dir="/sys/fs/bpf/x", mark=0)
    loader = CaptureLoader(cgroup="/sys/fs/cgroup", pin_dir="/sys/fs/bpf/x/")
    assert loader.maps_dir == "/sys/fs/bpf/x/maps" and loader.links_dir == "/sys/fs/bpf/x/links"
    with pytest.raises(NodeagentError, match="not loaded"):
        loader.enrol_netns(1)


def test_cflags_carry_mark_mask_and_ports():
    flags = cflags("/b", "/sys/fs/bpf/x/maps", 0x539, {"outbound": 15001})
    assert flags == ["-I/b", '-DNA_PIN_DIR="/sys/fs/bpf/x/maps"', "-DNA_MARK=0x539",
                     "-DNA_MARK_MASK=0xfff", "-DNA_OUTBOUND_PORT=15001"]
    assert "-DNA_MARK_MASK=0xffffffff" in cflags("/b", "/m", 0x10000, {})


def test_mount_table_and_fs_type(mounts):
    assert ("/run/with space", "tmpfs") in preflight.mount_table(mounts)
    assert preflight.fs_type_of("/sys/fs/cgroup/unified/kubepods", mounts) == "cgroup2"
    assert preflight.fs_type_of("/sys/fs/cgroup/cpu", mounts) == "cgroup"
    assert preflight.fs_type_of("/sys/fs/bpfx", mounts) == "sysfs"  # a prefix is not a parent


def test_cgroup_checks(mounts, tmp_path):
    with pytest.raises(Cgroup2Missing, match="does not exist"):
        preflight.check_cgroup(str(tmp_path / "nope"), mounts)
    with pytest.raises(Cgroup2Missing, match="not on a cgroup2 mount"):
        preflight.check_cgroup(str(tmp_path), mounts)
    no_cgroup2 = tmp_path / "mounts-v1"
    no_cgroup2.write_text(MOUNTS.replace("cgroup2 /sys/fs/cgroup/unified cgroup2", "x /x x"))
    with pytest.raises(Cgroup2Missing, match="scripts/setup"):
        preflight.check_cgroup(str(tmp_path), str(no_cgroup2))


def test_bpffs_check_uses_nearest_existing_parent(mounts, tmp_path):
    with pytest.raises(BpffsMissing, match="not on a bpf filesystem"):
        preflight.check_bpffs(str(tmp_path / "a" / "b"), mounts)


def test_other_checks_name_what_is_missing(tmp_path, monkeypatch):
    with pytest.raises(KernelHeadersMissing, match="/lib/modules/0.0-none/build.*scripts/setup"):
        preflight.check_kernel_headers("0.0-none")
    with pytest.raises(BtfMissing, match="CONFIG_DEBUG_INFO_BTF"):
        preflight.check_btf(str(tmp_path / "vmlinux"))
    monkeypatch.setitem(__import__("sys").modules, "bcc", None)
    with pytest.raises(BccMissing, match="python3-bpfcc"):
        preflight.check_bcc()
    assert issubclass(BccMissing, EnvironmentProblem)


def test_verifier_message_keeps_the_end_of_a_long_log():
    log = "\n".join(f"line {i}" for i in range(100)) + "\nR1 invalid mem access 'scalar'"
    err = VerifierRejected("na_connect4", "Permission denied", log)
    assert "invalid mem access" in str(err) and "line 50" not in str(err) and err.log == log
