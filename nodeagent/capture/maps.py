"""Typed access to the pinned capture maps from user space.

Opens every map of nodeagent.h by its pin (so it works the same for maps this agent
created and maps it adopted) and offers the few operations the agent needs, in terms
of the structs.py mirrors. Per-CPU counters are summed over every possible CPU.
"""

from __future__ import annotations

import ctypes
import os

from nodeagent.capture import bpfsys
from nodeagent.capture.structs import (MAP_PERCPU_ARRAY, MAPS, MAPS_BY_NAME, Addr, Counter,
                                       OrigDst, OrigDstKey, Pod, PodIp)

POSSIBLE_CPUS = "/sys/devices/system/cpu/possible"


def possible_cpus(path: str = POSSIBLE_CPUS) -> int:
    """How many per-CPU slots the kernel keeps per element: highest possible CPU + 1."""
    with open(path) as f:
        highest = max(int(part.split("-")[-1]) for part in f.read().strip().split(","))
    return highest + 1


class CaptureMaps:
    """File descriptors of the pinned maps, by name; closed by close()."""

    def __init__(self, maps_dir: str):
        self.maps_dir = maps_dir
        self._fds: dict[str, int] = {}
        try:
            for spec in MAPS:
                self._fds[spec.name] = bpfsys.obj_get(self.path(spec.name))
        except BaseException:
            self.close()
            raise
        self._cpus = possible_cpus()

    def path(self, name: str) -> str:
        return os.path.join(self.maps_dir, name)

    # ---- meshed netns (na_pods) ----

    def set_pod(self, netns_cookie: int, pod: Pod) -> None:
        bpfsys.map_update(self._fds["na_pods"], ctypes.c_uint64(netns_cookie), pod,
                          f"enrol netns {netns_cookie} in na_pods")

    def delete_pod(self, netns_cookie: int) -> bool:
        return bpfsys.map_delete(self._fds["na_pods"], ctypes.c_uint64(netns_cookie))

    def pod_cookies(self) -> set[int]:
        return {key.value for key in bpfsys.map_keys(self._fds["na_pods"], ctypes.c_uint64)}

    # ---- original destinations (na_origdst) ----

    def fd_of(self, name: str) -> int:
        return self._fds[name]

    def pop_origdst(self, key: OrigDstKey) -> OrigDst | None:
        value = OrigDst()
        if not bpfsys.map_lookup(self._fds["na_origdst"], key, value):
            return None
        bpfsys.map_delete(self._fds["na_origdst"], key)
        return value

    # ---- inbound (na_inbound, na_enrolled_ips) ----

    def set_inbound(self, ip: str, listener_fd: int) -> None:
        bpfsys.map_update(self._fds["na_inbound"], Addr.of(ip), ctypes.c_uint64(listener_fd),
                          f"register the inbound listener for {ip} in na_inbound")

    def delete_inbound(self, ip: str) -> bool:
        return bpfsys.map_delete(self._fds["na_inbound"], Addr.of(ip))

    def set_enrolled_ip(self, ip: str, value: PodIp) -> None:
        bpfsys.map_update(self._fds["na_enrolled_ips"], Addr.of(ip), value,
                          f"enrol pod IP {ip} in na_enrolled_ips")

    def delete_enrolled_ip(self, ip: str) -> bool:
        return bpfsys.map_delete(self._fds["na_enrolled_ips"], Addr.of(ip))

    # ---- introspection ----

    def counters(self) -> dict[str, int]:
        """Every counter, summed over CPUs, by lower-case name (`captured`, ...)."""
        fd = self._fds["na_counters"]
        slots = (ctypes.c_uint64 * self._cpus)()  # per-CPU values are padded to 8 bytes
        totals = {}
        for counter in Counter:
            ctypes.memset(slots, 0, ctypes.sizeof(slots))
            bpfsys.map_lookup(fd, ctypes.c_uint32(counter), slots)
            totals[counter.name.lower()] = sum(slots)
        return totals

    def describe(self) -> list[dict]:
        """name, max_entries and current number of entries of each map."""
        out = []
        for name, fd in self._fds.items():
            info = bpfsys.map_info(fd)
            if MAPS_BY_NAME[name].type == MAP_PERCPU_ARRAY:
                entries = info.max_entries  # arrays are always full
            else:
                entries = sum(1 for _ in bpfsys.map_keys(fd, MAPS_BY_NAME[name].key))
            out.append({"name": name, "id": info.id, "max_entries": info.max_entries,
                        "entries": entries})
        return out

    def unpin(self) -> None:
        """Remove the pins (the maps live on while some fd or program holds them)."""
        for spec in MAPS:
            try:
                os.unlink(self.path(spec.name))
            except FileNotFoundError:
                pass

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

