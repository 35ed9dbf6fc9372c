"""A client process for the kernel tests: joins a cgroup and a netns, connects.

Usage: connector.py '{"cgroup": DIR, "netns": PATH, "family": 2|10, "mark": N,
                      "targets": [[ip, port], ...]}'
Prints one JSON line (per target: ok, local and peer address or the error), then
holds every socket open until stdin closes, so the test can accept them first.
The cgroup is joined before any socket exists: a socket belongs to the cgroup of the
process that creates it, which decides whether the capture programs see it.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from nodeagent import netns

SO_MARK = 36


def connect(family: int, mark: int, target: list) -> tuple[socket.socket, dict]:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if mark:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    sock.settimeout(5)
    outcome = {"target": target, "ok": False, "local": None, "peer": None, "error": None}
    try:
        sock.connect(tuple(target))
        outcome.update(ok=True, local=list(sock.getsockname()[:2]), peer=list(sock.getpeername()[:2]))
    except OSError as exc:
        outcome["error"] = exc.strerror or str(exc)
    return sock, outcome


def main() -> None:
    spec = json.loads(sys.argv[1])
    with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as procs:
        procs.write("0")  # "0": the writing process
    socks, outcomes = [], []
    with netns.entered(spec["netns"]):
        for target in spec["targets"]:
            sock, outcome = connect(spec["family"], spec["mark"], target)
            socks.append(sock)
            outcomes.append(outcome)
    print(json.dumps(outcomes), flush=True)
    sys.stdin.read()


if __name__ == "__main__":
    main()
