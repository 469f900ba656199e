"""The APScheduler wrapper: runs, no overlap, missed/skipped/error events, cron, injected jitter."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest

from bridge.config import ScheduleSettings
from bridge.daemon.scheduler import Scheduler, build_cron_trigger, crontab_weekdays
from bridge.errors import ConfigError
from bridge.metrics import Metrics
from tests.support.procs import eventually


def settings(**kw: Any) -> ScheduleSettings:
    # model_construct: sub-second intervals (validation wants >= 5 s) keep the tests fast.
    base: dict[str, Any] = {
        "interval_seconds": 0.2,
        "jitter_fraction": 0.0,
        "cron": None,
        "misfire_grace_seconds": 5.0,
        "first_run_max_delay_seconds": 0.0,
    }
    base.update(kw)
    return ScheduleSettings.model_construct(**base)


class FixedRng(random.Random):
    """`uniform` answers from a script (then repeats the last value) and records its bounds."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]


def event_count(m: Metrics, event: str) -> float:
    value = m.registry.get_sample_value("cybedefend_bridge_scheduler_events_total", {"event": event})
    return value or 0.0




@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def test_interval_job_runs_repeatedly_and_counts_executions(metrics: Metrics) -> None:
    ticks: list[float] = []
    s = Scheduler(settings(), lambda: ticks.append(time.monotonic()), metrics, rng=random.Random(1))
    assert event_count(metrics, "executed") == 0  # the series exist before the first run
    s.start()
    try:
        assert s.alive()
        assert eventually(lambda: len(ticks) >= 4)
        assert eventually(lambda: event_count(metrics, "executed") >= 4)
    finally:
        s.shutdown()
    assert not s.alive()
    # Nothing can run after shutdown: shutdown() joined the loop thread and the executor's workers.
    left = [t.name for t in threading.enumerate() if t.name.startswith(("APScheduler", "ThreadPoolExecutor"))]
    assert left == []


def test_a_slow_tick_never_overlaps_and_overlaps_are_counted_as_skipped(metrics: Metrics) -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    done = threading.Event()

    def tick() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.7)
        with lock:
            running -= 1
        done.set()

    s = Scheduler(settings(interval_seconds=0.1), tick, metrics, rng=random.Random(1))
    s.start()
    try:
        assert done.wait(5)
        assert eventually(lambda: event_count(metrics, "skipped") >= 1)
    finally:
        s.shutdown(wait=True)
    assert most == 1


def test_a_run_later_than_the_grace_time_is_missed_not_run(metrics: Metrics) -> None:
    ticks: list[int] = []
    # The first run is placed 30 s in the past (a process suspended that long looks the same),
    # with a grace of 1 s: APScheduler must report it missed and not call the job.
    s = Scheduler(
        settings(interval_seconds=3600, misfire_grace_seconds=1, first_run_max_delay_seconds=10),
        lambda: ticks.append(1),
        metrics,
        rng=FixedRng(-30.0, 0.0),
    )
    s.start()
    try:
        # The missed event is APScheduler's decision not to run that fire time; the next is an hour away.
        assert eventually(lambda: event_count(metrics, "missed") == 1)
    finally:
        s.shutdown()
    assert ticks == []
    assert event_count(metrics, "executed") == 0


def test_a_failing_tick_is_counted_as_error_and_the_schedule_goes_on(metrics: Metrics) -> None:
    calls: list[int] = []

    def tick() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    s = Scheduler(settings(), tick, metrics, rng=random.Random(1))
    s.start()
    try:
        assert eventually(lambda: event_count(metrics, "error") >= 2)
        assert s.alive()
    finally:
        s.shutdown()
    assert len(calls) >= 2


def test_first_run_offset_and_jitter_come_from_the_injected_rng(metrics: Metrics) -> None:
    ran = threading.Event()
    rng = FixedRng(0.0, 7.5)  # offset 0 s, then every jitter draw 7.5 s
    s = Scheduler(settings(interval_seconds=100, jitter_fraction=0.1, first_run_max_delay_seconds=10), ran.set, metrics, rng=rng)
    before = time.time()
    s.start()
    try:
        assert ran.wait(5)
        assert eventually(lambda: (s.next_run_time() or 0) > before + 50)
        first_run = before  # offset 0: the first run was scheduled at start
        nxt = s.next_run_time()
        assert nxt is not None
        # next = first run + interval + the rng's jitter, within the clock read's slack
        assert abs(nxt - (first_run + 100 + 7.5)) < 1.0
    finally:
        s.shutdown()
    assert rng.calls[0] == (0, 10)  # first-run offset bounded by first_run_max_delay_seconds
    assert set(rng.calls[1:]) == {(0, 10.0)}  # jitter bounded by interval * jitter_fraction


def test_first_run_waits_for_the_random_offset(metrics: Metrics) -> None:
    ticks: list[int] = []
    s = Scheduler(settings(interval_seconds=3600, first_run_max_delay_seconds=120), lambda: ticks.append(1), metrics, rng=FixedRng(60.0))
    before = time.time()
    s.start()
    try:
        nxt = s.next_run_time()
        assert nxt is not None and abs(nxt - (before + 60)) < 1.0
    finally:
        s.shutdown()  # waits for a run in progress: one started at start() would be in `ticks`
    assert ticks == [] and event_count(metrics, "executed") == 0


def test_run_soon_brings_the_next_run_forward(metrics: Metrics) -> None:
    ran = threading.Event()
    s = Scheduler(settings(interval_seconds=3600, first_run_max_delay_seconds=3600), ran.set, metrics, rng=FixedRng(3000.0))
    s.start()
    try:
        assert not ran.wait(0.3)
        s.run_soon()
        assert ran.wait(3)
        nxt = s.next_run_time()
        assert nxt is not None and nxt > time.time() + 3000  # back on the interval afterwards
    finally:
        s.shutdown()


def test_reschedule_applies_a_new_interval(metrics: Metrics) -> None:
    s = Scheduler(settings(interval_seconds=3600, first_run_max_delay_seconds=3600), lambda: None, metrics, rng=FixedRng(3000.0))
    s.start()
    try:
        s.reschedule(settings(interval_seconds=600))
        nxt = s.next_run_time()
        assert nxt is not None and abs(nxt - (time.time() + 600)) < 2
        assert s.period_seconds() == 600
        with pytest.raises(ConfigError):
            s.reschedule(settings(cron="not a cron"))
        assert s.period_seconds() == 600  # the bad one left the schedule alone
    finally:
        s.shutdown()


def test_cron_mode_uses_the_crontab_and_reports_its_period(metrics: Metrics) -> None:
    ran = threading.Event()
    s = Scheduler(settings(cron="*/5 * * * *"), ran.set, metrics, rng=random.Random(1))
    assert s.period_seconds() == 300
    s.start()
    try:
        assert ran.wait(3)  # the first run is the startup offset (0 here), not the cron time
        nxt = s.next_run_time()
        assert nxt is not None
        when = datetime.fromtimestamp(nxt, UTC)
        assert when.minute % 5 == 0 and when.second == 0
    finally:
        s.shutdown()


def test_cron_weekdays_follow_crontab_numbering() -> None:
    assert crontab_weekdays("0") == "sun"
    assert crontab_weekdays("7") == "sun"
    assert crontab_weekdays("1-5") == "mon,tue,wed,thu,fri"
    assert crontab_weekdays("5-7") == "fri,sat,sun"
    assert crontab_weekdays("*/2") == "tue,thu,sat,sun"  # 0,2,4,6
    assert crontab_weekdays("mon,Wed") == "mon,wed"
    assert crontab_weekdays("*") == "*"
    trigger = build_cron_trigger("0 9 * * 1-5")
    t = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)  # a Saturday
    fires: list[datetime] = []
    for _ in range(5):
        t = trigger.get_next_fire_time(None if not fires else t, t)
        fires.append(t)
    assert [f.strftime("%a %H:%M") for f in fires] == ["Mon 09:00", "Tue 09:00", "Wed 09:00", "Thu 09:00", "Fri 09:00"]


@pytest.mark.parametrize("expr", ["* * * *", "61 * * * *", "0 9 * * 8", "0 9 * * 5-1", "0 0 1 * 1", "x y z w v"])
def test_bad_cron_is_a_config_error_naming_the_key(expr: str, metrics: Metrics) -> None:
    with pytest.raises(ConfigError) as info:
        Scheduler(settings(cron=expr), lambda: None, metrics, rng=random.Random(1))
    assert info.value.key == "schedule.cron"
