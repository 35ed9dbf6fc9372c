"""Bad HBONE clients, run inside a lab pod against a pod's real port 15008:
`python3 hbone_attacker.py POD_IP ROOT_FILE NAME=CERT_FILE...` prints one JSON object
saying what the server did to each: garbage that is not TLS, TLS without a client
certificate, TLS with each certificate given except `valid` (another CA's, an expired
one, another trust domain's...), and the `valid` mesh certificate followed by a
truncated HTTP/2 HEADERS frame."""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time

import h2.config
import h2.connection

PORT = 15008


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


def main() -> int:
    ip, root = sys.argv[1:3]
    certs = dict(arg.split("=", 1) for arg in sys.argv[3:])
    results = {"garbage": garbage(ip), "no_client_cert": with_certificate(ip, root, None)}
    results.update({name: with_certificate(ip, root, path) for name, path in certs.items() if name != "valid"})
    results["truncated_h2"] = truncated(ip, root, certs["valid"])
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
