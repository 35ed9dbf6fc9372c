"""The contract between the waypoint Envoy and the agent's data path.

Envoy never opens a connection between nodes and never holds a key: it only talks to
the agent over unix sockets in one runtime directory, and every connection starts with
a PROXY protocol v2 header carrying the original addresses and the facts only the agent
knows (the verified source identity) or only Envoy knows (the endpoint it picked):

  agent → outbound.sock  client-side L7; PROXY src = client pod, dst = original
                         destination (service VIP:port); TLVs PRINCIPAL, SOURCE_LABELS,
                         SOURCE_WORKLOAD.
  agent → inbound.sock   server-side L7; PROXY src = client, dst = destination pod
                         IP:port; TLV PRINCIPAL (as verified by mTLS).
  Envoy → upstream.sock  after client-side L7; PROXY src/dst as received, TLVs
                         PRINCIPAL and SOURCE_WORKLOAD passed through, ENDPOINT added:
                         the pod "ip:port" Envoy's load balancer chose (absent for a
                         PASSTHROUGH DestinationRule: use the PROXY destination);
                         ENFORCED: the digest of the endpoint's HTTP policy the route
                         enforced (its cluster adds it; one waypoint per request).
  Envoy → deliver.sock   after server-side L7; PROXY src = client, dst = the pod;
                         PRINCIPAL passed through. The agent delivers to the pod.
  Envoy → xds.sock       ADS (gRPC) to the agent's xDS server.
  Envoy → access-log.fifo  a line per request (logline.py), read by the agent for
                         Istio's request metrics.

TLV types are in PROXY v2's custom range (0xE0-0xEF) and never renumbered. Envoy
hands back only connections for those the agent sent it and still relays (HandOffs);
the agent refuses any other.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

from nodeagent.errors import ConfigError

TLV_PRINCIPAL = 0xE0  # SPIFFE URI of the source workload, as verified by the agent
TLV_SOURCE_LABELS = 0xE1  # the source pod's labels, encode_labels() form
TLV_ENDPOINT = 0xE2  # "ip:port" / "[ip6]:port" of the endpoint Envoy picked
TLV_SOURCE_WORKLOAD = 0xE3  # "<namespace>/<pod name>" of the source, for telemetry
# The digest of the endpoint's HTTP policy the routes to the cluster enforced (one
# waypoint per request): added by the cluster (translate/outbound.py), on upstream.sock
TLV_ENFORCED = 0xE4
# ... which the agent of the source's node says on the HBONE CONNECT it makes for it with
# its own identity (spiffe.NODE_NAMESPACE), naming the source it vouches for; the
# destination's agent then delivers straight to the pod when that digest is what the
# pod's waypoint chain enforces now (enforceable), else through that chain.
ENFORCED_HEADER = "x-nodeagent-enforced"
SOURCE_HEADER = "x-nodeagent-source"

# Where Envoy keeps what the TLVs said: dynamic metadata namespace (set by the
# proxy_protocol listener filter) and the filter state keys HTTP filters match on.
METADATA_NAMESPACE = "nodeagent"
TLV_KEYS = {TLV_PRINCIPAL: "source_principal", TLV_SOURCE_LABELS: "source_labels",
            TLV_SOURCE_WORKLOAD: "source_workload"}
FILTER_STATE = {tlv: f"nodeagent.{key}" for tlv, key in TLV_KEYS.items()}

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
HEAD_SIZE = 16  # the fixed part: signature, version and command, family, body length
MAX_HEADER = 4096  # bytes of PROXY v2 body (addresses and TLVs) accepted
UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL


@dataclass(frozen=True)
class Sockets:
    """The unix socket paths of one waypoint, all in `directory`."""

    directory: str
    check: bool = True  # refuse a directory whose socket paths do not fit sun_path

    def __post_init__(self) -> None:
        if not self.check:
            return
        longest = self.outbound
        if len(longest.encode()) > UNIX_PATH_MAX:
            raise ConfigError(f"waypoint runtime directory {self.directory!r}",
                              f"socket paths such as {longest} exceed {UNIX_PATH_MAX} bytes",
                              "use a shorter directory, e.g. under /run")

    def path(self, name: str) -> str:
        return f"{self.directory.rstrip('/')}/{name}"

    @property
    def envoy_directory(self) -> str:
        """Where Envoy makes its listeners' sockets: the one directory it may write (the
        agent opens nothing by name there; it connects and checks the peer is Envoy)."""
        return self.path("envoy")

    @property
    def xds(self) -> str:
        return self.path("xds.sock")

    @property
    def outbound(self) -> str:
        return self.path("envoy/outbound.sock")

    @property
    def inbound(self) -> str:
        return self.path("envoy/inbound.sock")

    @property
    def upstream(self) -> str:
        return self.path("upstream.sock")

    @property
    def deliver(self) -> str:
        return self.path("deliver.sock")

    @property
    def admin(self) -> str:
        """Envoy's admin API."""
        return self.path("envoy/admin.sock")

    @property
    def access_log(self) -> str:
        """The FIFO Envoy writes its access-log lines into (logline.py) and the agent reads."""
        return self.path("access-log.fifo")


@dataclass(frozen=True)
class DataPlane:
    """What the agent needs from one snapshot: which connections go through Envoy, and
    for the server side, a digest of the filter chain Envoy applies to each (a connection
    held on a chain that changed or went is reset by the agent: Envoy would keep the old
    chain's policy on it until its drain ends)."""

    sockets: Sockets
    outbound: frozenset[tuple[str, int]] = frozenset()  # (service VIP, port) → outbound.sock
    # (local pod IP, port) → inbound.sock; the value is its filter chain's digest
    inbound: Mapping[tuple[str, int], str] = field(default_factory=dict, hash=False)
    # One waypoint per request (translate/outbound.py): (service VIP, port) → {endpoint
    # (pod IP, port) → the digest of the endpoint's HTTP policy its outbound chain enforces}
    enforced: Mapping[tuple[str, int], Mapping[tuple[str, int], str]] = field(default_factory=dict, hash=False)
    # (local pod IP, port) of `inbound` → the digest a routing waypoint that enforced its
    # HTTP policy says (translate/inbound.py ServerSide.digest); absent: only ours may
    enforceable: Mapping[tuple[str, int], str] = field(default_factory=dict, hash=False)

    def enforced_for(self, vip: tuple[str, int], endpoint: tuple[str, int]) -> str | None:
        """The digest of the HTTP policy the outbound chain of `vip` enforced for `endpoint`."""
        return self.enforced.get(vip, {}).get(endpoint)


@dataclass(frozen=True)
class ProxyHeader:
    """One PROXY v2 PROXY-command header over TCP (IPv4 or IPv6)."""

    source: tuple[str, int]
    destination: tuple[str, int]
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, kind: int) -> bytes | None:
        return next((value for t, value in self.tlvs if t == kind), None)

    def encode(self) -> bytes:
        src, dst = ipaddress.ip_address(self.source[0]), ipaddress.ip_address(self.destination[0])
        if src.version != dst.version:
            raise ValueError(f"PROXY v2 needs one address family: {src} and {dst}")
        family = 0x11 if src.version == 4 else 0x21  # TCP over IPv4 / IPv6
        body = src.packed + dst.packed + struct.pack("!HH", self.source[1], self.destination[1])
        for kind, value in self.tlvs:
            body += struct.pack("!BH", kind, len(value)) + value
        return SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


# The socket Envoy hands a connection back on, by the listener it came in on.
HANDED_BACK_ON = {"outbound": "upstream", "inbound": "deliver"}


class HandOffs:
    """The connections the agent has sent through Envoy and not yet ended, as what Envoy
    may hand back for them: on upstream.sock, the client pod's address and the
    destination it asked for (Envoy picks the endpoint: any of the service's or of a
    route's); on deliver.sock, the client's address and the pod's address and port.
    Anything else Envoy hands back is for no connection of a pod, so it is refused: a
    compromised Envoy (it parses every request of the node) can then act only for the
    pods talking through it at that moment, with the destinations they asked for, not as
    any pod of the node to anywhere. Source ports are not compared: Envoy pools its
    upstream connections per PROXY header and may hand one back for any connection of
    the same client and destination."""

    def __init__(self) -> None:
        self._live: Counter[tuple] = Counter()

    @contextlib.contextmanager
    def expecting(self, kind: str, header: ProxyHeader) -> Iterator[None]:
        key = _key(HANDED_BACK_ON[kind], header)
        self._live[key] += 1
        try:
            yield
        finally:
            self._live[key] -= 1
            if not self._live[key]:
                del self._live[key]

    def solicited(self, socket_name: str, header: ProxyHeader) -> bool:
        """Whether a connection Envoy hands back on `socket_name` ("upstream", "deliver")
        with `header` is for one the agent sent it and still relays."""
        return self._live.get(_key(socket_name, header), 0) > 0

    def __len__(self) -> int:
        return sum(self._live.values())


def _key(socket_name: str, header: ProxyHeader) -> tuple:
    return (socket_name, ipaddress.ip_address(header.source[0]), ipaddress.ip_address(header.destination[0]),
            header.destination[1])


class HeaderReader:
    """One PROXY v2 header as its bytes arrive, with no I/O, so that every reader (the
    blocking one below, the waypoint's on the agent's loop) checks it in this one place:
    read at most `missing` bytes (never any past the header) and feed() them until
    `missing` is 0, then `header()`. ValueError for anything that is not PROXY v2 over
    TCP, a body over MAX_HEADER bytes, or the end of the stream inside the header."""

    def __init__(self) -> None:
        self._data = b""
        self._size = HEAD_SIZE  # of the whole header, once its fixed part is in

    @property
    def missing(self) -> int:
        return self._size - len(self._data)

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            raise ValueError("connection closed inside the PROXY header")
        if len(chunk) > self.missing:
            raise ValueError("fed past the PROXY header")
        self._data += chunk
        if self._size == HEAD_SIZE and len(self._data) == HEAD_SIZE:
            self._size += _body_length(self._data)

    def header(self) -> ProxyHeader | None:
        """The header read; None for a LOCAL command (no addresses)."""
        head, body = self._data[:HEAD_SIZE], self._data[HEAD_SIZE:]
        if head[12] & 0x0F == 0:
            return None
        size = {0x11: 4, 0x21: 16}.get(head[13])
        if size is None:
            raise ValueError(f"unsupported PROXY v2 address family 0x{head[13]:02x}")
        src = str(ipaddress.ip_address(body[:size]))
        dst = str(ipaddress.ip_address(body[size:2 * size]))
        sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
        return ProxyHeader((src, sport), (dst, dport), _tlvs(body[2 * size + 4:]))


def _body_length(head: bytes) -> int:
    """The length of the body (addresses and TLVs) that follows the fixed part `head`."""
    if head[:12] != SIGNATURE or head[12] >> 4 != 2:
        raise ValueError("not a PROXY protocol v2 header")
    length = struct.unpack("!H", head[14:16])[0]
    if length > MAX_HEADER:
        raise ValueError(f"PROXY v2 header of {length} bytes")
    return length


def decode(read: Callable[[int], bytes]) -> ProxyHeader | None:
    """One PROXY v2 header read with `read(n)` (at most n bytes, b"" at the end of the
    stream), as HeaderReader checks it."""
    reader = HeaderReader()
    while reader.missing:
        reader.feed(read(reader.missing))
    return reader.header()


def read_header(sock) -> ProxyHeader | None:
    """decode() from a blocking socket, reading exactly the header's bytes and nothing after it."""
    return decode(sock.recv)


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    while data:
        if len(data) < 3:
            raise ValueError("truncated PROXY v2 TLV")
        kind, length = struct.unpack("!BH", data[:3])
        if len(data) < 3 + length:
            raise ValueError(f"truncated PROXY v2 TLV 0x{kind:02x}")
        out.append((kind, data[3:3 + length]))
        data = data[3 + length:]
    return tuple(out)


def endpoint(ip: str, port: int) -> str:
    """The ENDPOINT TLV text: `10.0.0.1:80`, `[fd00::1]:80`."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_endpoint(text: str) -> tuple[str, int]:
    """The (ip, port) of an ENDPOINT TLV text; ValueError when it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not an endpoint ip:port: {text!r}")
    return str(ipaddress.ip_address(host.strip("[]"))), int(port)


def encode_labels(labels: Mapping[str, str]) -> bytes:
    """SOURCE_LABELS: `,k1=v1,k2=v2,` sorted by key. Kubernetes label keys and values
    never contain ',' or '=', so the form is unambiguous and a selector is a regex."""
    return ("," + "".join(f"{k}={v}," for k, v in sorted(labels.items()))).encode()


def labels_regex(selector: Mapping[str, str]) -> str:
    """An RE2 pattern that fully matches encode_labels(labels) exactly when every
    key=value of `selector` is among `labels` (entries are sorted and comma-bounded,
    so `(?:[^,]*,)*` skips whole entries between the wanted ones)."""
    wanted = "(?:[^,]*,)*".join(f"{re2_escape(k)}={re2_escape(v)}," for k, v in sorted(selector.items()))
    return f",(?:[^,]*,)*{wanted}.*"


def re2_escape(text: str) -> str:
    # Escape every non-alphanumeric character: RE2 reads `\<punct>` as the literal.
    return re.sub(r"([^A-Za-z0-9])", r"\\\1", text)
