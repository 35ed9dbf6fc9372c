"""Builds `nodeagent.native._relay`, the cffi (API mode) module of the native relay engine
(native/relay.c, its API in native/relay.h), and `nodeagent.native._hbone`, the native HBONE
engine's (native/hbone.c), linked with the pinned OpenSSL that nodeagent.native.openssl
fetches and builds once per machine.

scripts/setup runs it after `pip install -e .`; the .so lands in nodeagent/native/ next to
this file (git-ignored), where the editable install imports it from. The cdef is the
header's block between `cffi-begin` and `cffi-end`, so the declarations exist once. Our C
and cffi's generated wrapper compile with -O2 -Wall -Wextra -Werror. The module carries a
digest of the C sources it was built from (`na_build_digest()`): nodeagent.native refuses
a module built from other sources than those in the tree (rebuild: scripts/setup).

Usage: python -m nodeagent.native.build [--out DIR] [--cflags "-fsanitize=address ..."]
  --out DIR   build there only (DIR/nodeagent/native/_relay*.so), e.g. a sanitizer build
              for a test; default: build under build/native and install next to this file
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NATIVE = ROOT / "native"
SOURCES = ("relay.h", "relay.c")  # what the digest covers
MODULE = "nodeagent.native._relay"
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11")
CDEF_BEGIN, CDEF_END = "/* cffi-begin */", "/* cffi-end */"


def source_digest(native: Path = NATIVE) -> str:
    """sha256 over the C sources (name and bytes of each), hex."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (native / name).read_bytes() + b"\0")
    return h.hexdigest()


def cdef(native: Path = NATIVE) -> str:
    header = (native / "relay.h").read_text()
    try:
        return header.split(CDEF_BEGIN, 1)[1].split(CDEF_END, 1)[0]
    except IndexError:
        raise SystemExit(f"{native / 'relay.h'}: no {CDEF_BEGIN} ... {CDEF_END} block") from None


def ffibuilder(extra_cflags: tuple[str, ...] = ()):
    from cffi import FFI  # build time only

    ffi = FFI()
    ffi.cdef(cdef() + "\nconst char *na_build_digest(void);\n")
    ffi.set_source(MODULE, '#include "relay.h"\n'
                   f'static const char *na_build_digest(void) {{ return "{source_digest()}"; }}\n',
                   sources=[str(NATIVE / "relay.c")], include_dirs=[str(NATIVE)],
                   extra_compile_args=[*CFLAGS, *extra_cflags], extra_link_args=list(extra_cflags))
    return ffi


def build(out: Path, extra_cflags: tuple[str, ...] = ()) -> Path:
    """Compile into `out` (cffi's tmpdir); the path of the built .so."""
    out.mkdir(parents=True, exist_ok=True)
    return Path(ffibuilder(extra_cflags).compile(tmpdir=str(out), verbose=False))


# The native HBONE engine (native/hbone.{h,c}: TLS 1.3 with OpenSSL, HTTP/2 with libnghttp2):
# a second module, built the same way, with its own digest (nodeagent.native.hbone checks it).
# OpenSSL is the pinned release of nodeagent.native.openssl, linked static with its symbols
# kept inside the module; nghttp2 is Debian's shared library.
HBONE_SOURCES = ("hbone.h", "hbone.c")
HBONE_MODULE = "nodeagent.native._hbone"
HBONE_LIBRARIES = ["nghttp2"]


def hbone_digest(native: Path = NATIVE) -> str:
    """sha256 over hbone's C sources and the OpenSSL pin they are linked with, hex."""
    from nodeagent.native import openssl

    h = hashlib.sha256(f"openssl {openssl.VERSION} {openssl.SHA256}\0".encode())
    for name in HBONE_SOURCES:
        h.update(name.encode() + b"\0" + (native / name).read_bytes() + b"\0")
    return h.hexdigest()


def hbone_ffibuilder(extra_cflags: tuple[str, ...] = ()):
    from cffi import FFI  # build time only

    from nodeagent.native import openssl

    ssl = openssl.ensure()
    header = (NATIVE / "hbone.h").read_text()
    ffi = FFI()
    ffi.cdef(header.split(CDEF_BEGIN, 1)[1].split(CDEF_END, 1)[0] + "\nconst char *nh_build_digest(void);\n")
    ffi.set_source(HBONE_MODULE, '#include "hbone.h"\n'
                   f'static const char *nh_build_digest(void) {{ return "{hbone_digest()}"; }}\n',
                   sources=[str(NATIVE / "hbone.c")], include_dirs=[str(ssl / "include"), str(NATIVE)],
                   extra_objects=[str(path) for path in openssl.archives(ssl)], libraries=HBONE_LIBRARIES,
                   extra_compile_args=[*CFLAGS, *extra_cflags],
                   extra_link_args=["-Wl,--exclude-libs,ALL", *extra_cflags])
    return ffi


def build_hbone(out: Path, extra_cflags: tuple[str, ...] = ()) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return Path(hbone_ffibuilder(extra_cflags).compile(tmpdir=str(out), verbose=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="build there only (not installed next to this file)")
    parser.add_argument("--cflags", default="", help="extra compiler and linker flags")
    args = parser.parse_args(argv)
    from nodeagent.native import openssl

    extra = tuple(shlex.split(args.cflags))
    for builder in (build, build_hbone):
        try:
            built = builder(args.out or ROOT / "build" / "native", extra)
        except openssl.OpenSSLBuildError as exc:
            print(f"build: error: {exc}", file=sys.stderr)
            return 1
        if args.out is None:
            target = Path(__file__).parent / built.name
            shutil.copy2(built, target.with_suffix(".tmp"))
            target.with_suffix(".tmp").replace(target)  # a running agent keeps the module it mapped
            built = target
        print(built)
    return 0


if __name__ == "__main__":
    sys.exit(main())
