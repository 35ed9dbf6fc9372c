"""Compile bpf/*.c with bcc and load the capture programs into the kernel.

One bcc module per source file (one file per attach point); they share maps because
every map is pinned (BPF_TABLE_PINNED): the first module creates and pins a map, the
others — and the next agent — open the pin. bcc prints compiler errors and verifier
logs to stderr, so stderr (fd 2) is captured while bcc runs and put into the typed
error (CompileFailed, VerifierRejected); warnings of a good compile are logged.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
import types
from dataclasses import dataclass
from typing import Callable, Iterator

from nodeagent.capture import bpfsys
from nodeagent.capture.errors import CompileFailed, NotPrivileged, PinnedMapMismatch, VerifierRejected
from nodeagent.capture.structs import MAPS

PROG_SOCK_OPS, PROG_CGROUP_SOCK_ADDR, PROG_SK_LOOKUP = 13, 18, 30


@dataclass(frozen=True)
class ProgramSpec:
    name: str  # C function name, also the kernel's program name (<= 15 chars)
    source: str  # file in bpf/
    prog_type: int
    attach_type: int  # expected attach type: the kernel requires it for these types


PROGRAMS = (
    ProgramSpec("na_connect4", "connect.c", PROG_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET4_CONNECT),
    ProgramSpec("na_connect6", "connect.c", PROG_CGROUP_SOCK_ADDR, bpfsys.ATTACH_CGROUP_INET6_CONNECT),
    ProgramSpec("na_sockops", "sockops.c", PROG_SOCK_OPS, bpfsys.ATTACH_CGROUP_SOCK_OPS),
    ProgramSpec("na_sk_lookup", "sk_lookup.c", PROG_SK_LOOKUP, bpfsys.ATTACH_SK_LOOKUP),
)
CGROUP_PROGRAMS = tuple(p for p in PROGRAMS if p.attach_type != bpfsys.ATTACH_SK_LOOKUP)
SK_LOOKUP = next(p for p in PROGRAMS if p.attach_type == bpfsys.ATTACH_SK_LOOKUP)


def mark_mask(mark: int) -> int:
    """Bits of a socket mark that identify the agent: ztunnel's 0x539/0xfff, so the
    agent's delivery mark (0x1539) matches too; a mark wider than 12 bits is exact."""
    return 0xfff if mark <= 0xfff else 0xffffffff


def cflags(bpf_dir: str, maps_dir: str, mark: int, ports: dict[str, int]) -> list[str]:
    """bcc flags: where nodeagent.h is, where maps are pinned, the mark and ports."""
    flags = [f"-I{bpf_dir}", f'-DNA_PIN_DIR="{maps_dir}"', f"-DNA_MARK={mark:#x}",
             f"-DNA_MARK_MASK={mark_mask(mark):#x}"]
    flags += [f"-DNA_{name.upper()}_PORT={port}" for name, port in ports.items()]
    return flags


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Callable[[], str]]:
    """Point fd 2 at a temporary file for the body; yields a reader of what was written.

    bcc and clang write to fd 2 from C. Other threads' stderr output during the body
    lands there too (and is logged), which is why the body is only bcc calls.
    """
    with tempfile.TemporaryFile() as log:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)

        def read() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")
        try:
            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def check_pinned_maps(maps_dir: str) -> None:
    """Refuse to adopt a pinned map that this version would misread (bcc would not check)."""
    for spec in MAPS:
        path = os.path.join(maps_dir, spec.name)
        if not os.path.exists(path):
            continue
        fd = bpfsys.obj_get(path)
        try:
            info = bpfsys.map_info(fd)
        finally:
            os.close(fd)
        want = (spec.type, ctypes.sizeof(spec.key), ctypes.sizeof(spec.value), spec.max_entries)
        have = (info.type, info.key_size, info.value_size, info.max_entries)
        if want != have:
            raise PinnedMapMismatch(path, f"(type, key size, value size, max entries) is {have}, "
                                          f"this version needs {want}")


class LoadedPrograms:
    """The compiled bcc modules and the fds of the loaded programs (by name)."""

    def __init__(self, log: logging.Logger):
        self._log = log
        self._modules: list = []
        self.fds: dict[str, int] = {}
        self.ids: dict[str, int] = {}

    @classmethod
    def build(cls, bcc: types.ModuleType, bpf_dir: str, flags: list[str],
              log: logging.Logger) -> "LoadedPrograms":
        loaded = cls(log)
        try:
            for source in dict.fromkeys(p.source for p in PROGRAMS):
                loaded._build_one(bcc, os.path.join(bpf_dir, source), flags)
        except BaseException:
            loaded.close()
            raise
        return loaded

    def _build_one(self, bcc: types.ModuleType, path: str, flags: list[str]) -> None:
        with _stderr_captured() as output:
            try:
                module = bcc.BPF(src_file=path.encode(), cflags=flags)
            except Exception as exc:  # bcc raises bare Exception
                raise CompileFailed(path, output() or str(exc)) from None
            self._modules.append(module)
            for spec in (p for p in PROGRAMS if path.endswith("/" + p.source)):
                self._load(module, spec, output)
            warnings = output()
        if warnings.strip():
            self._log.debug("bcc output for %s:\n%s", path, warnings.strip())

    def _load(self, module, spec: ProgramSpec, output: Callable[[], str]) -> None:
        try:
            fn = module.load_func(spec.name.encode(), spec.prog_type, attach_type=spec.attach_type)
        except Exception as exc:  # bcc raises bare Exception
            if "super-user" in str(exc):
                raise NotPrivileged(["CAP_BPF (loading programs)"]) from None
            reason = str(exc).rsplit(": ", 1)[-1]
            raise VerifierRejected(spec.name, reason, output()) from None
        self.fds[spec.name] = fn.fd
        self.ids[spec.name] = bpfsys.prog_info(fn.fd).id

    def close(self) -> None:
        """Close the modules and program fds (attached programs stay attached)."""
        for module in self._modules:
            try:
                module.cleanup()
            except Exception as exc:  # bcc raises bare Exception; closing must go on
                self._log.warning("closing a bcc module failed: %s", exc)
        self._modules.clear()
        self.fds.clear()

