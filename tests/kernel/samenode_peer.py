"""Both ends of a known exchange for the same-node fast path test (test_same_node.py),
run inside sandbox pods: stdlib only, one JSON line per connection on stdout.

  python samenode_peer.py serve PORT DOWN
      Per connection: greet with one byte ("G"), read to EOF (the client's half-close),
      then send DOWN bytes of the known pattern and close. Prints {"peer", "received",
      "sha256"}.
  python samenode_peer.py send HOST:PORT UP
      Connect, read the greeting (so the agent has joined the connection while it is
      still open both ways), send UP bytes of the known pattern, half-close, read to EOF.
      Prints {"received", "sha256", "error"} (error: null, "reset" or another errno name;
      received and sha256 after the greeting).
  python samenode_peer.py hold HOST:PORT [--reset]
      Connect, read the greeting, print "joined", then read until the connection ends
      (--reset: reset it instead, SO_LINGER 0). Prints {"received", "error"}.
  python samenode_peer.py stall PORT
      Per connection: greet, then never read; hold it until the client goes. Prints
      "listening" once.
  python samenode_peer.py flood HOST:PORT QUIET MAX
      Connect, read the greeting, then send until the connection takes nothing for QUIET
      seconds or MAX bytes went. Prints {"sent", "error"}.
"""

from __future__ import annotations

import errno
import hashlib
import json
import random
import socket
import struct
import sys

GREETING = b"G"


def pattern(size: int) -> bytes:
    """The known payload of `size` bytes (the same on every run)."""
    return random.Random(size).randbytes(size)


def _read_all(sock: socket.socket) -> tuple[bytes, str | None]:
    data = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
    except OSError as exc:
        return bytes(data), "reset" if exc.errno == errno.ECONNRESET else errno.errorcode.get(exc.errno, str(exc))
    return bytes(data), None


def serve(port: int, down: int) -> None:
    with socket.create_server(("0.0.0.0", port), backlog=16) as listener:
        print("listening", flush=True)
        while True:
            conn, peer = listener.accept()
            with conn:
                try:
                    conn.sendall(GREETING)
                except OSError:
                    pass
                data, error = _read_all(conn)
                try:
                    conn.sendall(pattern(down))
                except OSError:
                    pass
            print(json.dumps({"peer": f"{peer[0]}:{peer[1]}", "received": len(data),
                              "sha256": hashlib.sha256(data).hexdigest(), "error": error}), flush=True)


def send(host: str, port: int, up: int) -> dict:
    error = None
    data = b""
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except ConnectionResetError:  # reset as the connect completed (a refusal can be that quick)
        return {"received": 0, "sha256": hashlib.sha256(b"").hexdigest(), "error": "reset"}
    with sock:
        try:
            if sock.recv(1) != GREETING:
                return {"received": 0, "sha256": hashlib.sha256(b"").hexdigest(), "error": "no greeting"}
            sock.sendall(pattern(up))
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            error = "reset" if exc.errno in (errno.ECONNRESET, errno.EPIPE) else errno.errorcode.get(exc.errno)
        if error is None:
            data, error = _read_all(sock)
    return {"received": len(data), "sha256": hashlib.sha256(data).hexdigest(), "error": error}


def hold(host: str, port: int, reset: bool) -> dict:
    with socket.create_connection((host, port), timeout=30) as sock:
        if sock.recv(1) != GREETING:
            return {"received": 0, "error": "no greeting"}
        print("joined", flush=True)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return {"received": 0, "error": None}
        data, error = _read_all(sock)
    return {"received": len(data), "error": error}


def stall(port: int) -> None:
    with socket.create_server(("0.0.0.0", port), backlog=16) as listener:
        print("listening", flush=True)
        held = []
        while True:
            conn, _ = listener.accept()
            conn.sendall(GREETING)
            held.append(conn)


def flood(host: str, port: int, quiet: float, most: int) -> dict:
    sent, error, chunk = 0, None, b"x" * (1 << 20)
    with socket.create_connection((host, port), timeout=30) as sock:
        if sock.recv(1) != GREETING:
            return {"sent": 0, "error": "no greeting"}
        sock.settimeout(quiet)
        try:
            while sent < most:
                sent += sock.send(chunk)
        except socket.timeout:
            pass
        except OSError as exc:
            error = errno.errorcode.get(exc.errno, str(exc))
    return {"sent": sent, "error": error}


def main(argv: list[str]) -> int:
    if argv[0] == "serve":
        serve(int(argv[1]), int(argv[2]))
    elif argv[0] == "stall":
        stall(int(argv[1]))
    elif argv[0] == "flood":
        host, _, port = argv[1].rpartition(":")
        print(json.dumps(flood(host, int(port), float(argv[2]), int(argv[3]))), flush=True)
    elif argv[0] == "hold":
        host, _, port = argv[1].rpartition(":")
        print(json.dumps(hold(host, int(port), "--reset" in argv)), flush=True)
    else:
        host, _, port = argv[1].rpartition(":")
        print(json.dumps(send(host, int(port), int(argv[2]))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
