"""The kernel lab's Vagrantfile and box Vagrantfile (issue 15, items 1 and 2), checked
by vagrant itself without booting anything: `vagrant validate`, and what vagrant
resolved for each VM — read through a one-command vagrant plugin defined in a wrapper
Vagrantfile that loads the project's (or a box's) Vagrantfile. Runs where Debian's
vagrant and vagrant-libvirt are installed (tests/vm/build-box installs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "vm"))
import box  # noqa: E402
from engines import ci_enabled  # noqa: E402

LIBVIRT_PLUGIN = Path("/usr/share/vagrant-plugins/plugins.d")
MISSING = "vagrant and vagrant-libvirt not installed (scripts/test and tests/vm/build-box install them)"


@pytest.fixture(autouse=True)
def _vagrant_installed() -> None:
    """Skipped where vagrant is missing, except under CI, where scripts/test installed it."""
    if shutil.which("vagrant") is None or not any(LIBVIRT_PLUGIN.glob("*libvirt*")):
        if ci_enabled():
            pytest.fail(f"CI: {MISSING}")
        pytest.skip(MISSING)

# A vagrant command printing, per VM, what vagrant resolved from the Vagrantfile.
SHOW = """
require "json"
class NodeagentShow < Vagrant.plugin("2", :command)
  def execute
    with_target_vms(@argv, provider: :libvirt) do |m|
      pc = m.provider_config
      nets = m.config.vm.networks.reject { |type, _| type == :forwarded_port }
      puts JSON.generate({
        name: m.name.to_s, box: m.config.vm.box, driver: pc.driver, cpus: pc.cpus, cpu_mode: pc.cpu_mode,
        mgmt_attach: pc.mgmt_attach, agent: pc.qemu_use_agent, qemuargs: pc.instance_variable_get(:@qemu_args).map { |a| a[:value] },
        networks: nets.map { |type, o| [type.to_s, o] }, ssh: [m.config.ssh.host, m.config.ssh.port],
        kernel: pc.kernel, initrd: pc.initrd, cmd_line: pc.cmd_line,
        provisioners: m.config.vm.provisioners.map { |p| [p.name.to_s, p.run.to_s] },
        setup: m.config.vm.provisioners.select { |p| p.name.to_s == "setup" }.map { |p| p.config.inline },
        synced: m.config.vm.synced_folders.map { |id, o| [o[:guestpath], o[:type].to_s, o[:disabled] ? true : false] },
      })
    end
    0
  end
end
class NodeagentShowPlugin < Vagrant.plugin("2")
  name "nodeagent-show"
  command("nodeagent-show") { NodeagentShow }
end
load %s
"""


def vagrant(tmp_path: Path, *argv: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NODEAGENT_", "VAGRANT_"))}
    clean.update(VAGRANT_HOME=str(tmp_path / "vagrant.d"), VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
                 VAGRANT_CHECKPOINT_DISABLE="1", **env)
    return subprocess.run(["vagrant", *argv], cwd=cwd, env=clean, capture_output=True, text=True, timeout=120)


def show(tmp_path: Path, vagrantfile: Path, *names: str, **env: str) -> dict[str, dict]:
    wrapper = tmp_path / "show"
    wrapper.mkdir(exist_ok=True)
    (wrapper / "Vagrantfile").write_text(SHOW % json.dumps(str(vagrantfile)))
    out = vagrant(tmp_path, "nodeagent-show", *names, cwd=wrapper, **env)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {row["name"]: row for row in rows}


def test_vagrantfile_validates(tmp_path):
    out = vagrant(tmp_path, "validate")
    assert out.returncode == 0, out.stderr
    assert "Vagrantfile validated successfully." in out.stdout


def test_matrix_all_four_kernels_by_default_one_box_each(tmp_path):
    vms = show(tmp_path, ROOT / "Vagrantfile", NODEAGENT_VM_ACCEL="tcg")
    assert list(vms) == ["bullseye", "bookworm", "trixie", "sid"]
    assert {n: vm["box"] for n, vm in vms.items()} == {n: f"nodeagent/{n}" for n in vms}
    ports = [vm["ssh"] for vm in vms.values()]
    assert ports == [["127.0.0.1", 52220 + i] for i in range(4)]
    for i, (name, vm) in enumerate(vms.items()):
        # emulation: qemu driver, one vCPU, a CPU model TCG has; no libvirt network
        assert (vm["driver"], vm["cpus"], vm["cpu_mode"], vm["mgmt_attach"], vm["agent"]) == ("qemu", 1, "custom", False, True)
        mac = f"52:54:00:4e:41:{i + 1:02x}"
        assert vm["qemuargs"] == ["-netdev", f"user,id=nanet,hostfwd=tcp:127.0.0.1:{52220 + i}-:22",
                                  "-device", f"virtio-net-pci,netdev=nanet,mac={mac},addr=0x1f"]
        # the placeholder NIC libvirt lists carries the same MAC (vagrant-libvirt asks the
        # guest agent for the address of the domain's first NIC's MAC)
        [(kind, net)] = vm["networks"]
        assert kind == "private_network"
        assert (net["libvirt__tunnel_type"], net["libvirt__mac"], net["auto_config"]) == ("udp", mac, False)
        assert vm["provisioners"] == [["setup", ""], ["kernel", ""], ["e2e", "never"]]
        # the kernel tier alone: no Kubernetes control plane built in the VM
        assert vm["setup"] == ["cd /nodeagent && scripts/setup --no-kube"]
        assert ["/nodeagent", "rsync", False] in vm["synced"] and ["/vagrant", "", True] in vm["synced"]


def test_kernels_picked_by_variable_kvm_and_e2e_on_request(tmp_path):
    vms = show(tmp_path, ROOT / "Vagrantfile", NODEAGENT_KERNELS="trixie,bookworm", NODEAGENT_VM_ACCEL="kvm",
               NODEAGENT_E2E="1")
    assert list(vms) == ["bookworm", "trixie"]
    for vm in vms.values():
        assert (vm["driver"], vm["cpus"], vm["cpu_mode"]) == ("kvm", 2, "host-passthrough")
        assert vm["provisioners"] == [["setup", ""], ["kernel", ""], ["e2e", "once"]]
        assert vm["setup"] == ["cd /nodeagent && scripts/setup"]  # the e2e tier's --kube lab needs it
    # the matrix's indexes stay put whatever is picked: bookworm keeps its port
    assert vms["bookworm"]["ssh"] == ["127.0.0.1", 52221]


def test_unknown_suite_or_accel_refused_with_the_choices(tmp_path):
    out = vagrant(tmp_path, "validate", NODEAGENT_KERNELS="bookworm,buster")
    assert out.returncode == 1
    assert "NODEAGENT_KERNELS: unknown suite(s) buster: use bullseye, bookworm, trixie, sid" in out.stderr
    out = vagrant(tmp_path, "validate", NODEAGENT_VM_ACCEL="hvf")
    assert out.returncode == 1
    assert "NODEAGENT_VM_ACCEL=hvf: use kvm or tcg" in out.stderr


def test_box_vagrantfile_boots_the_cached_kernel_directly(tmp_path):
    cache = tmp_path / "boxes" / "trixie"
    cache.mkdir(parents=True)
    built = box.Box("trixie", cache)
    boxdir = tmp_path / "box"
    boxdir.mkdir()
    (boxdir / "Vagrantfile").write_text(box.box_vagrantfile(built))
    # the kernel not built on this machine: refused, naming the command that builds it
    out = vagrant(tmp_path, "validate", cwd=boxdir)
    assert out.returncode == 1
    assert f"nodeagent/trixie: {cache / 'vmlinuz'} is missing: run tests/vm/build-box trixie on this machine" in out.stderr
    (cache / "vmlinuz").write_bytes(b"")
    (cache / "initrd.img").write_bytes(b"")
    [(name, vm)] = show(tmp_path, boxdir / "Vagrantfile").items()
    assert (vm["kernel"], vm["initrd"], vm["cmd_line"]) == (str(cache / "vmlinuz"), str(cache / "initrd.img"), box.CMDLINE)
    assert box.CMDLINE.split()[:2] == ["root=/dev/vda", "rw"]  # box.img is one ext4, no partition table
