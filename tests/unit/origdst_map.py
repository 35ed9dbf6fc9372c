"""The capture's map of original destinations (na_origdst) made for a test: a real BPF
hash map with the capture's key and value layout (capture/structs.py), written as the
connect4 program writes it. Making a map needs root: the tests using it carry the `root`
marker."""

from __future__ import annotations

import ctypes
import os
import socket

from nodeagent.capture import bpfsys
from nodeagent.capture.structs import Addr, OrigDst, OrigDstKey


class KernelOriginalDestinations:
    """The capture's na_origdst map itself (structs.OrigDstKey -> OrigDst, a BPF hash map
    made for the test: needs root), written as connect4 writes it; the agent reads it as
    the loader does, and the native engine through `origdst_map_fd`."""

    def __init__(self):
        attr = _MapCreateAttr(map_type=1, key_size=ctypes.sizeof(OrigDstKey), value_size=ctypes.sizeof(OrigDst),
                              max_entries=4096)  # BPF_MAP_TYPE_HASH
        self.fd = bpfsys.call(0, attr, "create the test's na_origdst map")  # BPF_MAP_CREATE

    def record(self, cookie: int, family: int, client_port: int, dst: tuple[str, int]) -> None:
        key = OrigDstKey(netns_cookie=cookie, family=family, client_port=client_port)
        value = OrigDst(netns_cookie=cookie, dst=Addr.of(dst[0]), port=socket.htons(dst[1]))
        bpfsys.map_update(self.fd, key, value, "record an original destination")

    def pop_original_dst(self, cookie: int, family: int, client_port: int) -> tuple[str, int] | None:
        key, value = OrigDstKey(netns_cookie=cookie, family=family, client_port=client_port), OrigDst()
        if not bpfsys.map_lookup(self.fd, key, value):
            return None
        bpfsys.map_delete(self.fd, key)
        return value.destination()

    def origdst_map_fd(self) -> int:
        return self.fd

    def left(self) -> int:
        """Destinations recorded and not read."""
        return sum(1 for _ in bpfsys.map_keys(self.fd, OrigDstKey))

    def close(self) -> None:
        os.close(self.fd)


class _MapCreateAttr(ctypes.Structure):
    _fields_ = [("map_type", ctypes.c_uint32), ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32)]
