"""`nodeagent run`: the agent's asyncio main.

Start-up: load capture (preflight, compile, adopt pinned maps, attach), start the admin
endpoints, start the source (`files:DIR`, woken by inotify, or `kube`, woken by its
watches: sources/kube.py), then reconcile: every meshed local pod is (re-)enrolled — idempotent, so a
restart after a crash adopts what the previous agent left — and capture entries of netns
cookies no longer meshed are removed. Then the source is checked every poll interval
(and at once when inotify or a watch reports a change) and each new model is reconciled: policies
rebuilt first (new connections see them at once), then enrolment, then the workload
identities of the enrolled pods (fetched ahead, forgotten when unused) and the release
of removed pods' tunnel connections. Ready (`/healthz/ready`, status) means "can serve":
the first reconcile is done and every enrolled pod's identity has a valid certificate
(when there is a CA; one a previous agent left counts, so a restart while the CA is down
stays ready). The data path is wired in datapath.py. SIGTERM or SIGINT: stop listening
and relaying and leave capture and in-pod routing for the next agent (--on-exit=keep, the
default), as a SIGKILL does: meshed pods fail closed until it is ready. --on-exit=remove
(--no-keep-on-exit) removes them, as `nodeagent uninstall` does; --on-exit=owner (the
DaemonSet's) removes them only when the agent saw its DaemonSet deleted or its Namespace
terminating (kube/owner.py), asking the API once more, briefly, at the signal. The
decision and its reason are logged.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import resource
import signal
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from nodeagent import __version__
from nodeagent.agent import logs
from nodeagent.admin import AdminServer, Readiness, ReadinessFile, readiness_path
from nodeagent.agent.config import AgentConfig, cluster_config
from nodeagent.agent.configwork import ConfigWork
from nodeagent.agent.datapath import DataPath
from nodeagent.agent.inpod.enrolment import Enroller, Handlers, Ports
from nodeagent.agent.inpod.sockets import PodContext
from nodeagent.agent.metrics import AgentMetrics
from nodeagent.agent.inpod.podns import PodNetnsResolver
from nodeagent.agent.watch import DirectoryWatch
from nodeagent.kube import events
from nodeagent.kube.client import KubeApiError
from nodeagent.kube.owner import CONFIRM_SECONDS, ExitDecision, OwnerWatch
from nodeagent.model import Model
from nodeagent.sources.files import FilesSource
from nodeagent.xds.istio.config import IstioConfig
from nodeagent.xds.istio.problems import problems
from nodeagent.sources.kube import KubeSource

# Bound of the drain at a rolling update: within the DaemonSet's 30 s grace period, after
# the API look at exit (CONFIRM_SECONDS) and before the close.
DRAIN_SECONDS = 20.0


class Agent:
    def __init__(self, config: AgentConfig, *, capture, registry: CollectorRegistry,
                 log: logging.Logger, source: FilesSource | KubeSource | None = None,
                 resolver: PodNetnsResolver | None = None):
        self.config = config
        self.capture = capture
        self.registry = registry
        self.log = log
        self.metrics = AgentMetrics(registry)
        self.source = source or new_source(config, log.getChild("source"))
        self.model = Model.empty()
        self._round_failed = False  # the last round raised: the next one redoes it all
        self.model_changed_at: float | None = None
        self.started_at = time.time()
        self.reconciled = False  # the first reconcile is done (part of readiness)
        self._istio: IstioConfig | None = None  # validation of the Istio resources, without a waypoint (events)
        self._event_errors: dict[str, str] = {}  # the source's errors the last Events were computed with
        self.work = ConfigWork(log.getChild("config"))
        self.datapath = DataPath(config, registry=registry, metrics=self.metrics, capture=capture, log=log,
                                 model=lambda: self.model, pod_at=self.pod_at, work=self.work)
        self.enroller = self._enroller(resolver or PodNetnsResolver())
        self.admin = AdminServer(registry=registry, status=self.status, ready=self.readiness,
                                 log=log.getChild("admin"))

    def _enroller(self, resolver: PodNetnsResolver) -> Enroller:
        c, d = self.config, self.datapath
        return Enroller(node=c.node, capture=self.capture, resolver=resolver,
                        ports=Ports(c.outbound_port, c.inbound_port, c.tunnel_port),
                        handlers=Handlers(d.outbound.handle, d.inbound.handle, d.tunnel.handle,
                                          outbound_offload=d.outbound.offload),
                        delivery_mark=c.delivery_mark, metrics=self.metrics, log=self.log.getChild("enrolment"))

    def pod_at(self, ip: str) -> PodContext | None:
        """The enrolled pod with this IP."""
        return next((e.ctx for e in self.enroller.enrolled.values() if e.wanted.ip == ip), None)

    # --- lifecycle ------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        if self.config.admin_socket is not None:  # a crashed predecessor's verdict is not ours
            ReadinessFile(readiness_path(self.config.admin_socket), self.readiness, self.log).clear()
        self.capture.load()
        at_exit = self._exit_default()
        try:
            await self.admin.start(self.config.admin_address, self.config.admin_socket)
            watch = self._wakeup()
            try:
                await self.datapath.start()
                await self._first_reconcile(stop, watch)
                if stop.is_set():
                    return
                self.datapath.identities.discard_unclaimed()  # the source read: the local pods are known
                self.reconciled = True
                self.log.info("agent reconciled on node %s: %d pods enrolled; %s", self.config.node,
                              len(self.enroller.enrolled), "; ".join(self.readiness().missing) or "ready")
                await self._loop(stop, watch)
            finally:
                self._hand_over()  # at once: the next agent, if any, serves from now on
                at_exit = await self._exit_decision(at_exit)  # while the source still runs
                if not at_exit.remove and self.config.on_exit == "owner":
                    await self._drain()
                watch.close()
                await asyncio.to_thread(self.work.close)  # the config step under way ends first
                await self.enroller.close(keep_routing=not at_exit.remove)
                await self.datapath.close()
                await self.admin.close()
        finally:
            self.capture.close(keep=not at_exit.remove)
            self.log.info("agent stopped: %s", "capture detached and unpinned, pods' routing removed"
                          if at_exit.remove else "capture kept for the next agent")

    def _hand_over(self) -> None:
        """Stop taking connections: close the in-pod listeners (what they queued moves to
        the next agent's, tcp_migrate_req) and have the HBONE connections of the pods take
        no new streams (refused, so their clients retry on a new connection: the next
        agent's). The relays under way go on until `_drain` or the close."""
        try:
            self.enroller.stop_listening()
            for e in list(self.enroller.enrolled.values()):
                self.datapath.tunnel.drain(e.wanted.ip)
        except Exception:  # the shutdown goes on: the close below closes what is left
            self.log.exception("handing over the pods' listeners failed")

    async def _drain(self) -> None:
        """A rolling update (--on-exit=owner, keeping capture): let the relays under way
        end, up to DRAIN_SECONDS, before the rest is closed (reset)."""
        started = time.monotonic()
        left = await self.enroller.drain(DRAIN_SECONDS)
        left += await self.datapath.drain(max(0.0, DRAIN_SECONDS - (time.monotonic() - started)))
        self.log.info("drained the relays in %.1fs%s", time.monotonic() - started,
                      f"; {left} still open are closed now" if left else "")

    def _exit_default(self) -> ExitDecision:
        """What exit does before the owner watch could say anything (--on-exit=owner: keep)."""
        mode = self.config.on_exit
        if mode == "owner":
            return ExitDecision(False, "the agent stopped before it could watch its DaemonSet")
        return ExitDecision(mode == "remove", f"--on-exit={mode}")

    async def _exit_decision(self, default: ExitDecision) -> ExitDecision:
        """--on-exit=owner: what the owner watch saw; when that says keep, one fresh look
        (pod, DaemonSets, Namespace) bounded by CONFIRM_SECONDS, since the DaemonSet's
        deletion may still be on its way. Logged with its reason; never raises."""
        owner = getattr(self.source, "owner", None)
        decision = default
        if self.config.on_exit == "owner" and isinstance(owner, OwnerWatch):
            decision = owner.decision()
            if not decision.remove:
                try:
                    await asyncio.wait_for(self.source.run_here(owner.confirm()), CONFIRM_SECONDS)
                except asyncio.TimeoutError:
                    self.log.warning("no answer from the API within %gs at exit", CONFIRM_SECONDS)
                except (KubeApiError, RuntimeError) as exc:
                    self.log.warning("cannot ask the API at exit: %s", exc)
                decision = owner.decision()
        self.log.info("agent stopping: %s", decision)
        return decision

    def _wakeup(self) -> DirectoryWatch | Any:
        """What wakes the agent when the source changes: inotify on the files source's
        directory, or the kube source's watches (which this starts; closing it stops them)."""
        if isinstance(self.source, KubeSource):
            return self.source.wakeup()
        return DirectoryWatch(self.config.source_dir, self.log.getChild("watch"))

    async def _first_reconcile(self, stop: asyncio.Event, watch: "DirectoryWatch") -> None:
        """Read the source until it reads (an unreadable one is no empty cluster: capture
        left pinned by a previous agent stays, and the agent is not ready), then reconcile
        and drop what a previous agent left for pods that are gone."""
        await self._poll_and_reconcile(force=True)
        while self.source.scan_error is not None:
            await watch.wait(stop, self.config.poll_interval)
            if stop.is_set():
                return
            await self._poll_and_reconcile(force=True)
        stale = self.enroller.remove_stale(self.model)
        if stale:
            self.log.info("removed %d stale capture entries left by a previous agent", len(stale))

    async def _loop(self, stop: asyncio.Event, watch: "DirectoryWatch") -> None:
        while not stop.is_set():
            await watch.wait(stop, self._next_look(watch))
            if stop.is_set():
                return
            try:
                await self._poll_and_reconcile(force=self._round_failed, rebuild=self._round_failed)
                self._round_failed = False
            except Exception:  # a bug in one round must not end the agent; the next round retries
                self._round_failed = True
                self.log.exception("reconcile failed; retrying next round")

    def _next_look(self, watch: "DirectoryWatch") -> float:
        """Seconds until the source is read again without a change reported: the poll
        interval while inotify cannot be trusted to report every change or a pod's
        enrolment waits for a retry, else the resync interval (a full scan of a 10k-object
        directory every poll interval kept an idle agent at 55 % CPU)."""
        if not watch.reliable or self.enroller.failures or self._round_failed:
            return self.config.poll_interval
        return self.config.resync_interval

    async def _poll_and_reconcile(self, force: bool = False, rebuild: bool = False) -> None:
        """Read the source; on a new model (or `rebuild`, after a failed round) rebuild the
        data path's configuration; on a new model, `force` (first or failed round) or a
        due retry, reconcile enrolment."""
        model = await self.work.run(self.source.poll)
        if model is not None:
            self.model = model
            self.model_changed_at = time.time()
        if model is not None or rebuild:
            # The pods' new labels go in force with the policies of the same model (refreshed
            # before the build, a pod relabelled out of an ALLOW's selector while a new ALLOW
            # selected its new labels was allow-all until the build ended), before the data
            # path re-checks what is open under both.
            current = self.model
            await self.datapath.update(current, lambda: self.enroller.refresh(current))
        if getattr(self.source, "events", None) is not None and (
                model is not None or rebuild or self.source.errors != self._event_errors):
            try:  # a refusal by the source alone changes no model, only its errors
                await self.work.run(self._report_events, self.model)
            except Exception:  # reporting must never stop a reconcile
                self.log.exception("cannot compute the Events of the verdicts")
        if model is not None or force or self.enroller.retry_due():
            before = {e.ctx for e in self.enroller.enrolled.values()}
            await self.enroller.reconcile(self.model)
            enrolled = list(self.enroller.enrolled.values())
            self.datapath.enrolled([e.ctx.pod for e in enrolled], before - {e.ctx for e in enrolled})

    def _report_events(self, model: Model) -> None:
        """In the config thread: the verdicts status shows (the source's refusals, the
        policies', the Istio kinds', and the waypoint's validation — or, without a
        waypoint, the same IstioConfig validation it would run) handed to the kube
        source's Event writer (kube/events.py), so every agent reports the same."""
        policies, waypoint = self.datapath.policies, self.datapath.waypoint
        self._event_errors = source_errors = self.source.errors
        errors = [*source_errors.values(), *(str(e) for e in policies.errors), *policies.kinds["errors"]]
        warnings = list(policies.kinds["warnings"])
        if waypoint is not None:
            config = waypoint.publisher.config
            warnings += list(waypoint.publisher.warnings)
        else:
            config = self._istio = IstioConfig.build(model, self._istio, self.config.root_namespace)
            warnings += [str(w) for w in config.warnings]
        errors += [str(e) for e in config.errors]
        warnings = [w for w in warnings if "not in force" in w or "not applicable" in w]
        objects = [o for objs in model.resources.values() for o in objs]
        self.source.events.submit(problems(objects, errors, warnings, self.source.refused()))

    # --- status ---------------------------------------------------------------------
    def readiness(self) -> Readiness:
        """Can serve: the first reconcile is done, every pod captured before this agent
        (by the previous one) is enrolled — listeners open, steering at them — and every
        enrolled pod's identity has a valid certificate now; else what is missing. A
        rolling update deletes the old agent only once this holds for the new one."""
        if not self.reconciled:
            scan_error = self.source.scan_error
            return Readiness((f"cluster state not read yet: {scan_error}" if scan_error
                              else "first reconcile not done yet",))
        pods = [e.ctx.pod for e in self.enroller.enrolled.values()]
        failed = [f"pod {f.wanted.namespace}/{f.wanted.name} is not enrolled: {f.reason}"
                  for f in sorted(self.enroller.failures.values(), key=lambda f: f.wanted.uid) if f.blocks_readiness]
        return Readiness(tuple(failed + self.datapath.identities.missing(pods)))

    def status(self) -> dict[str, Any]:
        enrolment = self.enroller.describe()
        try:
            capture = self.capture.stats()
        except Exception as exc:  # status must render even when the maps cannot be read
            capture = {"error": str(exc)}
        return {
            "node": self.config.node, "version": __version__, "pid": os.getpid(),
            "started_at": self.started_at, **self._readiness_status(),
            "source": {"location": getattr(self.source, "location", self.config.source),
                       "errors": dict(self.source.errors),
                       **({"events": self.source.events.describe()}
                          if getattr(self.source, "events", None) is not None else {}),
                       **({"owner": self.source.owner.describe()}
                          if getattr(self.source, "owner", None) is not None else {}),
                       "model_changed_at": self.model_changed_at,
                       "pods_on_node": len(self.model.pods_on_node(self.config.node))},
            "pods": enrolment["enrolled"], "waiting": enrolment["waiting"],
            "capture": capture, "counters": self.metrics.snapshot(),
            "config": self.config.as_dict(), "open_files": open_files(), **self.datapath.describe(),
        }

    def _readiness_status(self) -> dict[str, Any]:
        readiness = self.readiness()
        return {"ready": bool(readiness), "not_ready": list(readiness.missing)}


def new_source(config: AgentConfig, log: logging.Logger) -> FilesSource | KubeSource:
    """The source `config.source` names (the kube source's reflectors start with its wake-up)."""
    if config.source_kind == "kube":
        source = KubeSource(cluster_config(config.kubeconfig), log=log)
        source.events = events.EventWriter(source.client, config.node, log.getChild("events"))
        if config.on_exit == "owner" and config.pod is not None:
            source.owner = OwnerWatch(source.client, *config.pod, log=log.getChild("owner"))
        return source
    return FilesSource(config.source_dir, log=log)


def new_capture(config: AgentConfig, log: logging.Logger):
    from nodeagent.capture.loader import CaptureLoader  # bcc runs in its compile process, never here

    return CaptureLoader(cgroup=str(config.cgroup), pin_dir=str(config.bpffs), mark=config.mark,
                         outbound_port=config.outbound_port, inbound_port=config.inbound_port,
                         tunnel_port=config.tunnel_port, admin_port=config.admin_port,
                         compile_timeout=config.compile_timeout, log=log.getChild("capture"))


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """At most `arenas` glibc malloc arenas. The agent has ~20 threads (gRPC's, the
    CA client's, the watches') that each allocate a little: glibc gives each its own
    arena by default, up to 8 per core, and each arena keeps its freed pages (small
    Python objects live in pymalloc's pools; larger ones and the C libraries' memory
    here). Measured at 50 meshed pods per node: with the lab's machinery no longer
    imported, the agent's RSS went from 124 to 110 MiB. False where the C library is
    not glibc (nothing changes there)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


OPEN_FILES_WANTED = 65536  # below this the agent warns at start


def raise_open_files() -> tuple[int, int]:
    """(before, after): the soft limit of open descriptors raised to the hard one, as Go's
    runtime does for every Go program at start (kubelet, containerd, ztunnel does it too).
    Container runtimes start processes at systemd's 1024 soft (containerd 2 no longer
    raises it), and a relayed connection holds two or three descriptors: at 1024 the
    agent would fail connections (EMFILE) past ~300 at once. A hard limit of infinity
    stops at the kernel's fs.nr_open."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            return soft, soft
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return soft, target
    return soft, soft


def open_files() -> dict[str, int]:
    """Descriptors open now and the soft limit (status)."""
    return {"open": len(os.listdir("/proc/self/fd")), "limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}


def run(config: AgentConfig) -> int:
    """Run the agent until SIGTERM/SIGINT; the `nodeagent run` entry point."""
    limit_malloc_arenas()
    before, after = raise_open_files()
    log = logs.configure(config.log_level, config.log_format)
    if after != before:
        log.info("open descriptors: soft limit raised from %d to %d (the hard limit)", before, after)
    if after < OPEN_FILES_WANTED:
        log.warning("open descriptors: at most %d (the container's hard limit); a relayed connection takes two or "
                    "three, so connections past ~%d at once will fail: raise the nofile limit of the agent's "
                    "container runtime", after, after // 3)
    agent = Agent(config, capture=new_capture(config, log), registry=CollectorRegistry(), log=log)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    asyncio.run(main())
    return 0
