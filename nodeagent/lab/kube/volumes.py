"""Pod volumes of the lab's API pods (`--kube`), made as kubelet makes them.

A Pod's volumes are materialised under `kube/pods/<uid>/volumes/<name>/` before its
containers start: configMap, secret (data decoded), downwardAPI and projected volumes
(configMap, secret, downwardAPI and serviceAccountToken sources) are written as
kubelet's atomic writer writes them (the files in a `..<time>` directory, `..data` a
symlink to it, each top-level name a symlink through `..data`), so a new version,
such as a refreshed token, replaces the whole set with one rename and a reader never
sees a partial file. emptyDir is a directory of the pod (also `medium: Memory`: a tmpfs
would have to be mounted on the machine or be private to one container); hostPath is
the machine's path, checked or created as its `type` says. Other kinds
(persistentVolumeClaim, csi, nfs…) are refused by name.

Each container gets a mount plan (`container_mounts`): bind mounts of those directories,
files or subPaths at its `volumeMounts[].mountPath`, read-only where asked and always for
configMap/secret/downwardAPI/projected, parents before children. The plan runs as a
shell script in the container's private mount namespace just before its command
(`mount_script`), so the machine's mount table never changes. A mount point missing on
the machine must be created there (an empty directory or file); the lab records every
path it creates, and which pods of which labs use it, in one ledger shared by the labs
of the machine (`run_root/.mountpoints.json`, under an flock of `run_root`), and removes
it when its last pod goes, or at `lab down` (`release`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import re
import shlex
import shutil
import stat
import time
from dataclasses import dataclass
from decimal import Decimal
from typing import Callable

from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.lab import expansion

# Kinds the lab makes; any other key of a volume is a kind it does not implement.
KINDS = ("configMap", "secret", "downwardAPI", "projected", "emptyDir", "hostPath")
WRITTEN = ("configMap", "secret", "downwardAPI", "projected")  # atomic-writer volumes, always read-only
PROJECTED_SOURCES = ("configMap", "secret", "downwardAPI", "serviceAccountToken")
DEFAULT_MODE = 0o644  # kubelet's defaultMode (420)
DATA = "..data"
LEDGER = ".mountpoints.json"
HOST_PATH_TYPES = ("", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice",
                   "BlockDevice")
# kubelet's token manager: refresh past 80% of a token's life, or 24 h after it was issued.
REFRESH_AT = 0.8
MAX_TTL = 24 * 3600
RESYNC = 60.0  # seconds between re-reads of a running pod's written volumes (kubelet: about a minute)


class NotReady(NodeagentError):
    """A volume cannot be set up yet (a missing ConfigMap or Secret, a hostPath whose type
    check fails): the pod waits in ContainerCreating and is tried again, as kubelet does."""

    def __init__(self, volume: str, why: str):
        super().__init__(f'MountVolume.SetUp failed for volume "{volume}" : {why}')


@dataclass(frozen=True)
class Mount:
    """One bind mount of a container: `source` on the machine at `target` in the container."""

    source: str
    target: str
    read_only: bool


@dataclass
class Token:
    """A service-account token the node requested, as the TokenRequest answered."""

    value: str
    expires: dt.datetime  # status.expirationTimestamp
    seconds: int  # spec.expirationSeconds asked for


def needs_refresh(token: Token, now: dt.datetime) -> bool:
    """kubelet's rule (token manager, without its jitter): a token is renewed once 80% of
    its requested life has passed, or 24 h after it was issued, whichever comes first."""
    issued = token.expires - dt.timedelta(seconds=token.seconds)
    if now >= issued + dt.timedelta(seconds=MAX_TTL):
        return True
    return now >= issued + dt.timedelta(seconds=token.seconds * REFRESH_AT)


# --- checking a pod's volumes ------------------------------------------------------------
def kind_of(volume: dict) -> str:
    """The volume's kind, or ConfigError naming the kind the lab does not implement."""
    name = volume.get("name", "")
    kinds = [k for k in volume if k != "name"]
    if len(kinds) != 1:
        raise ConfigError(f"volume {name}", f"has {len(kinds)} volume sources ({', '.join(kinds) or 'none'})",
                          "a volume has exactly one")
    kind = kinds[0]
    if kind not in KINDS:
        raise ConfigError(f"volume {name}", f"the lab does not implement {kind} volumes",
                          f"it implements {', '.join(KINDS)}")
    if kind == "projected":
        for i, source in enumerate(volume[kind].get("sources") or []):
            other = [k for k in source if k not in PROJECTED_SOURCES]
            if other:
                raise ConfigError(f"volume {name} projected.sources[{i}]",
                                  f"the lab does not implement {other[0]} sources",
                                  f"it implements {', '.join(PROJECTED_SOURCES)}")
    if kind == "hostPath" and volume[kind].get("type", "") not in HOST_PATH_TYPES:
        raise ConfigError(f"volume {name} hostPath.type", f"unknown type {volume[kind].get('type')!r}",
                          "one of " + ", ".join(t or '""' for t in HOST_PATH_TYPES))
    return kind


def check(item: dict) -> None:
    """ConfigError for any volume the lab cannot make or any mount of a volume the pod lacks."""
    spec = item.get("spec", {})
    names = {v.get("name"): kind_of(v) for v in spec.get("volumes") or []}
    for container in spec.get("initContainers") or []:
        if container.get("volumeMounts"):
            raise ConfigError(f"init container {container.get('name')}", "the lab does not run init containers")
    for container in spec.get("containers") or []:
        for i, vm in enumerate(container.get("volumeMounts") or []):
            where = f"container {container.get('name')} volumeMounts[{i}]"
            if vm.get("name") not in names:
                raise ConfigError(where, f"no volume named {vm.get('name')!r}")
            if not str(vm.get("mountPath", "")).startswith("/"):
                raise ConfigError(f"{where}.mountPath", f"{vm.get('mountPath')!r} is not an absolute path")
            if vm.get("mountPropagation") == "Bidirectional":
                raise ConfigError(f"{where}.mountPropagation", "the lab does not propagate a container's mounts "
                                  "back to the machine", "drop mountPropagation (HostToContainer is what it gives)")


# --- quantities and the downward API -------------------------------------------------------
_QUANTITY = re.compile(r"^([+-]?[0-9]*\.?[0-9]+)(?:[eE]([+-]?[0-9]+))?(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?\Z")
_SUFFIXES = {None: Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
             "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9, "T": Decimal(10) ** 12,
             "P": Decimal(10) ** 15, "E": Decimal(10) ** 18, "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20,
             "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60}


def quantity(text: str | int | float, where: str) -> Decimal:
    """A Kubernetes resource quantity ("500m", "128Mi", "1e3") as a number."""
    match = _QUANTITY.match(str(text).strip())
    if not match:
        raise ConfigError(where, f"{text!r} is not a resource quantity")
    number, exponent, suffix = match.groups()
    return Decimal(number) * (Decimal(10) ** int(exponent or 0)) * _SUFFIXES[suffix]


def resource_value(item: dict, container: str, resource: str, divisor: str | None,
                   allocatable: Callable[[], dict]) -> str:
    """What kubelet gives a resourceFieldRef: the container's limit (the node's allocatable
    when it has none) or request, divided by `divisor` and rounded up, as an integer."""
    where = f"container {container} resourceFieldRef {resource}"
    found = next((c for c in item["spec"].get("containers", []) if c.get("name") == container), None)
    if found is None:
        raise ConfigError(where, f"the pod has no container {container!r}")
    section, _, name = resource.partition(".")
    if section not in ("limits", "requests") or name not in ("cpu", "memory", "ephemeral-storage"):
        raise ConfigError(where, "the lab resolves limits/requests.cpu, .memory and .ephemeral-storage")
    value = (found.get("resources") or {}).get(section, {}).get(name)
    if value is None and section == "limits":
        value = allocatable().get(name, "0")
    amount = quantity(value if value is not None else "0", where)
    per = quantity(divisor or "1", f"{where} divisor") or Decimal(1)  # the API defaults it to 0: kubelet reads 1
    if per < 0:
        raise ConfigError(f"{where} divisor", f"{divisor!r} must be positive")
    if name == "cpu":  # kubelet: ceil(milli / divisor's milli)
        return str(math.ceil(Decimal(math.ceil(amount * 1000)) / Decimal(math.ceil(per * 1000))))
    return str(math.ceil(math.ceil(amount) / math.ceil(per)))


def _format_map(values: dict) -> str:
    """kubelet's form of labels/annotations in a file: `key="value"` lines, sorted."""
    return "\n".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(values.items()))


def field_value(item: dict, path: str, fields: dict[str, str]) -> str:
    """A fieldRef's value: `fields` (the pod's own: name, IP…), or labels and annotations."""
    meta = item["metadata"]
    if path in fields:
        return fields[path]
    for where in ("labels", "annotations"):
        if path == f"metadata.{where}":
            return _format_map(meta.get(where) or {})
        prefix = f"metadata.{where}['"
        if path.startswith(prefix) and path.endswith("']"):
            return (meta.get(where) or {}).get(path[len(prefix):-2], "")
    raise ConfigError(f"fieldRef {path}", "not a field the lab resolves",
                      f"it resolves {', '.join(sorted(fields))}, metadata.labels/annotations and keys of them")


# --- what a written volume holds ---------------------------------------------------------------
Reader = Callable[[str, str], "dict[str, bytes] | None"]  # (configmap|secret, name) -> data, None: absent
TokenFn = Callable[[str, int], Token]  # (audience, expirationSeconds) -> a new token
HostView = Callable[[str], str]  # a hostPath's path -> that path on the pod's node


@dataclass
class Inputs:
    """What a pod's written volumes are made from (all reads go through these)."""

    item: dict
    fields: dict[str, str]  # the pod's downward-API values (see processes.pod_fields)
    read: Reader
    request_token: TokenFn
    allocatable: Callable[[], dict]


def decode_data(kind: str, obj: dict) -> dict[str, bytes]:
    """A ConfigMap's (data and binaryData) or a Secret's data, as the bytes of each key."""
    out = {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}
    for key, value in (obj.get("data") or {}).items():
        out[key] = base64.b64decode(value) if kind == "secret" else value.encode()
    return out


def _mode(value, where: str, default: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ConfigError(where, f"{value!r} is not a file mode between 0 and 0777 (decimal 511)")
    return value


def _keyed(kind: str, ref: dict, where: str, volume: str, inputs: Inputs, default_mode: int,
           cache: dict) -> dict[str, tuple[bytes, int]]:
    """The files of a configMap or secret (volume or projected source)."""
    name = ref.get("secretName" if kind == "secret" and "secretName" in ref else "name", "")
    key = (kind, name)
    if key not in cache:
        cache[key] = inputs.read(kind, name)
    data = cache[key]
    if data is None:
        if ref.get("optional"):
            return {}
        raise NotReady(volume, f'{kind.lower()} "{name}" not found')
    items = ref.get("items")
    if not items:
        return {k: (v, default_mode) for k, v in data.items()}
    out = {}
    for i, entry in enumerate(items):
        if entry.get("key") not in data:
            if ref.get("optional"):
                continue
            raise NotReady(volume, f"{kind.lower()} references non-existent config key: {entry.get('key')}")
        out[entry.get("path") or entry["key"]] = (data[entry["key"]],
                                                  _mode(entry.get("mode"), f"{where}.items[{i}].mode", default_mode))
    return out


def _downward(items: list, where: str, inputs: Inputs, default_mode: int) -> dict[str, tuple[bytes, int]]:
    out = {}
    for i, entry in enumerate(items or []):
        if "fieldRef" in entry:
            value = field_value(inputs.item, entry["fieldRef"].get("fieldPath", ""), inputs.fields)
        elif "resourceFieldRef" in entry:
            ref = entry["resourceFieldRef"]
            value = resource_value(inputs.item, ref.get("containerName", ""), ref.get("resource", ""),
                                   ref.get("divisor"), inputs.allocatable)
        else:
            raise ConfigError(f"{where}.items[{i}]", "needs fieldRef or resourceFieldRef")
        out[entry.get("path", "")] = (value.encode(), _mode(entry.get("mode"), f"{where}.items[{i}].mode",
                                                            default_mode))
    return out


def payload(volume: dict, inputs: Inputs, tokens: dict, now: dt.datetime) -> dict[str, tuple[bytes, int]]:
    """The files (relative path -> (bytes, mode)) of one written volume. `tokens` holds the
    tokens already requested for it, by projected source index; one is requested when
    missing or due for refresh (`needs_refresh`)."""
    name, kind = volume["name"], kind_of(volume)
    body, where = volume[kind], f"volume {volume['name']}"
    default = _mode(body.get("defaultMode"), f"{where}.defaultMode", DEFAULT_MODE)
    cache: dict = {}
    if kind in ("configMap", "secret"):
        return _keyed(kind, body, f"{where}.{kind}", name, inputs, default, cache)
    if kind == "downwardAPI":
        return _downward(body.get("items"), f"{where}.downwardAPI", inputs, default)
    out: dict[str, tuple[bytes, int]] = {}
    for i, source in enumerate(body.get("sources") or []):
        at = f"{where}.projected.sources[{i}]"
        if "configMap" in source or "secret" in source:
            kind = "configMap" if "configMap" in source else "secret"
            out.update(_keyed(kind, source[kind], f"{at}.{kind}", name, inputs, default, cache))
        elif "downwardAPI" in source:
            out.update(_downward(source["downwardAPI"].get("items"), f"{at}.downwardAPI", inputs, default))
        elif "serviceAccountToken" in source:
            sat = source["serviceAccountToken"]
            token = tokens.get(i)
            if token is None or needs_refresh(token, now):
                token = tokens[i] = inputs.request_token(sat.get("audience", ""),
                                                         int(sat.get("expirationSeconds") or 3600))
            out[sat.get("path", "token")] = (token.value.encode(), default)
    return out


# --- kubelet's atomic writer -------------------------------------------------------------------
def _check_path(path: str, volume: str) -> None:
    parts = path.split("/")
    if not path or path.startswith("/") or ".." in parts or parts[0].startswith(".."):
        raise ConfigError(f"volume {volume} path {path!r}", "must be relative, without '..' and not start with '..'")


def current(directory: str) -> dict[str, tuple[bytes, int]]:
    """What the volume at `directory` holds now (through `..data`)."""
    top = os.path.join(directory, DATA)
    out = {}
    if not os.path.isdir(top):
        return out
    for root, _, names in os.walk(top):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, top)] = (f.read(), stat.S_IMODE(os.stat(path).st_mode))
    return out


def write_atomically(directory: str, files: dict[str, tuple[bytes, int]], volume: str = "") -> bool:
    """Make `directory` hold exactly `files`; False when it already did. The new files are
    written in a fresh `..<time>` directory and `..data` is renamed to point at it, so a
    reader sees the old set or the new one, never a mix or a partial file."""
    for path in files:
        _check_path(path, volume)
    if os.path.isdir(os.path.join(directory, DATA)) and current(directory) == files:
        return False
    os.makedirs(directory, mode=0o755, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("..%Y_%m_%d_%H_%M_%S.") + f"{time.monotonic_ns() % 10**9:09d}"
    fresh = os.path.join(directory, stamp)
    os.mkdir(fresh, 0o755)
    for path, (data, mode) in files.items():
        target = os.path.join(fresh, path)
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
    old = os.readlink(os.path.join(directory, DATA)) if os.path.islink(os.path.join(directory, DATA)) else None
    link = os.path.join(directory, DATA + "_tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    os.symlink(stamp, link)
    os.rename(link, os.path.join(directory, DATA))
    tops = {p.split("/")[0] for p in files}
    for name in os.listdir(directory):
        if not name.startswith("..") and name not in tops and os.path.islink(os.path.join(directory, name)):
            os.unlink(os.path.join(directory, name))
    for name in tops:
        if not os.path.lexists(os.path.join(directory, name)):
            os.symlink(os.path.join(DATA, name), os.path.join(directory, name))
    if old and old != stamp:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    return True


# --- setting up a pod's volumes ------------------------------------------------------------------
def volume_dir(pod_dir: str, name: str) -> str:
    return os.path.join(pod_dir, "volumes", name)


def check_host_path(volume: str, path: str, kind: str) -> list[str]:
    """kubelet's hostPath type check; the paths it created (…OrCreate), parents first."""
    exists = os.path.lexists(path)
    if kind == "DirectoryOrCreate" and not exists:
        made, head = [], path
        while not os.path.lexists(head):
            made.insert(0, head)
            head = os.path.dirname(head)
        os.makedirs(path, mode=0o755)
        return made
    if kind == "FileOrCreate" and not exists:
        if not os.path.isdir(os.path.dirname(path)):
            raise NotReady(volume, f"hostPath type check failed: {os.path.dirname(path)} is not a directory")
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        return [path]
    tests = {"Directory": (stat.S_ISDIR, "a directory"), "DirectoryOrCreate": (stat.S_ISDIR, "a directory"),
             "File": (stat.S_ISREG, "a file"), "FileOrCreate": (stat.S_ISREG, "a file"),
             "Socket": (stat.S_ISSOCK, "a socket"), "CharDevice": (stat.S_ISCHR, "a character device"),
             "BlockDevice": (stat.S_ISBLK, "a block device")}
    if kind in tests:
        test, what = tests[kind]
        if not exists or not test(os.stat(path).st_mode):
            raise NotReady(volume, f"hostPath type check failed: {path} is not {what}")
    return []


class PodVolumes:
    """The volumes of one pod: made by `set_up`, kept current by `resync` (a new token when
    one is due, the ConfigMaps' and Secrets' latest data), sources of its mounts."""

    def __init__(self, item: dict, pod_dir: str, inputs: Inputs, host_view: HostView = str):
        """`host_view`: what a hostPath's path is on the pod's node (kube/nodeview.py)."""
        self.item, self.pod_dir, self.inputs, self.host_view = item, pod_dir, inputs, host_view
        self.volumes = {v["name"]: v for v in item["spec"].get("volumes") or []}
        self.tokens: dict[str, dict[int, Token]] = {}
        self.created: list[str] = []  # hostPaths this pod's set-up created (…OrCreate)
        self.synced = 0.0

    def set_up(self, now: dt.datetime, monotonic: float) -> None:
        """Make every volume; NotReady (pod waits) or ConfigError (pod refused)."""
        for name, volume in self.volumes.items():
            kind = kind_of(volume)
            if kind in WRITTEN:
                continue
            if kind == "emptyDir":
                path = volume_dir(self.pod_dir, name)
                os.makedirs(path, exist_ok=True)
                os.chmod(path, 0o777)  # as kubelet makes it: any user of the pod may write
            else:
                body = volume["hostPath"]
                path = body.get("path", "")
                if not path.startswith("/"):
                    raise ConfigError(f"volume {name} hostPath.path", f"{path!r} is not an absolute path")
                self.created += check_host_path(name, self.host_view(path), body.get("type", ""))
        self.resync(now, monotonic, force=True)

    def due(self, now: dt.datetime, monotonic: float) -> bool:
        if monotonic - self.synced >= RESYNC:
            return True
        return any(needs_refresh(t, now) for ts in self.tokens.values() for t in ts.values())

    def resync(self, now: dt.datetime, monotonic: float, force: bool = False) -> list[str]:
        """Rewrite the written volumes whose content changed; the names of those rewritten.
        When not forced (a running pod), a volume whose source is gone keeps its files."""
        changed = []
        for name, volume in self.volumes.items():
            if kind_of(volume) not in WRITTEN:
                continue
            tokens = self.tokens.setdefault(name, {})
            try:
                files = payload(volume, self.inputs, tokens, now)
            except NotReady:
                if force:
                    raise
                continue
            if write_atomically(volume_dir(self.pod_dir, name), files, name):
                changed.append(name)
        self.synced = monotonic
        return changed


# --- mounts of a container ----------------------------------------------------------------------
def _sub_path_expr(text: str, env: dict[str, str], volume: str) -> str:
    """kubelet's ExpandContainerVolumeMounts: a variable not set (or empty) is an error."""
    missing = sorted({n for n in expansion.references(text) if not env.get(n)})
    if missing:
        raise ConfigError(f"volume {volume} subPathExpr {text!r}", f"missing value for {', '.join(missing)}")
    return expansion.expand(text, env)


def container_mounts(item: dict, container: str, pod_dir: str, env: dict[str, str],
                     host_view: HostView = str) -> list[Mount]:
    """The container's bind mounts, parents first (as container runtimes order them).
    subPath (or subPathExpr, expanded with `env` as kubelet expands it) mounts that part
    of the volume; a missing one is made as a directory, as kubelet does. A hostPath is
    `host_view(path)`: the path on the pod's node."""
    spec = item["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    found = next((c for c in spec.get("containers", []) if c.get("name") == container), {})
    mounts = []
    for i, vm in enumerate(found.get("volumeMounts") or []):
        volume = volumes[vm["name"]]
        kind = kind_of(volume)
        base = host_view(volume["hostPath"]["path"]) if kind == "hostPath" else volume_dir(pod_dir, vm["name"])
        sub = _sub_path_expr(vm["subPathExpr"], env, vm["name"]) if vm.get("subPathExpr") else vm.get("subPath", "")
        source = base
        if sub:
            _check_path(sub, vm["name"])
            source = os.path.join(base, sub)
            if not os.path.lexists(source):
                if kind in WRITTEN:
                    raise NotReady(vm["name"], f"subPath {sub!r} is not in the volume")
                os.makedirs(source, mode=0o755)
        target = os.path.normpath(vm["mountPath"])
        mounts.append(Mount(source, target, bool(vm.get("readOnly")) or kind in WRITTEN))
    return ordered(mounts)


def ordered(mounts: list[Mount]) -> list[Mount]:
    """`mounts` parents first (by depth, stable), as container runtimes order them."""
    return sorted(mounts, key=lambda m: len([p for p in m.target.split("/") if p]))


def mount_points(mounts: list[Mount]) -> list[tuple[str, bool]]:
    """(path on the machine, is a directory) that must exist for each mount: the target,
    or, below an earlier mount of the same container, the matching path in its source."""
    out = []
    for n, mount in enumerate(mounts):
        path = mount.target
        for parent in reversed(mounts[:n]):
            if path.startswith(parent.target.rstrip("/") + "/"):
                path = os.path.join(parent.source, os.path.relpath(path, parent.target))
                break
        out.append((path, os.path.isdir(mount.source)))
    return out


FIRST_FD, LAST_FD = 3, 9  # the descriptors sh (dash) can open by number


def _inside(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def mount_script(mounts: list[Mount], read_only_root: bool = False, before: list[str] = (),
                 covers: tuple[str, ...] = ()) -> str:
    """Shell commands making `mounts` in the (private) mount namespace they run in
    (`before`: steps run first, after the root is made read-only — the pod netns's
    sysfs, /dev/shm, the image view —, which mount over the directories `covers`).
    A source that `before` or an earlier mount of the container hides (the machine's
    /sys/fs/cgroup below a pod's sysfs; the pod's own directory under /run/nodeagent/<lab>/
    when a volume is mounted at /run/nodeagent) is opened before any mount and bound
    from its descriptor, as a runtime resolves every source on the machine, not in the
    container; the descriptors are closed before the command."""
    hidden = [n for n, m in enumerate(mounts)
              if any(_inside(m.source, top) for top in (*covers, *(p.target for p in mounts[:n])))]
    if len(hidden) > LAST_FD - FIRST_FD + 1:
        raise ConfigError(f"volume mounts at {', '.join(mounts[n].target for n in hidden)}",
                          f"the lab can mount at most {LAST_FD - FIRST_FD + 1} volumes from below another "
                          "mount of the same container")
    fds = {n: FIRST_FD + i for i, n in enumerate(hidden)}
    steps = ["mount -o remount,bind,ro /"] if read_only_root else []
    if fds:
        steps.append("exec " + " ".join(f"{fd}<{shlex.quote(mounts[n].source)}" for n, fd in fds.items()))
    steps += before
    for n, m in enumerate(mounts):
        if n in fds:  # -c: mount(8) must not resolve the link to the (hidden) path
            steps.append(f"mount -c --bind /proc/self/fd/{fds[n]} {shlex.quote(m.target)}")
        else:
            steps.append(f"mount --bind {shlex.quote(m.source)} {shlex.quote(m.target)}")
        if m.read_only:
            steps.append(f"mount -o remount,bind,ro {shlex.quote(m.target)}")
    if fds:
        steps.append("exec " + " ".join(f"{fd}<&-" for fd in fds.values()))
    return " && ".join(steps)


# --- mount points on the machine, shared by every lab ---------------------------------------------
@contextlib.contextmanager
def _ledger(run_root: str):
    os.makedirs(run_root, mode=0o755, exist_ok=True)
    fd = os.open(run_root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = os.path.join(run_root, LEDGER)
        try:
            with open(path) as f:
                paths = json.load(f)
        except FileNotFoundError:
            paths = {}
        yield paths
        if paths:
            with open(path + ".tmp", "w") as f:
                json.dump(paths, f, indent=1, sort_keys=True)
            os.rename(path + ".tmp", path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


def _real(path: str) -> str:
    """`path` with its existing part resolved (/var/run/x -> /run/x), so labs agree on names."""
    head, tail = path, []
    while not os.path.exists(head) and head != "/":
        head, name = os.path.split(head)
        tail.insert(0, name)
    return os.path.join(os.path.realpath(head), *tail)


def claim(run_root: str, user: str, points: list[tuple[str, bool]], created: list[str] = ()) -> None:
    """Make each missing mount point (directories, or an empty file), noting it and every
    parent made for it, with `user` ("<lab>:<pod uid>"), in the ledger; note hostPaths the
    pod's set-up `created` the same way (their content is the pod's)."""
    with _ledger(run_root) as paths:
        for path in created:
            entry = paths.setdefault(_real(path), {"users": [], "content": True})
            entry["users"] = sorted(set(entry["users"]) | {user})
        for path, is_dir in points:  # (a created hostPath's own subPath is no mount point)
            path = _real(path)
            made, head = [], path
            while not os.path.lexists(head):
                made.insert(0, head)
                head = os.path.dirname(head)
            for n, step in enumerate(made):
                if n < len(made) - 1 or is_dir:
                    os.mkdir(step, 0o755)
                else:
                    os.close(os.open(step, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            for step in made + ([path] if path in paths else []):
                entry = paths.setdefault(step, {"users": [], "content": False})
                entry["users"] = sorted(set(entry["users"]) | {user})


def release(run_root: str, user: str, final: bool = False) -> list[str]:
    """Drop `user` (or with final, every user starting with it: a lab going down) from the
    ledger and remove what no one uses any more, deepest first: mount points only while
    empty (one holding another pod's mount point stays for whoever releases that one);
    created hostPaths while empty, or whatever they hold when `final`. Returns the
    created hostPaths a final release could not remove."""
    left = []
    if not os.path.isdir(run_root):
        return left
    with _ledger(run_root) as paths:
        for path in sorted(paths, key=lambda p: -p.count("/")):
            entry = paths[path]
            users = [u for u in entry["users"] if not (u == user or (final and u.startswith(user)))]
            if users:
                entry["users"] = users
                continue
            if not entry["content"]:
                entry["users"] = []  # an empty mount point: whoever releases next may remove it
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    if final and entry["content"]:
                        shutil.rmtree(path)
                    else:
                        os.rmdir(path)
                elif os.path.lexists(path):
                    if os.path.getsize(path) and not (final and entry["content"]):
                        raise OSError("not empty")
                    os.unlink(path)
                del paths[path]
            except OSError:
                if not entry["content"]:
                    continue  # another pod's mount point is below it: removed after that one
                if final:
                    left.append(path)
                    del paths[path]  # the lab is gone: no one would ever remove it
                else:
                    entry["users"] = [user]  # kept for its lab's `lab down`
    return left
