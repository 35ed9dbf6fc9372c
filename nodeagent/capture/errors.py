"""Typed errors of the capture layer, each saying what is missing and how to fix it.

Everything the machine can be missing is an EnvironmentProblem (the agent cannot run
until an operator acts); a bad argument from the caller is a ConfigError. to_wire and
from_wire carry one across the compile process's socket (compiler.py) unchanged.
"""

from __future__ import annotations

import errno as errno_mod
import os

from nodeagent.errors import EnvironmentProblem

SETUP_HINT = "run scripts/setup as root"
MIN_KERNEL = "5.17"  # sk_lookup's ingress_ifindex; the other features are older (features.FEATURES)


class CaptureError(EnvironmentProblem):
    """Base of the capture layer's environment errors."""


class BccMissing(CaptureError):
    def __init__(self, detail: str):
        super().__init__(f"bcc's Python bindings are not importable ({detail})",
                         f"{SETUP_HINT}, or apt-get install python3-bpfcc and link "
                         "/usr/lib/python3/dist-packages/bcc into the venv")


class KernelHeadersMissing(CaptureError):
    def __init__(self, path: str):
        super().__init__(f"no kernel headers at {path} (bcc compiles the programs against them)",
                         f"{SETUP_HINT}: it installs linux-headers and links them there")


class Cgroup2Missing(CaptureError):
    def __init__(self, detail: str):
        super().__init__(f"cgroup v2: {detail}",
                         f"{SETUP_HINT} (it mounts cgroup2), or pass an existing cgroup2 directory")


class BtfMissing(CaptureError):
    def __init__(self, path: str):
        super().__init__(f"no kernel BTF at {path}",
                         "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y (every major distro's is)")


class NotPrivileged(CaptureError):
    def __init__(self, missing: list[str]):
        super().__init__(f"missing capabilities: {', '.join(missing)}",
                         "run the agent as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN")


class BpffsMissing(CaptureError):
    def __init__(self, path: str):
        super().__init__(f"{path} is not on a bpf filesystem, so maps cannot be pinned there",
                         f"{SETUP_HINT} (it mounts bpffs at /sys/fs/bpf), or pick a pin dir under it")


class KernelFeatureMissing(CaptureError):
    """The feature probes (features.py) found something the agent needs and has no
    fallback for; the message names each feature and the Linux release that has it."""


class CompileFailed(CaptureError):
    def __init__(self, source: str, log: str):
        self.log = log
        super().__init__(f"bcc could not compile {source}:\n{log.strip()}",
                         "check the kernel headers (scripts/setup) and the bpf/ sources")


class VerifierRejected(CaptureError):
    """`log` is the whole verifier log; the message keeps its end, where the refusal is."""

    TAIL_LINES = 30

    def __init__(self, program: str, reason: str, log: str):
        self.program, self.log = program, log
        lines = log.strip().splitlines()
        tail = "\n".join((["..."] if len(lines) > self.TAIL_LINES else []) + lines[-self.TAIL_LINES:])
        super().__init__(f"the kernel refused program {program} ({reason}); verifier log:\n{tail}",
                         f"the kernel may be too old for a feature it uses (Linux >= {MIN_KERNEL} "
                         "is needed), or the program has a bug the log points at")


class PinnedMapMismatch(CaptureError):
    def __init__(self, path: str, detail: str):
        super().__init__(f"pinned map {path} does not match this version's definition ({detail})",
                         f"remove {os.path.dirname(os.path.dirname(path))} to start fresh "
                         "(drops the original destinations of connections in flight), "
                         "or run the agent version that pinned it")


_ERRNO_HINTS = {
    errno_mod.EPERM: "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)",
    errno_mod.EACCES: "needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)",
    errno_mod.EINVAL: f"the kernel may be too old for this (Linux >= {MIN_KERNEL} is needed)",
    errno_mod.ENOENT: "it does not exist (was the pin directory removed?)",
    errno_mod.EEXIST: "something is already there",
    errno_mod.ENOSPC: "the map is full",
    errno_mod.E2BIG: "the map is full",
    errno_mod.EOPNOTSUPP: "the kernel does not support this here",
    errno_mod.ENOSYS: "the kernel has no bpf(2) (CONFIG_BPF_SYSCALL)",
}


class BpfSyscallError(CaptureError):
    """A bpf(2) command failed. `errno` is the kernel's answer."""

    def __init__(self, what: str, err: int, hint: str | None = None):
        self.what, self.errno = what, err
        super().__init__(f"{what}: {os.strerror(err)} (errno {err})", hint or _ERRNO_HINTS.get(err))


_WIRE_TYPES = (str, int, float, bool, list, type(None))


def to_wire(err: CaptureError) -> dict:
    """`err` as JSON-able data: its class name, message, hint and attributes."""
    attrs = {k: v for k, v in vars(err).items() if k not in ("message", "hint") and isinstance(v, _WIRE_TYPES)}
    return {"type": type(err).__name__, "message": err.message, "hint": err.hint, "attrs": attrs}


def from_wire(data: dict) -> CaptureError:
    """The error to_wire described, of the same class (CaptureError if unknown here), with
    the same message, hint and attributes (`log`, `program`, `errno`...)."""
    cls = globals().get(str(data.get("type")))
    if not (isinstance(cls, type) and issubclass(cls, CaptureError)):
        cls = CaptureError
    err = cls.__new__(cls)
    EnvironmentProblem.__init__(err, str(data["message"]), data.get("hint"))
    for name, value in dict(data.get("attrs") or {}).items():
        setattr(err, name, value)
    return err
