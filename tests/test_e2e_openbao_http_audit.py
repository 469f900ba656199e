"""OpenBao's `http` audit device (OpenBao 2.5+) pointed at the bridge's POST /v1/audit, for real.

OpenBao POSTs one JSON audit entry per request and, when it starts or reloads its declared audit
devices, first sends a test entry and refuses to start (or to enable the device) unless that POST
is answered 2xx. Both orders are exercised with the device declared in OpenBao's config file:
(a) the bridge is up and the device is added later with a SIGHUP; (b) the bridge starts first,
while OpenBao is still down, and OpenBao starts with the device already declared.
The bearer token reaches OpenBao through the device's `headers` option as a `file://` reference,
so it is never written into OpenBao's config.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.daemon import WEBHOOK_TOKEN, DaemonProc, Stack
from tests.support.data import unix
from tests.support.openbao import OpenBao
from tests.support.procs import free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PROMPT = 5.0  # seconds; the scheduled full pass is 600 s away, so a registration this fast came from the device


def http_device(bridge_port: int, auth_file: Path) -> str:
    headers = json.dumps({"Authorization": [f"file://{auth_file}"]})
    return (
        f'audit "http" "bridge" {{\n  options {{\n    uri = "http://127.0.0.1:{bridge_port}/v1/audit"\n'
        f"    headers = {json.dumps(headers)}\n  }}\n}}\n"
    )


def auth_file(tmp: Path) -> Path:
    path = tmp / "bao-audit-authorization"
    path.write_text(f"Bearer {WEBHOOK_TOKEN}", encoding="utf-8")  # no newline: OpenBao sends the file as is
    path.chmod(0o600)
    return path


def audit_devices(bao: OpenBao) -> dict[str, str]:
    doc = bao.api("GET", "sys/audit", token=bao.root_token)
    devices = doc.get("data", doc)
    return {path: dev["type"] for path, dev in devices.items() if isinstance(dev, dict) and "type" in dev}


def last_trigger(d: DaemonProc, wall: float) -> str | None:
    """The trigger of the daemon's last targeted pass, once one started after `wall`."""
    last = d.status().get("last_pass")
    return str(last["trigger"]) if last and unix(last["started_at"]) >= wall and not last["full"] else None


def test_device_added_with_sighup_while_the_bridge_runs(stacks: Callable[[OpenBao], Stack], tmp_path: Path) -> None:
    (tmp_path / "bao").mkdir()
    bao = OpenBao("dev", workdir=tmp_path / "bao", extra_config="# the http audit device is added later\n")
    try:
        bao.start()
        stack = stacks(bao)
        port = free_port()
        d = stack.daemon(port=port, triggers={"audit_ingest": True}).start()
        d.wait_ready()
        assert "bridge/" not in audit_devices(bao)

        config = bao.workdir / "config.hcl"
        config.write_text(config.read_text() + http_device(port, auth_file(tmp_path)), encoding="utf-8")
        assert bao.pid is not None
        os.kill(bao.pid, signal.SIGHUP)
        wait_for(lambda: audit_devices(bao).get("bridge/") == "http", 15, 0.2)

        wall = time.time()
        tok = stack.put("http-a", 1)
        wait_for(lambda: stack.registered(tok), PROMPT, 0.05)
        assert wait_for(lambda: last_trigger(d, wall), PROMPT) == "audit_ingest"
        assert d.metric("cybedefend_bridge_trigger_events_total", source="audit_ingest") >= 1
        wait_for(lambda: stack.settled(d, ["http-a"]) and len(stack.creds()) == 1)
        stack.assert_registered_once(["http-a"], d.rows())
        stack.check_exposure(d)
    finally:
        bao.cleanup()


def test_device_declared_at_openbao_start_with_the_bridge_started_first(stacks: Callable[[OpenBao], Stack],
                                                                         tmp_path: Path) -> None:
    """The bridge waits for this very OpenBao, which will not start unless its test POST gets a 2xx."""
    port = free_port()
    (tmp_path / "bao").mkdir()
    bao = OpenBao("dev", workdir=tmp_path / "bao", extra_config=http_device(port, auth_file(tmp_path)))
    try:
        stack = stacks(bao)
        d = stack.daemon(port=port, triggers={"audit_ingest": True}).start()
        wait_for(lambda: d.events("startup_waiting") or not d.alive(), 15)
        assert d.alive(), f"the daemon exited; see {d.dir}"
        assert d.code("/readyz") == 200  # waiting for Vault, yet Ready and answering /v1/audit
        bao.start()  # raises if OpenBao's test POST to the device failed
        assert audit_devices(bao).get("bridge/") == "http"
        assert d.metric("cybedefend_bridge_trigger_events_deferred_total", source="audit_ingest") >= 1
        d.wait_ready()

        wall = time.time()
        tok = stack.put("http-b", 1)
        wait_for(lambda: stack.registered(tok), PROMPT, 0.05)
        assert wait_for(lambda: last_trigger(d, wall), PROMPT) == "audit_ingest"
        wait_for(lambda: stack.settled(d, ["http-b"]) and len(stack.creds()) == 1)
        stack.assert_registered_once(["http-b"], d.rows())
        stack.check_exposure(d)
    finally:
        bao.cleanup()
