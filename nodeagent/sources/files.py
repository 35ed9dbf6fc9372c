"""The `files` source: a directory of Kubernetes-shaped YAML, watched for changes.

The lab writes its state here; an operator can point an agent at any directory (like
ztunnel's local config file). Every `*.yaml`/`*.yml`/`*.json` file below the directory
is read. A file that fails to parse, or holds a Pod or Service the model cannot read,
is reported once per change and its last good objects stay in force, so a half-written
or broken file never replaces good state.

A directory that cannot be read (EMFILE, EACCES, an I/O error, the directory gone after
it was read) is never an empty cluster: the scan is abandoned, every object stays as
last read, the error is reported (`errors`, `scan_error`, logged once) and the next poll
tries again. Pods leave the mesh only when their objects are read as gone.

An object without metadata.creationTimestamp gets the time this source first read it
(what an API server stamps at creation), kept while the object exists: Istio resolves
conflicts by age (the oldest VirtualService or DestinationRule for a host wins), so the
order of first appearance is the age. Objects first read in the same poll share a time
(Istio then orders them by name); after an agent restart every object is first read anew.

Change detection is by (mtime, size, inode) and, for files modified in the last
RACY_SECONDS, by content: file timestamps are coarse (a kernel tick), so a same-size
rewrite within a tick of the last read would otherwise go unseen ("racy git").
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from nodeagent.errors import ConfigError, NodeagentError
from nodeagent.kube.objects import KubeObject, ObjectKey, parse_documents
from nodeagent.model import Model, check

SUFFIXES = (".yaml", ".yml", ".json")
RACY_SECONDS = 2  # files younger than this are compared by content too

Stamp = tuple[int, int, int]  # (mtime_ns, size, inode)


@dataclass
class _FileState:
    stamp: Stamp  # of the last read
    digest: bytes  # sha256 of the content last read (b"" when it could not be read)
    objects: list[KubeObject]  # last good objects of this file
    error: str | None = None


class SourceUnreadable(NodeagentError):
    """The source directory (or a part of it) could not be listed: nothing can be concluded."""


class FilesSource:
    """Poll a directory; `poll()` returns a new Model when anything changed, else None."""

    def __init__(self, directory: str | os.PathLike, log: logging.Logger | None = None,
                 on_error: Callable[[ConfigError], None] | None = None):
        self.directory = Path(directory)
        self.log = log or logging.getLogger("nodeagent.sources.files")
        self.on_error = on_error
        self._files: dict[Path, _FileState] = {}
        self._scanned = False  # a scan has succeeded: from then on the directory must stay
        self.errors: dict[str, str] = {}  # file (or the directory) -> current error, for status output
        self.scan_error: str | None = None  # why the last scan was abandoned; None when it was read
        self._first_seen: dict[ObjectKey, str] = {}  # RFC 3339 time each object was first read

    def _scan(self) -> dict[Path, Stamp]:
        """Every YAML/JSON file below the directory with its stamp; SourceUnreadable when
        any part of it cannot be listed (a partial listing would read as deletions)."""
        found: dict[Path, Stamp] = {}
        try:
            top = os.stat(self.directory)
        except FileNotFoundError:
            if not self._scanned:
                return found  # not created yet: no cluster state so far
            raise SourceUnreadable(f"source directory {self.directory} is gone",
                                   "recreate it; the objects last read stay in force") from None
        except OSError as exc:
            raise SourceUnreadable(f"cannot read source directory {self.directory}: {exc.strerror or exc}") from None
        if not stat.S_ISDIR(top.st_mode):
            raise SourceUnreadable(f"source {self.directory} is not a directory")

        def unreadable(exc: OSError) -> None:
            raise SourceUnreadable(f"cannot list {exc.filename or self.directory}: {exc.strerror or exc}")

        for root, dirs, files in os.walk(self.directory, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if name.startswith(".") or not name.endswith(SUFFIXES):
                    continue
                path = Path(root) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # removed between the listing and the stat: it is gone
                except OSError as exc:
                    raise SourceUnreadable(f"cannot stat {path}: {exc.strerror or exc}") from None
                found[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return found

    def poll(self) -> Model | None:
        try:
            found = self._scan()
        except SourceUnreadable as exc:
            self._unreadable(str(exc))
            return None
        if self.scan_error is not None:
            self.log.info("source directory %s readable again", self.directory)
            self.errors.pop(str(self.directory), None)
            self.scan_error = None
        self._scanned = True
        changed = False
        for path in list(self._files):
            if path not in found:
                del self._files[path]
                self.errors.pop(str(path), None)
                changed = True
        racy_after = time.time_ns() - RACY_SECONDS * 1_000_000_000
        for path, stamp in found.items():
            state = self._files.get(path)
            if state is not None and state.stamp == stamp and stamp[0] < racy_after:
                continue
            changed |= self._read(path, stamp, state)
        return self.model() if changed else None

    def _unreadable(self, message: str) -> None:
        """Keep every object as last read; report the scan error (logged once per error)."""
        if message != self.scan_error:
            self.log.error("%s; keeping the %d objects last read, retrying", message,
                           sum(len(s.objects) for s in self._files.values()))
        self.scan_error = message
        self.errors[str(self.directory)] = message

    def _read(self, path: Path, stamp: Stamp, state: _FileState | None) -> bool:
        """Read one file into self._files; True when its objects changed."""
        previous = state.objects if state else []
        try:
            data = path.read_bytes()
        except OSError as exc:
            return self._refuse(path, _FileState(stamp, b"", previous), exc)
        digest = hashlib.sha256(data).digest()
        if state is not None and state.digest == digest:
            state.stamp = stamp
            return False
        try:
            # Kubernetes YAML is UTF-8 whatever the locale says.
            syntax = "json" if path.suffix == ".json" else "yaml"
            objects = parse_documents(data.decode("utf-8"), str(path.relative_to(self.directory)),
                                      syntax=syntax)
            check(objects)
        except (ConfigError, UnicodeDecodeError) as exc:
            return self._refuse(path, _FileState(stamp, digest, previous), exc)
        self.errors.pop(str(path), None)
        self._files[path] = _FileState(stamp, digest, objects)
        return True

    def _refuse(self, path: Path, state: _FileState, exc: Exception) -> bool:
        """Keep the file's last good objects and report why its new content is refused."""
        state.error = str(exc)
        self._files[path] = state
        self.errors[str(path)] = state.error
        self.log.error("ignoring %s, keeping its last good objects: %s", path, state.error)
        if self.on_error and isinstance(exc, ConfigError):
            self.on_error(exc)
        return False

    def model(self) -> Model:
        objects: list[KubeObject] = []
        for path in sorted(self._files):
            objects.extend(self._files[path].objects)
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        present = {o.key for o in objects}
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in present}
        return Model.build([self._stamped(o, now) for o in objects])

    def _stamped(self, obj: KubeObject, now: str) -> KubeObject:
        """`obj` with metadata.creationTimestamp: its own, or when this source first read it."""
        meta = obj.body.get("metadata") or {}
        if meta.get("creationTimestamp") is not None:
            return obj
        first = self._first_seen.setdefault(obj.key, now)
        return dataclasses.replace(obj, body={**obj.body, "metadata": {**meta, "creationTimestamp": first}})
