"""gRPC for the agent over grpclib, with messages as bytes and a size limit.

The agent serves Envoy (ADS) and calls the mesh CA with grpclib, on
asyncio, rather than grpcio: grpcio's core library and its threads cost the agent ~14 MiB
of RSS, and grpclib is pure Python over h2, which the agent loads anyway. Messages stay
bytes here (`Raw`); the callers parse them with the schema they need. grpclib reads a message of any announced length into memory, so `receive` reads
the 5-byte gRPC prefix itself and refuses one above `limit` (grpcio's default, 4 MiB)
before any of it is buffered, and a compressed one (neither side here compresses).
"""

from __future__ import annotations

import struct
from typing import Awaitable, Callable

from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError

MAX_MESSAGE = 4 * 1024 * 1024  # bytes in one message, as grpcio's default receive limit


class Raw(CodecBase):
    """The identity codec: what is sent and received is the message's wire bytes."""
    __content_subtype__ = "proto"

    def encode(self, message: bytes, message_type: object) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: object) -> bytes:
        return data


class Service:
    """Handlers by method path ("/package.Service/Method") for a grpclib Server."""

    def __init__(self) -> None:
        self._mapping: dict[str, Handler] = {}

    def add(self, service: str, method: str, cardinality: Cardinality,
            handler: Callable[..., Awaitable[None]]) -> "Service":
        self._mapping[f"/{service}/{method}"] = Handler(handler, cardinality, bytes, bytes)
        return self

    def __mapping__(self) -> dict[str, Handler]:
        return dict(self._mapping)


async def receive(stream, limit: int = MAX_MESSAGE) -> bytes | None:
    """The next message of a grpclib stream (server or client side), None at its end;
    GRPCError(RESOURCE_EXHAUSTED) for one above `limit`, read no further."""
    raw = stream._stream  # grpclib.protocol.Stream: data as it arrives, flow control acknowledged as read
    meta = await _read(raw, 5)
    if not meta:
        return None
    compressed, size = struct.unpack(">?I", meta)
    if compressed:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not accepted")
    if size > limit:
        raise GRPCError(Status.RESOURCE_EXHAUSTED, f"a message of {size} bytes is over the limit of {limit}")
    data = await _read(raw, size)
    if len(data) != size:
        raise GRPCError(Status.INVALID_ARGUMENT, f"the stream ended inside a message of {size} bytes")
    return data


async def _read(raw, size: int) -> bytes:
    try:
        return await raw.recv_data(size)
    except AssertionError:  # grpclib's Buffer: the stream ended with fewer bytes than asked for
        raise GRPCError(Status.INVALID_ARGUMENT, "the stream ended inside a message") from None
