"""Debian kernels for the kernel lab's runner (tests/vm/run): each suite's kernel image,
its headers (bcc compiles against /lib/modules/$(uname -r)/build) and busybox-static,
fetched with apt from Debian's mirror through a private apt configuration and state
under the cache, so the machine's own apt sources, lists and status are never read or
touched. A suite's kernel is pinned the first time it is fetched (the version
`linux-image-amd64` of that suite names then) and kept until --rebuild.

Cache layout (default /var/cache/nodeagent/vm):
  apt/SUITE/          apt.conf, sources.list, lists, downloaded .debs
  kernels/SUITE/      root/ (the .debs extracted, modules indexed by depmod),
                      initrd.img (tests/vm/initramfs.py), kernel.json (what was pinned)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import subprocess

MIRROR = "http://deb.debian.org/debian"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
ARCH = "amd64"
# The kernel matrix: suite name -> the kernel line it ships (for messages and README).
SUITES = {"bullseye": "5.10", "bookworm": "6.1", "trixie": "6.12", "sid": "newest"}


class KernelFetchError(Exception):
    """A step of fetching or unpacking a suite's kernel failed; the message says which."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One suite's kernel, unpacked in the cache."""
    suite: str
    package: str      # linux-image-6.1.0-50-amd64
    version: str      # 6.1.158-1 (the Debian package version)
    release: str      # 6.1.0-50-amd64 (uname -r)
    root: pathlib.Path  # the extracted packages: boot/, lib/modules/, usr/src/

    @property
    def vmlinuz(self) -> pathlib.Path:
        return _vmlinuz(self.root, self.release)

    @property
    def modules(self) -> pathlib.Path:
        """The directory the guest binds over /lib/modules (holds RELEASE/ only)."""
        return self.root / "lib" / "modules"

    def describe(self) -> str:
        return f"{self.package} {self.version}"


def _run(argv: list[str], what: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise KernelFetchError(f"{what} failed ({' '.join(argv[:3])} ... exit {out.returncode}): " + " | ".join(tail))
    return out.stdout


class PrivateApt:
    """apt-get/apt-cache on one Debian suite with their own configuration and state
    (APT_CONFIG is read before /etc/apt/apt.conf.d, so Dir::Etc::Parts moves that too)."""

    def __init__(self, cache: pathlib.Path, suite: str):
        self.suite = suite
        self.dir = cache / "apt" / suite
        self.conf = self.dir / "apt.conf"

    def prepare(self) -> None:
        for sub in ("lists/partial", "archives/partial", "apt.conf.d", "preferences.d", "sources.list.d"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "status").touch()
        (self.dir / "sources.list").write_text(f"deb [signed-by={KEYRING}] {MIRROR} {self.suite} main\n")
        d = self.dir
        self.conf.write_text("\n".join([
            f'Dir::Etc::Main "{d}/apt.conf.main";', f'Dir::Etc::Parts "{d}/apt.conf.d";',
            f'Dir::Etc::SourceList "{d}/sources.list";', f'Dir::Etc::SourceParts "{d}/sources.list.d";',
            f'Dir::Etc::Preferences "{d}/preferences";', f'Dir::Etc::PreferencesParts "{d}/preferences.d";',
            f'Dir::State "{d}";', f'Dir::State::Lists "{d}/lists";', f'Dir::State::status "{d}/status";',
            f'Dir::Cache "{d}";', f'Dir::Cache::Archives "{d}/archives";',
            f'APT::Architecture "{ARCH}";', f'APT::Architectures {{ "{ARCH}"; }};',
            'Acquire::Languages "none";', 'Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";',
            'Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled "false";',
            'Debug::NoLocking "true";',
            # sid's Release is valid for a week only; a mirror snapshot older than that (as
            # this machine's) is still the suite's newest kernel, signed, and we pin it.
            'Acquire::Check-Valid-Until "false";', "",
        ]))

    def _env(self) -> dict[str, str]:
        return {**os.environ, "APT_CONFIG": str(self.conf), "DEBIAN_FRONTEND": "noninteractive"}

    def update(self) -> None:
        _run(["apt-get", "-q", "update"], f"apt-get update of Debian {self.suite} ({MIRROR})", self._env())

    def depends(self, package: str) -> list[str]:
        out = _run(["apt-cache", "depends", package], f"apt-cache depends {package} ({self.suite})", self._env())
        return [line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("Depends:")]

    def candidate(self, package: str) -> str:
        out = _run(["apt-cache", "policy", package], f"apt-cache policy {package} ({self.suite})", self._env())
        for line in out.splitlines():
            if line.strip().startswith("Candidate:"):
                version = line.split(":", 1)[1].strip()
                if version != "(none)":
                    return version
        raise KernelFetchError(f"Debian {self.suite} has no candidate for {package}")

    def download(self, pins: list[str]) -> list[pathlib.Path]:
        """`apt-get download PKG=VERSION ...` into the archive dir; the .deb paths."""
        archives = self.dir / "archives"
        _run(["sh", "-c", 'cd "$0" && exec apt-get -q download "$@"', str(archives), *pins],
             f"apt-get download {' '.join(pins)} ({self.suite})", self._env())
        debs = []
        for pin in pins:
            name, version = pin.split("=", 1)
            file_version = version.replace(":", "%3a")
            found = sorted(archives.glob(f"{name}_{file_version}_*.deb"))
            if not found:
                raise KernelFetchError(f"apt-get download {pin} left no .deb in {archives}")
            debs.append(found[0])
        return debs


def _image_package(apt: PrivateApt) -> str:
    """The versioned image the suite's linux-image-amd64 depends on (signed or unsigned)."""
    for dep in apt.depends(f"linux-image-{ARCH}"):
        if dep.startswith("linux-image-") and dep.endswith(f"-{ARCH}"):
            return dep
    raise KernelFetchError(f"linux-image-{ARCH} of Debian {apt.suite} names no linux-image-*-{ARCH}")


def _extract(deb: pathlib.Path, root: pathlib.Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")


def fetch(cache: pathlib.Path, suite: str, rebuild: bool = False, say=print) -> Kernel:
    """The suite's kernel in the cache: fetched, pinned and unpacked on first use (or when
    `rebuild`), else what kernel.json recorded."""
    if suite not in SUITES:
        raise KernelFetchError(f"unknown suite {suite!r}: one of {', '.join(SUITES)}")
    home = cache / "kernels" / suite
    record = home / "kernel.json"
    if rebuild and home.exists():
        shutil.rmtree(home)
    if record.exists():
        data = json.loads(record.read_text())
        return Kernel(suite, data["package"], data["version"], data["release"], home / "root")

    say(f"{suite}: fetching the kernel of Debian {suite} ({MIRROR}, private apt state in {cache / 'apt' / suite})")
    apt = PrivateApt(cache, suite)
    apt.prepare()
    apt.update()
    image = _image_package(apt)
    release = image[len("linux-image-"):]
    version = apt.candidate(image)
    common = next((d for d in apt.depends(f"linux-headers-{release}") if d.startswith("linux-headers-")
                   and d.endswith("-common")), None)
    if common is None:
        raise KernelFetchError(f"linux-headers-{release} of Debian {suite} names no linux-headers-*-common")
    # sid's 7.x image is a meta package: vmlinuz, modules and config come in
    # linux-{binary,modules,base}-RELEASE of the same version.
    parts = sorted({d for d in apt.depends(image) if release in d and d != image})
    pins = [f"{image}={version}", *(f"{d}={apt.candidate(d)}" for d in parts), f"linux-headers-{release}={apt.candidate(f'linux-headers-{release}')}",
            f"{common}={apt.candidate(common)}", f"busybox-static={apt.candidate('busybox-static')}"]
    debs = apt.download(pins)

    staging = home.with_name(suite + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    root = staging / "root"
    root.mkdir(parents=True)
    for deb in debs:
        _extract(deb, root)
    _finish_tree(root, release, pathlib.Path("/") / home.relative_to("/") / "root")
    (staging / "kernel.json").write_text(json.dumps(
        {"suite": suite, "package": image, "version": version, "release": release, "debs": pins}, indent=2) + "\n")
    staging.rename(home)
    say(f"{suite}: {image} {version} ({release}) unpacked in {home}")
    return Kernel(suite, image, version, release, home / "root")


def _vmlinuz(root: pathlib.Path, release: str) -> pathlib.Path:
    """boot/vmlinuz-RELEASE, or lib/modules/RELEASE/vmlinuz where sid's linux-binary puts it."""
    boot = root / "boot" / f"vmlinuz-{release}"
    return boot if boot.exists() else root / "lib" / "modules" / release / "vmlinuz"


def _finish_tree(root: pathlib.Path, release: str, final_root: pathlib.Path) -> None:
    """Index the modules (the image's postinst would run depmod) and point build/source
    at the headers by the path the guest sees (the cache through the 9p root)."""
    moddir = root / "lib" / "modules" / release
    if not moddir.is_dir():  # merged-/usr packages (trixie, sid) ship usr/lib/modules
        alt = root / "usr" / "lib" / "modules" / release
        if not alt.is_dir():
            raise KernelFetchError(f"the image package has no lib/modules/{release}")
        (root / "lib").mkdir(exist_ok=True)
        shutil.move(str(alt.parent), str(root / "lib" / "modules"))
    if not _vmlinuz(root, release).exists():
        raise KernelFetchError(f"the image packages have no boot/vmlinuz-{release} or lib/modules/{release}/vmlinuz")
    _run(["depmod", "-b", str(root), release], f"depmod of {release}")
    headers = root / "usr" / "src" / f"linux-headers-{release}"
    if not (headers / "include").exists() and not (headers / "Makefile").exists():
        raise KernelFetchError(f"linux-headers-{release} unpacked no usr/src/linux-headers-{release}")
    # As the image's postinst and scripts/setup do: build is the flavour's tree, source
    # the common one (bcc reads include/linux/kconfig.h from source).
    common = headers.with_name(headers.name.rsplit("-", 1)[0] + "-common")
    for name, target in (("build", headers.name), ("source", common.name)):
        link = moddir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(final_root / "usr" / "src" / target)


def busybox(kernel: Kernel) -> pathlib.Path:
    """The static busybox unpacked beside the kernel (busybox-static of the same suite)."""
    for path in (kernel.root / "bin" / "busybox", kernel.root / "usr" / "bin" / "busybox"):
        if path.exists():
            return path
    raise KernelFetchError(f"busybox-static of Debian {kernel.suite} unpacked no bin/busybox under {kernel.root}")
