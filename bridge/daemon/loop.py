"""The long-running loop of `cybedefend-bridge run`: threads, readiness, HA role, signals, shutdown.

It wires the lifecycles of parts the composition root (`bridge.app`) built:
- The scheduler's tick asks the trigger queue for a full pass; webhooks, forwarded requests and
  audit lines offer keys to the same queue; one worker thread takes `PassRequest`s and calls
  `engine.run()`, so passes never overlap whatever asked for them.
- HA: `LeaseKeeper` renews the lease on its own thread. Only the leader runs passes; a standby
  hands what it takes from its queue to the leader's `/v1/sync` (dropped and counted on failure:
  the leader's periodic pass is the safety net). Losing the lease mid-pass sets the engine's
  `stop` event so the pass ends after its current secret; a new leader's next full pass is
  brought forward.
- /healthz: our own threads only (scheduler, worker, lease keeper), never Vault or CybeDefend.
  /readyz: "can this replica accept work" — config loaded, HTTP bound, not draining. Never
  leadership or an upstream: with HA every replica is Ready (a standby forwards what it receives
  to the leader), so `helm --wait`, `kubectl rollout status`, Flux and Argo CD finish, and a
  Vault outage does not take every replica out of its Service (the webhook and audit ingest
  keep being answered; the periodic full pass catches up). Leadership, Vault health (probed
  every VAULT_HEALTH_CACHE_SECONDS by the upstream-health thread, never on a request path, so
  neither probes nor scrapes can hammer or wait for Vault), CybeDefend as the last pass
  saw it, and whether the last full pass is within `server.ready_max_intervals` periods are in
  /v1/status and the metrics instead.
- `run()` (main thread): SIGTERM/SIGINT stop taking triggers, set `stop` (the engine finishes the
  secret in flight), wait up to `sync.shutdown_grace_seconds`, release the lease, call
  `on_shutdown` (where the composition root closes the ledger and revokes the Vault token), and
  return 0; a second signal exits at once with 130. SIGHUP calls `reload`. Handlers are explicit
  because as PID 1 SIGTERM has no default action; no children are spawned, so nothing to reap.

Write-to-registered latency is observed by the engine itself, per secret, from
`PassRequest.received_at`, so the daemon does not observe it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from bridge.config import ScheduleSettings, Settings
from bridge.daemon.ha import LeaseKeeper, LeasePort, forward_to_leader
from bridge.daemon.server import Check, Hooks, IngestResult
from bridge.errors import ConfigError, IngestRejected
from bridge.logs import get_logger
from bridge.metrics import Metrics
from bridge.model import iso8601
from bridge.ports import PassRequest, PassRunner

log = get_logger(__name__)

VAULT_HEALTH_CACHE_SECONDS = 5.0
FORWARD_TIMEOUT_SECONDS = 2.0
_TAKE_TIMEOUT = 0.5  # how often the worker looks at the draining flag when idle, seconds


def settle_heap() -> None:
    """Collect once, then move every object alive into the collector's permanent generation.

    Called once, after the daemon's first full pass: what is alive then (modules, classes,
    settings, clients, pools; ~50,000 objects) stays for the process's life, and every full
    (generation 2) collection walked all of it again: 30-80 ms with the GIL held, every few
    seconds while audit events came in, since each targeted pass allocates its listing of the
    organization's credentials. A write whose pass met one waited that long: most of
    write-to-registered's p99 (docs/adr/0017). Frozen objects are still freed by reference
    counting; only a reference cycle among them that becomes garbage later is never collected,
    which is why this happens once and after a collection, not after every pass.
    """
    gc.collect()
    gc.freeze()


class TriggerQueuePort(Protocol):
    """What the daemon uses of `bridge.daemon.triggers.TriggerQueue`."""

    def offer(self, keys: list[str], source: str, heard_at: float | None = None) -> bool: ...
    def request_full(self, source: str) -> object: ...
    def take(self, timeout: float) -> PassRequest | None: ...
    def close(self) -> object: ...


class SchedulerPort(Protocol):
    """What the daemon uses of `bridge.daemon.scheduler.Scheduler`."""

    def start(self) -> None: ...
    def shutdown(self, wait: bool = True) -> None: ...
    def alive(self) -> bool: ...
    def run_soon(self) -> None: ...
    def reschedule(self, settings: ScheduleSettings) -> None: ...
    def period_seconds(self) -> float: ...
    def next_run_time(self) -> float | None: ...


class ServerPort(Protocol):
    def start(self) -> int: ...
    def stop(self) -> None: ...


class ServicePort(Protocol):
    """A trigger source with its own thread (audit file tailer, socket listener)."""

    def start(self) -> object: ...
    def close(self) -> object: ...


ServerHooks = Hooks  # the callables the daemon gives the HTTP server (`bridge.daemon.server.Hooks`)


@dataclass(frozen=True, slots=True)
class DaemonParts:
    """Everything the daemon runs, built by the composition root."""

    engine: PassRunner
    queue: TriggerQueuePort
    stop: threading.Event  # the same event the engine was built with; set on shutdown
    metrics: Metrics
    make_scheduler: Callable[[ScheduleSettings, Callable[[], None]], SchedulerPort]
    make_server: Callable[[ServerHooks], ServerPort]
    vault_healthy: Callable[[], bool]  # True when Vault answers and our token works
    lease: LeasePort | None = None  # None: no HA, this replica always acts
    forward_key: bytes | None = None  # signs forwards to the leader (Keyring.forward_key)
    audit_ingest: Callable[[bytes], IngestResult] | None = None  # server.make_audit_ingest
    services: Sequence[ServicePort] = ()
    reload: Callable[[], Settings] | None = None  # SIGHUP: new settings, or ConfigError
    on_shutdown: Callable[[], None] | None = None
    forward: Callable[[str, Sequence[str] | None], bool] | None = None  # default: forward_to_leader
    monotonic: Callable[[], float] = time.monotonic
    settle_heap: Callable[[], None] = settle_heap  # once, after the first full pass


class Daemon:
    def __init__(self, settings: Settings, parts: DaemonParts) -> None:
        self._settings = settings
        self._p = parts
        self._mono = parts.monotonic
        self._control: queue.SimpleQueue[str] = queue.SimpleQueue()  # reentrant: safe in signal handlers
        self._lock = threading.Lock()
        self._draining = threading.Event()
        self._shutting_down = False
        self._signalled = False  # plain flag read by the signal handler (no locks there)
        self._in_pass = False
        self._first_tick = True
        self._heap_settled = False
        self._last_full: float | None = None  # monotonic time the last full ok/partial pass ended
        self._last_result: str | None = None  # result of the last pass: CybeDefend health as it saw it
        self._vault_lock = threading.Lock()
        self._vault: tuple[float, bool] | None = None
        self._scheduler: SchedulerPort | None = None
        self._server: ServerPort | None = None
        self._worker: threading.Thread | None = None
        self._health: threading.Thread | None = None
        self._keeper: LeaseKeeper | None = None
        self.port: int | None = None
        forward = parts.forward
        if forward is None and parts.forward_key is not None:
            key = parts.forward_key
            forward = lambda addr, paths: forward_to_leader(addr, paths, key, timeout=FORWARD_TIMEOUT_SECONDS)  # noqa: E731
        self._forward = forward

    @property
    def settings(self) -> Settings:
        return self._settings

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> int:
        """Start the server, lease thread, worker, trigger services and scheduler; returns the port."""
        p = self._p
        if p.lease is None:
            p.metrics.leader.set(1)
        p.metrics.ready.set(0)
        self._server = p.make_server(ServerHooks(self.live, self.ready, self.status, self.on_sync, self._audit_hook()))
        self.port = self._server.start()
        if p.lease is not None:
            self._keeper = LeaseKeeper(p.lease, on_gain=self._on_gain, on_loss=self._on_loss)
            self._keeper.start()
        # daemon=True: past the grace period the process must be able to exit mid-secret.
        self._worker = threading.Thread(target=self._work, name="sync-worker", daemon=True)
        self._worker.start()
        # Upstream health is probed here, off every request path: a hung Vault must never make a
        # probe or a scrape wait, and the metrics stay true between scrapes and probes.
        self._health = threading.Thread(target=self._watch_upstreams, name="upstream-health", daemon=True)
        self._health.start()
        for service in p.services:
            service.start()
        self._scheduler = p.make_scheduler(self._settings.schedule, self._tick)
        self._scheduler.start()
        log.info("daemon_started", port=self.port, ha=p.lease is not None)
        return self.port

    def run(self) -> int:
        """Run until SIGTERM/SIGINT (or `request_stop()`); returns the exit code, 0 after a clean stop."""
        handlers: dict[signal.Signals, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                handlers[signum] = signal.signal(signum, self._on_signal)
        try:
            self.start()
            while True:
                try:
                    message = self._control.get(timeout=1.0)
                except queue.Empty:
                    continue
                if message == "reload":
                    self._reload()
                elif message.startswith("stop"):
                    log.info("stop_requested", signal=message.partition(":")[2] or None)
                    break
        finally:
            self.shutdown()
            for sig, previous in handlers.items():
                signal.signal(sig, previous)
        return 0

    def request_stop(self) -> None:
        self._control.put("stop")

    def request_reload(self) -> None:
        self._control.put("reload")

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: touch no lock (the interrupted code may
        # hold it), only the reentrant SimpleQueue and plain attributes.
        if signum == signal.SIGHUP:
            self._control.put("reload")
            return
        name = signal.Signals(signum).name
        if self._signalled:
            line = json.dumps({"level": "warning", "logger": __name__, "event": "second_signal_exit_now", "signal": name})
            with contextlib.suppress(OSError):
                os.write(2, (line + "\n").encode())
            os._exit(130)
        self._signalled = True
        self._control.put("stop:" + name)

    def shutdown(self) -> None:
        """Stop taking triggers, let the secret in flight finish (bounded), close everything. Idempotent."""
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
        self._signalled = True  # from here on a signal means "exit now"
        p, grace = self._p, self._settings.sync.shutdown_grace_seconds
        deadline = self._mono() + grace
        self._draining.set()
        p.metrics.ready.set(0)
        log.info("shutting_down", grace_seconds=grace)
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
        for service in p.services:
            _quietly("service_close_failed", service.close)
        p.queue.close()
        p.stop.set()
        if self._worker is not None:
            self._worker.join(timeout=max(0.0, deadline - self._mono()))
        finished = self._worker is None or not self._worker.is_alive()
        if not finished:
            log.warning("shutdown_grace_exceeded", grace_seconds=grace)
        if self._keeper is not None:
            self._keeper.stop()
        if p.lease is not None:
            _quietly("lease_release_failed", p.lease.release)
        if self._server is not None:
            _quietly("server_stop_failed", self._server.stop)
        if p.on_shutdown is not None:
            _quietly("on_shutdown_failed", p.on_shutdown)
        log.info("stopped", in_flight_finished=finished)

    def _reload(self) -> None:
        if self._p.reload is None:
            log.warning("config_reload_unsupported")
            return
        try:
            new = self._p.reload()
        except ConfigError as exc:
            log.error("config_reload_failed", key=exc.key, expected=exc.expected, kept="previous configuration")
            return
        except Exception as exc:
            log.error("config_reload_failed", error=type(exc).__name__, kept="previous configuration")
            return
        old = self._settings
        if new.schedule != old.schedule and self._scheduler is not None:
            try:
                self._scheduler.reschedule(new.schedule)
            except ConfigError as exc:
                log.error("config_reload_failed", key=exc.key, expected=exc.expected, kept="previous schedule")
                new = new.model_copy(update={"schedule": old.schedule})
        # Schedule and logging apply live (the composition root reconfigures logging in `reload`);
        # every other section is wired into long-lived parts, so say so rather than pretend.
        live = ("schedule", "logging")
        restart = [name for name in type(new).model_fields if name not in live and getattr(new, name) != getattr(old, name)]
        self._settings = new
        log.info("config_reloaded", needs_restart=restart)

    # -- threads --------------------------------------------------------------------------

    def _tick(self) -> None:
        lease = self._p.lease
        if self._draining.is_set() or (lease is not None and not lease.is_leader()):
            return
        trigger, self._first_tick = ("startup" if self._first_tick else "schedule"), False
        self._p.queue.request_full(trigger)

    def _work(self) -> None:
        while not self._draining.is_set():
            try:
                request = self._p.queue.take(_TAKE_TIMEOUT)
                if request is None or self._draining.is_set():
                    continue
                lease = self._p.lease
                if lease is not None and not lease.is_leader():
                    self._hand_over(request, lease)
                else:
                    self._run_pass(request)
            except Exception as exc:  # the worker must survive anything a pass throws
                log.error("worker_error", error=f"{type(exc).__name__}: {exc}")

    def _run_pass(self, request: PassRequest) -> None:
        with self._lock:
            if self._shutting_down:
                return
            self._p.stop.clear()  # a leftover from a lost-lease abort
            self._in_pass = True
        try:
            report = self._p.engine.run(request)
            self._last_result = report.result
            self._p.metrics.upstream_healthy.labels(upstream="cybedefend").set(0 if report.result == "failed" else 1)
        finally:
            with self._lock:
                self._in_pass = False
                if not self._shutting_down:
                    self._p.stop.clear()
        if report.full and report.result in ("ok", "partial"):
            self._last_full = self._mono()
        if report.full and not self._heap_settled:
            # Whatever its result: what start-up built is alive now, and its garbage is done.
            self._heap_settled = True
            self._p.settle_heap()

    def _hand_over(self, request: PassRequest, lease: LeasePort) -> None:
        paths = sorted(request.paths) if request.paths is not None else None
        address = lease.leader_address()
        if request.trigger == "forwarded":
            why = "already forwarded once"  # two replicas with stale views must not ping-pong
        elif address is None:
            why = "no leader known"
        elif self._forward is None:
            why = "no forward key"
        elif self._forward(address, paths):
            log.info("forwarded_to_leader", paths=len(paths) if paths is not None else "all")
            return
        else:
            why = "forward failed"
        self._p.metrics.trigger_dropped.labels(source="forwarded").inc(len(paths) if paths else 1)
        log.warning("forward_dropped", reason=why)

    def _on_gain(self) -> None:
        if self._scheduler is not None:
            self._scheduler.run_soon()  # a new leader should not wait a whole interval

    def _on_loss(self) -> None:
        with self._lock:
            if self._in_pass:
                self._p.stop.set()  # the pass ends after its current secret

    # -- server hooks ---------------------------------------------------------------------

    def on_sync(self, paths: list[str] | None, source: str) -> bool:
        """POST /v1/sync: queue the paths (or a full pass). False while shutting down."""
        if self._draining.is_set():
            return False
        if paths is None:
            self._p.queue.request_full(source)
        else:
            self._p.queue.offer(paths, source)  # False on overflow: the queue asked for a full pass
        return True

    def _audit_hook(self) -> Callable[[bytes], Mapping[str, int] | None] | None:
        ingest = self._p.audit_ingest
        if ingest is None:
            return None

        def on_audit(body: bytes) -> Mapping[str, int] | None:
            if self._draining.is_set():
                return None
            try:
                result = ingest(body)
            except IngestRejected as exc:
                if exc.too_large:  # writes were lost: a full pass covers them
                    self._p.queue.request_full("audit_ingest")
                raise
            if result.keys:
                self._p.queue.offer(result.keys, "audit_ingest")
            return result.counts()

        return on_audit

    def live(self) -> list[Check]:
        """Our own threads only: a dead upstream must never get the pod restarted."""
        worker = self._worker is not None and self._worker.is_alive()
        scheduler = self._scheduler is not None and self._scheduler.alive()
        checks: list[Check] = [("sync-worker", worker, "thread not running"), ("scheduler", scheduler, "not running")]
        if self._p.lease is not None:
            keeper = self._keeper is not None and self._keeper.alive()
            checks.append(("lease-keeper", keeper, "thread not running"))
        return checks

    def ready(self) -> list[Check]:
        """Can this replica accept work? Never leadership nor an upstream (see the module docstring)."""
        checks: list[Check] = [
            ("config", True, ""),  # this object exists only with validated settings
            ("http", self.port is not None, "not bound"),
            ("triggers", not self._draining.is_set(), "shutting down"),
        ]
        self._p.metrics.ready.set(1 if all(c[1] for c in checks) else 0)
        return checks

    def _watch_upstreams(self) -> None:
        while not self._draining.is_set():
            try:
                self._refresh_upstreams()
            except Exception as exc:  # the watcher outlives anything a probe throws
                log.warning("upstream_health_failed", error=type(exc).__name__)
            self._draining.wait(VAULT_HEALTH_CACHE_SECONDS)

    def _refresh_upstreams(self) -> bool:
        vault = self._vault_ok()
        self._p.metrics.upstream_healthy.labels(upstream="vault").set(1 if vault else 0)
        lease = self._p.lease
        self._p.metrics.leader.set(1 if lease is None or lease.is_leader() else 0)
        return vault

    def _pass_fresh(self) -> tuple[bool, float | None, float]:
        period = self._scheduler.period_seconds() if self._scheduler else self._settings.schedule.interval_seconds
        limit = self._settings.server.ready_max_intervals * period
        age = None if self._last_full is None else self._mono() - self._last_full
        fresh = age is not None and age <= limit
        self._p.metrics.full_pass_fresh.set(1 if fresh else 0)
        return fresh, age, limit

    def _vault_ok(self) -> bool:
        now = self._mono()
        cached = self._vault
        if cached is not None and now - cached[0] < VAULT_HEALTH_CACHE_SECONDS:
            return cached[1]
        if not self._vault_lock.acquire(blocking=False):
            return cached[1] if cached is not None else False  # another probe is asking Vault
        try:
            try:
                healthy = bool(self._p.vault_healthy())
            except Exception:
                healthy = False
            self._vault = (self._mono(), healthy)
            return healthy
        finally:
            self._vault_lock.release()

    def status(self) -> Mapping[str, Any]:
        doc = dict(self._p.engine.status())
        lease = self._p.lease
        checks = self.ready()
        vault = self._vault[1] if self._vault is not None else None  # as last probed (None: not yet)
        fresh, age, limit = self._pass_fresh()
        doc["daemon"] = {
            "ready": all(c[1] for c in checks),
            "ready_checks": {name: "ok" if ok else reason for name, ok, reason in checks},
            "leader": lease.is_leader() if lease is not None else True,
            "leader_address": lease.leader_address() if lease is not None else None,
            "ha": lease is not None,
            "vault": {"healthy": vault},
            # What CybeDefend looked like to the last pass (None before one): the bridge does not
            # probe it on its own, since every probe would cost a token exchange.
            "cybedefend": {"healthy": None if self._last_result is None else self._last_result != "failed",
                           "last_pass_result": self._last_result},
            "next_full_pass_at": iso8601(self._scheduler.next_run_time() if self._scheduler else None),
            "last_full_pass_age_seconds": None if age is None else round(age, 3),
            "last_full_pass_fresh": fresh,
            "last_full_pass_max_age_seconds": round(limit, 3),
            "draining": self._draining.is_set(),
        }
        return doc


def _quietly(event: str, fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception as exc:  # shutdown continues whatever one part does
        log.error(event, error=type(exc).__name__)
