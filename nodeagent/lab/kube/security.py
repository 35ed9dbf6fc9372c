"""What of a Pod's securityContext the lab's kubelet (`--kube`) gives its containers.

Lab containers are processes of the machine: they share its PID and IPC namespaces
(hostPID always holds, shareProcessNamespace too, and hostIPC but for /dev/shm: without
hostIPC a container gets an empty tmpfs there, as runtimes give each pod one, so no two
pods' Envoys meet in one shared-memory file) and start as root with every capability
(privileged). On top of that, with setpriv after the container's mounts:
`capabilities` (add/drop as container runtimes apply them to the bounding set, unless
privileged), `runAsUser`/`runAsGroup`/`supplementalGroups`, `allowPrivilegeEscalation:
false` (no_new_privs); `readOnlyRootFilesystem` remounts / read-only in the container's
mount namespace. `runAsNonRoot` without a non-zero runAsUser is refused with kubelet's
message (the lab has no image user). A non-root user reaches the machine's installation
(the lab's stand-in for the image) through `image.py`'s view. What the lab cannot give
(seccomp, AppArmor, SELinux, fsGroup, sysctls, a user namespace) is named in a Warning
event of the Pod: the container runs without it.
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass

from nodeagent.errors import ConfigError

CAPABILITY = re.compile(r"^(CAP_)?[A-Z_]+\Z")


@dataclass(frozen=True)
class Plan:
    argv: tuple[str, ...]  # prefix run just before the command (setpriv …), () = none
    read_only_root: bool
    warnings: tuple[str, ...]
    uid: int = 0  # the user the command runs as
    gids: frozenset[int] = frozenset()  # its group and supplementary groups
    own_shm: bool = True  # a /dev/shm of its own (False: hostIPC)


@functools.cache
def known_capabilities() -> frozenset[str]:
    """The capability names setpriv knows here (lower case, no CAP_)."""
    out = subprocess.run(["setpriv", "--list-caps"], capture_output=True, text=True, check=True).stdout
    return frozenset(out.split())


def _capabilities(caps: dict, where: str) -> list[str]:
    """setpriv's --bounding-set for `caps` (empty: leave all): drop ALL keeps only `add`."""
    def names(field: str) -> list[str]:
        out = []
        for raw in caps.get(field) or []:
            name = str(raw).upper().removeprefix("CAP_").lower()
            if raw != "ALL" and (not CAPABILITY.match(str(raw).upper()) or name not in known_capabilities()):
                raise ConfigError(f"{where}.capabilities.{field}", f"unknown capability {raw!r}")
            out.append("all" if str(raw).upper() == "ALL" else name)
        return out

    add, drop = names("add"), names("drop")
    if "all" in drop:
        return ["-all", *(f"+{c}" for c in add if c != "all")]
    return [f"-{c}" for c in drop if c not in add]


def _confines(value) -> bool:
    """Whether a field asks for something: a profile of type Unconfined asks for nothing."""
    return value is not None and not (isinstance(value, dict) and value.get("type") == "Unconfined")


def plan(item: dict, container: dict) -> Plan:
    """The container's securityContext as the lab applies it; ConfigError when kubelet
    would refuse it (runAsNonRoot as root, an unknown capability)."""
    spec = item.get("spec", {})
    pod_sc, sc = spec.get("securityContext") or {}, container.get("securityContext") or {}
    name = container.get("name", "")
    where = f"container {name} securityContext"
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    gid = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and not uid:
        raise ConfigError(where, f"container has runAsNonRoot and image will run as root (container: {name})",
                          "the lab runs commands as root unless runAsUser says otherwise: set runAsUser")
    argv: list[str] = []
    groups = [str(g) for g in pod_sc.get("supplementalGroups") or []]
    if uid is not None and uid != 0:
        argv += [f"--reuid={uid}", f"--regid={gid or 0}",
                 f"--groups={','.join(groups)}" if groups else "--clear-groups"]
    elif gid:
        argv += [f"--regid={gid}", "--clear-groups"]
    if sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"):
        argv.append("--no-new-privs")
    if not sc.get("privileged"):
        bounding = _capabilities(sc.get("capabilities") or {}, where)
        if bounding:
            argv.append("--bounding-set=" + ",".join(bounding))
    warnings = []
    for field in ("seccompProfile", "seLinuxOptions", "appArmorProfile", "sysctls", "fsGroup", "windowsOptions"):
        if _confines(pod_sc.get(field)):
            warnings.append(f"spec.securityContext.{field} is not applied by the lab")
    for field in ("seccompProfile", "seLinuxOptions", "appArmorProfile"):
        if _confines(sc.get(field)):
            warnings.append(f"container {name}: securityContext.{field} is not applied by the lab")
    if sc.get("procMount") not in (None, "Default", "Unmasked"):
        warnings.append(f"container {name}: securityContext.procMount is not applied by the lab")
    if spec.get("hostUsers") is False:
        warnings.append("spec.hostUsers: false: the lab has no user namespaces; the container runs as the "
                        "machine's users")
    gids = frozenset(int(g) for g in [*groups, *([gid or 0] if uid or gid else [])])
    return Plan(tuple(["setpriv", *argv, "--"]) if argv else (), bool(sc.get("readOnlyRootFilesystem")),
                tuple(warnings), int(uid or 0), gids, not spec.get("hostIPC"))
