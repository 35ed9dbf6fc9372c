"""The `files` source: a directory of Kubernetes-shaped YAML, watched for changes.

The lab writes its state here; an operator can point an agent at any directory (like
ztunnel's local config file). Every `*.yaml`/`*.yml`/`*.json` file below the directory
is read. A file that fails to parse is reported once per change and its last good
objects stay in force, so a half-written or broken file never replaces good state.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nodeagent.errors import ConfigError
from nodeagent.kube.objects import KubeObject, parse_documents
from nodeagent.model import Model

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass
class _FileState:
    stamp: tuple[int, int]  # (mtime_ns, size) of the last read
    objects: list[KubeObject]  # last good objects of this file
    error: str | None = None


class FilesSource:
    """Poll a directory; `poll()` returns a new Model when anything changed, else None."""

    def __init__(self, directory: str | os.PathLike, log: logging.Logger | None = None,
                 on_error: Callable[[ConfigError], None] | None = None):
        self.directory = Path(directory)
        self.log = log or logging.getLogger("nodeagent.sources.files")
        self.on_error = on_error
        self._files: dict[Path, _FileState] = {}
        self.errors: dict[str, str] = {}  # file -> current error, for status output

    def _scan(self) -> dict[Path, tuple[int, int]]:
        found = {}
        if not self.directory.is_dir():
            return found
        for root, dirs, files in os.walk(self.directory):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                if name.startswith(".") or not name.endswith(SUFFIXES):
                    continue
                path = Path(root) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                found[path] = (st.st_mtime_ns, st.st_size)
        return found

    def poll(self) -> Model | None:
        found = self._scan()
        changed = found.keys() != self._files.keys()
        for path in list(self._files):
            if path not in found:
                del self._files[path]
                self.errors.pop(str(path), None)
        for path, stamp in found.items():
            state = self._files.get(path)
            if state is not None and state.stamp == stamp:
                continue
            changed = True
            previous = state.objects if state else []
            try:
                objects = parse_documents(path.read_text(), str(path.relative_to(self.directory)))
            except (ConfigError, OSError, UnicodeDecodeError) as exc:
                message = str(exc)
                self.errors[str(path)] = message
                self.log.error("ignoring %s, keeping its last good objects: %s", path, message)
                if self.on_error and isinstance(exc, ConfigError):
                    self.on_error(exc)
                self._files[path] = _FileState(stamp, previous, message)
                continue
            self.errors.pop(str(path), None)
            self._files[path] = _FileState(stamp, objects)
        if not changed:
            return None
        return self.model()

    def model(self) -> Model:
        objects: list[KubeObject] = []
        for path in sorted(self._files):
            objects.extend(self._files[path].objects)
        return Model.build(objects)
