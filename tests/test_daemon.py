"""The daemon: triggers -> passes, readiness, HA forwarding, lease loss, shutdown, and real signals.

In-process tests use the real TriggerQueue, Scheduler and HttpServer (real HTTP on 127.0.0.1)
with a fake engine and fake lease. Signal tests run the daemon in a subprocess (`child_main`
below is its wiring) so SIGTERM, a second signal and SIGHUP are real.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config import ScheduleSettings, Settings, load_settings, parse_settings
from bridge.daemon.ha import FORWARD_HEADER, sign_forward
from bridge.daemon.loop import Daemon, DaemonParts, ServerHooks, settle_heap
from bridge.daemon.scheduler import Scheduler
from bridge.daemon.server import HttpServer, make_audit_ingest
from bridge.daemon.triggers import AuditMatcher, TriggerQueue
from bridge.errors import ConfigError
from bridge.metrics import Metrics
from bridge.model import Sensitive
from bridge.ports import PassReport, PassRequest
from tests.support.data import unix
from tests.support.procs import eventually

FORWARD_KEY = b"test-forward-key-0123456789abcdef"
TOKEN = "whk_daemon_test_token_0123456789abcdef"
REPO = Path(__file__).resolve().parent.parent
# How long a child may take to start its daemon and its first secret: a bound on waiting, not a
# timing assertion (each wait ends as soon as its condition holds). 15 s was too short on a
# 2-core machine at a load average above 10.
START_WAIT = 60.0


def make_settings(**sections: Any) -> Settings:
    raw: dict[str, Any] = {
        "sources": [{"mount": "secret", "path": "team", "kv_version": 2}],
        "cybedefend": {"auth": {"credential_file": "/dev/null"}},
        "server": {"bind": "127.0.0.1", "port": 0},
        "schedule": {"interval_seconds": 3600, "first_run_max_delay_seconds": 0},
        "sync": {"shutdown_grace_seconds": 5},
        "triggers": {"debounce_seconds": 0.05},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_settings(raw, env={})


class FakeEngine:
    """A `PassRunner` whose full pass walks `secrets`, taking `per_secret` seconds each, and
    checks the stop event before each one, as the real engine does."""

    def __init__(self, stop: threading.Event, secrets: int = 3, per_secret: float = 0.0, log: Path | None = None) -> None:
        self.stop = stop
        self.secrets = [f"secret/team/s{i:02d}" for i in range(secrets)]
        self.per_secret = per_secret
        self.log = log
        self.requests: list[PassRequest] = []
        self.progress: list[str] = []
        self.running = threading.Event()
        self.concurrent = 0
        self.most_concurrent = 0
        self.ignore_stop = False
        self._lock = threading.Lock()

    def _note(self, text: str) -> None:
        self.progress.append(text)
        if self.log is not None:
            with self.log.open("a") as fh:
                fh.write(text + "\n")

    def run(self, request: PassRequest) -> PassReport:
        with self._lock:
            self.concurrent += 1
            self.most_concurrent = max(self.most_concurrent, self.concurrent)
        self.requests.append(request)
        self.running.set()
        started, result = time.time(), "ok"
        try:
            for key in sorted(request.paths) if request.paths is not None else self.secrets:
                if self.stop.is_set() and not self.ignore_stop:
                    result = "aborted"
                    break
                self._note(f"start {key}")
                time.sleep(self.per_secret)
                self._note(f"done {key}")
        finally:
            with self._lock:
                self.concurrent -= 1
            self.running.clear()
        return PassReport(request.trigger, request.paths is None, started, time.time(), result)

    def status(self) -> dict[str, Any]:
        return {"passes": len(self.requests)}


class FakeLease:
    renew_interval = 0.05

    def __init__(self, leader: bool, address: str | None = None) -> None:
        self.leader = leader
        self.address = address
        self.released = False

    def acquire_or_renew(self) -> bool:
        return self.leader

    def is_leader(self) -> bool:
        return self.leader

    def leader_address(self) -> str | None:
        return self.address

    def release(self) -> None:
        self.released = True
        self.leader = False


class OffsetRng(random.Random):
    """Every draw is `value`: the first-run offset (and jitter, 0 here) are fixed."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def uniform(self, a: float, b: float) -> float:
        return self.value


def build(
    settings: Settings,
    *,
    engine: Callable[[threading.Event], FakeEngine] = FakeEngine,
    first_run: float = 0.0,
    metrics: Metrics | None = None,
    **parts: Any,
) -> tuple[Daemon, FakeEngine, Metrics]:
    m = metrics or Metrics()
    stop = threading.Event()
    eng = engine(stop)
    token = Sensitive(TOKEN)

    def make_server(h: ServerHooks) -> HttpServer:
        server = HttpServer(settings.server, metrics=m, hooks=h, webhook_token=token)
        server.accept_forwards(FORWARD_KEY)
        return server

    def make_scheduler(s: ScheduleSettings, tick: Callable[[], None]) -> Scheduler:
        return Scheduler(s, tick, m, rng=OffsetRng(first_run))

    parts.setdefault("vault_healthy", lambda: True)
    # The real one freezes the heap of the whole test process; tests that want it pass their own.
    parts.setdefault("settle_heap", lambda: None)
    daemon = Daemon(settings, DaemonParts(
        engine=eng, queue=TriggerQueue(settings.triggers.debounce_seconds, 100, m), stop=stop, metrics=m,
        make_scheduler=make_scheduler, make_server=make_server, forward_key=FORWARD_KEY, **parts,
    ))
    return daemon, eng, m


@pytest.fixture
def running() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.shutdown()




def http(port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310  # http://127.0.0.1 built here
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def status_daemon(port: int) -> dict[str, Any]:
    code, body = http(port, "GET", "/v1/status")
    assert code == 200
    doc: dict[str, Any] = json.loads(body)["daemon"]
    return doc


def test_ready_means_accepting_work_and_vault_health_is_reported_not_gating(running: list[Daemon]) -> None:
    vault_up = [True]
    offset = [0.0]
    daemon, engine, m = build(
        make_settings(), first_run=0.6, vault_healthy=lambda: vault_up[0], monotonic=lambda: time.monotonic() + offset[0]
    )
    running.append(daemon)
    port = daemon.start()
    # Ready before the first pass: the replica accepts work (triggers queue up behind the startup pass).
    assert http(port, "GET", "/readyz") == (200, "ok\n")
    assert status_daemon(port)["last_full_pass_fresh"] is False
    assert eventually(lambda: engine.requests)
    assert engine.requests[0].trigger == "startup" and engine.requests[0].paths is None
    assert eventually(lambda: status_daemon(port)["last_full_pass_fresh"] is True)
    assert m.registry.get_sample_value("cybedefend_bridge_ready") == 1
    assert m.registry.get_sample_value("cybedefend_bridge_full_pass_fresh") == 1
    vault_up[0] = False
    offset[0] += 10  # past the Vault health cache
    assert http(port, "GET", "/readyz")[0] == 200  # a Vault outage keeps the replica in its Service
    assert http(port, "GET", "/healthz")[0] == 200  # and never fails liveness
    assert eventually(lambda: status_daemon(port)["vault"] == {"healthy": False}, 10)  # the watcher probes every 5 s
    doc = status_daemon(port)
    assert doc["cybedefend"]["last_pass_result"] == "ok" and doc["cybedefend"]["healthy"] is True
    assert m.registry.get_sample_value("cybedefend_bridge_upstream_healthy", {"upstream": "vault"}) == 0
    assert m.registry.get_sample_value("cybedefend_bridge_upstream_healthy", {"upstream": "cybedefend"}) == 1
    vault_up[0] = True
    offset[0] += 10
    assert eventually(lambda: status_daemon(port)["vault"] == {"healthy": True}, 10)
    assert m.registry.get_sample_value("cybedefend_bridge_upstream_healthy", {"upstream": "vault"}) == 1
    offset[0] += 3 * 3600 + 20  # more than ready_max_intervals (3) x interval since the pass
    doc = status_daemon(port)
    assert doc["last_full_pass_fresh"] is False and doc["ready"] is True
    assert m.registry.get_sample_value("cybedefend_bridge_full_pass_fresh") == 0
    code, body = http(port, "GET", "/readyz?verbose")
    assert (code, body) == (200, "[+]config ok\n[+]http ok\n[+]triggers ok\nreadyz check passed\n")
    code, body = http(port, "GET", "/healthz?verbose")
    assert (code, body) == (200, "[+]sync-worker ok\n[+]scheduler ok\nlivez check passed\n")
    daemon.shutdown()
    assert m.registry.get_sample_value("cybedefend_bridge_ready") == 0


def test_a_webhook_leads_to_a_targeted_pass(running: list[Daemon]) -> None:
    daemon, engine, _ = build(make_settings(), first_run=3000)
    running.append(daemon)
    port = daemon.start()
    assert http(port, "POST", "/v1/sync", {"paths": ["secret/team/a"]})[0] == 202
    assert eventually(lambda: engine.requests)
    req = engine.requests[0]
    assert req.trigger == "webhook" and req.paths == frozenset({"secret/team/a"})
    assert "secret/team/a" in req.received_at
    status, body = http(port, "GET", "/v1/status")
    assert status == 200 and json.loads(body)["daemon"]["leader"] is True


def test_forwarded_audit_lines_lead_to_a_targeted_pass(running: list[Daemon]) -> None:
    s = make_settings()
    matcher = AuditMatcher(s.sources, {"secret": 2})
    daemon, engine, _ = build(s, first_run=3000, audit_ingest=make_audit_ingest(matcher.match, 100))
    running.append(daemon)
    port = daemon.start()
    line = {"type": "response", "request": {"operation": "update", "path": "secret/data/team/b", "mount_point": "secret/"}}
    noise = {"type": "request", "request": {"operation": "update", "path": "secret/data/team/c"}}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/audit", data=(json.dumps(line) + "\n" + json.dumps(noise) + "\n").encode(),
        method="POST", headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310  # http://127.0.0.1 built here
        assert resp.status == 202 and json.loads(resp.read()) == {"accepted": 2, "keys": 1, "rejected": 0}
    assert eventually(lambda: engine.requests)
    assert engine.requests[0].paths == frozenset({"secret/team/b"})
    assert engine.requests[0].trigger == "audit_ingest"


def test_the_heap_is_settled_once_after_the_first_full_pass_not_before(running: list[Daemon]) -> None:
    # ADR 17: start-up's objects go to the permanent generation once, when they are all built
    # (after the first full pass, whatever asked first), never after a targeted pass.
    calls: list[list[PassRequest]] = []
    box: list[FakeEngine] = []
    daemon, engine, _ = build(make_settings(), first_run=3000, settle_heap=lambda: calls.append(list(box[0].requests)))
    box.append(engine)
    running.append(daemon)
    port = daemon.start()
    assert http(port, "POST", "/v1/sync", {"paths": ["secret/team/a"]})[0] == 202
    assert eventually(lambda: len(engine.requests) == 1)
    assert http(port, "POST", "/v1/sync", {})[0] == 202  # a full pass
    assert eventually(lambda: calls)
    assert http(port, "POST", "/v1/sync", {})[0] == 202  # and another one
    assert eventually(lambda: len(engine.requests) == 3 and not engine.running.is_set())
    assert http(port, "POST", "/v1/sync", {"paths": ["secret/team/b"]})[0] == 202
    assert eventually(lambda: len(engine.requests) == 4 and not engine.running.is_set())
    time.sleep(0.1)
    assert len(calls) == 1, calls
    seen = calls[0]  # what the engine had run when the heap was settled: the targeted, then the full
    assert [r.paths is None for r in seen] == [False, True]


def test_settle_heap_moves_what_is_alive_out_of_every_collection() -> None:
    class Alive:
        pass

    kept = Alive()
    assert any(o is kept for o in gc.get_objects())
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects())  # a full collection no longer walks it
        fresh = Alive()
        assert any(o is fresh for o in gc.get_objects())  # what comes after is collected as before
    finally:
        gc.unfreeze()


def test_passes_never_overlap(running: list[Daemon]) -> None:
    daemon, engine, _ = build(make_settings(), engine=lambda stop: FakeEngine(stop, 3, 0.1))
    running.append(daemon)
    port = daemon.start()
    assert engine.running.wait(5)  # the startup pass is running (a pending full pass would absorb the keys)
    threads = [threading.Thread(target=http, args=(port, "POST", "/v1/sync", {"paths": [f"secret/team/x{i}"]})) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wanted = {f"done secret/team/x{i}" for i in range(8)}
    assert eventually(lambda: wanted <= set(engine.progress), 10)
    assert len(engine.requests) >= 2
    assert engine.most_concurrent == 1


def test_standby_forwards_triggers_to_the_leader(running: list[Daemon]) -> None:
    leader, leader_engine, _ = build(make_settings(), first_run=3000, lease=FakeLease(True))
    running.append(leader)
    leader_port = leader.start()
    standby, standby_engine, sm = build(
        make_settings(), first_run=0, lease=FakeLease(False, f"http://127.0.0.1:{leader_port}")
    )
    running.append(standby)
    port = standby.start()
    assert http(port, "POST", "/v1/sync", {"paths": ["secret/team/a", "secret/team/b"]})[0] == 202
    assert eventually(lambda: leader_engine.requests)
    assert leader_engine.requests[0].paths == frozenset({"secret/team/a", "secret/team/b"})
    assert leader_engine.requests[0].trigger == "forwarded"
    # Its own schedule (first run at once) has fired: as a standby it must not have run a pass.
    assert eventually(lambda: (sm.registry.get_sample_value("cybedefend_bridge_scheduler_events_total",
                                                          {"event": "executed"}) or 0) >= 1)
    assert standby_engine.requests == []  # neither the forwarded keys nor its own schedule ran
    assert http(port, "GET", "/readyz")[0] == 200  # a standby accepts work too (it forwards it)
    doc = status_daemon(port)
    assert doc["leader"] is False and doc["ha"] is True and doc["leader_address"] == f"http://127.0.0.1:{leader_port}"
    assert sm.registry.get_sample_value("cybedefend_bridge_leader") == 0
    assert status_daemon(leader_port)["leader"] is True


def test_a_failed_forward_is_dropped_and_counted(running: list[Daemon]) -> None:
    daemon, engine, m = build(make_settings(), first_run=3000, lease=FakeLease(False, "http://127.0.0.1:9"))
    running.append(daemon)
    port = daemon.start()
    assert http(port, "POST", "/v1/sync", {"paths": ["secret/team/a"]})[0] == 202

    def dropped() -> float:
        return m.registry.get_sample_value("cybedefend_bridge_trigger_events_dropped_total", {"source": "forwarded"}) or 0

    assert eventually(lambda: dropped() == 1)
    assert engine.requests == []


def test_a_standby_never_forwards_a_forwarded_request_again(running: list[Daemon]) -> None:
    leader, leader_engine, _ = build(make_settings(), first_run=3000, lease=FakeLease(True))
    running.append(leader)
    leader_port = leader.start()
    standby, _, m = build(make_settings(), first_run=3000, lease=FakeLease(False, f"http://127.0.0.1:{leader_port}"))
    running.append(standby)
    port = standby.start()
    body = b'{"paths": ["secret/team/a"]}'
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/sync", data=body, method="POST",
        headers={FORWARD_HEADER: sign_forward(FORWARD_KEY, body, time.time())},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310  # http://127.0.0.1 built here
        assert resp.status == 202
    assert eventually(
        lambda: m.registry.get_sample_value("cybedefend_bridge_trigger_events_dropped_total", {"source": "forwarded"}) == 1
    )
    assert leader_engine.requests == []  # the drop is the standby's decision: nothing was sent on


def test_losing_the_lease_mid_pass_stops_after_the_current_secret(running: list[Daemon]) -> None:
    lease = FakeLease(True)
    daemon, engine, _ = build(make_settings(), engine=lambda stop: FakeEngine(stop, 10, 0.2), lease=lease)
    running.append(daemon)
    daemon.start()
    assert eventually(lambda: "done secret/team/s01" in engine.progress)
    lease.leader = False
    assert eventually(lambda: not engine.running.is_set())
    first = list(engine.progress)
    assert first[-1].startswith("done ") and len(first) < 20  # aborted, the secret in flight finished
    lease.leader = True  # regained: a new full pass is brought forward and runs to the end
    assert eventually(lambda: len(engine.requests) >= 2 and not engine.running.is_set() and engine.progress[-1] == "done secret/team/s09", 10)


def test_liveness_and_a_bounded_shutdown(running: list[Daemon]) -> None:
    lease = FakeLease(True)
    hook = threading.Event()
    daemon, engine, _ = build(
        make_settings(), engine=lambda stop: FakeEngine(stop, 20, 0.3), lease=lease, on_shutdown=hook.set
    )
    port = daemon.start()
    assert all(ok for _, ok, _ in daemon.live()) and http(port, "GET", "/healthz")[0] == 200
    assert engine.running.wait(5)
    t0 = time.monotonic()
    daemon.shutdown()
    assert time.monotonic() - t0 < 1.0  # one secret (0.3 s), not the pass (6 s)
    assert engine.progress[-1].startswith("done ")
    assert hook.is_set() and lease.released
    assert not all(ok for _, ok, _ in daemon.live())
    assert daemon.on_sync(["secret/team/a"], "webhook") is False


def test_reload_applies_a_good_schedule_and_keeps_the_old_one_on_error(running: list[Daemon]) -> None:
    good = make_settings(schedule={"interval_seconds": 600})
    seen_by_probe: list[float] = []

    def probe() -> Settings:
        # Reloads are handled one at a time, in order: when this third one runs, the failed
        # second one has been fully dealt with, so what the daemon holds now is what it kept.
        seen_by_probe.append(daemon.settings.schedule.interval_seconds)
        return good

    answers: list[Any] = [good, ConfigError("schedule.cron", "bad"), probe]

    def reload() -> Settings:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if callable(answer):
            return answer()  # type: ignore[no-any-return]
        return answer  # type: ignore[no-any-return]

    daemon, _, _ = build(make_settings(), first_run=3000, reload=reload)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(daemon.run()))
    runner.start()
    try:
        assert eventually(lambda: daemon.port is not None)
        daemon.request_reload()
        assert eventually(lambda: daemon.settings.schedule.interval_seconds == 600)
        daemon.request_reload()
        daemon.request_reload()
        assert eventually(lambda: seen_by_probe)
        assert seen_by_probe == [600]
        assert daemon.settings.schedule.interval_seconds == 600
    finally:
        daemon.request_stop()
        runner.join(10)
    assert result == [0]


# -- real signals, in a subprocess ----------------------------------------------------------


def child_main(workdir: str) -> None:
    """The daemon's wiring for the signal tests (runs in the child process)."""
    from bridge import logs

    work = Path(workdir)
    params = json.loads((work / "params.json").read_text())
    logs.configure(level="info", fmt="json")
    settings = load_settings(work / "settings.yaml", env={})

    def engine(stop: threading.Event) -> FakeEngine:
        eng = FakeEngine(stop, params["secrets"], params["per_secret"], log=work / "progress.txt")
        eng.ignore_stop = params.get("ignore_stop", False)
        return eng

    def on_shutdown() -> None:
        with (work / "progress.txt").open("a") as fh:
            fh.write("shutdown hook\n")

    daemon, _, _ = build(settings, engine=engine, reload=lambda: load_settings(work / "settings.yaml", env={}), on_shutdown=on_shutdown)
    sys.exit(daemon.run())


class Child:
    def __init__(self, tmp: Path, settings: dict[str, Any], **params: Any) -> None:
        self.dir = tmp
        self.write_settings(settings)
        (tmp / "params.json").write_text(json.dumps({"secrets": 3, "per_secret": 0.0, **params}))
        self.stderr = (tmp / "stderr.log").open("wb")
        code = "import sys; from tests.test_daemon import child_main; child_main(sys.argv[1])"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(tmp)], cwd=REPO, stderr=self.stderr, stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def write_settings(self, extra: dict[str, Any]) -> None:
        import yaml

        raw: dict[str, Any] = {
            "sources": [{"mount": "secret", "path": "team", "kv_version": 2}],
            "cybedefend": {"auth": {"credential_file": "/dev/null"}},
            "server": {"bind": "127.0.0.1", "port": 0},
            "schedule": {"interval_seconds": 3600, "first_run_max_delay_seconds": 0},
            "triggers": {"debounce_seconds": 0.05},
        }
        raw.update(extra)
        (self.dir / "settings.yaml").write_text(yaml.safe_dump(raw))

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in (self.dir / "stderr.log").read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def has_event(self, name: str) -> bool:
        return any(e.get("event") == name for e in self.events())

    def progress(self) -> list[str]:
        path = self.dir / "progress.txt"
        return path.read_text().splitlines() if path.exists() else []

    def port(self) -> int:
        assert eventually(lambda: self.has_event("daemon_started"), START_WAIT), (self.dir / "stderr.log").read_text()
        return int(next(e["port"] for e in self.events() if e.get("event") == "daemon_started"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.stderr.close()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Callable[..., Child]]:
    made: list[Child] = []

    def make(settings: dict[str, Any] | None = None, **params: Any) -> Child:
        c = Child(tmp_path, settings or {}, **params)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_sigterm_mid_pass_finishes_the_secret_in_flight_and_exits_0(child: Callable[..., Child]) -> None:
    c = child({"sync": {"shutdown_grace_seconds": 5}}, secrets=30, per_secret=0.4)
    assert eventually(lambda: "start secret/team/s03" in c.progress(), START_WAIT)
    t0 = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    lines = c.progress()
    assert lines[-1] == "shutdown hook"
    work = lines[:-1]
    assert work[-1].startswith("done ")  # the secret in flight was finished, none was cut
    assert sum(line.startswith("done ") for line in work) < 30
    assert sum(line.startswith("start ") for line in work) == sum(line.startswith("done ") for line in work)
    assert c.has_event("stop_requested") and c.has_event("stopped")


def test_a_second_signal_exits_at_once(child: Callable[..., Child]) -> None:
    c = child({"sync": {"shutdown_grace_seconds": 60}}, secrets=2, per_secret=60, ignore_stop=True)
    assert eventually(lambda: "start secret/team/s00" in c.progress(), START_WAIT)
    c.proc.send_signal(signal.SIGTERM)
    assert eventually(lambda: c.has_event("shutting_down"))
    t0 = time.monotonic()
    c.proc.send_signal(signal.SIGINT)
    assert c.proc.wait(5) == 130
    assert time.monotonic() - t0 < 2
    assert c.has_event("second_signal_exit_now")


def test_grace_bounds_the_wait_for_a_stuck_secret(child: Callable[..., Child]) -> None:
    c = child({"sync": {"shutdown_grace_seconds": 1}}, secrets=2, per_secret=60, ignore_stop=True)
    assert eventually(lambda: "start secret/team/s00" in c.progress(), START_WAIT)
    t0 = time.monotonic()
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(10) == 0
    assert time.monotonic() - t0 < 4
    assert c.has_event("shutdown_grace_exceeded")
    assert c.progress()[-1] == "shutdown hook"


def test_sighup_reloads_a_good_config_and_keeps_the_old_one_on_error(child: Callable[..., Child]) -> None:
    c = child()
    port = c.port()

    def next_run_in() -> float:
        status, body = http(port, "GET", "/v1/status")
        assert status == 200
        return unix(json.loads(body)["daemon"]["next_full_pass_at"]) - time.time()

    assert eventually(lambda: next_run_in() > 3000)  # after the startup pass: the 3600 s interval
    c.write_settings({"schedule": {"interval_seconds": 600, "first_run_max_delay_seconds": 0}})
    c.proc.send_signal(signal.SIGHUP)
    assert eventually(lambda: c.has_event("config_reloaded"))
    assert 500 < next_run_in() < 700
    c.write_settings({"schedule": {"interval_secs": 5}})  # a typo: unknown key
    c.proc.send_signal(signal.SIGHUP)
    assert eventually(lambda: c.has_event("config_reload_failed"))
    failed = next(e for e in c.events() if e.get("event") == "config_reload_failed")
    assert failed["key"] == "schedule.interval_secs"
    assert 500 < next_run_in() < 700  # the previous configuration stays
    assert c.proc.poll() is None and http(port, "GET", "/healthz")[0] == 200
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(10) == 0
