"""The OpenSSL the native HBONE engine links: a pinned release built from source once per
machine, static, into the cache. Why not Debian bookworm's libssl-dev: its OpenSSL 3.0
runs AES-GCM with 128-bit AES-NI only (4.4 GB/s a core here for AES-256-GCM at 16 KiB
records), where 3.5 has the VAES/AVX-512 code (16.8 GB/s on the same core); trixie's
3.5 packages need glibc 2.38. The source is the `openssl-src` crate from crates.io
(immutable, checked against the sha256 crates.io's index publishes), which carries the
upstream tree unmodified under openssl/.

The libraries are linked into `_hbone` with their symbols kept local
(`-Wl,--exclude-libs,ALL`), so Python's own `ssl` (the system OpenSSL) and the engine's
never meet. The engine reports which it runs (`nh_tls_library`, in `nodeagent status`).

Layout: ${NODEAGENT_CACHE:-/var/cache/nodeagent}/openssl/<version>-<sha256[:12]>/ with
include/ and lib/lib{ssl,crypto}.a; built under a temporary directory beside it and
renamed into place when complete, so a build that fails or is killed leaves nothing a
later one would take for done.

Usage: python -m nodeagent.native.openssl   (builds if missing; prints the prefix)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

VERSION = "3.5.5"
CRATE = "openssl-src-300.5.5+3.5.5"
URL = f"https://static.crates.io/crates/openssl-src/{CRATE}.crate"
SHA256 = "3f1787d533e03597a7934fd0a765f0d28e94ecc5fb7789f8053b1e699a56f709"
# Only the libraries: no shared objects, no loadable provider modules, no tests or docs.
# -fPIC: they go into a shared object (the cffi module).
CONFIGURE = ("no-shared", "no-module", "no-tests", "no-docs", "-fPIC")
LIBRARIES = ("libssl.a", "libcrypto.a")  # link order: ssl needs crypto


class OpenSSLBuildError(Exception):
    """The pinned OpenSSL could not be fetched or built; the message says which step and why."""


def cache_root() -> Path:
    return Path(os.environ.get("NODEAGENT_CACHE") or "/var/cache/nodeagent") / "openssl"


def prefix(root: Path | None = None) -> Path:
    return (root or cache_root()) / f"{VERSION}-{SHA256[:12]}"


def archives(at: Path) -> list[Path]:
    """The static libraries under prefix `at`, in link order."""
    return [at / "lib" / name for name in LIBRARIES]


def built(at: Path) -> bool:
    return all(path.is_file() for path in archives(at)) and (at / "include/openssl/ssl.h").is_file()


def ensure(progress: Callable[[str], None] = print, *, url: str = URL, sha256: str = SHA256,
           root: Path | None = None, jobs: int | None = None) -> Path:
    """The prefix of the pinned OpenSSL, fetched and built first if it is not there."""
    at = prefix(root)
    if built(at):
        return at
    try:
        at.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{at.name}.", dir=at.parent))
    except OSError as exc:
        raise OpenSSLBuildError(f"cannot write the cache {at.parent} ({exc.strerror}): run scripts/setup as root "
                                f"or set NODEAGENT_CACHE to a writable directory") from None
    try:
        crate = work / "source.crate"
        progress(f"OpenSSL {VERSION}: downloading {url}")
        fetch(url, crate, sha256)
        progress(f"OpenSSL {VERSION}: building static libssl and libcrypto (about 2 minutes on 2 cores)")
        tree = unpack(crate, work)
        install = work / "prefix"
        started = time.monotonic()
        log = work / "build.log"
        run(["perl", "Configure", *CONFIGURE, f"--prefix={install}", "--libdir=lib",
             f"--openssldir={install / 'ssl'}"], tree, log)
        run(["make", f"-j{jobs or os.cpu_count() or 1}", "build_libs"], tree, log)
        run(["make", "install_dev"], tree, log)
        if not built(install):
            raise OpenSSLBuildError(f"OpenSSL {VERSION}: make install_dev left no {', '.join(LIBRARIES)} in {install}")
        try:
            install.rename(at)
        except OSError:  # a concurrent build got there first: same pin, same result
            pass
        progress(f"OpenSSL {VERSION}: built in {time.monotonic() - started:.0f} s into {at}")
        if not built(at):
            raise OpenSSLBuildError(f"OpenSSL {VERSION}: {at} exists but is incomplete; remove it and run again")
        return at
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fetch(url: str, to: Path, sha256: str) -> None:
    """Download `url` to `to`; refuse it unless its sha256 is `sha256`."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as answer, open(to, "wb") as out:
            while chunk := answer.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise OpenSSLBuildError(f"OpenSSL {VERSION}: cannot download {url}: {exc}") from None
    if digest.hexdigest() != sha256:
        raise OpenSSLBuildError(f"OpenSSL {VERSION}: {url} has sha256 {digest.hexdigest()}, not the pinned "
                                f"{sha256}: refused")


def unpack(crate: Path, into: Path) -> Path:
    """The crate's openssl/ tree, extracted under `into` (members outside it refused)."""
    import tarfile  # here, not at the top: the agent imports this module for the pin alone

    try:
        with tarfile.open(crate, "r:gz") as archive:
            members = archive.getmembers()
            for member in members:
                parts = Path(member.name).parts
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise OpenSSLBuildError(f"OpenSSL {VERSION}: {crate.name} holds {member.name!r}: refused")
            archive.extractall(into, members)
    except (tarfile.TarError, OSError) as exc:
        raise OpenSSLBuildError(f"OpenSSL {VERSION}: cannot unpack {crate.name}: {exc}") from None
    tree = into / CRATE / "openssl"
    if not (tree / "Configure").is_file():
        raise OpenSSLBuildError(f"OpenSSL {VERSION}: {crate.name} has no {CRATE}/openssl/Configure")
    return tree


def run(argv: list[str], cwd: Path, log: Path) -> None:
    with open(log, "ab") as out:
        try:
            done = subprocess.run(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise OpenSSLBuildError(f"OpenSSL {VERSION}: cannot run {argv[0]} ({exc.strerror}): "
                                    f"apt-get install perl make gcc") from None
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise OpenSSLBuildError(f"OpenSSL {VERSION}: `{' '.join(argv[:2])}` failed (exit {done.returncode}); "
                                f"the end of its output:\n" + "\n".join(tail))


def main() -> int:
    try:
        print(ensure(lambda line: print(line, file=sys.stderr, flush=True)))
    except OpenSSLBuildError as exc:
        print(f"openssl: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
