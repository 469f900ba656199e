"""`cybedefend-bridge run` end to end: a real subprocess, a real OpenBao, the CybeDefend double.

Each test starts its own OpenBao (with the audit device it needs) and its own daemon process
with a full-pass interval of 600 s, so anything registered within seconds came from a trigger.
Every test ends by checking that no token, PAT, webhook or Vault token appears in the process's
output, /metrics or /v1/status, and that no metric label value names a secret, path or
username. High availability is in test_e2e_daemon_ha.py; the rig in daemon_rig.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.model import Sensitive
from cybedefend_double.simulator import Fault
from tests.support.daemon import (
    WEBHOOK_TOKEN,
    DaemonProc,
    Stack,
    bearer,
    free_port,
    wait_for,
)
from tests.support.data import PROJECTS, unix
from tests.support.openbao import OpenBao

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PROMPT = 5.0  # seconds: "long before the next scheduled pass" (600 s away)


def registered_within(stack: Stack, tok: Sensitive, timeout: float = PROMPT) -> float:
    """Seconds from now until `tok` is a credential in the double (AssertionError past `timeout`)."""
    t0 = time.monotonic()
    wait_for(lambda: stack.registered(tok), timeout, 0.02)
    return time.monotonic() - t0


def last_pass_since(d: DaemonProc, wall: float, full: bool = False, timeout: float = PROMPT) -> dict[str, object]:
    """The daemon's last pass report once it started after `wall` (a targeted one unless `full`)."""

    def check() -> dict[str, object] | None:
        last = d.status().get("last_pass")
        return last if last and unix(last["started_at"]) >= wall and last["full"] is full else None

    return wait_for(check, timeout)


def test_a_vault_write_is_registered_through_the_tailed_audit_file(openbao_factory: Callable[..., OpenBao],
                                                                   stacks: Callable[[OpenBao], Stack], tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    stack = stacks(openbao_factory(audit_log=audit))
    stack.put("before", 1)
    d = stack.daemon(triggers={"audit_file": {"path": str(audit), "poll_seconds": 0.05}}).start()
    d.wait_ready()
    assert d.status()["last_full_pass"]["trigger"] == "startup"
    next_full = unix(d.status()["daemon"]["next_full_pass_at"])
    assert next_full - time.time() > 500  # so what follows cannot be the schedule

    wall = time.time()
    took = registered_within(stack, stack.put("fresh", 1, PROJECTS[1]))
    assert took < PROMPT
    print(f"write to registered through the audit file: {took:.2f} s")
    last = last_pass_since(d, wall)
    assert last["trigger"] == "audit_file" and last["counts"]["created"] == 1  # type: ignore[index]
    # A rotation takes the same road, and replaces the credential.
    wall = time.time()
    registered_within(stack, stack.put("before", 2))
    assert last_pass_since(d, wall)["trigger"] == "audit_file"
    wait_for(lambda: stack.settled(d, ["before", "fresh"]) and len(stack.creds()) == 2)
    stack.assert_registered_once(["before", "fresh"], d.rows())
    assert d.metric("cybedefend_bridge_trigger_events_total", source="audit_file") >= 2
    assert d.metric("cybedefend_bridge_write_to_registered_seconds_count") >= 2
    assert d.metric("cybedefend_bridge_passes_total", trigger="schedule", result="ok") == 0
    stack.check_exposure(d)


def test_audit_log_rotation_does_not_lose_the_tail(openbao_factory: Callable[..., OpenBao],
                                                   stacks: Callable[[OpenBao], Stack], tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    bao = openbao_factory(audit_log=audit)
    stack = stacks(bao)
    d = stack.daemon(triggers={"audit_file": {"path": str(audit), "poll_seconds": 0.05}}).start()
    d.wait_ready()
    registered_within(stack, stack.put("r0", 1))

    # Rename rotation (logrotate without copytruncate): Vault keeps writing to the renamed file
    # until SIGHUP makes it reopen the path. A write in that window must not be lost.
    os.rename(audit, tmp_path / "audit.log.1")
    in_window = stack.put("r1", 1)
    assert not audit.exists()  # the write went to the renamed file
    assert bao.pid is not None
    os.kill(bao.pid, signal.SIGHUP)
    wait_for(lambda: audit.exists(), 5)  # OpenBao reopened the path (the SIGHUP was honoured)
    after = stack.put("r2", 1)
    registered_within(stack, in_window)
    registered_within(stack, after, PROMPT)
    wall = time.time()
    registered_within(stack, stack.put("r3", 1))
    assert last_pass_since(d, wall)["trigger"] == "audit_file"
    assert (tmp_path / "audit.log.1").stat().st_size > 0 and audit.stat().st_size > 0

    # Copy-truncate rotation: the file shrinks under the reader, which starts over at 0.
    (tmp_path / "audit.log.2").write_bytes(audit.read_bytes())
    with audit.open("r+b") as fh:
        fh.truncate(0)
    registered_within(stack, stack.put("r4", 1))
    assert d.events("audit_tail_rotated") and d.events("audit_tail_truncated")
    names = ["r0", "r1", "r2", "r3", "r4"]
    wait_for(lambda: stack.settled(d, names))
    stack.assert_registered_once(names, d.rows())
    assert d.metric("cybedefend_bridge_passes_total", trigger="schedule", result="ok") == 0
    stack.check_exposure(d)


def socket_device(port: int) -> str:
    return f'audit "socket" "bridge" {{\n  options {{\n    address = "127.0.0.1:{port}"\n    socket_type = "tcp"\n  }}\n}}\n'


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_socket_audit_device_with_the_bridge_started_before_vault(stacks: Callable[[OpenBao], Stack],
                                                                  tmp_path: Path) -> None:
    """OpenBao refuses to start while its socket device's address is unreachable, and the bridge
    waits for Vault at start-up: the listener must therefore be up while the bridge waits."""
    sock_port = free_port()
    (tmp_path / "bao").mkdir()
    bao = OpenBao("dev", workdir=tmp_path / "bao", extra_config=socket_device(sock_port))
    try:
        stack = stacks(bao)
        d = stack.daemon(triggers={"audit_socket": {"bind": "127.0.0.1", "port": sock_port}}).start()
        wait_for(lambda: d.events("startup_waiting") or not d.alive(), 15)
        assert d.alive(), f"the daemon exited; see {d.dir}"
        assert accepts(sock_port)  # already listening for the socket device while it waits for Vault
        bao.start()  # raises if OpenBao cannot reach the socket device
        d.wait_ready()
        wall = time.time()
        registered_within(stack, stack.put("sock-a", 1))
        assert last_pass_since(d, wall)["trigger"] == "audit_socket"
        wall = time.time()
        registered_within(stack, stack.put("sock-a", 2))
        assert last_pass_since(d, wall)["trigger"] == "audit_socket"
        wait_for(lambda: stack.settled(d, ["sock-a"]) and len(stack.creds()) == 1)
        stack.assert_registered_once(["sock-a"], d.rows())
        assert d.metric("cybedefend_bridge_trigger_events_total", source="audit_socket") >= 2
        assert d.metric("cybedefend_bridge_audit_connections_refused_total") == 0
        stack.check_exposure(d)
    finally:
        bao.cleanup()


def test_probes_answer_while_vault_is_down_at_start_and_sigterm_ends_the_wait(stacks: Callable[[OpenBao], Stack],
                                                                              tmp_path: Path) -> None:
    """Liveness must not depend on an upstream: a pod started during a Vault outage stays alive,
    Ready (it accepts triggers, deferred to its first full pass), and stops promptly when asked."""
    (tmp_path / "bao").mkdir()
    bao = OpenBao("dev", workdir=tmp_path / "bao")  # never started: Vault is down for the whole test
    try:
        stack = stacks(bao)
        d = stack.daemon().start()
        wait_for(lambda: d.events("startup_waiting") or not d.alive(), 15)
        assert d.alive(), f"the daemon exited; see {d.dir}"
        wait_for(lambda: d.code("/healthz") == 200, 10)
        assert d.code("/readyz") == 200
        assert d.status() == {"starting": True, "waiting_for": "vault and cybedefend"}
        assert d.post("/v1/sync", json.dumps({"paths": [stack.key("early")]}).encode(), bearer())[0] == 202
        assert d.metric("cybedefend_bridge_trigger_events_deferred_total", source="webhook") == 1
        started = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(10) == 0
        assert time.monotonic() - started < 5
        stack.assert_no_leaks(d)
    finally:
        bao.cleanup()


def audit_lines_since(audit: Path, offset: int, needle: str) -> bytes | None:
    """Audit lines written after `offset`, once a response line naming `needle` is among them."""
    data = audit.read_bytes()[offset:]
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    hits = [ln for ln in lines if needle.encode() in ln and json.loads(ln).get("type") == "response"]
    return b"\n".join(lines) + b"\n" if hits else None


def test_forwarded_audit_lines_on_v1_audit(openbao_factory: Callable[..., OpenBao],
                                           stacks: Callable[[OpenBao], Stack], tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"  # the bridge does not tail it: the test ships its lines, as Vector would
    stack = stacks(openbao_factory(audit_log=audit))
    d = stack.daemon(triggers={"audit_ingest": True}, server={"max_body_bytes": 256 << 10}).start()
    d.wait_ready()

    offset = audit.stat().st_size
    tok = stack.put("shipped", 1)
    body = wait_for(lambda: audit_lines_since(audit, offset, "dockerhub/shipped"))
    assert d.post("/v1/audit", body, {"Content-Type": "application/x-ndjson"})[0] == 401
    assert d.post("/v1/audit", body, bearer("not-the-token"))[0] == 401
    assert d.post("/v1/audit", b"{}\n" * ((300 << 10) // 3), bearer())[0] == 413
    # A rejected body must not have queued anything: the trigger queue counts what it is offered
    # before the server answers, so the counter is already final here; no wait needed.
    assert d.metric("cybedefend_bridge_trigger_events_total", source="audit_ingest") == 0
    assert stack.registered(tok) is None

    wall = time.time()
    code, answer = d.post("/v1/audit", body, bearer())
    assert code == 202 and json.loads(answer)["accepted"] == body.count(b"\n")
    registered_within(stack, tok)
    assert last_pass_since(d, wall)["trigger"] == "audit_ingest"
    wait_for(lambda: stack.settled(d, ["shipped"]))
    stack.assert_registered_once(["shipped"], d.rows())
    assert d.metric("cybedefend_bridge_trigger_events_total", source="audit_ingest") >= 1
    stack.check_exposure(d)


def test_webhook_triggers_a_targeted_sync_and_rejects_bad_requests(openbao_factory: Callable[..., OpenBao],
                                                                    stacks: Callable[[OpenBao], Stack]) -> None:
    stack = stacks(openbao_factory())
    d = stack.daemon(server={"max_body_bytes": 1024}).start()  # no audit trigger: only the webhook can tell it
    d.wait_ready()
    tok = stack.put("ci", 1)
    body = json.dumps({"paths": [stack.key("ci")]}).encode()
    json_only = {"Content-Type": "application/json"}
    assert d.post("/v1/sync", body, json_only)[0] == 401
    assert d.post("/v1/sync", body, bearer(WEBHOOK_TOKEN[:-1]))[0] == 401
    assert d.post("/v1/sync", body, bearer(WEBHOOK_TOKEN + "x"))[0] == 401
    assert d.post("/v1/sync", body, {**json_only, "Authorization": WEBHOOK_TOKEN})[0] == 401  # no scheme
    big = json.dumps({"paths": [stack.key("ci")] * 100}).encode()
    assert len(big) > 1024
    assert d.post("/v1/sync", big, bearer())[0] == 413
    assert d.get("/v1/sync")[0] == 405
    # The trigger queue counts what it is offered before the server answers: the counter is final.
    assert stack.registered(tok) is None, "a rejected request caused a sync"
    assert d.metric("cybedefend_bridge_trigger_events_total", source="webhook") == 0

    wall = time.time()
    code, answer = d.post("/v1/sync", body, bearer())
    assert code == 202 and json.loads(answer) == {"accepted": True, "full": False, "paths": 1}
    registered_within(stack, tok)
    last = last_pass_since(d, wall)
    assert last["trigger"] == "webhook" and last["full"] is False
    # No paths: a full pass, still on the webhook's account.
    stack.put("ci-2", 1)
    wall = time.time()
    assert d.post("/v1/sync", b"", bearer())[0] == 202
    assert last_pass_since(d, wall, full=True)["trigger"] == "webhook"
    wait_for(lambda: stack.settled(d, ["ci", "ci-2"]))
    stack.assert_registered_once(["ci", "ci-2"], d.rows())
    stack.check_exposure(d)


def test_probes_stay_up_while_vault_is_down_and_its_health_is_reported(openbao_factory: Callable[..., OpenBao],
                                                      stacks: Callable[[OpenBao], Stack]) -> None:
    bao = openbao_factory("file")  # durable storage: it can be stopped and started with its data
    stack = stacks(bao)
    d = stack.daemon().start()
    assert wait_for(lambda: d.code("/healthz") == 200, 20)
    d.wait_ready()
    assert d.metric("cybedefend_bridge_ready") == 1

    bao.stop()
    probes: list[tuple[int | None, int | None]] = []

    def vault_seen_down() -> bool:
        probes.append((d.code("/healthz"), d.code("/readyz")))
        return d.metric("cybedefend_bridge_upstream_healthy", upstream="vault") == 0

    wait_for(vault_seen_down, 15, 0.2)
    assert d.status()["daemon"]["vault"] == {"healthy": False}
    assert d.status()["daemon"]["ready"] is True
    for _ in range(5):
        probes.append((d.code("/healthz"), d.code("/readyz")))
        time.sleep(0.2)
    # Neither probe depends on Vault: the replica stays in its Service, webhooks keep being taken.
    assert probes and set(probes) == {(200, 200)}, "probes must not depend on Vault"
    assert d.metric("cybedefend_bridge_ready") == 1

    bao.start()  # same data, unsealed again; the bridge's token still works
    wait_for(lambda: d.metric("cybedefend_bridge_upstream_healthy", upstream="vault") == 1, 20, 0.2)
    registered = stack.put("after-outage", 1)
    assert d.post("/v1/sync", json.dumps({"paths": [stack.key("after-outage")]}).encode(), bearer())[0] == 202
    registered_within(stack, registered)
    stack.check_exposure(d)


def test_sigterm_mid_pass_then_restart_nothing_lost_nothing_duplicated(openbao_factory: Callable[..., OpenBao],
                                                                       stacks: Callable[[OpenBao], Stack]) -> None:
    stack = stacks(openbao_factory())
    names = [f"many-{i:03d}" for i in range(150)]
    for i, name in enumerate(names):
        stack.put(name, 1, PROJECTS[i % 4])
    stack.sim.inject("create", Fault.delay(0.2), times=1000)
    d = stack.daemon(sync={"shutdown_grace_seconds": 8}).start()
    wait_for(lambda: len(stack.creds()) >= 20, 30)

    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(15) == 0
    took = time.monotonic() - t0
    assert took < 8, f"exit took {took:.1f} s, longer than the grace period"
    done = len(stack.creds())
    assert 20 <= done < 150, "the signal did not arrive mid-pass"
    [stopped] = d.events("stopped")
    assert stopped["in_flight_finished"] is True
    assert not d.events("shutdown_grace_exceeded")

    # While it is down, some tokens are rotated (some of them were registered, some not yet).
    rotated = names[:5] + names[-5:]
    for name in rotated:
        stack.put(name, 2, PROJECTS[names.index(name) % 4])
    stack.sim.clear_faults()
    d.start()
    d.wait_ready(60)
    wait_for(lambda: stack.settled(d, names) and len(stack.creds()) == 150, 30, 0.2)
    stack.assert_registered_once(names, d.rows())
    assert wait_for(lambda: d.status()["pending_deletes"] == 0)
    assert sorted(d.rows()) == sorted(stack.key(n) for n in names)
    stack.check_exposure(d)


def test_sighup_reloads_the_config_and_keeps_it_when_the_new_one_is_invalid(openbao_factory: Callable[..., OpenBao],
                                                                           stacks: Callable[[OpenBao], Stack]) -> None:
    stack = stacks(openbao_factory())
    d = stack.daemon().start()
    d.wait_ready()

    def next_full_in() -> float:
        return unix(d.status()["daemon"]["next_full_pass_at"]) - time.time()

    assert next_full_in() > 500
    d.get("/healthz")
    assert not d.events("http_request")  # info level: no access log

    raw = json.loads(json.dumps(d.raw))
    raw["schedule"]["interval_seconds"] = 5
    raw["logging"]["level"] = "debug"
    d.write_config(raw)
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.events("config_reloaded"))
    assert next_full_in() <= 5.5
    wall = time.time()
    # the new interval (5 s, up to 10 % jitter) is in effect: a scheduled pass well before the old 600 s
    assert last_pass_since(d, wall, full=True, timeout=15)["trigger"] == "schedule"
    d.get("/healthz")
    assert wait_for(lambda: [e for e in d.events("http_request") if e.get("path") == "/healthz"])  # debug now

    bad = json.loads(json.dumps(raw))
    bad["schedule"] = {**raw["schedule"], "interval_secs": 600}  # a typo
    del bad["schedule"]["interval_seconds"]
    d.write_config(bad)
    d.signal(signal.SIGHUP)
    [failed] = wait_for(lambda: d.events("config_reload_failed"))
    assert failed["key"] == "schedule.interval_secs"
    bad["schedule"] = {**raw["schedule"], "interval_seconds": 1}  # below the minimum
    d.write_config(bad)
    d.signal(signal.SIGHUP)
    second = wait_for(lambda: d.events("config_reload_failed")[1:])[0]
    assert second["key"] == "schedule.interval_seconds"
    assert next_full_in() <= 5.5  # the previous configuration stays
    wall = time.time()
    assert last_pass_since(d, wall, full=True, timeout=15)["trigger"] == "schedule"
    assert d.alive() and d.code("/healthz") == 200 and d.code("/readyz") == 200
    assert len(d.events("config_reloaded")) == 1
    stack.check_exposure(d)
    d.signal(signal.SIGTERM)
    assert d.wait(15) == 0
    stack.assert_no_leaks(d)  # debug logging included
