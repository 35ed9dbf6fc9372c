"""The capture programs (which source, type and attach point) and their loaded fds.

Compiling and loading happen in a short-lived child process (compiler.py) so bcc and
LLVM never enter the agent; the agent keeps only the program fds (LoadedPrograms).
One bcc module per source file (one file per attach point); they share maps because
every map is pinned (BPF_TABLE_PINNED): the first module creates and pins a map, the
others — and the next agent — open the pin.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from nodeagent.capture import bpfsys
from nodeagent.capture.errors import PinnedMapMismatch
from nodeagent.capture.structs import MAPS

PROG_SOCK_OPS, PROG_SK_SKB, PROG_CGROUP_SOCK_ADDR, PROG_SK_LOOKUP = 13, 14, 18, 30


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
# The same-node fast path's in-kernel join (sockmap.py): compiled and loaded apart from
# capture, so a kernel that refuses it leaves capture whole (the join falls back to splice).
SAMENODE = ProgramSpec("na_sn_verdict", "samenode.c", PROG_SK_SKB, bpfsys.ATTACH_SK_SKB_VERDICT)
BY_NAME = {p.name: p for p in (*PROGRAMS, SAMENODE)}


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
    """The fds and ids of the loaded programs, by name (compiler.load_programs makes it)."""

    def __init__(self, fds: dict[str, int]):
        self.fds = fds
        self.ids = {name: bpfsys.prog_info(fd).id for name, fd in fds.items()}

    def close(self) -> None:
        """Close the program fds (attached programs stay attached)."""
        while self.fds:
            os.close(self.fds.popitem()[1])
