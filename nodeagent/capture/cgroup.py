"""Attach the cgroup programs (connect4/6, sockops) to one cgroup v2 directory.

Programs are attached with BPF_PROG_ATTACH, not links, so they outlive the agent
(fail closed while it restarts). A new agent replaces the previous instances without a
gap: it attaches its own with BPF_F_ALLOW_MULTI first, then detaches the programs of
the same name it found there with BPF_PROG_QUERY. For the overlap both run; the old
one's rewrite targets loopback, which the new one leaves alone, so nothing is captured
twice.
"""

from __future__ import annotations

import logging
import os

from nodeagent.capture import bpfsys
from nodeagent.capture.errors import BpfSyscallError, CaptureError
from nodeagent.capture.programs import CGROUP_PROGRAMS, ProgramSpec

ATTACH_NAMES = {bpfsys.ATTACH_CGROUP_INET4_CONNECT: "connect4",
                bpfsys.ATTACH_CGROUP_INET6_CONNECT: "connect6",
                bpfsys.ATTACH_CGROUP_SOCK_OPS: "sock_ops"}


def attached(cgroup_fd: int, attach_type: int) -> list[tuple[int, str]]:
    """(id, name) of the programs attached to the cgroup itself for `attach_type`."""
    out = []
    for prog_id in bpfsys.prog_query(cgroup_fd, attach_type, "query cgroup programs"):
        try:
            fd = bpfsys.prog_fd_by_id(prog_id)
        except BpfSyscallError:
            continue  # detached meanwhile
        try:
            out.append((prog_id, bpfsys.prog_info(fd).name.decode()))
        finally:
            os.close(fd)
    return out


class CgroupAttachment:
    """Our programs attached to one cgroup; detach_all() undoes them."""

    def __init__(self, cgroup: str, log: logging.Logger):
        self.cgroup = cgroup
        self._log = log
        self._fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._ours: list[tuple[ProgramSpec, int]] = []  # (spec, prog fd) we attached

    def replace(self, spec: ProgramSpec, prog_fd: int, prog_id: int) -> None:
        """Attach `prog_fd`, then detach earlier programs named like it."""
        previous = [pid for pid, name in attached(self._fd, spec.attach_type)
                    if name == spec.name and pid != prog_id]
        where = f"attach {spec.name} to cgroup {self.cgroup}"
        try:
            bpfsys.prog_attach(prog_fd, self._fd, spec.attach_type, bpfsys.F_ALLOW_MULTI, where)
        except BpfSyscallError as exc:
            others = attached(self._fd, spec.attach_type)
            raise CaptureError(f"{where}: {exc.message}",
                               f"programs already attached there: {others or 'none'}; one attached "
                               "without BPF_F_ALLOW_MULTI blocks ours") from None
        self._ours.append((spec, prog_fd))
        for prog_id_old in previous:
            self._detach_id(spec, prog_id_old)

    def _detach_id(self, spec: ProgramSpec, prog_id: int) -> None:
        try:
            fd = bpfsys.prog_fd_by_id(prog_id)
        except BpfSyscallError:
            return  # gone already
        try:
            bpfsys.prog_detach(fd, self._fd, spec.attach_type, f"detach old {spec.name} (id {prog_id})")
            self._log.info("replaced %s id %d on %s", spec.name, prog_id, self.cgroup)
        finally:
            os.close(fd)

    def describe(self) -> list[dict]:
        """Every program of ours attached to the cgroup now (ours or a predecessor's)."""
        names = {spec.name for spec in CGROUP_PROGRAMS}
        return [{"name": name, "id": prog_id, "attach_point": f"cgroup {self.cgroup} {label}"}
                for attach_type, label in ATTACH_NAMES.items()
                for prog_id, name in attached(self._fd, attach_type) if name in names]

    def detach_all(self) -> None:
        """Detach what this instance attached; tolerates programs already gone."""
        while self._ours:
            spec, prog_fd = self._ours.pop()
            try:
                bpfsys.prog_detach(prog_fd, self._fd, spec.attach_type, f"detach {spec.name}")
            except BpfSyscallError as exc:
                self._log.warning("%s (already detached?)", exc)

    def detach_named(self) -> list[str]:
        """Detach every program named like ours from the cgroup, whoever attached it (an
        uninstall after agents that kept their capture). Returns what it detached."""
        done = []
        for spec in CGROUP_PROGRAMS:
            for prog_id, name in attached(self._fd, spec.attach_type):
                if name == spec.name:
                    self._detach_id(spec, prog_id)
                    done.append(f"{name} (id {prog_id})")
        return done

    def close(self) -> None:
        """Forget our programs (they stay attached) and close the cgroup fd."""
        self._ours.clear()
        os.close(self._fd)
