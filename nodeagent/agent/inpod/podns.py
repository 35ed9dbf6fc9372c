"""Find a pod's network namespace from its UID, with no CNI plugin: scan `/proc/*/cgroup`.

The kubelet puts every pod's processes in a cgroup named after the pod UID, either
`.../pod<uid>/...` (cgroupfs driver, and the lab) or
`.../kubepods-<qos>-pod<uid with _ for ->.slice/...` (systemd driver). The pod's processes
share its netns, unless one made a netns of its own (`unshare -n`, a sandboxing browser):
so the pod's netns is that of the first process (lowest PID) whose netns holds the pod's
IP as a local address, read from `/proc/PID/net` without entering it (before 2026-12-06
the first process's, whatever its netns: a process of the pod with a netns of its own and
a lower PID had the agent capture an empty netns and leave the pod's own uncaptured).
When no candidate's addresses can be read the first process's is taken, as before.
Results are cached per UID (the pid, an open netns fd and the netns cookie) and
re-resolved when that pid is gone or has left the pod's cgroup.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from nodeagent import netns
from nodeagent.netns import NetnsError


class PodNotFound(NetnsError):
    """No process of the pod was found (not started yet, or already gone)."""


@dataclass
class PodNetns:
    uid: str
    pid: int  # the process the netns was found through
    fd: int  # open /proc/PID/ns/net; keeps the netns reachable even if the pid exits
    cookie: int
    inode: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def uids_in_cgroup_path(path: str) -> set[str]:
    """Pod UIDs named by one cgroup path (both kubelet namings)."""
    found = set()
    for part in path.split("/"):
        if part.startswith("pod") and len(part) > 3:
            found.add(part[3:])
        elif part.endswith(".slice") and "-pod" in part:
            found.add(part[:-len(".slice")].rsplit("-pod", 1)[1].replace("_", "-"))
    return found


def uids_of_cgroup_file(text: str) -> set[str]:
    """Pod UIDs named by the content of a /proc/PID/cgroup file (any hierarchy line)."""
    found: set[str] = set()
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            found |= uids_in_cgroup_path(parts[2])
    return found


class PodNetnsResolver:
    """UID -> PodNetns, cached; `resolve_many` scans /proc once for all missing UIDs."""

    def __init__(self, proc: str = "/proc", own_netns: str = "/proc/self/ns/net",
                 cookie_of: Callable[[int], int] = netns.cookie):
        self.proc = proc
        self.cookie_of = cookie_of
        self._own_inode = _inode(own_netns)
        self._cache: dict[str, PodNetns] = {}

    def _read_cgroup(self, pid: int) -> str | None:
        try:
            with open(f"{self.proc}/{pid}/cgroup") as f:
                return f.read()
        except OSError:  # the process exited while we looked, or is not ours to see
            return None

    def _still_valid(self, entry: PodNetns) -> bool:
        text = self._read_cgroup(entry.pid)
        return text is not None and entry.uid in uids_of_cgroup_file(text)

    def _scan(self, wanted: set[str]) -> dict[str, list[int]]:
        """Every process of each wanted pod, lowest PID first."""
        pids: dict[str, list[int]] = {}
        try:
            names = os.listdir(self.proc)
        except OSError:
            return pids
        for name in sorted((n for n in names if n.isdigit()), key=int):
            text = self._read_cgroup(int(name))
            if text is None:
                continue
            for uid in uids_of_cgroup_file(text) & wanted:
                pids.setdefault(uid, []).append(int(name))
        return pids

    def _holds(self, pid: int, ip: str) -> bool | None:
        """Whether `pid`'s netns has `ip` as a local address (None: cannot be read)."""
        try:
            address = ipaddress.ip_address(ip)
            if address.version == 4:
                with open(f"{self.proc}/{pid}/net/fib_trie") as f:
                    lines = [line.strip() for line in f]
                return any(line == f"|-- {ip}" and "/32 host LOCAL" in following
                           for line, following in zip(lines, lines[1:]))
            with open(f"{self.proc}/{pid}/net/if_inet6") as f:
                return any(line.split()[0] == address.exploded.replace(":", "") for line in f if line.strip())
        except (OSError, ValueError, IndexError):
            return None

    def _choose(self, uid: str, pids: list[int], ip: str | None) -> int:
        """The pod's process to take the netns of: the first whose netns holds `ip`."""
        if not ip:
            return pids[0]
        unread = None
        for pid in pids:
            held = self._holds(pid, ip)
            if held:
                return pid
            if held is None and unread is None:
                unread = pid
        if unread is not None:
            return unread
        raise NetnsError(f"no process of pod {uid} is in a network namespace holding its IP {ip}",
                         "retrying (the pod's network may not be up yet; a netns of one of its processes' "
                         "own is not the pod's)")

    def _open(self, uid: str, pid: int) -> PodNetns:
        path = f"{self.proc}/{pid}/ns/net"
        fd = netns.open_netns(path)
        try:
            inode = os.fstat(fd).st_ino
            if inode == self._own_inode:
                raise NetnsError(f"pod {uid} shares the agent's network namespace (hostNetwork?)",
                                 "hostNetwork pods cannot be meshed; label the pod istio.io/dataplane-mode=none")
            return PodNetns(uid, pid, fd, self.cookie_of(fd), inode)
        except BaseException:
            os.close(fd)
            raise

    def resolve_many(self, uids: Iterable[str],
                     ips: Mapping[str, str] | None = None) -> dict[str, PodNetns | NetnsError]:
        """Each UID's netns (the one holding its IP in `ips`, when given), or the error saying
        why it could not be found (retry later)."""
        out: dict[str, PodNetns | NetnsError] = {}
        missing = set()
        for uid in uids:
            entry = self._cache.get(uid)
            if entry is not None and self._still_valid(entry):
                out[uid] = entry
            else:
                self.forget(uid)
                missing.add(uid)
        pids = self._scan(missing) if missing else {}
        for uid in missing:
            if uid not in pids:
                out[uid] = PodNotFound(f"no process of pod {uid} in {self.proc}/*/cgroup",
                                       "the pod has not started yet or is gone; retrying")
                continue
            try:
                out[uid] = self._cache[uid] = self._open(uid, self._choose(uid, pids[uid], (ips or {}).get(uid)))
            except NetnsError as exc:
                out[uid] = exc
        return out

    def resolve(self, uid: str) -> PodNetns:
        result = self.resolve_many([uid])[uid]
        if isinstance(result, NetnsError):
            raise result
        return result

    def forget(self, uid: str) -> None:
        entry = self._cache.pop(uid, None)
        if entry is not None:
            entry.close()

    def close(self) -> None:
        for uid in list(self._cache):
            self.forget(uid)


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return -1
