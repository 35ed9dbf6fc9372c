"""The kernel lab runner's cache of Python-tree images (tests/vm/pyimage.py prune): an
image is kept while the tree it was made of exists; the image of a tree since deleted (a
fresh clone's .venv: 463 MB), an image without its stamp and an interrupted mkfs's
.partial are removed, each named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "vm"))
import pyimage  # noqa: E402


def test_prune_keeps_live_images_and_removes_every_left_over(tmp_path) -> None:
    home, live = tmp_path / "python", tmp_path / "live-venv"
    home.mkdir()
    live.mkdir()
    for name, tree in (("live", live), ("gone", tmp_path / "deleted-clone" / ".venv")):
        (home / f"{name}.img").write_bytes(b"ext4")
        (home / f"{name}.json").write_text(json.dumps({"tree": str(tree), "fingerprint": [1, 2]}))
    (home / "stampless.img").write_bytes(b"ext4")
    (home / "interrupted.partial").write_bytes(b"half")
    said: list[str] = []
    pyimage.prune(home, said.append)
    assert sorted(p.name for p in home.iterdir()) == ["live.img", "live.json"]
    assert said == [f"removing the image of {tmp_path / 'deleted-clone' / '.venv'}, which is gone",
                    "removing interrupted.partial: no stamp says what it is an image of",
                    "removing stampless.img: no stamp says what it is an image of"]
