"""CaptureLoader: the whole lifecycle of the eBPF capture layer, in one object.

load() checks the machine and has a short-lived child process compile bpf/*.c with bcc
and load the programs (compiler.py: bcc and LLVM never enter this process); the child
adopts or creates the maps pinned under pin_dir/maps and hands back the program fds.
With those, through raw bpf(2), load() points pinned sk_lookup links
(pin_dir/links/<cookie>) at the new program and replaces earlier instances of
connect4/6 and sockops on the cgroup without a gap. The agent then enrols netns, steers
inbound and pops original destinations. close(keep=False) undoes everything;
close(keep=True) leaves programs, links and maps in force for the next agent
(restarts, rolling upgrades).
See docs/design.md, "Capture".
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterable

import nodeagent
from nodeagent.capture import preflight
from nodeagent.capture.cgroup import CgroupAttachment
from nodeagent.capture.compiler import COMPILE_TIMEOUT, load_programs
from nodeagent.capture.errors import CaptureError
from nodeagent.capture.features import KernelSupport
from nodeagent.capture.links import NetnsLinks
from nodeagent.capture.maps import CaptureMaps
from nodeagent.capture.programs import CGROUP_PROGRAMS, SK_LOOKUP, LoadedPrograms, cflags, check_pinned_maps
from nodeagent.capture.sockmap import SockmapJoin
from nodeagent.capture.structs import MAX_EXCLUDED_PORTS, POD_F_CAPTURE, OrigDstKey, Pod, PodIp
from nodeagent.errors import ConfigError, NodeagentError

DEFAULT_BPF_DIR = Path(nodeagent.__file__).resolve().parent.parent / "bpf"
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/@+-]+\Z")  # goes into a C string literal


def _ports(where: str, ports: Iterable[int], limit: int = MAX_EXCLUDED_PORTS) -> list[int]:
    out = list(dict.fromkeys(ports))
    bad = [p for p in out if not isinstance(p, int) or not 0 < p < 65536]
    if bad:
        raise ConfigError(where, f"not TCP ports: {bad}", "use integers 1-65535")
    if len(out) > limit:
        raise ConfigError(where, f"{len(out)} ports given, at most {limit} fit the map value",
                          "exclude fewer ports")
    return out


def _check_listener(listener: socket.socket, ips: list[str]) -> None:
    """Refuse a listener the kernel would refuse at steering time (silently, as drops)."""
    if listener.type != socket.SOCK_STREAM or not listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ConfigError("listener", "is not a listening TCP socket", "bind and listen() first")
    for ip in ips:
        try:
            version = ipaddress.ip_address(ip).version
        except ValueError:
            raise ConfigError("pod_ips", f"{ip!r} is not an IP address") from None
        if version == 6 and listener.family != socket.AF_INET6:
            raise ConfigError("listener", f"an IPv4 socket cannot take IPv6 pod IP {ip}",
                              "use an AF_INET6 listener")
        if version == 4 and listener.family == socket.AF_INET6 and \
                listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
            raise ConfigError("listener", f"an IPV6_V6ONLY socket cannot take IPv4 pod IP {ip}",
                              "clear IPV6_V6ONLY or use an AF_INET listener")


class CaptureLoader:
    """Loads, attaches, adopts and removes the capture programs; map access for the agent."""

    def __init__(self, *, cgroup: str, pin_dir: str, bpf_dir: str | None = None, mark: int = 0x539,
                 outbound_port: int = 15001, inbound_port: int = 15006, tunnel_port: int = 15008,
                 admin_port: int = 15020, compile_timeout: float = COMPILE_TIMEOUT,
                 log: logging.Logger | None = None):
        if not _SAFE_PATH.match(pin_dir):
            raise ConfigError("pin_dir", f"{pin_dir!r} must be an absolute path of [A-Za-z0-9._/@+-]")
        if not 0 < mark < 2 ** 32:
            raise ConfigError("mark", f"{mark:#x} is not a non-zero 32-bit socket mark")
        self.ports = {"outbound": outbound_port, "inbound": inbound_port, "tunnel": tunnel_port,
                      "admin": admin_port}
        _ports("ports", self.ports.values(), limit=4)
        if len(set(self.ports.values())) != 4:
            raise ConfigError("ports", f"the agent's ports must differ: {self.ports}")
        self.cgroup, self.pin_dir, self.mark = cgroup, pin_dir.rstrip("/"), mark
        self.compile_timeout = compile_timeout  # seconds each compile process may take
        self.bpf_dir = Path(bpf_dir) if bpf_dir else DEFAULT_BPF_DIR
        self._log = log or logging.getLogger(__name__)
        self._programs: LoadedPrograms | None = None
        self._maps: CaptureMaps | None = None
        self._links: NetnsLinks | None = None
        self._cgroup: CgroupAttachment | None = None
        self._joins: list[SockmapJoin] = []
        self.kernel: KernelSupport | None = None  # what the feature probes found (load())

    @property
    def maps_dir(self) -> str:
        return os.path.join(self.pin_dir, "maps")

    @property
    def links_dir(self) -> str:
        return os.path.join(self.pin_dir, "links")

    # ---- lifecycle ----

    def load(self) -> None:
        if self._programs is not None:
            raise NodeagentError("CaptureLoader.load: already loaded", "close() it first")
        self.kernel = preflight.check_all(self.cgroup, self.pin_dir)
        fresh = not os.path.exists(self.pin_dir)
        try:
            self._load()
        except BaseException:
            # Leave a predecessor's pins and programs as they were; drop only ours.
            self._release(detach=True, unpin=fresh)
            raise

    def _load(self) -> None:
        os.makedirs(self.maps_dir, exist_ok=True)
        os.makedirs(self.links_dir, exist_ok=True)
        check_pinned_maps(self.maps_dir)
        flags = cflags(str(self.bpf_dir), self.maps_dir, self.mark, self.ports)
        self._programs = programs = load_programs(str(self.bpf_dir), flags, self._log, self.compile_timeout)
        self._maps = CaptureMaps(self.maps_dir)
        self._links = NetnsLinks(self.links_dir, programs.fds[SK_LOOKUP.name],
                                 programs.ids[SK_LOOKUP.name], self._log)
        self._links.adopt()
        self._cgroup = CgroupAttachment(self.cgroup, self._log)
        for spec in CGROUP_PROGRAMS:
            self._cgroup.replace(spec, programs.fds[spec.name], programs.ids[spec.name])
        self._log.info("capture loaded on cgroup %s, maps pinned in %s (%d netns enrolled)",
                       self.cgroup, self.maps_dir, len(self.enrolled_netns()))

    def close(self, keep: bool = False) -> None:
        """keep=False: detach, unlink and unpin everything, remove pin_dir.
        keep=True: leave programs attached and maps/links pinned (as a crash would).
        A loader that is not loaded owns nothing: then this does nothing."""
        if self._maps is None and self._programs is None and self._cgroup is None:
            return  # never loaded (or closed): pin_dir may be a predecessor's
        self._release(detach=not keep, unpin=not keep)

    def _release(self, detach: bool, unpin: bool) -> None:
        cgroup, links, maps, programs = self._cgroup, self._links, self._maps, self._programs
        self._cgroup = self._links = self._maps = self._programs = None
        joins, self._joins = self._joins, []
        steps: list[Callable[[], None]] = [join.close for join in joins]  # its pairs are this agent's own
        if cgroup:
            steps += [cgroup.detach_all] if detach else []
            steps.append(cgroup.close)
        if links:
            steps.append(lambda: links.close(keep=not unpin))
        if maps:
            steps += [maps.unpin] if unpin else []
            steps.append(maps.close)
        if programs:
            steps.append(programs.close)
        if unpin:
            steps.append(lambda: shutil.rmtree(self.pin_dir, ignore_errors=False)
                         if os.path.exists(self.pin_dir) else None)
        _run_all(steps, self._log)

    def uninstall(self) -> list[str]:
        """Remove the capture agents left in place (keep-on-exit, the default): detach
        our programs from the cgroup and unpin every map and sk_lookup link (a pinned
        link goes with its pin). For a node being taken out of the mesh; its pods'
        connections then go where they were addressed. Returns what was removed."""
        if self._programs is not None:
            raise NodeagentError("CaptureLoader.uninstall: this loader is running", "close() it instead")
        cgroup = CgroupAttachment(self.cgroup, self._log)
        try:
            removed = [f"detached {what} from {self.cgroup}" for what in cgroup.detach_named()]
        finally:
            cgroup.close()
        if os.path.exists(self.pin_dir):
            shutil.rmtree(self.pin_dir)
            removed.append(f"unpinned {self.pin_dir}")
        return removed

    def __enter__(self) -> "CaptureLoader":
        self.load()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close(keep=False)

    def sockmap_join(self) -> SockmapJoin:
        """Load the same-node fast path's in-kernel join (bpf/samenode.c: its own compile
        child, its maps pinned beside capture's); CaptureError saying why it cannot.
        Closed (detached) with the loader."""
        self._loaded()
        if self.kernel is not None and not self.kernel.has("same_node_join"):
            raise CaptureError(self.kernel.why_not("same_node_join"), "splice(2) joins same-node pairs instead")
        flags = cflags(str(self.bpf_dir), self.maps_dir, self.mark, self.ports)
        join = SockmapJoin.load(str(self.bpf_dir), flags, self.maps_dir, self._log, self.compile_timeout)
        self._joins.append(join)
        return join

    # ---- outbound ----

    def _loaded(self) -> CaptureMaps:
        if self._maps is None:
            raise NodeagentError("capture is not loaded", "call CaptureLoader.load() first")
        return self._maps

    def enrol_netns(self, netns_cookie: int, exclude_outbound_ports: Iterable[int] = ()) -> None:
        ports = _ports("exclude_outbound_ports", exclude_outbound_ports)
        self._loaded().set_pod(netns_cookie, Pod.of(POD_F_CAPTURE, ports))

    def remove_netns(self, netns_cookie: int) -> None:
        self._loaded().delete_pod(netns_cookie)

    def enrolled_netns(self) -> set[int]:
        return self._loaded().pod_cookies()

    def origdst_map_fd(self) -> int:
        """The descriptor of the original destinations' map (na_origdst), for the native
        engine's own reads (source_routes.py); the engine takes a copy."""
        return self._loaded().fd_of("na_origdst")

    def pop_original_dst(self, netns_cookie: int, family: int, client_port: int) -> tuple[str, int] | None:
        """The original destination of an accepted outbound connection, or None; deletes it.

        `client_port` is the accepted socket's peer port. A v4-mapped IPv6 destination
        comes back as the IPv4 address it stands for.
        """
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise ConfigError("family", f"{family} is neither AF_INET nor AF_INET6")
        key = OrigDstKey(netns_cookie=netns_cookie, family=family, client_port=client_port)
        found = self._loaded().pop_origdst(key)
        return found.destination() if found else None

    # ---- inbound ----

    def steer_inbound(self, netns_fd: int, netns_cookie: int, pod_ips: Iterable[str],
                      listener: socket.socket, exclude_ports: Iterable[int] = ()) -> None:
        """Steer inbound TCP for `pod_ips` to `listener` (idempotent; replaces a previous one)."""
        maps, ips = self._loaded(), list(pod_ips)
        ports = _ports("exclude_ports", exclude_ports)
        _check_listener(listener, ips)
        assert self._links is not None
        self._links.ensure(netns_cookie, netns_fd)
        for ip in ips:  # listener first, so an enrolled IP never lacks one needlessly
            maps.set_inbound(ip, listener.fileno())
            maps.set_enrolled_ip(ip, PodIp.of(netns_cookie, ports))

    def refuse_inbound(self, netns_fd: int, netns_cookie: int, pod_ips: Iterable[str],
                       exclude_ports: Iterable[int] = ()) -> None:
        """Refuse inbound TCP for `pod_ips` (a meshed pod the agent cannot serve): enrolled,
        with no listener, so the sk_lookup program drops every connection but the tunnel
        port's and the excluded ports' (fail closed; steer_inbound replaces it)."""
        maps, ips = self._loaded(), list(pod_ips)
        ports = _ports("exclude_ports", exclude_ports)
        assert self._links is not None
        self._links.ensure(netns_cookie, netns_fd)
        for ip in ips:
            maps.delete_inbound(ip)
            maps.set_enrolled_ip(ip, PodIp.of(netns_cookie, ports))

    def unsteer_inbound(self, netns_cookie: int, pod_ips: Iterable[str]) -> None:
        maps = self._loaded()
        for ip in pod_ips:  # unenrol first: no fail-closed drop in between
            maps.delete_enrolled_ip(ip)
            maps.delete_inbound(ip)
        assert self._links is not None
        self._links.remove(netns_cookie)

    # ---- introspection ----

    def stats(self) -> dict:
        maps = self._loaded()
        assert self._cgroup is not None and self._links is not None
        return {"programs": self._cgroup.describe() + self._links.describe(),
                "maps": [{k: m[k] for k in ("name", "max_entries", "entries")} for m in maps.describe()],
                "counters": maps.counters(), "kernel": self.kernel.describe() if self.kernel else None}


def _run_all(steps: list[Callable[[], None]], log: logging.Logger) -> None:
    """Run every clean-up step even if one fails; raise the first failure at the end."""
    first: BaseException | None = None
    for step in steps:
        try:
            step()
        except Exception as exc:
            log.error("capture clean-up step failed: %s", exc)
            first = first or exc
    if first is not None:
        raise first
