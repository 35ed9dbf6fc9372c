"""The bpf(2) commands bcc 0.26's Python API lacks, called directly through ctypes.

Pinning (BPF_OBJ_PIN/GET), cgroup attachment with flags and BPF_PROG_QUERY, program,
map and link info, BPF_LINK_CREATE/UPDATE for sk_lookup, and map element access on any
map fd (bcc's Table has no class for SOCKHASH). Each command gets its own ctypes
structure laid out as its member of `union bpf_attr` (include/uapi/linux/bpf.h); the
kernel accepts an attr shorter than its own union as long as what it reads is there.
Failures raise BpfSyscallError carrying the errno and a hint.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
from typing import Iterator

from nodeagent.capture.errors import BpfSyscallError

# bpf_cmd
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_PIN = 6
OBJ_GET = 7
PROG_ATTACH = 8
PROG_DETACH = 9
PROG_GET_FD_BY_ID = 13
OBJ_GET_INFO_BY_FD = 15
PROG_QUERY = 16
LINK_CREATE = 28
LINK_UPDATE = 29

# bpf_attach_type values we use
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_SK_LOOKUP = 36
ATTACH_SK_SKB_VERDICT = 38  # BPF_SK_SKB_VERDICT: a sockmap's verdict program (target: the map fd)

F_ALLOW_MULTI = 1 << 1  # BPF_F_ALLOW_MULTI
ANY = 0  # BPF_ANY: create or replace an element

_SYSCALL_NR = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

OBJ_NAME_LEN = 16


class _MapElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32),
                ("file_flags", ctypes.c_uint32)]


class _AttachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32)]


class _GetFdByIdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("old_prog_fd", ctypes.c_uint32)]


class ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info (the kernel fills what fits)."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
                ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
                ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
                ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
                ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
                ("name", ctypes.c_char * OBJ_NAME_LEN)]


class MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
                ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
                ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * OBJ_NAME_LEN)]


class LinkInfo(ctypes.Structure):
    """The head of struct bpf_link_info with its netns member (the union sits at 16)."""
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("netns_ino", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32)]


@functools.cache
def _nr() -> int:
    machine = platform.machine()
    if machine not in _SYSCALL_NR:
        raise BpfSyscallError("bpf(2)", errno.ENOSYS, f"unsupported architecture {machine}")
    return _SYSCALL_NR[machine]


def _bpf(cmd: int, attr: ctypes.Structure) -> tuple[int, int]:
    """bpf(cmd, &attr, sizeof(attr)): (result, errno when it is negative). The map
    commands run several times per connection (same-node fast path, original
    destinations): no exception for an answer as common as ENOENT."""
    ret = _libc.syscall(_nr(), cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return (ret, ctypes.get_errno()) if ret < 0 else (ret, 0)


def call(cmd: int, attr: ctypes.Structure, what: str) -> int:
    """bpf(cmd, &attr, sizeof(attr)); the result, or BpfSyscallError naming `what`."""
    ret, err = _bpf(cmd, attr)
    if ret < 0:
        raise BpfSyscallError(what, err)
    return ret


def _addr(obj: ctypes._CData) -> int:
    return ctypes.addressof(obj)


# ---- pinning ----

def obj_pin(fd: int, path: str) -> None:
    raw = ctypes.create_string_buffer(os.fsencode(path))
    call(OBJ_PIN, _ObjAttr(pathname=_addr(raw), bpf_fd=fd), f"pin {path}")


def obj_get(path: str) -> int:
    """A new fd for the object pinned at `path` (caller closes it)."""
    raw = ctypes.create_string_buffer(os.fsencode(path))
    return call(OBJ_GET, _ObjAttr(pathname=_addr(raw)), f"open pinned {path}")


# ---- cgroup attachment ----

def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int, what: str) -> None:
    attr = _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type,
                       attach_flags=flags)
    call(PROG_ATTACH, attr, what)


def prog_detach(prog_fd: int, target_fd: int, attach_type: int, what: str) -> None:
    call(PROG_DETACH, _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd,
                                  attach_type=attach_type), what)


def prog_query(target_fd: int, attach_type: int, what: str) -> list[int]:
    """Ids of the programs attached directly to `target_fd` for `attach_type`."""
    ids = (ctypes.c_uint32 * 64)()
    attr = _QueryAttr(target_fd=target_fd, attach_type=attach_type, prog_ids=_addr(ids), prog_cnt=64)
    call(PROG_QUERY, attr, what)
    return list(ids[:attr.prog_cnt])


def prog_fd_by_id(prog_id: int) -> int:
    return call(PROG_GET_FD_BY_ID, _GetFdByIdAttr(id=prog_id), f"open program id {prog_id}")


# ---- info ----

def _info(fd: int, info: ctypes.Structure, what: str) -> None:
    call(OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_addr(info)), what)


def prog_info(fd: int) -> ProgInfo:
    info = ProgInfo()
    _info(fd, info, "read program info")
    return info


def map_info(fd: int) -> MapInfo:
    info = MapInfo()
    _info(fd, info, "read map info")
    return info


def link_info(fd: int) -> LinkInfo:
    info = LinkInfo()
    _info(fd, info, "read link info")
    return info


# ---- links (sk_lookup in a netns) ----

def link_create(prog_fd: int, target_fd: int, attach_type: int, what: str) -> int:
    return call(LINK_CREATE, _LinkCreateAttr(prog_fd=prog_fd, target_fd=target_fd,
                                             attach_type=attach_type), what)


def link_update(link_fd: int, new_prog_fd: int, what: str) -> None:
    call(LINK_UPDATE, _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=new_prog_fd), what)


# ---- map elements ----

def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData) -> bool:
    """Fill `value` from the element at `key`; False if there is none."""
    ret, err = _bpf(MAP_LOOKUP_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value)))
    if ret < 0 and err != errno.ENOENT:
        raise BpfSyscallError("map lookup", err)
    return ret >= 0


def map_update(fd: int, key: ctypes._CData, value: ctypes._CData, what: str, flags: int = ANY) -> None:
    call(MAP_UPDATE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key), value=_addr(value), flags=flags), what)


def map_delete(fd: int, key: ctypes._CData) -> bool:
    """Delete the element at `key`; False if there was none."""
    ret, err = _bpf(MAP_DELETE_ELEM, _MapElemAttr(map_fd=fd, key=_addr(key)))
    if ret < 0 and err != errno.ENOENT:
        raise BpfSyscallError("map delete", err)
    return ret >= 0


def map_keys(fd: int, key_type: type[ctypes._CData]) -> Iterator[ctypes._CData]:
    """Every key of the map (a snapshot-ish walk: concurrent updates may be missed)."""
    prev, key = None, key_type()
    while True:
        attr = _MapElemAttr(map_fd=fd, key=_addr(prev) if prev is not None else 0, value=_addr(key))
        try:
            call(MAP_GET_NEXT_KEY, attr, "map walk")
        except BpfSyscallError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        yield key
        prev, key = key, key_type()
