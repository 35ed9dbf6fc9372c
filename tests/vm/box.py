"""Vagrant boxes for the kernel lab (issue 15, item 1): a libvirt box per Debian suite,
built here from a debootstrap root filesystem with that suite's own kernel package, for
the project's Vagrantfile. tests/vm/build-box is the command; this module does the work.

A box is the vagrant-libvirt format: a tar of box.img (qcow2: one ext4 filesystem, no
partition table, no bootloader), metadata.json and a Vagrantfile. The VM boots the
suite's kernel directly (libvirt's <kernel>/<initrd>/<cmdline>): those two files stay
in the cache, where qemu (the libvirt-qemu user) can read them — a box's own directory
under ~/.vagrant.d usually sits in a 0700 home — and the box's Vagrantfile names them.

Inside: systemd, sshd (host keys made at first boot, so two VMs of one box differ),
sudo, rsync (vagrant's rsync synced folder), qemu-guest-agent (the Vagrantfile's VMs
have no libvirt network: vagrant-libvirt asks the agent for the address, ssh goes
through a forwarded port), python3, DHCP on the first NIC by systemd-networkd, the
host's locally added CAs (/usr/local/share/ca-certificates: a TLS-intercepting proxy the
host trusts is trusted in the VM, or pip fails there). User
`vagrant`, password-less sudo, vagrant's well-known insecure public key read from the
installed vagrant package (vagrant swaps it for a per-VM key on the first `vagrant up`).
Nothing of the project is installed: scripts/setup provisions the VM.

Cache layout (default /var/cache/nodeagent/vm/boxes/SUITE):
  nodeagent-SUITE.box    what `vagrant box add` gets
  vmlinuz, initrd.img    the suite's kernel, booted directly
  box.json               what was built: suite, kernel package and version, times, packages
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import tarfile
import time

import kernels

DEFAULT_CACHE = pathlib.Path("/var/cache/nodeagent/vm/boxes")
DISK_GIB = 20            # the ext4 root's size (qcow2 holds only what is written)
# Host tools and the Debian packages that bring them (apt-get install when missing).
HOST_TOOLS = {
    "vagrant": "vagrant", "debootstrap": "debootstrap", "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86", "virsh": "libvirt-clients", "libvirtd": "libvirt-daemon-system",
    "mkfs.ext4": "e2fsprogs", "rsync": "rsync", "ssh": "openssh-client",
}
HOST_PACKAGES_ALWAYS = ["vagrant-libvirt"]  # a plugin, not a command: checked with dpkg
# What the guest needs beyond debootstrap's minbase. scripts/setup's own packages
# (`scripts/setup --packages`) come in the box too: apt inside a VM under software
# emulation took 22 of the set-up's 30 minutes; setup then finds them installed.
SETUP = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "setup"
GUEST_PACKAGES = [
    "linux-image-amd64", "initramfs-tools", "systemd-sysv", "udev", "kmod", "dbus", "iproute2",
    "openssh-server", "sudo", "rsync", "qemu-guest-agent", "python3", "python3-venv",
    "ca-certificates", "procps", "less", "e2fsprogs",  # e2fsprogs: fsck of the root at boot
]
# systemd-resolved is its own package from bookworm on (bullseye's systemd carries it).
GUEST_PACKAGES_BY_SUITE = {"bullseye": [], "bookworm": ["systemd-resolved"], "trixie": ["systemd-resolved"],
                           "sid": ["systemd-resolved"]}
VAGRANT_PUBKEY_GLOB = "/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub"
LOCAL_CA_DIR = pathlib.Path("/usr/local/share/ca-certificates")
CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0 mitigations=off"


class BoxError(Exception):
    """A step of building or adding a box failed; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Box:
    suite: str
    dir: pathlib.Path

    @property
    def file(self) -> pathlib.Path:
        return self.dir / f"nodeagent-{self.suite}.box"

    @property
    def name(self) -> str:
        return f"nodeagent/{self.suite}"

    @property
    def record(self) -> pathlib.Path:
        return self.dir / "box.json"


def run(argv: list[str], what: str, env: dict[str, str] | None = None, capture: bool = True) -> str:
    out = subprocess.run(argv, capture_output=capture, text=True, env=env)
    if out.returncode != 0:
        tail = ((out.stderr or "") + (out.stdout or "")).strip().splitlines()[-6:] if capture else []
        raise BoxError(f"{what} failed ({' '.join(argv[:3])} ... exit {out.returncode})"
                       + (": " + " | ".join(tail) if tail else ""))
    return out.stdout if capture else ""


def missing_host_packages() -> list[str]:
    missing = {pkg for tool, pkg in HOST_TOOLS.items()
               if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")}
    for pkg in HOST_PACKAGES_ALWAYS:
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if "install ok installed" not in status.stdout:
            missing.add(pkg)
    if not os.path.exists(kernels.KEYRING):
        missing.add("debian-archive-keyring")
    return sorted(missing)


def ensure_host_packages(say) -> None:
    """apt-get install what building and booting a box needs, from the host's own Debian
    release (its versions are what this machine's apt pins; the box's are recorded)."""
    missing = missing_host_packages()
    if not missing:
        say("host packages present (vagrant, vagrant-libvirt, libvirt, qemu, debootstrap)")
        return
    if shutil.which("apt-get") is None:
        raise BoxError(f"missing {', '.join(missing)} and no apt-get: install them by hand")
    say(f"installing Debian packages: {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], "apt-get update", env)
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], f"apt-get install {' '.join(missing)}", env)


def libvirt_up() -> bool:
    return subprocess.run(["virsh", "-c", "qemu:///system", "version"], capture_output=True).returncode == 0


def ensure_libvirtd(say) -> None:
    """libvirtd answering on qemu:///system: started by systemd where it runs, else by
    hand (a container or a VM without systemd as PID 1)."""
    if libvirt_up():
        return
    if pathlib.Path("/run/systemd/system").is_dir():
        say("starting libvirtd (systemctl start libvirtd virtlogd)")
        run(["systemctl", "start", "virtlogd", "libvirtd"], "systemctl start libvirtd")
    else:
        say("no systemd here: starting virtlogd -d and libvirtd -d by hand (stop them with the pids in /run)")
        run(["virtlogd", "-d"], "virtlogd -d")
        run(["libvirtd", "-d"], "libvirtd -d")
    for _ in range(50):
        if libvirt_up():
            return
        time.sleep(0.2)
    raise BoxError("libvirtd does not answer on qemu:///system: see `virsh -c qemu:///system version`")


def vagrant_pubkey() -> str:
    keys = sorted(pathlib.Path("/").glob(VAGRANT_PUBKEY_GLOB.lstrip("/")))
    if not keys:
        raise BoxError(f"vagrant's insecure public key not found ({VAGRANT_PUBKEY_GLOB}): apt-get install vagrant")
    key = keys[-1].read_text().strip()
    if not key.startswith("ssh-"):
        raise BoxError(f"{keys[-1]} is not an OpenSSH public key")
    return key


def guest_packages(suite: str) -> list[str]:
    return list(dict.fromkeys(GUEST_PACKAGES + GUEST_PACKAGES_BY_SUITE[suite] + setup_packages()))


def setup_packages() -> list[str]:
    """The Debian packages scripts/setup installs (its own list, not a copy)."""
    return run(["bash", str(SETUP), "--packages"], "scripts/setup --packages").split()


def debootstrap(suite: str, root: pathlib.Path, say) -> None:
    packages = guest_packages(suite)
    say(f"{suite}: debootstrap --variant=minbase with {len(packages)} packages ({kernels.MIRROR}; several minutes)")
    run(["debootstrap", "--variant=minbase", f"--keyring={kernels.KEYRING}", "--arch", kernels.ARCH,
         "--include=" + ",".join(packages), suite, str(root), kernels.MIRROR],
        f"debootstrap {suite}")


def chroot(root: pathlib.Path, *argv: str, what: str) -> str:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    return run(["chroot", str(root), *argv], what, env)


def write(root: pathlib.Path, path: str, text: str, mode: int = 0o644) -> None:
    target = root / path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink():
        target.unlink()
    target.write_text(text)
    target.chmod(mode)


def configure(suite: str, root: pathlib.Path, pubkey: str) -> list[str]:
    """Everything a vagrant box needs, written into the root before it becomes an image;
    the names of the host CAs it trusts."""
    write(root, "/etc/hostname", f"nodeagent-{suite}\n")
    write(root, "/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\tnodeagent-{suite}\n"
                              "::1\tlocalhost ip6-localhost ip6-loopback\n")
    write(root, "/etc/fstab", "/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n")
    write(root, "/etc/systemd/network/80-dhcp.network",
          "[Match]\nName=eth* en*\n\n[Network]\nDHCP=yes\n")
    # Empty machine-id: systemd makes one at first boot (two VMs of a box differ, DHCP too).
    write(root, "/etc/machine-id", "")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.exists() or dbus_id.is_symlink():
        dbus_id.unlink()
    # sshd's host keys: none in the box, made before ssh.service on first boot.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    write(root, "/etc/systemd/system/ssh-hostkeys.service", "\n".join([
        "[Unit]", "Description=Make the SSH host keys this box ships without",
        "Before=ssh.service", "ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key", "",
        "[Service]", "Type=oneshot", "ExecStart=/usr/bin/ssh-keygen -A", "",
        "[Install]", "WantedBy=multi-user.target", ""]))
    write(root, "/etc/ssh/sshd_config.d/vagrant.conf", "UseDNS no\n")
    if suite == "sid":
        # sid's Release is valid for a week; a mirror snapshot older than that is still
        # the newest sid there is (tests/vm/kernels.py fetches with the same setting).
        write(root, "/etc/apt/apt.conf.d/99nodeagent-valid-until", 'Acquire::Check-Valid-Until "false";\n')
    chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo", "vagrant",
           what="useradd vagrant")
    write(root, "/etc/sudoers.d/vagrant", "vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n", 0o440)
    write(root, "/home/vagrant/.ssh/authorized_keys", pubkey + "\n", 0o600)
    chroot(root, "chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh", what="chown /home/vagrant/.ssh")
    (root / "home/vagrant/.ssh").chmod(0o700)
    chroot(root, "systemctl", "enable", "systemd-networkd", "systemd-resolved", "ssh", "ssh-hostkeys",
           what="systemctl enable")
    resolv = root / "etc/resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    resolv.symlink_to("/run/systemd/resolve/resolv.conf")
    cas = local_cas(root)
    chroot(root, "apt-get", "clean", what="apt-get clean")
    return cas


def local_cas(root: pathlib.Path) -> list[str]:
    """The host's locally trusted CAs (Debian's /usr/local/share/ca-certificates) trusted
    in the box too: behind a TLS-intercepting proxy the host trusts, pip in the VM
    (scripts/setup) otherwise fails certificate verification. apt uses plain http."""
    names = []
    for crt in sorted(LOCAL_CA_DIR.glob("**/*.crt")):
        target = root / LOCAL_CA_DIR.relative_to("/") / crt.relative_to(LOCAL_CA_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(crt, target)
        target.chmod(0o644)
        names.append(str(crt.relative_to(LOCAL_CA_DIR)))
    if names:
        chroot(root, "update-ca-certificates", what="update-ca-certificates")
    return names


def kernel_of(root: pathlib.Path) -> tuple[str, str, pathlib.Path, pathlib.Path]:
    """(package, version, vmlinuz, initrd) of the one kernel debootstrap installed."""
    out = chroot(root, "dpkg-query", "-W", "-f=${Package} ${Version} ${Status}\n", "linux-image-*",
                 what="dpkg-query linux-image-*")
    images = [line.split()[:2] for line in out.splitlines()
              if "install ok installed" in line and line.split()[0] != f"linux-image-{kernels.ARCH}"
              and line.split()[0].endswith(f"-{kernels.ARCH}")]
    if len(images) != 1:
        raise BoxError(f"expected one linux-image-*-{kernels.ARCH} in the root, found {images}")
    package, version = images[0]
    release = package[len("linux-image-"):]
    vmlinuz = next((p for p in (root / "boot" / f"vmlinuz-{release}", root / "usr/lib/modules" / release / "vmlinuz")
                    if p.exists()), None)
    initrd = root / "boot" / f"initrd.img-{release}"
    if vmlinuz is None or not initrd.exists():
        raise BoxError(f"{package}: no vmlinuz or no {initrd.name} in the root (did update-initramfs run?)")
    return package, version, vmlinuz, initrd


def mounts_below(root: pathlib.Path) -> list[str]:
    """Mount points inside the root (debootstrap mounts /proc and /sys there while it
    works and leaves them when it fails), deepest first."""
    prefix = str(root.resolve()) + "/"
    points = []
    for line in pathlib.Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point.startswith(prefix):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_below(root: pathlib.Path) -> None:
    """Unmount what debootstrap left mounted in the root; removing the tree or making an
    image of it must never descend into the host's /proc, /sys or /dev."""
    for point in mounts_below(root):
        subprocess.run(["umount", "--lazy", point], capture_output=True)
    left = mounts_below(root)
    if left:
        raise BoxError(f"still mounted inside {root}: {', '.join(left)}: unmount them by hand, then remove {root}")


def remove_tree(path: pathlib.Path) -> None:
    if path.exists():
        unmount_below(path)
        shutil.rmtree(path)


def make_image(root: pathlib.Path, raw: pathlib.Path, qcow2: pathlib.Path, say) -> None:
    """ext4 made from the directory (mkfs.ext4 -d: no loop device, no mount), then qcow2."""
    say(f"making the {DISK_GIB} GiB ext4 root (mkfs.ext4 -d) and converting it to qcow2")
    unmount_below(root)
    run(["mkfs.ext4", "-q", "-F", "-L", "nodeagent-root", "-d", str(root), str(raw), f"{DISK_GIB}G"], "mkfs.ext4 -d")
    run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], "qemu-img convert")


def box_vagrantfile(box: Box) -> str:
    """The Vagrantfile inside the box: direct kernel boot of the cached kernel."""
    kernel, initrd = box.dir / "vmlinuz", box.dir / "initrd.img"
    return f"""# nodeagent/{box.suite}: built by tests/vm/build-box {box.suite} (see tests/vm/box.py).
# The suite's kernel boots directly; it stays in the build cache, readable by qemu.
kernel = "{kernel}"
initrd = "{initrd}"
[kernel, initrd].each do |f|
  abort "nodeagent/{box.suite}: #{{f}} is missing: run tests/vm/build-box {box.suite} on this machine" unless File.exist?(f)
end
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = kernel
    lv.initrd = initrd
    lv.cmd_line = "{CMDLINE}"
    lv.disk_bus = "virtio"
  end
end
"""


def metadata() -> dict:
    return {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_GIB}


def pack(box: Box, qcow2: pathlib.Path, say) -> None:
    say(f"packing {box.file.name} (box.img, metadata.json, Vagrantfile)")
    partial = box.file.with_suffix(".box.partial")
    with tarfile.open(partial, "w") as tar:  # uncompressed: qcow2 is already sparse
        for name, data in (("metadata.json", json.dumps(metadata()) + "\n"), ("Vagrantfile", box_vagrantfile(box))):
            path = qcow2.parent / name
            path.write_text(data)
            tar.add(path, arcname=name)
        tar.add(qcow2, arcname="box.img")
    partial.rename(box.file)


def build(cache: pathlib.Path, suite: str, rebuild: bool, say) -> Box:
    """The suite's box in the cache: built when missing or when `rebuild`."""
    if suite not in kernels.SUITES:
        raise BoxError(f"unknown suite {suite!r}: one of {', '.join(kernels.SUITES)}")
    box = Box(suite, cache / suite)
    if box.file.exists() and box.record.exists() and not rebuild:
        say(f"{suite}: {box.file} cached (built {json.loads(box.record.read_text())['built']}; --rebuild to make it again)")
        return box
    started = time.monotonic()
    pubkey = vagrant_pubkey()
    work = cache / f"{suite}.partial"
    remove_tree(work)
    root = work / "root"
    root.mkdir(parents=True)
    try:
        debootstrap(suite, root, say)
        t_debootstrap = time.monotonic() - started
        cas = configure(suite, root, pubkey)
        package, version, vmlinuz, initrd = kernel_of(root)
        say(f"{suite}: kernel {package} {version}")
        packages = chroot(root, "dpkg-query", "-W", "-f=${Package}=${Version}\n", what="dpkg-query -W").split()
        box.dir.mkdir(parents=True, exist_ok=True)
        for src, name in ((vmlinuz, "vmlinuz"), (initrd, "initrd.img")):
            shutil.copyfile(src, work / name)
        make_image(root, work / "root.ext4", work / "box.img", say)
        remove_tree(root)
        (work / "root.ext4").unlink()
        for name in ("vmlinuz", "initrd.img"):
            os.replace(work / name, box.dir / name)
            (box.dir / name).chmod(0o644)
        pack(box, work / "box.img", say)
    finally:
        remove_tree(work)
    box.dir.chmod(0o755)
    elapsed = time.monotonic() - started
    box.record.write_text(json.dumps({
        "suite": suite, "kernel_package": package, "kernel_version": version, "cmdline": CMDLINE,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": round(elapsed),
        "debootstrap_seconds": round(t_debootstrap), "box_bytes": box.file.stat().st_size,
        "mirror": kernels.MIRROR, "local_cas": cas, "packages": packages,
    }, indent=2) + "\n")
    say(f"{suite}: built {box.file} ({box.file.stat().st_size / 2**20:.0f} MiB) in {elapsed:.0f} s")
    return box


def add(box: Box, say) -> None:
    say(f"vagrant box add --force --name {box.name} {box.file}")
    run(["vagrant", "box", "add", "--force", "--provider", "libvirt", "--name", box.name, str(box.file)],
        f"vagrant box add {box.name}")
