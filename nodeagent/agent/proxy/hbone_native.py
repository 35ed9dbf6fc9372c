"""The agent's HBONE on the native engine (native/hbone.c through nodeagent/native/hbone.py),
chosen by the setting `hbone_engine` beside the Python `tunnel/` path.

`HboneEngines` is the choice, made once from the setting as splice.Splicer makes the
relays' (`auto`, the default: native when the module is built from this tree's sources
and starts, else python saying why; `native`: required, ConfigError at start-up without
the module; `python`), the engine itself (started on the agent's loop, stopped
last) and the engine's TLS credentials per workload identity (a new `nh_tls` when a
certificate rotates; connections made keep theirs), and how the engine's ends are
labelled in the tunnel's metrics (the Python path's names). The source side's pool is
native_outbound.NativePool, the destination side native_inbound.NativeServing.
"""

from __future__ import annotations

import logging
import time

from nodeagent.errors import ConfigError
from nodeagent.identity.workload.credentials import Credentials
from nodeagent.native import NativeUnavailable
from nodeagent.native import hbone
from nodeagent.tunnel import TunnelSettings
from nodeagent.tunnel.h2conn import code_name
from nodeagent.tunnel.tls import VERIFY_REASONS

POOL_IDLE = 300.0  # seconds a pooled client connection without streams lives (HbonePool's idle_timeout)
SERVER_IDLE = 600.0  # ... and a server connection (HboneServer's)
ERROR_ENDS = ("keepalive", "protocol_error", "flood", "goaway", "io_error", "truncated")  # after TLS: connection_errors


class HboneEngines:
    """Which engine carries HBONE, and the native one when it is the choice."""

    def __init__(self, setting: str, log: logging.Logger, settings: TunnelSettings = TunnelSettings(), *,
                 client_idle: float = POOL_IDLE, server_idle: float = SERVER_IDLE):
        self.setting, self.log, self.settings = setting, log, settings
        self.client_idle, self.server_idle = client_idle, server_idle
        self.engine: hbone.HboneEngine | None = None
        self._module = None
        self._tls: dict[object, tuple[Credentials, hbone.Tls]] = {}
        self.tls_library: str | None = None  # the native module's OpenSSL, once loaded
        self.why = "hbone_engine=python"
        if setting == "python":
            return
        try:
            module = hbone.load()
        except NativeUnavailable as exc:
            if setting == "native":
                raise ConfigError("setting hbone_engine", f"is native, but {exc}",
                                  "build it (scripts/setup) or set hbone_engine to python") from None
            self.why = str(exc)
            return
        self._module = module
        self.tls_library = hbone.tls_library(module)
        self.why = "the native HBONE engine has not started yet"

    @property
    def native(self) -> bool:
        return self.engine is not None

    async def start(self) -> None:
        """Start the native engine on the running loop, if it is the choice."""
        if self._module is None or self.engine is not None:
            return
        try:
            self.engine = hbone.HboneEngine.start(self.settings, module=self._module, client_idle=self.client_idle,
                                                  server_idle=self.server_idle)
        except OSError as exc:
            if self.setting == "native":
                raise ConfigError("setting hbone_engine", f"is native, but {exc}",
                                  "see the error, or set hbone_engine to python") from None
            self.why = str(exc)
            self.log.warning("HBONE: python: %s", exc)
            return
        self.why = f"hbone_engine={self.setting}: the native HBONE module is built from this tree's native/"

    def tls(self, creds: Credentials) -> hbone.Tls:
        """The engine's credentials for `creds` (made once per certificate: rotation makes
        new ones; those of certificates that have expired, e.g. of a service account no pod
        uses any more, are let go: connections made with them keep their own reference)."""
        cached = self._tls.get(creds.identity)
        if cached is not None and cached[0] is creds:
            return cached[1]
        made = self.engine.tls(creds.key_pem + creds.chain_pem, creds.trust_bundle_pem)
        now = time.time()
        self._tls = {k: v for k, v in self._tls.items() if v[0].not_after > now}
        self._tls[creds.identity] = (creds, made)
        return made

    def describe(self) -> dict:
        return {"engine": "native" if self.native else "python", "setting": self.setting, "why": self.why,
                "tls_library": self.tls_library if self.native else None,
                "native": self.engine.stats() if self.engine is not None else None}

    def budgets(self, stats: dict | None) -> dict | None:
        """The native engine's budgets from its `stats` (describe()'s "native"), as
        StreamBudget.describe() says the Python path's."""
        if stats is None:
            return None
        return {"received_held": stats["received_held"], "received_held_peak": stats["received_held_peak"],
                "receive_budget": self.settings.receive_budget, "streams_overloaded": stats["streams_overloaded"],
                "send_held": stats["send_held"], "send_held_peak": stats["send_held_peak"],
                "send_budget": self.settings.send_budget, "streams_send_waiting": stats["streams_send_waiting"]}

    def close(self) -> None:
        """Stop the native engine: what is still open is reset."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None
            self._tls.clear()
            self.why = "stopped"


def tls_reason(end: hbone.End) -> str:
    """The handshake failure label (tunnel/tls.failure_reason's names) of a native end."""
    if end.how in ("timeout", "identity"):
        return {"timeout": "timeout", "identity": "identity_mismatch"}[end.how]
    if end.code:  # the X509 verify result of the peer's chain
        return VERIFY_REASONS.get(end.code, "bad_certificate")
    text = end.reason.lower()
    for words, label in (("did not return a certificate", "no_client_cert"), ("certificate required", "peer_requires_cert"),
                         ("unknown ca", "peer_refused_cert"), ("bad certificate", "peer_refused_cert"),
                         ("certificate expired", "peer_refused_cert"), ("decrypt error", "peer_refused_cert"),
                         ("verify failed", "bad_certificate"), ("wrong version", "not_tls"),
                         ("http request", "not_tls"), ("unknown protocol", "not_tls"),
                         ("unsupported protocol", "tls_version"), ("protocol version", "tls_version"),
                         ("right after tls", "peer_closed"), ("closed the connection", "closed")):
        if words in text:
            return label
    return "tls_error"


def error_label(end: hbone.End) -> str:
    """The connection_errors label of a native end, named as the Python session names it."""
    if end.how == "goaway":
        return f"goaway_{code_name(end.code).lower()}"
    if end.how == "io_error":
        return "transport_error" if end.error else "closed_with_open_streams"
    if end.how == "protocol_error" and "magic" in end.reason.lower():  # nghttp2: "bad client magic"
        return "bad_preface"
    if end.how == "protocol_error":  # h2conn.error_reason's names for the codes they map to
        # 11: nghttp2's outbound queue flooded (answers the peer does not read)
        return {3: "flow_control", 6: "frame_too_large", 11: "output_flood"}.get(end.code, "protocol_error")
    return {"keepalive": "keepalive_timeout", "flood": "too_many_resets"}.get(end.how, end.how)
