"""Reading HTTP/1.x requests from an asyncio stream, for the lab's echo app.

The standard library has HTTP/1 servers, but none that reads chunked request bodies or
serves thousands of keep-alive connections on one thread, so the echo app reads requests
itself: request line, headers, and body framing as RFC 9112 gives it (chunked wins over
Content-Length, and a request carrying both closes the connection afterwards, which
defeats request smuggling). Bodies are read and thrown away, so any size is fine.
Anything malformed raises BadRequest with the status to answer and why.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

HEX = re.compile(r"^[0-9A-Fa-f]{1,15}\Z")
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
VERSION = re.compile(r"^HTTP/1\.[01]\Z")
MAX_HEADERS = 100
CHUNK = 65536


class BadRequest(Exception):
    """The request cannot be served as sent; answer `status` with `message`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class Request:
    method: str
    target: str  # as sent: path and query (or absolute-form)
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: list[tuple[str, str]]  # in order, names as sent

    def header(self, name: str) -> str | None:
        """All values of header `name` joined with ", " (RFC 9110 5.3), or None."""
        values = [v for k, v in self.headers if k.lower() == name]
        return ", ".join(values) if values else None

    def header_map(self) -> dict[str, str]:
        """Lower-cased names (as HTTP/2 and Envoy spell them) to joined values."""
        out: dict[str, str] = {}
        for k, v in self.headers:
            k = k.lower()
            out[k] = f"{out[k]}, {v}" if k in out else v
        return out

    def tokens(self, name: str) -> list[str]:
        """The lower-cased comma-separated tokens of header `name` (Connection, Expect...)."""
        return [t.strip().lower() for t in (self.header(name) or "").split(",") if t.strip()]

    @property
    def chunked(self) -> bool:
        return self.header("transfer-encoding") is not None

    @property
    def length(self) -> int:
        """Content-Length, 0 when absent (checked by read_request)."""
        raw = self.header("content-length")
        return 0 if raw is None or self.chunked else int(raw.split(",")[0])

    @property
    def keep_alive(self) -> bool:
        if self.chunked and self.header("content-length") is not None:
            return False  # ambiguous framing: answer, then close
        connection = self.tokens("connection")
        return "close" not in connection if self.version == "HTTP/1.1" else "keep-alive" in connection


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise BadRequest("a request line or header is too long", 431) from None


def _request_line(line: str) -> tuple[str, str, str]:
    parts = line.split(" ")
    if len(parts) != 3 or not TOKEN.match(parts[0]) or not parts[1]:
        raise BadRequest(f"malformed request line {line[:100]!r}")
    if not VERSION.match(parts[2]):
        if parts[2].startswith("HTTP/"):
            raise BadRequest(f"{parts[2]} is not served here, only HTTP/1.0 and HTTP/1.1", 505)
        raise BadRequest(f"malformed request line {line[:100]!r}")
    return parts[0], parts[1], parts[2]


def _check_framing(request: Request) -> None:
    te = request.tokens("transfer-encoding")
    if te and te[-1] != "chunked":
        raise BadRequest(f"transfer-encoding {request.header('transfer-encoding')!r} is not supported "
                         "(chunked must come last)", 501 if "chunked" not in te else 400)
    raw = request.header("content-length")
    if raw is not None and not te:
        values = {v.strip() for v in raw.split(",")}
        if len(values) != 1 or not values.pop().isdigit():
            raise BadRequest(f"content-length {raw!r} is not one non-negative integer")


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """The next request's head, or None when the client closed between requests."""
    while True:
        try:
            raw = await _line(reader)
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise BadRequest("connection closed in the middle of the request line") from None
            return None
        if raw.strip():  # RFC 9112 2.2: ignore empty lines before a request line
            break
    method, target, version = _request_line(raw.decode("latin-1").rstrip("\r\n"))
    headers: list[tuple[str, str]] = []
    while True:
        line = (await _line(reader)).decode("latin-1").rstrip("\r\n")
        if not line:
            break
        name, sep, value = line.partition(":")
        if not sep or not TOKEN.match(name):  # also refuses obs-fold and "Name :"
            raise BadRequest(f"malformed header line {line[:100]!r}")
        if len(headers) == MAX_HEADERS:
            raise BadRequest(f"more than {MAX_HEADERS} headers", 431)
        headers.append((name, value.strip(" \t")))
    request = Request(method, target, version, headers)
    _check_framing(request)
    return request


async def drain_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request) -> int:
    """Read and discard the request body; returns its size. Sends 100 Continue first when
    the client waits for it (curl does for bodies over 1 KiB)."""
    if not request.chunked and not request.length:
        return 0
    if request.version == "HTTP/1.1" and "100-continue" in request.tokens("expect"):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if not request.chunked:
        return await _discard(reader, request.length)
    total = 0
    while True:
        line = (await _line(reader)).decode("latin-1").strip()
        size_text = line.split(";")[0].strip()  # ";name=value" chunk extensions are ignored
        if not HEX.match(size_text):
            raise BadRequest(f"malformed chunk size line {line[:100]!r}")
        size = int(size_text, 16)
        if size == 0:
            break
        total += await _discard(reader, size)
        if await reader.readexactly(2) != b"\r\n":
            raise BadRequest("chunk data not followed by CRLF")
    while (await _line(reader)).strip():  # trailer fields, up to the empty line
        pass
    return total


async def _discard(reader: asyncio.StreamReader, size: int) -> int:
    left = size
    while left:
        left -= len(await reader.readexactly(min(left, CHUNK)))
    return size
