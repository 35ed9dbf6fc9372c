"""The kernel feature probes: each asks the kernel for one thing the capture programs
use, the way libbpf's libbpf_probe_bpf_prog_type/_helper do — a minimal program of that
exact shape through BPF_PROG_LOAD (hand-assembled instructions, raw bpf(2): no bcc, no
LLVM), a map created with one entry, a netns link made in a throwaway netns and
updated, a one-type BTF blob loaded — and closes every fd again. A probe raises
BpfSyscallError with the kernel's words (the verifier log's last line for a load);
`Prober.run` turns those into Probe results. Every bpf(2) goes through the `bpf` it was
given (bpfsys.call; tests inject one that fails). The rows they answer for, and what a
missing one means, are in features.py.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

from nodeagent.capture import bpfsys
from nodeagent.capture.errors import BpfSyscallError, NotPrivileged
from nodeagent.netns import CLONE_NEWNET, OWN_NETNS, SO_NETNS_COOKIE

Syscall = Callable[[int, ctypes.Structure, str], int]  # bpfsys.call's shape; tests inject failures

# bpf_cmd, bpf_prog_type, bpf_map_type, bpf_attach_type and helper ids (include/uapi/linux/bpf.h)
MAP_CREATE, PROG_LOAD, BTF_LOAD = 0, 5, 18
PROG_SOCK_OPS, PROG_SK_SKB, PROG_CGROUP_SOCK_ADDR, PROG_SK_LOOKUP = 13, 14, 18, 30
MAP_HASH, MAP_PERCPU_ARRAY, MAP_LRU_HASH, MAP_SOCKHASH = 1, 6, 9, 18
FN_MAP_LOOKUP, FN_GET_SOCKET_COOKIE, FN_SK_REDIRECT_HASH = 1, 46, 72
FN_SK_RELEASE, FN_GET_NETNS_COOKIE, FN_SK_ASSIGN = 86, 122, 124
SK_LOOKUP_INGRESS_IFINDEX = 64  # offsetof(struct bpf_sk_lookup, ingress_ifindex)
BTF_VMLINUX = "/sys/kernel/btf/vmlinux"

_LOG_STATISTICS = ("processed ", "verification time", "stack depth")  # after the reason, on success too

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Probe:
    """One probe's answer: `ok`, and in `detail` the kernel's words when not."""
    ok: bool
    detail: str = ""


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32)]


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]


class _BtfLoadAttr(ctypes.Structure):
    _fields_ = [("btf", ctypes.c_uint64), ("btf_log_buf", ctypes.c_uint64), ("btf_size", ctypes.c_uint32),
                ("btf_log_size", ctypes.c_uint32), ("btf_log_level", ctypes.c_uint32)]


class _QueryAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class _AttachAttr(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("replace_bpf_fd", ctypes.c_uint32)]


class _LinkCreateAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("target_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_ = [("link_fd", ctypes.c_uint32), ("new_prog_fd", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("old_prog_fd", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    regs = (dst << 4 | src) if sys.byteorder == "big" else (src << 4 | dst)
    return struct.pack("=BBhi", code, regs, off, imm)


def _mov_imm(dst: int, imm: int) -> bytes:
    return _insn(0xb7, dst, imm=imm)  # BPF_ALU64 | BPF_MOV | BPF_K


def _mov_reg(dst: int, src: int) -> bytes:
    return _insn(0xbf, dst, src)  # BPF_ALU64 | BPF_MOV | BPF_X


def _add_imm(dst: int, imm: int) -> bytes:
    return _insn(0x07, dst, imm=imm)  # BPF_ALU64 | BPF_ADD | BPF_K


def _call(helper: int) -> bytes:
    return _insn(0x85, imm=helper)


def _map_fd(dst: int, fd: int) -> bytes:
    return _insn(0x18, dst, 1, imm=fd) + _insn(0)  # BPF_LD | BPF_IMM | BPF_DW, BPF_PSEUDO_MAP_FD


EXIT = _insn(0x95)
RETURN_1 = _mov_imm(0, 1) + EXIT


def _throwaway_netns() -> int:
    """An fd of a new, empty network namespace (it goes when the fd is closed): made by a
    short-lived thread that unshares its own netns (~1-3 ms), so no thread of ours moves."""
    made: dict[str, int] = {}

    def unshare() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            made["errno"] = ctypes.get_errno()
            return
        made["fd"] = os.open(OWN_NETNS, os.O_RDONLY | os.O_CLOEXEC)

    thread = threading.Thread(target=unshare, name="netns-probe")
    thread.start()
    thread.join()
    if "fd" not in made:
        err = made.get("errno", errno.EINVAL)
        if err == errno.EPERM:
            raise NotPrivileged(["CAP_SYS_ADMIN (a network namespace for the link probe)"])
        raise BpfSyscallError("unshare a network namespace for the link probe", err)
    return made["fd"]


class Prober:
    """Runs every probe through `bpf` (bpfsys.call; a test passes one that fails on purpose)."""

    LOG_SIZE = 65536

    def __init__(self, bpf: Syscall = bpfsys.call):
        self.bpf = bpf
        self._log = ctypes.create_string_buffer(self.LOG_SIZE)

    # -- primitives: each returns an fd the caller closes, or raises BpfSyscallError --

    def load(self, what: str, prog_type: int, insns: bytes, attach_type: int = 0) -> int:
        code = ctypes.create_string_buffer(insns, len(insns))
        gpl = ctypes.create_string_buffer(b"GPL")
        self._log[0] = b"\0"
        attr = _ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
                             license=ctypes.addressof(gpl), log_level=1, log_size=self.LOG_SIZE,
                             log_buf=ctypes.addressof(self._log), expected_attach_type=attach_type)
        try:
            return self.bpf(PROG_LOAD, attr, what)
        except BpfSyscallError as exc:
            reason = self._refusal()
            if reason and exc.errno != errno.EPERM:
                raise BpfSyscallError(f"{what}: {reason}", exc.errno) from None
            raise

    def _refusal(self) -> str:
        """The verifier's reason: the log's last line before its statistics."""
        lines = self._log.value.decode(errors="replace").strip().splitlines()
        said = [line for line in lines if not line.startswith(_LOG_STATISTICS)]
        return said[-1] if said else ""

    def create_map(self, what: str, map_type: int, key: int, value: int) -> int:
        return self.bpf(MAP_CREATE, _MapCreateAttr(map_type=map_type, key_size=key, value_size=value,
                                                   max_entries=1), what)

    # -- the probes, one per row of features.FEATURES --

    def maps(self) -> None:
        for map_type, value in ((MAP_HASH, 8), (MAP_LRU_HASH, 8), (MAP_PERCPU_ARRAY, 8)):
            os.close(self.create_map(f"create map type {map_type}", map_type, 4, value))

    def sockhash(self) -> None:
        os.close(self.create_map("create a sockhash", MAP_SOCKHASH, 4, 8))

    def cgroup_sock_addr(self) -> None:
        for attach in (bpfsys.ATTACH_CGROUP_INET4_CONNECT, bpfsys.ATTACH_CGROUP_INET6_CONNECT):
            os.close(self.load(f"load a cgroup/connect program (attach type {attach})", PROG_CGROUP_SOCK_ADDR,
                               RETURN_1, attach))

    def socket_cookie(self) -> None:
        os.close(self.load("load a cgroup/connect4 program calling bpf_get_socket_cookie", PROG_CGROUP_SOCK_ADDR,
                           _call(FN_GET_SOCKET_COOKIE) + RETURN_1, bpfsys.ATTACH_CGROUP_INET4_CONNECT))
        os.close(self.load("load a sockops program calling bpf_get_socket_cookie", PROG_SOCK_OPS,
                           _call(FN_GET_SOCKET_COOKIE) + RETURN_1))

    def netns_cookie(self) -> None:
        os.close(self.load("load a cgroup/connect4 program calling bpf_get_netns_cookie", PROG_CGROUP_SOCK_ADDR,
                           _call(FN_GET_NETNS_COOKIE) + RETURN_1, bpfsys.ATTACH_CGROUP_INET4_CONNECT))

    def sockops(self) -> None:
        os.close(self.load("load a sockops program", PROG_SOCK_OPS, RETURN_1))

    def cgroup_bpf(self, cgroup: str) -> None:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            ids = (ctypes.c_uint32 * 1)()
            attr = _QueryAttr(target_fd=fd, attach_type=bpfsys.ATTACH_CGROUP_INET4_CONNECT,
                              prog_ids=ctypes.addressof(ids), prog_cnt=0)
            self.bpf(bpfsys.PROG_QUERY, attr, f"query the programs on cgroup {cgroup}")
        finally:
            os.close(fd)

    def _sk_lookup(self, what: str, insns: bytes = RETURN_1) -> int:
        return self.load(what, PROG_SK_LOOKUP, insns, bpfsys.ATTACH_SK_LOOKUP)

    def sk_lookup(self) -> None:
        os.close(self._sk_lookup("load an sk_lookup program"))

    def sk_lookup_ifindex(self) -> None:
        read = _insn(0x61, 2, 1, SK_LOOKUP_INGRESS_IFINDEX)  # r2 = *(u32 *)(ctx + ingress_ifindex)
        os.close(self._sk_lookup("load an sk_lookup program reading ingress_ifindex", read + RETURN_1))

    def sk_assign(self) -> None:
        """sk_lookup.c's steering: a socket looked up in a sockhash, assigned, released."""
        map_fd = self.create_map("create a sockhash", MAP_SOCKHASH, 4, 8)
        try:
            insns = (_mov_reg(6, 1) + _insn(0x62, 10, off=-4, imm=0)  # r6 = ctx; *(u32 *)(fp - 4) = 0
                     + _mov_reg(2, 10) + _add_imm(2, -4) + _map_fd(1, map_fd) + _call(FN_MAP_LOOKUP)
                     + _insn(0x15, 0, off=7, imm=0)  # if r0 == 0: skip to the return
                     + _mov_reg(7, 0) + _mov_reg(1, 6) + _mov_reg(2, 7) + _mov_imm(3, 0) + _call(FN_SK_ASSIGN)
                     + _mov_reg(1, 7) + _call(FN_SK_RELEASE) + RETURN_1)
            os.close(self._sk_lookup("load an sk_lookup program assigning a sockhash socket", insns))
        finally:
            os.close(map_fd)

    def netns_links(self) -> None:
        """A pass-through sk_lookup program linked into a throwaway netns (never the
        agent's own), the link updated and read back, then closed (which detaches it)."""
        prog = self._sk_lookup("load an sk_lookup program")
        try:
            netns = _throwaway_netns()
        except BaseException:
            os.close(prog)
            raise
        try:
            link = self.bpf(bpfsys.LINK_CREATE, _LinkCreateAttr(prog_fd=prog, target_fd=netns,
                                                                attach_type=bpfsys.ATTACH_SK_LOOKUP),
                            "link an sk_lookup program into a netns (BPF_LINK_CREATE)")
            try:
                self.bpf(bpfsys.LINK_UPDATE, _LinkUpdateAttr(link_fd=link, new_prog_fd=prog),
                         "update a netns link (BPF_LINK_UPDATE)")
                info = bpfsys.LinkInfo()
                self.bpf(bpfsys.OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=link, info_len=ctypes.sizeof(info),
                                                              info=ctypes.addressof(info)), "read a netns link's info")
                if info.netns_ino == 0:
                    raise BpfSyscallError("read a netns link's info: no netns inode", errno.EOPNOTSUPP)
            finally:
                os.close(link)
        finally:
            os.close(netns)
            os.close(prog)

    def so_netns_cookie(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
            except OSError as exc:
                raise BpfSyscallError("getsockopt(SO_NETNS_COOKIE)", exc.errno or errno.EINVAL) from None

    def btf(self, vmlinux: str = BTF_VMLINUX) -> None:
        """A one-type BTF blob (`int`) through BPF_BTF_LOAD, and the kernel's own BTF."""
        strings = b"\0int\0"
        types = struct.pack("=IIII", 1, 1 << 24, 4, 1 << 24 | 32)  # name "int", KIND_INT, 4 bytes; signed, 32 bits
        header = struct.pack("=HBBIIIII", 0xeB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
        blob = ctypes.create_string_buffer(header + types + strings, 24 + len(types) + len(strings))
        os.close(self.bpf(BTF_LOAD, _BtfLoadAttr(btf=ctypes.addressof(blob), btf_size=len(blob)), "load BTF"))
        if not os.path.exists(vmlinux):
            raise BpfSyscallError(f"no {vmlinux}", errno.ENOENT)

    def same_node_join(self) -> None:
        """samenode.c's shape: an sk_skb program redirecting by socket cookie through a
        sockhash, attached to that map as BPF_SK_SKB_VERDICT, then detached."""
        map_fd = self.create_map("create a sockhash", MAP_SOCKHASH, 8, 8)
        try:
            insns = (_mov_reg(6, 1) + _call(FN_GET_SOCKET_COOKIE) + _insn(0x7b, 10, 0, -8)  # *(u64 *)(fp - 8) = r0
                     + _mov_reg(1, 6) + _map_fd(2, map_fd) + _mov_reg(3, 10) + _add_imm(3, -8) + _mov_imm(4, 0)
                     + _call(FN_SK_REDIRECT_HASH) + EXIT)
            prog = self.load("load an sk_skb program calling bpf_sk_redirect_hash", PROG_SK_SKB, insns)
            try:
                attr = _AttachAttr(target_fd=map_fd, attach_bpf_fd=prog, attach_type=bpfsys.ATTACH_SK_SKB_VERDICT)
                self.bpf(bpfsys.PROG_ATTACH, attr, "attach an sk_skb program to a sockhash (BPF_SK_SKB_VERDICT)")
                self.bpf(bpfsys.PROG_DETACH, attr, "detach it again")
            finally:
                os.close(prog)
        finally:
            os.close(map_fd)

    def run(self, names: Iterable[str], cgroup: str) -> dict[str, Probe]:
        """The probes `names` (methods of this class); EPERM anywhere means we may not
        ask, not that the kernel lacks it."""
        results = {}
        for name in names:
            probe = getattr(self, name)
            try:
                probe(cgroup) if name == "cgroup_bpf" else probe()
                results[name] = Probe(True)
            except BpfSyscallError as exc:
                if exc.errno == errno.EPERM:
                    raise NotPrivileged([f"CAP_BPF ({exc.what})"]) from None
                results[name] = Probe(False, exc.message)
        return results
