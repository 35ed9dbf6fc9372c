"""A keep-alive HTTP client that holds its connection between rounds a test asks for.

Run inside a lab pod: `python3 http_hold.py URL`. Each line on stdin is a JSON round,
{"n": 10, "headers": {"Name": "value"}}; the client sends n GET requests on the one
connection it keeps, and prints one JSON line: the request tool's summary (codes,
errors, pods, versions) plus "connections", how many connections it has opened so far,
and "replaced_idle", how many held connections it found closed by the other side while
idle and replaced before a request (as urllib3 and Go's transport do; a request is never
retried). A request that fails closes the connection; the next one opens another.
"""

from __future__ import annotations

import http.client
import json
import select
import sys

from nodeagent.lab.request import Summary, Target, _identify, error_kind


class HeldClient:
    def __init__(self, url: str, timeout: float = 5.0):
        self.target = Target.parse(url)
        self.timeout = timeout
        self.conn: http.client.HTTPConnection | None = None
        self.connections = 0
        self.replaced_idle = 0

    def _connection(self) -> http.client.HTTPConnection:
        if self.conn is not None and self.conn.sock is not None and _dropped(self.conn.sock):
            self.conn.close()
            self.conn = None
            self.replaced_idle += 1
        if self.conn is None or self.conn.sock is None:
            self.conn = http.client.HTTPConnection(self.target.host, self.target.port, timeout=self.timeout)
            self.conn.connect()
            self.connections += 1
        return self.conn

    def round(self, n: int, headers: dict[str, str]) -> dict:
        summary = Summary()
        for _ in range(n):
            summary.sent += 1
            try:
                conn = self._connection()
                conn.request("GET", self.target.path, headers=headers)
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                summary.errors[error_kind(exc)] += 1
                continue
            summary.codes[response.status] += 1
            pod, version = _identify(body)
            if pod is not None:
                summary.pods[pod] += 1
            if version is not None:
                summary.versions[version] += 1
        return {**summary.to_json(), "connections": self.connections, "replaced_idle": self.replaced_idle}


def _dropped(sock) -> bool:
    """An idle HTTP/1.1 connection is readable only when the server closed or reset it."""
    return bool(select.select([sock], [], [], 0)[0])


def main() -> None:
    client = HeldClient(sys.argv[1])
    for line in sys.stdin:
        ask = json.loads(line)
        print(json.dumps(client.round(ask["n"], ask.get("headers", {}))), flush=True)


if __name__ == "__main__":
    main()
