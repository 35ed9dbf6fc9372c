"""Run CaptureLoader.load() in a fresh Python process and report, as one JSON line on
stdout, how it went and what that process had mapped afterwards.

A fresh process, because the pytest process may have imported bcc itself
(test_structs.py does): only a process that never did can show that loading leaves no
LLVM or bcc behind. Usage: fresh_loader.py '{"cgroup": ..., "pin_dir": ..., "bpf_dir": ...}'
Output: {"error": {type, message, attrs} | null, "programs": [names attached],
"llvm_or_bcc": [mapped libraries], "bcc_imported": bool, "children": [pids]}.
The loader is closed (keep=False) before exiting.
"""

from __future__ import annotations

import json
import os
import sys

from footprint import children, llvm_or_bcc
from nodeagent.capture.errors import CaptureError, to_wire
from nodeagent.capture.loader import CaptureLoader


def main() -> int:
    spec = json.loads(sys.argv[1])
    loader = CaptureLoader(cgroup=spec["cgroup"], pin_dir=spec["pin_dir"], bpf_dir=spec.get("bpf_dir"))
    error, programs = None, []
    try:
        loader.load()
        programs = sorted(p["name"] for p in loader.stats()["programs"])
    except CaptureError as exc:
        error = to_wire(exc)
    outcome = {"error": error, "programs": programs, "llvm_or_bcc": llvm_or_bcc(os.getpid()),
               "bcc_imported": "bcc" in sys.modules, "children": children(os.getpid())}
    loader.close()
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
