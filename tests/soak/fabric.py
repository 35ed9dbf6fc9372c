"""The soak's eye on the fabric: tcpdump on the bridge of the lab's fabric netns (the
only way between nodes), its pcap stream read as it comes, never written to disk (30
minutes of traffic would be gigabytes). Every TCP packet is parsed (Ethernet, IPv4,
TCP) and counted; its payload is searched for each marker; and a packet between two
meshed pods on neither side's port 15008 is counted as meshed plaintext, whatever it
carries. tcpdump's own count of packets the kernel dropped is read when it stops: with
drops, "0 seen" proves less, so the soak reports them.
"""

from __future__ import annotations

import select
import signal
import socket
import struct
import subprocess
import threading
from collections import Counter

TUNNEL_PORT = 15008
PCAP_HEADER, RECORD_HEADER = 24, 16
ETHERNET, ETH_IPV4, IPPROTO_TCP = 1, 0x0800, 6
LITTLE_ENDIAN_MAGIC = (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1")  # microsecond, nanosecond pcap


class FabricCapture:
    """tcpdump in `fabric_netns` counting `markers` and meshed plaintext; start, then stop."""

    def __init__(self, fabric_netns: str, markers: dict[str, bytes], meshed_ips: set[str]):
        self.argv = ["ip", "netns", "exec", fabric_netns, "tcpdump", "-i", "br0", "-nn", "-U", "-s", "0",
                     "-B", "65536", "-w", "-", "tcp"]
        self.markers = markers
        self.meshed = {socket.inet_aton(ip) for ip in meshed_ips}
        self.found: Counter = Counter()  # marker name -> packets carrying it; "meshed_plaintext"
        self.packets = self.bytes = 0
        self.dropped: int | None = None  # tcpdump's "dropped by kernel", once stopped
        self.error: str | None = None
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready, _, _ = select.select([self.proc.stderr], [], [], 10)
        line = self.proc.stderr.readline().decode() if ready else ""
        if "listening on br0" not in line:
            self.stop()
            raise RuntimeError(f"tcpdump did not start on the fabric: {line.strip() or 'no output in 10 s'}")
        self._reader = threading.Thread(target=self._read, name="fabric-capture", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # tcpdump flushes, prints its counts and exits
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if self._reader is not None:
            self._reader.join(15)
        for line in err.decode(errors="replace").splitlines():
            if "dropped by kernel" in line:
                self.dropped = int(line.split()[0])
        self.proc = None

    def _read(self) -> None:
        stream = self.proc.stdout
        try:
            header = _exactly(stream, PCAP_HEADER)
            if header is None:
                return
            order = "<" if header[:4] in LITTLE_ENDIAN_MAGIC else ">"  # tcpdump writes its own byte order
            linktype = struct.unpack(order + "I", header[20:24])[0]
            if linktype != ETHERNET:
                self.error = f"tcpdump gave link type {linktype}, not Ethernet"
                return
            while (record := _exactly(stream, RECORD_HEADER)) is not None:
                length = struct.unpack(order + "I", record[8:12])[0]
                frame = _exactly(stream, length)
                if frame is None:
                    return
                self._packet(frame)
        except Exception as exc:  # noqa: BLE001 - a reader that died must show in the report
            self.error = f"the capture reader failed: {exc!r}"

    def _packet(self, frame: bytes) -> None:
        self.packets += 1
        self.bytes += len(frame)
        for name, marker in self.markers.items():
            if marker in frame:
                self.found[name] += 1
        if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != ETH_IPV4 or frame[23] != IPPROTO_TCP:
            return
        ihl = (frame[14] & 0x0F) * 4
        src, dst = frame[26:30], frame[30:34]
        sport, dport = struct.unpack("!HH", frame[14 + ihl:18 + ihl])
        if src in self.meshed and dst in self.meshed and TUNNEL_PORT not in (sport, dport):
            self.found["meshed_plaintext"] += 1


def _exactly(stream, size: int) -> bytes | None:
    """`size` bytes from the pipe, or None at its end."""
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
