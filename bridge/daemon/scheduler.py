"""When full passes run: one APScheduler 3.x job; the only module that imports apscheduler.

The job itself does almost nothing (the daemon's tick puts "full pass" on the trigger queue),
so it returns at once; passes never overlap because a single worker drains that queue. The
scheduler's own guards are still explicit so that a slow tick cannot pile up:
`max_instances=1` (an overlapping run is skipped and counted), `coalesce=True` (runs missed
while the process was stopped collapse into one), `misfire_grace_time` (a run later than that is
dropped; the next one covers it).

Jitter is drawn from the injected random source rather than APScheduler's module-level
`random`, so tests can pin it. Cron expressions are read with crontab's weekday numbering
(0 and 7 are Sunday), which APScheduler 3.x's `from_crontab` does not do (it counts from
Monday, see its docstring), and are evaluated in UTC.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import (
    EVENT_JOB_ERROR,
    EVENT_JOB_EXECUTED,
    EVENT_JOB_MAX_INSTANCES,
    EVENT_JOB_MISSED,
)
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from bridge.config import ScheduleSettings
from bridge.errors import ConfigError
from bridge.logs import get_logger
from bridge.metrics import Metrics

log = get_logger(__name__)

JOB_ID = "full-pass"
_EVENT_NAMES = {
    EVENT_JOB_EXECUTED: "executed",
    EVENT_JOB_MISSED: "missed",
    EVENT_JOB_MAX_INSTANCES: "skipped",
    EVENT_JOB_ERROR: "error",
}
_CRONTAB_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


class _JitteredInterval(IntervalTrigger):  # type: ignore[misc]  # apscheduler ships no types
    """An interval trigger whose jitter comes from an injected `random.Random`."""

    def __init__(self, seconds: float, jitter: float, rng: random.Random) -> None:
        super().__init__(seconds=seconds, timezone=UTC)
        self._max_jitter = jitter
        self._rng = rng

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        fire: datetime | None = super().get_next_fire_time(previous_fire_time, now)
        if fire is None or self._max_jitter <= 0:
            return fire
        return fire + timedelta(seconds=self._rng.uniform(0, self._max_jitter))


def _crontab_day(token: str) -> int:
    token = token.strip().lower()
    if token.isdigit() and 0 <= int(token) <= 7:
        return int(token)
    if token[:3] in _CRONTAB_DAYS:
        return _CRONTAB_DAYS.index(token[:3])
    raise ValueError(f"invalid day of week {token!r} (expected 0-7 or sun..sat)")


def crontab_weekdays(field: str) -> str:
    """Translate crontab's day-of-week field (Sunday = 0 or 7) into APScheduler day names.

    Names sidestep the numbering mismatch and the wrap-around ranges APScheduler refuses,
    so `1-5` means Monday to Friday and `5-7` Friday to Sunday, as in crontab.
    """
    if field == "*":
        return field
    days: set[int] = set()
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise ValueError(f"invalid step in {part!r}")
        if span == "*":
            low, high = 0, 6
        elif "-" in span:
            first, last = span.split("-", 1)
            low, high = _crontab_day(first), _crontab_day(last)
        else:
            low = _crontab_day(span)
            high = 7 if step_text else low
        if low > high:
            raise ValueError(f"range {span!r} runs backwards")
        days.update(d % 7 for d in range(low, high + 1, step))
    aps_order = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
    names = {_CRONTAB_DAYS[d] for d in days}
    return ",".join(n for n in aps_order if n in names)


def build_cron_trigger(expr: str) -> Any:
    """A UTC `CronTrigger` for a 5-field crontab expression; ConfigError naming the key if bad."""
    fields = expr.split()
    if len(fields) != 5:
        raise ConfigError("schedule.cron", f"expected 5 crontab fields, got {len(fields)}")
    if fields[2] != "*" and fields[4] != "*":
        # crontab runs when either day field matches, APScheduler only when both do.
        raise ConfigError("schedule.cron", "restrict day of month or day of week, not both")
    try:
        fields[4] = crontab_weekdays(fields[4])
        return CronTrigger.from_crontab(" ".join(fields), timezone=UTC)
    except ValueError as exc:
        raise ConfigError("schedule.cron", f"not a valid crontab expression: {exc}") from exc


def _build_trigger(settings: ScheduleSettings, rng: random.Random) -> Any:
    if settings.cron:
        return build_cron_trigger(settings.cron)
    return _JitteredInterval(settings.interval_seconds, settings.interval_seconds * settings.jitter_fraction, rng)


class Scheduler:
    """Calls `on_tick` for every scheduled full pass; `start`, `shutdown`, `alive` for /healthz."""

    def __init__(
        self,
        settings: ScheduleSettings,
        on_tick: Callable[[], None],
        metrics: Metrics,
        *,
        rng: random.Random,
    ) -> None:
        self._settings = settings
        self._on_tick = on_tick
        self._metrics = metrics
        self._rng = rng
        self._trigger = _build_trigger(settings, rng)
        self._lock = threading.Lock()
        self._started = False
        # One worker thread: the tick is tiny, and a second thread could only ever be blocked
        # by max_instances anyway.
        self._sched = BackgroundScheduler(
            timezone=UTC, executors={"default": ThreadPoolExecutor(max_workers=1)}, daemon=True
        )
        self._sched.add_listener(
            self._on_event, EVENT_JOB_EXECUTED | EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_ERROR
        )
        for name in _EVENT_NAMES.values():
            metrics.scheduler_events.labels(event=name)  # export zeroes before the first event

    @property
    def settings(self) -> ScheduleSettings:
        return self._settings

    def _grace(self) -> int:
        # APScheduler insists on a positive whole number of seconds.
        return max(1, math.ceil(self._settings.misfire_grace_seconds))

    def start(self) -> None:
        """Start the scheduler; the first run comes after a random delay up to first_run_max_delay_seconds."""
        with self._lock:
            if self._started:
                return
            delay = self._rng.uniform(0, self._settings.first_run_max_delay_seconds)
            self._sched.add_job(
                self._on_tick,
                trigger=self._trigger,
                id=JOB_ID,
                name="full pass",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=self._grace(),
                next_run_time=datetime.now(UTC) + timedelta(seconds=delay),
                replace_existing=True,
            )
            self._sched.start()
            self._started = True
        log.info(
            "scheduler_started",
            mode="cron" if self._settings.cron else "interval",
            first_run_in_seconds=round(delay, 3),
            period_seconds=round(self.period_seconds(), 3),
        )

    def shutdown(self, wait: bool = True) -> None:
        """Stop scheduling; `wait` waits for a tick that is running. Safe to call twice."""
        with self._lock:
            if not self._started:
                return
            self._started = False
        if self._sched.running:
            self._sched.shutdown(wait=wait)

    def alive(self) -> bool:
        """True while the scheduler runs and its thread is alive (for /healthz)."""
        if not self._started or not self._sched.running:
            return False
        thread = getattr(self._sched, "_thread", None)  # BackgroundScheduler's loop thread
        return thread is not None and bool(thread.is_alive())

    def run_soon(self) -> None:
        """Bring the next run forward to now (after a queue overflow, or on becoming leader)."""
        with self._lock:
            if not self._started:
                return
            self._sched.modify_job(JOB_ID, next_run_time=datetime.now(UTC))

    def reschedule(self, settings: ScheduleSettings) -> None:
        """Apply new schedule settings (SIGHUP); ConfigError leaves the old schedule in place."""
        trigger = _build_trigger(settings, self._rng)
        with self._lock:
            self._settings = settings
            self._trigger = trigger
            if self._started:
                self._sched.reschedule_job(JOB_ID, trigger=trigger)
                self._sched.modify_job(JOB_ID, misfire_grace_time=self._grace())

    def next_run_time(self) -> float | None:
        """Unix time of the next run, or None when not scheduled."""
        job = self._sched.get_job(JOB_ID)
        when = getattr(job, "next_run_time", None) if job is not None else None
        return when.timestamp() if isinstance(when, datetime) else None

    def period_seconds(self) -> float:
        """The nominal time between runs: the interval, or for cron the gap between its next two runs."""
        if not self._settings.cron:
            return float(self._settings.interval_seconds)
        now = datetime.now(UTC)
        first = self._trigger.get_next_fire_time(None, now)
        second = self._trigger.get_next_fire_time(first, first) if first is not None else None
        if first is None or second is None:
            return float(self._settings.interval_seconds)
        return float((second - first).total_seconds())

    def _on_event(self, event: Any) -> None:
        name = _EVENT_NAMES.get(event.code)
        if name is None:
            return
        self._metrics.scheduler_events.labels(event=name).inc()
        if name == "error":
            exc = getattr(event, "exception", None)
            log.error("scheduler_tick_failed", error=f"{type(exc).__name__}: {exc}")
        elif name in ("missed", "skipped"):
            log.warning("scheduler_run_" + name, job=JOB_ID)
