"""What stands in for a container's image in the lab: this machine's installation.

The lab ignores images and runs a container's command where the machine has it: the
project's interpreter (`sys.base_prefix`, e.g. a pyenv Python under /root), its venv
(`sys.prefix`) and the project tree (the package, `bpf/`, the native engine). A
container with a non-root `runAsUser` (the CA's Deployment runs as 65532) must be able
to reach them, as an image's user can reach its image's files; but /root is 0700 and a
CI clone may sit under a 0700 directory. So, in the container's own mount namespace
only and before its volumes, each topmost directory the user cannot traverse on the way
to one of them is covered by an empty tmpfs (0755) in which just the installation's
subtrees are bind-mounted back at their own paths (staged through an empty directory of
the pod first, since the tmpfs hides them); nothing else of that directory is visible,
and nothing on the machine is chmod'ed or mounted. An installation directory the user
cannot read itself (a clone in a 0700 `mktemp -d`, as CI makes) is covered the same way
and every entry of it brought back (directories and files bound, symbolic links made
again), so the tree keeps its contents and only its own mode changes, to 0755. One under
an ancestor the user cannot traverse either is named in the pod's Warning event.
`blocked` and `mount_steps` are pure (the lookup of modes is passed in).
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from dataclasses import dataclass
from typing import Callable

import nodeagent

TMPFS_SOURCE = "nodeagent-image"  # the tmpfs's name in the container's mount table


@dataclass(frozen=True)
class View:
    """A container's image view: its mount steps, the directories they cover (a volume
    source below one is hidden once they ran) and what the pod's Warning event says."""

    steps: tuple[str, ...] = ()
    covers: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def installation() -> tuple[str, ...]:
    """The paths a lab container's command needs, as absolute real paths, outer ones only."""
    project = os.path.dirname(os.path.dirname(os.path.abspath(nodeagent.__file__)))
    return outermost([os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, project)])


def outermost(paths: list[str]) -> tuple[str, ...]:
    """`paths` without duplicates and without those inside another, sorted."""
    out: list[str] = []
    for path in sorted(set(paths)):
        if not any(path == p or path.startswith(p.rstrip("/") + "/") for p in out):
            out.append(path)
    return tuple(out)


def may(st: os.stat_result, uid: int, gids: frozenset[int], bits: int) -> bool:
    """Whether user `uid` with groups `gids` has the permission `bits` (r=4, x=1) on it."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid in gids:
        shift = 3
    else:
        shift = 0
    return (stat.S_IMODE(st.st_mode) >> shift) & bits == bits


def blocked(paths: tuple[str, ...], uid: int, gids: frozenset[int],
            lookup: Callable[[str], os.stat_result] = os.stat) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """({topmost ancestor `uid` cannot traverse: the paths below it to bring back, or an
    installation path it cannot read and traverse itself: (that path,), meaning all its
    entries}, the paths `uid` can reach neither way)."""
    cover: dict[str, list[str]] = {}
    unreadable = []
    for path in paths:
        parts = [p for p in path.split("/") if p]
        ancestors = ["/" + "/".join(parts[:n]) for n in range(len(parts))]
        ancestor = next((a for a in ancestors if not may(lookup(a), uid, gids, 1)), None)
        readable = may(lookup(path), uid, gids, 5)
        if ancestor is not None:
            cover.setdefault(ancestor, []).append(path)
            if not readable:
                unreadable.append(path)
        elif not readable:
            cover[path] = [path]
    return {a: tuple(sorted(p)) for a, p in sorted(cover.items())}, unreadable


def mount_steps(cover: dict[str, tuple[str, ...]], stage: str, read_only: bool = False) -> list[str]:
    """Shell steps (run as root in the container's mount namespace) making `cover`: each
    path is bind-mounted to `stage`/<n> (an existing empty directory), its ancestor
    covered by a tmpfs, the path made on it and the bind moved there; the tmpfs is
    made read-only afterwards when the container's root filesystem is. A path covering
    itself ((path,)) is bound to its stage whole, covered, and each entry of the staged
    copy brought back at run time."""
    steps, n = [], 0
    for ancestor, paths in cover.items():
        if paths == (ancestor,):
            spot, where = os.path.join(stage, str(n)), shlex.quote(ancestor)
            n += 1
            steps.append(f"mount -n --rbind {where} {shlex.quote(spot)}")
            steps.append(f"mount -n -t tmpfs -o mode=0755 {TMPFS_SOURCE} {where}")
            steps.append(f"(umask 022 && for e in {shlex.quote(spot)}/* {shlex.quote(spot)}/.[!.]* "
                         f"{shlex.quote(spot)}/..?*; do [ -e \"$e\" ] || [ -L \"$e\" ] || continue; "
                         f"t={where}/\"${{e##*/}}\"; "
                         f"if [ -L \"$e\" ]; then ln -s \"$(readlink \"$e\")\" \"$t\"; "
                         f"elif [ -d \"$e\" ]; then mkdir \"$t\" && mount -n --rbind \"$e\" \"$t\"; "
                         f"else : > \"$t\" && mount -n --bind \"$e\" \"$t\"; fi || exit 1; done)")
            if read_only:
                steps.append(f"mount -n -o remount,ro {where}")
            continue
        staged = []
        for path in paths:
            spot = os.path.join(stage, str(n))
            steps.append(f"mount -n --rbind {shlex.quote(path)} {shlex.quote(spot)}")
            staged.append((spot, path))
            n += 1
        steps.append(f"mount -n -t tmpfs -o mode=0755 {TMPFS_SOURCE} {shlex.quote(ancestor)}")
        for spot, path in staged:
            steps.append(f"(umask 022 && mkdir -p {shlex.quote(path)})")
            steps.append(f"mount -n --move {shlex.quote(spot)} {shlex.quote(path)}")
        if read_only:
            steps.append(f"mount -n -o remount,ro {shlex.quote(ancestor)}")
    return steps


def stage_count(cover: dict[str, tuple[str, ...]]) -> int:
    """How many staging directories `mount_steps` uses (stage/0 … stage/n-1)."""
    return sum(len(paths) for paths in cover.values())
