"""sk_lookup links, one per steered pod netns, pinned as <pin_dir>/links/<netns cookie>.

A link (BPF_LINK_CREATE with the netns fd) detaches when its last reference goes, so
the pin is what keeps inbound steering — and fail-closed dropping — in place while the
agent restarts. A new agent points every pinned link at its own program with
BPF_LINK_UPDATE (atomic, no gap) and drops pins whose netns no longer exists.
"""

from __future__ import annotations

import logging
import os
import threading

from nodeagent.capture import bpfsys
from nodeagent.capture.errors import BpfSyscallError


class NetnsLinks:
    """The pinned sk_lookup links under `links_dir`, by netns cookie."""

    def __init__(self, links_dir: str, prog_fd: int, prog_id: int, log: logging.Logger):
        self.links_dir = links_dir
        self._prog_fd, self._prog_id = prog_fd, prog_id
        self._log = log
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}  # netns cookie -> link fd

    def _path(self, netns_cookie: int) -> str:
        return os.path.join(self.links_dir, str(netns_cookie))

    def adopt(self) -> None:
        """Take over the links a previous agent pinned: run our program in them."""
        for entry in sorted(os.listdir(self.links_dir)):
            if not entry.isdigit():
                continue
            cookie, fd = int(entry), bpfsys.obj_get(self._path(int(entry)))
            if bpfsys.link_info(fd).netns_ino == 0:  # its netns is gone
                self._log.info("dropping sk_lookup link of vanished netns %d", cookie)
                os.close(fd)
                os.unlink(self._path(cookie))
                continue
            self._fds[cookie] = fd
            self._point_at_us(cookie, fd)

    def _point_at_us(self, netns_cookie: int, fd: int) -> None:
        if bpfsys.link_info(fd).prog_id != self._prog_id:
            bpfsys.link_update(fd, self._prog_fd, f"update sk_lookup link of netns {netns_cookie}")

    def ensure(self, netns_cookie: int, netns_fd: int) -> None:
        """Our program linked into the netns, pinned; idempotent."""
        with self._lock:
            fd = self._fds.get(netns_cookie)
            if fd is None and os.path.exists(self._path(netns_cookie)):
                fd = self._fds[netns_cookie] = bpfsys.obj_get(self._path(netns_cookie))
            if fd is not None:
                self._point_at_us(netns_cookie, fd)
                return
            fd = bpfsys.link_create(self._prog_fd, netns_fd, bpfsys.ATTACH_SK_LOOKUP,
                                    f"link sk_lookup into netns {netns_cookie}")
            try:
                bpfsys.obj_pin(fd, self._path(netns_cookie))
            except BpfSyscallError:
                os.close(fd)  # the unpinned link dies with its fd
                raise
            self._fds[netns_cookie] = fd

    def remove(self, netns_cookie: int) -> None:
        """Unpin and close: the link detaches from the netns."""
        with self._lock:
            fd = self._fds.pop(netns_cookie, None)
            try:
                os.unlink(self._path(netns_cookie))
            except FileNotFoundError:
                pass
            if fd is not None:
                os.close(fd)

    def describe(self) -> list[dict]:
        with self._lock:
            items = list(self._fds.items())
        out = []
        for cookie, fd in items:
            info = bpfsys.link_info(fd)
            out.append({"name": "na_sk_lookup", "id": info.prog_id,
                        "attach_point": f"netns {cookie} sk_lookup (link {info.id})"})
        return out

    def close(self, keep: bool) -> None:
        """keep: leave links pinned (they stay in force); else remove every one."""
        for cookie in list(self._fds):
            if keep:
                os.close(self._fds.pop(cookie))
            else:
                self.remove(cookie)
        if not keep:
            for entry in os.listdir(self.links_dir):  # pins we never opened
                os.unlink(os.path.join(self.links_dir, entry))
