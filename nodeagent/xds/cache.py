"""The last published snapshot of each node, kept apart from any transport.

`set_snapshot` replaces a node's snapshot (already consistency-checked by
Snapshot.build) and tells every watcher which node changed; the ADS server is one
watcher. Thread-safe; nothing global.
"""

from __future__ import annotations

import threading
from typing import Callable

from nodeagent.xds.snapshot import Snapshot

Watcher = Callable[[str], None]


class SnapshotCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshots: dict[str, Snapshot] = {}
        self._watchers: list[Watcher] = []

    def set_snapshot(self, node: str, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshots[node] = snapshot
            watchers = list(self._watchers)
        for watcher in watchers:
            watcher(node)

    def get(self, node: str) -> Snapshot | None:
        with self._lock:
            return self._snapshots.get(node)

    def clear(self, node: str) -> None:
        with self._lock:
            self._snapshots.pop(node, None)

    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._snapshots)

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher(node)` after each change; returns the function that stops it."""
        with self._lock:
            self._watchers.append(watcher)

        def stop() -> None:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)
        return stop
