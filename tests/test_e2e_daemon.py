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
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bridge.model import Sensitive
from bridge.simulator import Fault, Simulator
from tests.daemon_rig import (
    WEBHOOK_TOKEN,
    DaemonProc,
    Stack,
    bearer,
    free_port,
    new_simulator,
    wait_for,
)
from tests.helpers import PROJECTS
from tests.openbao import OpenBao

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PROMPT = 5.0  # seconds: "long before the next scheduled pass" (600 s away)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    s = new_simulator()
    yield s
    s.stop()


@pytest.fixture
def stacks(sim: Simulator, tmp_path: Path) -> Iterator[Callable[[OpenBao], Stack]]:
    made: list[Stack] = []

    def make(bao: OpenBao) -> Stack:
        st = Stack(bao, sim, tmp_path)
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()


def registered_within(stack: Stack, tok: Sensitive, timeout: float = PROMPT) -> float:
    """Seconds from now until `tok` is a credential in the double (AssertionError past `timeout`)."""
    t0 = time.monotonic()
    wait_for(lambda: stack.registered(tok), timeout, 0.02)
    return time.monotonic() - t0


def last_pass_since(d: DaemonProc, wall: float, full: bool = False) -> dict[str, object]:
    """The daemon's last pass report once it started after `wall` (a targeted one unless `full`)."""

    def check() -> dict[str, object] | None:
        last = d.status().get("last_pass")
        return last if last and last["started_at"] >= wall and last["full"] is full else None

    return wait_for(check, PROMPT)


def test_a_vault_write_is_registered_through_the_tailed_audit_file(openbao_factory: Callable[..., OpenBao],
                                                                   stacks: Callable[[OpenBao], Stack], tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    stack = stacks(openbao_factory(audit_log=audit))
    stack.put("before", 1)
    d = stack.daemon(triggers={"audit_file": {"path": str(audit), "poll_seconds": 0.05}}).start()
    d.wait_ready()
    assert d.status()["last_full_pass"]["trigger"] == "startup"
    next_full = d.status()["daemon"]["next_full_pass_at"]
    assert next_full - time.time() > 500  # so what follows cannot be the schedule

    wall = time.time()
    took = registered_within(stack, stack.put("fresh", 1, PROJECTS[1]))
    assert took < PROMPT
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
        wait_for(lambda: accepts(sock_port) or not d.alive(), 15)
        assert d.alive(), d.stderr()[-2000:]
        assert d.events("startup_waiting_for_a_dependency") or d.code("/readyz") is None  # Vault is not up yet
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
