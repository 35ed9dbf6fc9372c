"""Bad HBONE clients, run inside a lab pod against a pod's real port 15008. Two modes,
each printing one JSON object that says what the server did:

  hbone_attacker.py clients POD_IP ROOT_FILE NAME=CERT_FILE...
      garbage that is not TLS, TLS without a client certificate, TLS with each
      certificate given except `valid` (another CA's, an expired one, another trust
      domain's...), and the `valid` mesh certificate followed by a truncated HTTP/2
      HEADERS frame.
  hbone_attacker.py authorities POD_IP ROOT_FILE CERT_FILE APP_PORT AUTHORITY...
      with a valid mesh certificate, on one TLS connection: a CONNECT to each
      AUTHORITY (another pod's IP, the agent's own ports...), then one to
      POD_IP:APP_PORT, the probe server's, which must still work: its status, the
      greeting and the echo of a line.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection
import h2.events

PORT = 15008
LINE = b"ping\n"


def until_closed(sock) -> str:
    """'closed' once the server ends the connection (EOF, reset, TLS alert), 'open'
    if it is still there after 5 s."""
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError):
        pass
    except socket.timeout:
        return "open"
    return "closed"


def tls_context(root: str, cert: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(root)
    ctx.set_alpn_protocols(["h2"])
    if cert:
        ctx.load_cert_chain(cert)
    return ctx


def garbage(ip: str) -> str:
    with socket.create_connection((ip, PORT), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n" * 4)
        return until_closed(sock)


def with_certificate(ip: str, root: str, cert: str | None) -> str:
    try:
        sock = tls_context(root, cert).wrap_socket(socket.create_connection((ip, PORT), timeout=5))
    except (ssl.SSLError, ConnectionResetError):
        return "closed"  # refused during the handshake
    with sock:
        return until_closed(sock)  # TLS 1.3: the server refuses after our side of the handshake


def truncated(ip: str, root: str, cert: str) -> str:
    with tls_context(root, cert).wrap_socket(socket.create_connection((ip, PORT), timeout=5)) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "CONNECT"), (":authority", f"{ip}:9000")])
        sock.sendall(conn.data_to_send()[:-5])  # the HEADERS frame without its last 5 bytes
        time.sleep(0.2)
    return "sent"


def clients(ip: str, root: str, certs: dict[str, str]) -> dict:
    results = {"garbage": garbage(ip), "no_client_cert": with_certificate(ip, root, None)}
    results.update({name: with_certificate(ip, root, path) for name, path in certs.items() if name != "valid"})
    results["truncated_h2"] = truncated(ip, root, certs["valid"])
    return results


class Streams:
    """A bare HTTP/2 client on one TLS socket: CONNECT streams, their status and data."""

    def __init__(self, sock: ssl.SSLSocket):
        self.sock = sock
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                         header_encoding="utf-8"))
        self.status: dict[int, int] = {}
        self.data: dict[int, bytes] = {}
        self.goaway: int | None = None  # the error code of a GOAWAY the server sent
        self.conn.initiate_connection()
        self._flush()

    def connect(self, authority: str) -> int:
        """CONNECT `authority` on a new stream; returns the stream's id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
        self._flush()
        return stream_id

    def response(self, stream_id: int) -> int | str:
        """The stream's response status, or why there is none."""
        return self._until(lambda: self.status.get(stream_id))

    def send(self, stream_id: int, data: bytes) -> None:
        self.conn.send_data(stream_id, data)
        self._flush()

    def read_line(self, stream_id: int) -> str:
        """The next line the stream carried (without its newline), or why there is none."""
        def line():
            data = self.data.get(stream_id, b"")
            if b"\n" in data:
                text, _, self.data[stream_id] = data.partition(b"\n")
                return text.decode()
            return None
        return self._until(line)

    def _until(self, done):
        self.sock.settimeout(5)
        while (found := done()) is None:
            try:
                received = self.sock.recv(65536)
            except socket.timeout:
                return "no answer"
            except (ConnectionResetError, ssl.SSLError):
                return "reset"
            if not received:
                return "closed"
            for event in self.conn.receive_data(received):
                self._on(event)
            self._flush()
        return found

    def _on(self, event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.status[event.stream_id] = int(dict(event.headers)[":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.data[event.stream_id] = self.data.get(event.stream_id, b"") + event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event.error_code

    def _flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())


def authorities(ip: str, root: str, cert: str, app_port: int, aimed: list[str]) -> dict:
    with tls_context(root, cert).wrap_socket(socket.create_connection((ip, PORT), timeout=5)) as sock:
        streams = Streams(sock)
        refused = {authority: streams.response(streams.connect(authority)) for authority in aimed}
        good = streams.connect(f"{ip}:{app_port}")
        then = {"status": streams.response(good)}
        if then["status"] == 200:
            then["greeting"] = streams.read_line(good)
            streams.send(good, LINE)
            then["echo"] = streams.read_line(good)
        return {"refused": refused, "then": then, "goaway": streams.goaway}


def main() -> int:
    mode, ip, root, *rest = sys.argv[1:]
    if mode == "clients":
        result = clients(ip, root, dict(arg.split("=", 1) for arg in rest))
    elif mode == "authorities":
        cert, app_port, *aimed = rest
        result = authorities(ip, root, cert, int(app_port), aimed)
    else:
        print(f"unknown mode {mode!r}: clients or authorities", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
