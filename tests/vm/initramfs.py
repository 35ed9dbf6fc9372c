"""The small initramfs the runner boots each Debian kernel with: busybox-static, the
image's own modules that reaching the 9p root needs (virtio PCI, 9p over virtio,
overlayfs, virtio-rng for early entropy, virtio-blk and ext4 for the Python images) in
dependency order, decompressed, and
tests/vm/init as /init. Written as a gzip'd newc cpio by this module, so no cpio tool
is needed. Cached next to the kernel (kernels/SUITE/initrd.img); rebuilt with --rebuild
or when tests/vm/init changes."""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import pathlib
import stat

from kernels import Kernel, KernelFetchError, busybox

HERE = pathlib.Path(__file__).resolve().parent
INIT = HERE / "init"
# What the guest's first minutes need that Debian builds as modules; their dependencies
# (virtio, virtio_ring, 9pnet, netfs, fscache, rng_core, ...) are added from modules.dep.
# virtio_blk, ext4 and crc32c (which ext4 asks the crypto API for at mount) read the
# Python images (tests/vm/pyimage.py).
# 7.x dropped the crc32c_generic crypto module (crc32c is in lib/, ext4 calls it directly).
MAYBE_GONE = {"crc32c_generic"}
WANTED = ("virtio_pci", "9pnet_virtio", "9p", "overlay", "virtio_rng", "virtio_blk", "crc32c_generic", "ext4")


def _modules_in_order(kernel: Kernel) -> list[str]:
    """Module paths (relative to lib/modules/RELEASE) to insmod, dependencies first;
    built-in ones are left out."""
    base = kernel.modules / kernel.release
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {_name(path): path for path in deps}
    builtin = {_name(p) for p in (base / "modules.builtin").read_text().split()}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps[path]):  # modules.dep lists the deepest dependency last
            visit(dep)
        order.append(path)

    for name in WANTED:
        if name in builtin:
            continue
        if name not in by_name and name in MAYBE_GONE:
            continue
        if name not in by_name:
            raise KernelFetchError(f"{kernel.release} has module {name} neither built in nor in modules.dep")
        visit(by_name[name])
    return order


def _name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            return base[: -len(suffix)].replace("-", "_")
    return base


def _module_bytes(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        raise KernelFetchError(f"{path.name}: zstd-compressed modules are not handled by tests/vm/initramfs.py")
    return data


class _Cpio:
    """newc cpio archive writer (what the kernel's initramfs unpacker reads)."""

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        self.out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        self.out.write(b"\0" * (-(110 + len(encoded)) % 4) + data + b"\0" * (-len(data) % 4))
        self.ino += 1

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def build(kernel: Kernel, target: pathlib.Path) -> pathlib.Path:
    """Write the initramfs for `kernel` to `target` (atomically); returns target."""
    modules = _modules_in_order(kernel)
    archive = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
        archive.dir(d)
    archive.file("bin/busybox", busybox(kernel).read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", INIT.read_bytes(), 0o755)
    names = []
    for i, rel in enumerate(modules):
        name = f"{i:02d}-{_name(rel)}.ko"
        archive.file(f"modules/{name}", _module_bytes(kernel.modules / kernel.release / rel))
        names.append(name)
    archive.file("modules/order", ("\n".join(names) + "\n").encode())
    archive.file("init.sha256", _stamp(kernel).encode())
    data = gzip.compress(archive.finish(), compresslevel=6)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.rename(target)
    return target


def _stamp(kernel: Kernel) -> str:
    return hashlib.sha256(INIT.read_bytes() + kernel.release.encode()).hexdigest()


def ensure(kernel: Kernel) -> pathlib.Path:
    """The cached initramfs of `kernel`, built when missing or when tests/vm/init changed."""
    target = kernel.root.parent / "initrd.img"
    stamp = kernel.root.parent / "initrd.sha256"
    if target.exists() and stamp.exists() and stamp.read_text() == _stamp(kernel):
        return target
    build(kernel, target)
    stamp.write_text(_stamp(kernel))
    return target
