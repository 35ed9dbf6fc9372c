"""Read-only ext4 images of the Python trees the guest runs on (the interpreter the .venv
was made from, and the .venv), handed to qemu as virtio disks and mounted over their 9p
originals by tests/vm/init. Why: under TCG every 9p request costs ~4 ms (measured: a
stat of 19,428 files took 72 s in the guest, 0.08 s on the host), and importing the
agent touches thousands of files; from a block device the guest's page cache serves
them. The repository itself stays on 9p, so the guest always runs the working tree.

`mkfs.ext4 -d` fills an image from a directory without mounting anything (12 s for
the 745 MiB interpreter). An image is rebuilt when its tree changed (the mtimes of the
tree, its bin/ and its site-packages, which pip's installs and removals change) or on
--rebuild."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess


class ImageError(Exception):
    """An image could not be made; the message says which and why."""


def trees(repo: pathlib.Path) -> list[pathlib.Path]:
    """The interpreter prefix named by .venv/pyvenv.cfg ('home' is its bin/), and the .venv."""
    venv = repo / ".venv"
    home = None
    for line in (venv / "pyvenv.cfg").read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home":
            home = pathlib.Path(value.strip())
    if home is None:
        raise ImageError(f"{venv / 'pyvenv.cfg'} names no home interpreter")
    prefix = home.parent
    # A system interpreter (/usr) is too big to copy and shares its tree with everything: leave it on 9p.
    return ([prefix] if prefix != pathlib.Path("/usr") else []) + [venv]


def _fingerprint(tree: pathlib.Path) -> list[int]:
    marks = [tree, tree / "bin", *sorted(tree.glob("lib/python3*/site-packages"))]
    return [p.stat().st_mtime_ns for p in marks if p.exists()]


def _size_mib(tree: pathlib.Path) -> int:
    out = subprocess.run(["du", "-sm", str(tree)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def prune(home: pathlib.Path, say) -> None:
    """Remove the images of trees that are gone (a .venv of a clone since deleted, e.g. a
    fresh-clone test run's under /tmp): each is hundreds of MiB."""
    for stamp in sorted(home.glob("*.json")):
        try:
            tree = json.loads(stamp.read_text()).get("tree")
        except (OSError, ValueError):
            tree = None
        if tree and not os.path.isdir(tree):
            say(f"removing the image of {tree}, which is gone")
            stamp.with_suffix(".img").unlink(missing_ok=True)
            stamp.unlink(missing_ok=True)
    # An image without its stamp is never used (ensure() wants both) and a .partial is an
    # interrupted mkfs: both are left-overs (one runner per cache holds the lock).
    for orphan in sorted([*home.glob("*.partial"), *(i for i in home.glob("*.img") if not i.with_suffix(".json").exists())]):
        say(f"removing {orphan.name}: no stamp says what it is an image of")
        orphan.unlink(missing_ok=True)


def ensure(cache: pathlib.Path, tree: pathlib.Path, rebuild: bool, say) -> pathlib.Path:
    """The image of `tree` under cache/python/, made when missing, stale or asked."""
    home = cache / "python"
    home.mkdir(parents=True, exist_ok=True)
    prune(home, say)
    name = str(tree).strip("/").replace("/", "_")
    image, stamp = home / f"{name}.img", home / f"{name}.json"
    want = {"tree": str(tree), "fingerprint": _fingerprint(tree)}
    if not rebuild and image.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return image
    if shutil.which("mkfs.ext4") is None:
        raise ImageError("mkfs.ext4 not found: apt-get install e2fsprogs (or run with --no-python-images)")
    size = _size_mib(tree) * 12 // 10 + 64
    say(f"making the ext4 image of {tree} ({size} MiB) for the guest")
    partial = image.with_suffix(".partial")
    out = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "nodeagent-vm", "-E", "root_owner=0:0",
                          "-d", str(tree), str(partial), f"{size}M"], capture_output=True, text=True)
    if out.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ImageError(f"mkfs.ext4 -d {tree} failed: {out.stderr.strip()[-300:]}")
    os.replace(partial, image)
    stamp.write_text(json.dumps(want))
    return image
