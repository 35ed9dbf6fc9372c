"""The h2 connection object HBONE uses, and what we read from h2 beyond its events.

`new_connection` configures h2 (headers as bytes, our window, frame size and stream
limit; push off on the client); `start` sends the preface and opens the connection
window. `partial_input` tells a connection cut mid-frame from a clean close (it reads
h2's frame buffer, defensively). The performance workaround: h2 4.x formats `repr(frame)` of every
received frame for a trace log line even when nothing is logged, and hyperframe's repr
of a DATA frame serialises and hex-encodes the whole payload — about 45% of a
receiver's CPU with 1 MiB frames. Received DATA frames are re-classed, per connection
(nothing is patched globally), to a DataFrame subclass whose repr is constant-size; if
h2's internals ever differ, the connection simply works without it.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.exceptions
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes, Settings
from hyperframe.frame import DataFrame

from nodeagent.tunnel.settings import TunnelSettings

MAX_HEADER_LIST = 16 * 1024
H2_DEFAULT_WINDOW = 65535
PREFACE_LEN = 24
_ERROR_REASONS = {h2.exceptions.FlowControlError: "flow_control", h2.exceptions.FrameTooLargeError: "frame_too_large",
                  h2.exceptions.TooManyStreamsError: "too_many_streams"}


class _DataFrame(DataFrame):
    def _body_repr(self) -> str:
        return f"data=<{len(self.data)} bytes>"


class _FrameBuffer(FrameBuffer):
    def __next__(self):
        frame = super().__next__()
        if type(frame) is DataFrame:
            frame.__class__ = _DataFrame
        return frame


def new_connection(*, client_side: bool, settings: TunnelSettings, max_streams: int) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client_side, header_encoding=None))
    initial = {SettingCodes.INITIAL_WINDOW_SIZE: settings.stream_window,
               SettingCodes.MAX_FRAME_SIZE: settings.max_frame_size,
               SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
               SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST}
    if client_side:
        initial[SettingCodes.ENABLE_PUSH] = 0
    conn.local_settings = Settings(client=client_side, initial_values=initial)
    conn.max_inbound_frame_size = settings.max_frame_size  # h2 copies it at __init__
    _cheap_data_frame_repr(conn)
    return conn


def _cheap_data_frame_repr(conn: h2.connection.H2Connection) -> None:
    table = getattr(conn, "_frame_dispatch_table", None)
    if isinstance(table, dict) and DataFrame in table and type(conn.incoming_buffer) is FrameBuffer:
        table[_DataFrame] = table[DataFrame]
        conn.incoming_buffer = _FrameBuffer(server=not conn.config.client_side)


def start(conn: h2.connection.H2Connection, settings: TunnelSettings) -> None:
    """Queue the preface and SETTINGS, and open the connection window to our size."""
    conn.initiate_connection()
    if settings.connection_window > H2_DEFAULT_WINDOW:
        conn.increment_flow_control_window(settings.connection_window - H2_DEFAULT_WINDOW)


def partial_input(conn: h2.connection.H2Connection) -> bool:
    """h2 holds the start of a frame, a header block or the client preface, never finished."""
    buf = conn.incoming_buffer
    return bool(getattr(buf, "_data", b"")) or bool(getattr(buf, "_headers_buffer", ())) or \
        0 < getattr(buf, "_preamble_len", 0) < PREFACE_LEN


def error_reason(exc: h2.exceptions.ProtocolError) -> str:
    """The metrics label for a protocol error the peer made."""
    return "bad_preface" if "preamble" in str(exc) else _ERROR_REASONS.get(type(exc), "protocol_error")


def code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


def latin1_headers(headers) -> tuple[tuple[str, str], ...]:
    """h2's bytes headers as text, losslessly (HTTP field values are Latin-1 at most)."""
    return tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)
