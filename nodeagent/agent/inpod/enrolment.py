"""The enrolment reconciler: which of this node's pods are in the mesh, and making it so.

`plan()` is the decision as a pure function: model + node + what is enrolled now ->
pods to enrol, to update (excluded ports changed), to remove, and meshed pods that must
wait (no IP, no UID, neither Pending nor Running). `Enroller` carries the plan out. Enrolling a pod:
find its netns, install its delivery routing, open its in-pod listeners, then add its
netns cookie to the capture map and steer its inbound traffic — listeners first, so a
captured connect never finds nobody listening. Removal is the reverse; the routing goes
last, once the pod's inbound relays have ended. Neither restarts the pod nor resets a
connection: a relayed connection stays relayed until it closes, and connections opened
before enrolment are never captured. A pod that cannot be enrolled is logged, shown in
status and retried with backoff; it never stops the agent.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

from nodeagent.agent.inpod import podrouting
from nodeagent.agent.inpod import sockets as inpod
from nodeagent.agent.inpod.sockets import AcceptFailures, InPodListener, ListenSpec, PodContext
from nodeagent.agent.metrics import AgentMetrics
from nodeagent.agent.inpod.podns import PodNetns, PodNetnsResolver, PodNotFound
from nodeagent.backoff import Backoff
from nodeagent.model import EXCLUDE_INBOUND_PORTS, EXCLUDE_OUTBOUND_PORTS, MESHED_PHASES, Model, Pod
from nodeagent.netns import NetnsError

RETRY = Backoff(first=0.1, maximum=2.0)  # between attempts to enrol (or update) a failing pod


SOURCES_EVERY = 10.0  # seconds between two re-reads of the address the node reaches each pod from


@dataclass(frozen=True)
class Wanted:
    """What enrolment of one pod depends on; a change here means re-doing some of it."""

    uid: str
    namespace: str
    name: str
    ip: str
    exclude_outbound: frozenset[int] = frozenset()
    exclude_inbound: frozenset[int] = frozenset()
    other_ips: tuple[str, ...] = ()  # dual-stack: the other family's, refused in the pod (not carried)

    @classmethod
    def of(cls, pod: Pod) -> "Wanted":
        return cls(pod.uid, pod.namespace, pod.name, pod.ip,
                   pod.port_list(EXCLUDE_OUTBOUND_PORTS), pod.port_list(EXCLUDE_INBOUND_PORTS), pod.other_ips)

    @property
    def ips(self) -> list[str]:
        return [self.ip, *self.other_ips]


@dataclass(frozen=True)
class Waiting:
    namespace: str
    name: str
    uid: str
    reason: str


@dataclass(frozen=True)
class Plan:
    enrol: tuple[Wanted, ...] = ()
    update: tuple[Wanted, ...] = ()
    remove: tuple[str, ...] = ()  # UIDs
    waiting: tuple[Waiting, ...] = ()


def _wait_reason(pod: Pod) -> str | None:
    if not pod.uid:
        return "no metadata.uid: cannot find its network namespace"
    if pod.phase not in MESHED_PHASES:
        return f"phase is {pod.phase}, not Pending or Running"
    if not pod.ip:
        return "no status.podIP yet"
    return None


def wanted_pods(model: Model, node: str) -> tuple[dict[str, Wanted], list[Waiting]]:
    """The meshed pods of `node` that can be enrolled (by UID), and those that must wait."""
    wanted: dict[str, Wanted] = {}
    waiting: list[Waiting] = []
    for pod in model.pods_on_node(node):
        if pod.host_network and model.opted_in(pod):  # said where the user looks, not skipped silently
            waiting.append(Waiting(pod.namespace, pod.name, pod.uid, "a hostNetwork pod shares the node's network "
                                   "namespace and cannot be meshed: label it istio.io/dataplane-mode=none"))
            continue
        if not model.is_meshed(pod):
            continue
        reason = _wait_reason(pod) or ("another pod has the same uid" if pod.uid in wanted else None)
        if reason:
            waiting.append(Waiting(pod.namespace, pod.name, pod.uid, reason))
        else:
            wanted[pod.uid] = Wanted.of(pod)
    return wanted, waiting


def plan(model: Model, node: str, current: Mapping[str, Wanted]) -> Plan:
    """Decide what to change so exactly the meshed local pods with an IP, Pending or
    Running, are enrolled."""
    wanted, waiting = wanted_pods(model, node)
    enrol, update, remove = [], [], []
    for uid, have in current.items():
        want = wanted.get(uid)
        if want is None or want.ips != have.ips:
            remove.append(uid)  # gone, left the mesh, or re-addressed (then enrolled afresh)
        elif want != have:
            update.append(want)
    for uid, want in wanted.items():
        if uid not in current or current[uid].ips != want.ips:
            enrol.append(want)
    return Plan(tuple(enrol), tuple(update), tuple(remove), tuple(waiting))


@dataclass
class Enrolment:
    wanted: Wanted
    ctx: PodContext
    pid: int
    listeners: list[InPodListener]
    enrolled_at: float  # wall clock: capture became active

    def describe(self) -> dict:
        return {"namespace": self.wanted.namespace, "name": self.wanted.name, "uid": self.wanted.uid,
                "ip": self.wanted.ip, "refused_ips": list(self.wanted.other_ips), "node_source": self.ctx.node_source,
                "netns_cookie": self.ctx.cookie, "pid": self.pid,
                "enrolled_at": self.enrolled_at,
                "listeners": [f"{a[0]}:{a[1]}" if ":" not in a[0] else f"[{a[0]}]:{a[1]}"
                              for a in (lst.address for lst in self.listeners)],
                "exclude_outbound_ports": sorted(self.wanted.exclude_outbound),
                "exclude_inbound_ports": sorted(self.wanted.exclude_inbound),
                "active": {d: len(t) for d, t in self.ctx.tasks.items()}}


@dataclass
class Failure:
    wanted: Wanted
    reason: str
    attempts: int = 0
    retry_at: float = 0.0
    adopted_cookie: int | None = None  # its netns was captured already (by the agent before this one)
    refused_cookie: int | None = None  # its inbound is refused in that netns until it is enrolled
    phase: str = ""  # the pod's when no netns was found: a change (Pending to Running) is worth a try at once

    @property
    def blocks_readiness(self) -> bool:
        """A pod the previous agent captured (and may still serve, in a rolling update)
        that this agent cannot serve (a listener it cannot open: the port held without
        SO_REUSEPORT…). Other failures — a pod not started yet, an app holding a mesh
        port from the start — do not: no agent could serve that pod, and one pod must not
        hold back the node's agent."""
        return self.adopted_cookie is not None

    def describe(self) -> dict:
        return {"namespace": self.wanted.namespace, "name": self.wanted.name, "uid": self.wanted.uid,
                "reason": self.reason, "attempts": self.attempts,
                "inbound": "refused" if self.refused_cookie is not None else "open"}


@dataclass
class Ports:
    outbound: int
    inbound: int
    tunnel: int


@dataclass
class Handlers:
    outbound: Callable
    inbound: Callable
    tunnel: Callable
    outbound_offload: Callable | None = None  # may take an outbound listener's accepting (InPodListener)


@dataclass
class Enroller:
    node: str
    capture: object  # nodeagent.capture.loader.CaptureLoader
    resolver: PodNetnsResolver
    ports: Ports
    handlers: Handlers
    delivery_mark: int
    metrics: AgentMetrics
    log: logging.Logger
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time
    enrolled: dict[str, Enrolment] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    waiting: tuple[Waiting, ...] = ()
    draining: dict[asyncio.Task, Enrolment] = field(default_factory=dict)  # removed, relays running

    def __post_init__(self) -> None:
        self.accept_failures = AcceptFailures(self.log, self.metrics.failure, self.clock)  # all pods' listeners
        self._sources_at = float("-inf")  # when refresh last re-read the node's source address per pod

    # --- reconcile ------------------------------------------------------------------
    def retry_due(self) -> bool:
        now = self.clock()
        return any(f.retry_at <= now for f in self.failures.values())

    async def reconcile(self, model: Model) -> Plan:
        p = plan(model, self.node, {uid: e.wanted for uid, e in self.enrolled.items()})
        for uid in p.remove:
            self.remove(uid)
        for want in p.update:
            self._update(want)
        wanted_uids = {w.uid for w in p.enrol} | {w.uid for w in p.update if w.uid in self.failures}
        for uid in list(self.failures):
            if uid not in wanted_uids:
                self._stop_refusing(self.failures.pop(uid))
        now = self.clock()
        due = [w for w in p.enrol if self._due(w, model, now)]
        found = self.resolver.resolve_many([w.uid for w in due], {w.uid: w.ip for w in due}) if due else {}
        for w in due:
            self._enrol(w, model.pods[(w.namespace, w.name)], found[w.uid])
        self.refresh(model)
        self.waiting = p.waiting
        self.metrics.enrolled.set(len(self.enrolled))
        return p

    def _due(self, want: Wanted, model: Model, now: float) -> bool:
        """Whether to try `want` now: never tried, its backoff over, or its pod's phase
        changed since it failed (the netns of a pod that had its IP while Pending, which
        the lab's pods have before they start, is there once it runs)."""
        failure = self.failures.get(want.uid)
        if failure is None or failure.retry_at <= now:
            return True
        pod = model.pods.get((want.namespace, want.name))
        return bool(failure.phase) and pod is not None and pod.phase != failure.phase

    def refresh(self, model: Model) -> None:
        """The enrolled pods as `model` has them (labels...), which admission and the relays
        read (ctx.pod): before the data path re-checks what is open under a new model, so a
        pod relabelled into a DENY's or a STRICT PeerAuthentication's selector is re-checked
        with its new labels (refreshed only by the reconcile after it, it was not re-checked
        at all, and routes given meanwhile carried the old labels' decision)."""
        now = self.clock()
        sources = now - self._sources_at >= SOURCES_EVERY  # a model change can come many times a second
        if sources:
            self._sources_at = now
        for e in self.enrolled.values():
            pod = model.pods.get((e.wanted.namespace, e.wanted.name))
            if pod is not None and pod.uid == e.wanted.uid:  # not a new pod of the same name (a
                e.ctx.pod = pod  # StatefulSet's): its labels and account are not this netns's
            if not sources:
                continue
            source = inpod.source_towards(e.wanted.ip)  # the node's routes may have changed
            if source != e.ctx.node_source:
                self.log.info("pod %s: the node reaches it from %s (was %s): kubelet's probes are told by that",
                              e.ctx, source or "no address", e.ctx.node_source or "no address")
                e.ctx.node_source = source

    def remove_stale(self, model: Model) -> list[int]:
        """Drop capture state of netns cookies no enrolled pod owns, left by a previous
        agent for pods that left the mesh or went away while no agent ran: the cookie's
        na_pods entry and its sk_lookup link. The maps do not say which IPs a cookie
        steered, so the IPs of this node's pods that are not enrolled are unsteered too
        (none of them may be steered)."""
        ours = {e.ctx.cookie for e in self.enrolled.values()}
        ours |= {f.adopted_cookie for f in self.failures.values() if f.adopted_cookie is not None}  # kept, retried
        stale = sorted(set(self.capture.enrolled_netns()) - ours)
        loose = sorted({ip for p in model.pods_on_node(self.node) for ip in p.ips} - self._held())
        for i, cookie in enumerate(stale):
            self.log.info("removing stale capture state of netns cookie %d", cookie)
            self.capture.remove_netns(cookie)
            self.capture.unsteer_inbound(cookie, loose if i == 0 else [])
        return stale

    # --- enrol ----------------------------------------------------------------------
    def _retry_later(self, want: Wanted, reason: str, adopted_cookie: int | None = None,
                     refused_cookie: int | None = None, phase: str = "") -> tuple[int, float]:
        """Record a failed attempt at `want`: its number in a row and the delay before the next."""
        prev = self.failures.get(want.uid)
        attempts = (prev.attempts if prev else 0) + 1
        delay = RETRY.delay(attempts)
        if refused_cookie is None and prev is not None:
            refused_cookie = prev.refused_cookie  # still refused (an attempt that found no netns)
        self.failures[want.uid] = Failure(want, reason, attempts, self.clock() + delay, adopted_cookie,
                                          refused_cookie, phase)
        return attempts, delay

    def _failed(self, want: Wanted, reason: str, metric: str, adopted_cookie: int | None = None,
                refused_cookie: int | None = None, phase: str = "") -> None:
        attempts, delay = self._retry_later(want, reason, adopted_cookie, refused_cookie, phase)
        self.metrics.enrol_errors.labels(reason=metric).inc()
        # A pod just starting is normal; one that stays unfindable is worth a warning a minute.
        loud = metric != "netns_not_found" or attempts == 5 or attempts % 30 == 5
        (self.log.warning if loud else self.log.info)(
            "cannot enrol pod %s/%s yet (attempt %d, retrying in %.1fs): %s",
            want.namespace, want.name, attempts, delay, reason)

    def _enrol(self, want: Wanted, pod: Pod, found: PodNetns | NetnsError) -> None:
        if isinstance(found, NetnsError):
            self._failed(want, str(found), "netns_not_found" if isinstance(found, PodNotFound) else "netns_error",
                         phase=pod.phase)
            return
        ctx = PodContext(pod, os.dup(found.fd), found.cookie, node_source=inpod.source_towards(want.ip))
        listeners: list[InPodListener] = []
        captured = False
        try:
            podrouting.install(ctx.netns_fd, self._routing(want))
            listeners = self._open_listeners(ctx, want)
            self.capture.enrol_netns(ctx.cookie, exclude_outbound_ports=sorted(want.exclude_outbound))
            captured = True
            self._steer(ctx, want, listeners)
        except Exception as exc:  # one pod's failure must never stop the agent
            self.log.debug("enrolment of %s failed", ctx, exc_info=True)
            # Captured already, before this attempt: by the previous agent (a restart, or
            # a rolling update's old agent still serving it). Its capture, steering and
            # routing then stay — fail closed, or served by that agent — never unmeshed.
            adopted = not captured and ctx.cookie in self.capture.enrolled_netns()
            refused = None
            if adopted:
                for lst in listeners:
                    lst.close()
                os.close(ctx.netns_fd)
            else:
                refused = self._undo(ctx, want, listeners, refuse=True)
            self._failed(want, f"{type(exc).__name__}: {exc}", "error", ctx.cookie if adopted else None, refused)
            return
        failed = self.failures.pop(want.uid, None)
        self.enrolled[want.uid] = Enrolment(want, ctx, found.pid, listeners, self.wall_clock())
        if failed is not None and failed.refused_cookie not in (None, ctx.cookie):
            self._stop_refusing(failed)  # refused in a netns the pod no longer has (its IP steered now)
        self.log.info("enrolled pod %s (ip %s, netns cookie %d)", ctx, want.ip, ctx.cookie)

    def _open_listeners(self, ctx: PodContext, want: Wanted) -> list[InPodListener]:
        """Outbound (IPv4, and IPv6 if the pod has ::1), inbound, tunnel."""
        p, h = self.ports, self.handlers
        any_addr = "::" if inpod.family_of(want.ip) == socket.AF_INET6 else "0.0.0.0"
        plan = [(ListenSpec("127.0.0.1", p.outbound, buffers=inpod.LOCAL_BUFFER), "outbound", h.outbound),
                (ListenSpec("::1", p.outbound, optional=True, buffers=inpod.LOCAL_BUFFER), "outbound", h.outbound),
                (ListenSpec(any_addr, p.inbound), "inbound", h.inbound),
                (ListenSpec(want.ip, p.tunnel, freebind=True), "inbound", h.tunnel)]
        try:
            socks = inpod.listeners(ctx.netns_fd, [spec for spec, _, _ in plan])
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen in pod {ctx}: {exc.strerror}"
                          + (" (is the app using one of the mesh's reserved ports "
                             f"{p.outbound}, {p.inbound}, {p.tunnel}?)" if exc.errno == errno.EADDRINUSE else "")
                          ) from None
        out = [InPodListener(sock, ctx, direction, handler, self.log, self.accept_failures,
                             offload=h.outbound_offload if handler is h.outbound else None)
               for sock, (_, direction, handler) in zip(socks, plan) if sock is not None]
        for lst in out:
            lst.start()
        return out

    def _steer(self, ctx: PodContext, want: Wanted, listeners: list[InPodListener]) -> None:
        inbound = next(lst for lst in listeners if lst.address[1] == self.ports.inbound)
        self.capture.steer_inbound(ctx.netns_fd, ctx.cookie, [want.ip], inbound.sock,
                                   exclude_ports=sorted(want.exclude_inbound))
        if want.other_ips:  # dual-stack: the mesh carries status.podIP only; the other family is
            # refused (as a pod the agent cannot serve), never left open around the mesh
            self.capture.refuse_inbound(ctx.netns_fd, ctx.cookie, list(want.other_ips),
                                        exclude_ports=sorted(want.exclude_inbound))

    def _routing(self, want: Wanted) -> podrouting.RoutingSpec:
        return podrouting.RoutingSpec(self.delivery_mark, (inpod.family_of(want.ip),))

    def _update(self, want: Wanted) -> None:
        e = self.enrolled[want.uid]
        try:
            self.capture.enrol_netns(e.ctx.cookie, exclude_outbound_ports=sorted(want.exclude_outbound))
            self._steer(e.ctx, want, e.listeners)
        except Exception as exc:
            # Half applied (outbound may have the new exclusions, inbound the old): retried
            # with backoff until both are in place; status shows it among the waiting.
            attempts, delay = self._retry_later(want, f"cannot update excluded ports: {exc}")
            self.metrics.enrol_errors.labels(reason="update").inc()
            self.log.warning("cannot update excluded ports of pod %s (attempt %d, retrying in %.1fs): %s",
                             e.ctx, attempts, delay, exc)
            return
        self.failures.pop(want.uid, None)
        e.wanted = want
        self.log.info("updated excluded ports of pod %s", e.ctx)

    # --- remove ---------------------------------------------------------------------
    def remove(self, uid: str) -> None:
        e = self.enrolled.pop(uid)
        self.resolver.forget(uid)
        self._stop_capture(e.ctx, e.wanted)
        for lst in e.listeners:
            lst.close()
        task = asyncio.get_running_loop().create_task(self._finish_removal(e))
        self.draining[task] = e
        task.add_done_callback(lambda t: self.draining.pop(t, None))
        self.metrics.enrolled.set(len(self.enrolled))
        self.log.info("removed pod %s from the mesh", e.ctx)

    def _held(self, but_failed: str | None = None) -> set[str]:
        """The IPs whose capture entries a pod of this agent needs: every enrolled pod's,
        and those of failed pods whose inbound is refused or whose netns a previous agent
        captured (adopted: kept, fail closed, until enrolled), but the failure of pod
        `but_failed`. The entries are keyed by IP alone, so a pod that goes must leave
        those another pod holds (a reused IP, a refused replacement)."""
        held = {ip for e in self.enrolled.values() for ip in e.wanted.ips}
        held |= {ip for f in self.failures.values()
                 if f.wanted.uid != but_failed and (f.refused_cookie is not None or f.adopted_cookie is not None)
                 for ip in f.wanted.ips}
        return held

    def _stop_capture(self, ctx: PodContext, want: Wanted) -> None:
        held = self._held(but_failed=want.uid)
        for undo in (lambda: self.capture.unsteer_inbound(ctx.cookie, [ip for ip in want.ips if ip not in held]),
                     lambda: self.capture.remove_netns(ctx.cookie)):
            try:
                undo()
            except Exception as exc:
                self.log.warning("removing capture of pod %s: %s", ctx, exc)

    async def _finish_removal(self, e: Enrolment) -> None:
        """Wait for the pod's inbound relays (they need the routing), then remove it."""
        inbound = set(e.ctx.tasks.get("inbound", ()))
        if inbound:
            await asyncio.wait(inbound)
        self._remove_routing(e.ctx, e.wanted)
        os.close(e.ctx.netns_fd)

    def _remove_routing(self, ctx: PodContext, want: Wanted) -> None:
        if want.uid in self.enrolled:
            return  # enrolled again meanwhile: it needs the routing
        try:
            podrouting.remove(ctx.netns_fd, self._routing(want))
        except OSError as exc:
            self.log.warning("removing delivery routing of pod %s: %s", ctx, exc)

    def _undo(self, ctx: PodContext, want: Wanted, listeners: list[InPodListener],
              refuse: bool = False) -> int | None:
        """Undo a half-made enrolment; with `refuse`, then refuse the pod's inbound in its
        netns (the cookie, None if that failed too)."""
        self._stop_capture(ctx, want)
        for lst in listeners:
            lst.close()
        refused = self._refuse(ctx, want) if refuse else None
        self._remove_routing(ctx, want)
        os.close(ctx.netns_fd)
        return refused

    def _refuse(self, ctx: PodContext, want: Wanted) -> int | None:
        """A meshed pod the agent cannot serve keeps no inbound path around the mesh: its
        IP's connections are dropped in its netns (but the tunnel port's and its excluded
        ports'), as when the agent is gone, until it is enrolled. Unrefused, an app that
        held 15006 took plaintext from anybody, every policy and STRICT unenforced."""
        try:
            self.capture.refuse_inbound(ctx.netns_fd, ctx.cookie, want.ips,
                                        exclude_ports=sorted(want.exclude_inbound))
        except Exception as exc:
            self.log.error("cannot refuse the inbound connections of pod %s, which is not enrolled: %s", ctx, exc)
            return None
        return ctx.cookie

    def _stop_refusing(self, failure: Failure) -> None:
        """The refusal of `failure` ends (its pod left the mesh or the node, or is enrolled
        in another netns): the link goes, and the IPs' entries but those another pod holds (_held)."""
        if failure.refused_cookie is None:
            return
        held = self._held(but_failed=failure.wanted.uid)  # reused meanwhile, or enrolled now
        ips = [ip for ip in failure.wanted.ips if ip not in held]
        try:
            self.capture.unsteer_inbound(failure.refused_cookie, ips)
        except Exception as exc:
            self.log.warning("removing the refusal of pod %s/%s: %s", failure.wanted.namespace,
                             failure.wanted.name, exc)

    # --- shutdown -------------------------------------------------------------------
    def stop_listening(self) -> None:
        """Handing the node over to the next agent: close every in-pod listener without
        accepting what is queued, which the kernel moves to the next agent's listener of
        the same reuseport group (tcp_migrate_req, podrouting.py). Capture and steering
        stay as they are (the next agent points them at its own listeners); the relays
        under way go on."""
        for e in self.enrolled.values():
            for lst in e.listeners:
                lst.close(accept_queued=False)

    async def drain(self, timeout: float) -> int:
        """Wait up to `timeout` seconds for the relays of every pod to end; how many are
        still running then."""
        tasks = {t for e in [*self.enrolled.values(), *self.draining.values()]
                 for bucket in e.ctx.tasks.values() for t in bucket}
        if not tasks:
            return 0
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return len(pending)

    async def close(self, keep_routing: bool) -> None:
        """Agent shutdown: stop listening and relaying; remove routing unless kept."""
        entries = list(self.enrolled.values())
        self.enrolled.clear()
        for e in entries:
            for lst in e.listeners:
                lst.close()
        for e in entries + list(self.draining.values()):
            for tasks in e.ctx.tasks.values():
                for t in list(tasks):
                    t.cancel()
        if self.draining:
            await asyncio.wait(list(self.draining), timeout=5)
        for e in entries:
            if not keep_routing:
                self._remove_routing(e.ctx, e.wanted)
            os.close(e.ctx.netns_fd)
        self.resolver.close()

    def describe(self) -> dict:
        return {"enrolled": [e.describe() for e in sorted(self.enrolled.values(),
                                                           key=lambda e: (e.wanted.namespace, e.wanted.name))],
                "waiting": [asdict(w) for w in self.waiting]
                + [f.describe() for f in sorted(self.failures.values(), key=lambda f: f.wanted.uid)]}

