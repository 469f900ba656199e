"""End to end: a real Prometheus on loopback scrapes a running bridge and evaluates the chart's rules.

One rig per module: an OpenBao dev server and the CybeDefend double, `cybedefend-bridge run` as a
subprocess (5 s schedule), and Debian's Prometheus (1 s scrape and evaluation, temporary TSDB) with
the PrometheusRule rendered by helm for the same release and namespace as the other deploy tests.
The target carries job/namespace labels so the rules' selectors match it, as a ServiceMonitor would.
Checks: the live /metrics exposes every metric the rules and the dashboard use; it parses and no
label value is a secret or a Vault path; stopping OpenBao sends CybeDefendBridgeNoSuccessfulPass
to `pending`. The last check stops OpenBao, so it runs last and the others do not need Vault.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cybedefend_double.demo import write_config
from cybedefend_double.openbao import DevOpenBao
from cybedefend_double.simulator import Simulator
from tests.deploy.deploy_tools import NAMESPACE, RELEASE, dashboard, dashboard_exprs, metrics_in, rules_spec, tool
from tests.support.data import forms
from tests.support.procs import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(90)]  # starts OpenBao

ALERT = "CybeDefendBridgeNoSuccessfulPass"
INTERVAL_SECONDS = 5
# Two intervals (10 s): one would let the alert flicker between two healthy passes.
STALE_INTERVALS = 2
ORG = str(uuid.uuid4())
T = TypeVar("T")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - loopback URLs built here
        body: bytes = resp.read()
    return body.decode()


def _wait_for(what: str, check: Callable[[], T | None], timeout: float, why: Callable[[], str] = str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (OSError, ValueError, KeyError):  # not listening yet, or an answer without the data
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{why()}")
        time.sleep(0.25)


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process we started (by its PID), SIGKILL it if it outlives the grace period."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class Rig:
    bao: DevOpenBao
    bridge: subprocess.Popen[bytes]
    prometheus: subprocess.Popen[bytes]
    bridge_url: str
    prom_url: str
    bridge_log: Path
    prom_log: Path
    stale_seconds: int
    # Every secret-ish value the test hands the bridge: none may show up in labels or logs.
    secrets: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    def redacted(self, text: str) -> str:
        for value in self.secrets:
            text = text.replace(value, "<redacted>")
        return text

    def logs(self) -> str:
        """Tails of both logs for failure messages, with the test's secrets blanked out."""
        out = []
        for name, path in (("bridge", self.bridge_log), ("prometheus", self.prom_log)):
            text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
            out.append(f"--- {name} log (tail)\n{self.redacted(text[-3000:])}")
        return "\n".join(out)

    def query(self, promql: str) -> list[dict[str, Any]]:
        data = json.loads(_get(f"{self.prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
        assert data["status"] == "success", data
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        data = json.loads(_get(f"{self.prom_url}/api/v1/alerts"))
        assert data["status"] == "success", data
        found: list[dict[str, Any]] = data["data"]["alerts"]
        return found

    def metrics_text(self) -> str:
        return _get(f"{self.bridge_url}/metrics")


def _write_bridge_config(work: Path, bao: DevOpenBao, sim: Simulator, port: int, pat: str) -> Path:
    # The demo's configuration, without its audit trigger; no jitter and no start delay: the
    # alert window below is two exact intervals.
    return write_config(
        work, bao, sim, port, pat, org=ORG, triggers=None, logging={"level": "info", "format": "json"},
        schedule={"interval_seconds": INTERVAL_SECONDS, "jitter_fraction": 0, "first_run_max_delay_seconds": 0},
    )


def _write_prometheus_config(work: Path, bridge_port: int) -> tuple[Path, int]:
    rules = rules_spec("--set", f"config.schedule.interval_seconds={INTERVAL_SECONDS}",
                       "--set", f"metrics.prometheusRule.noSuccessfulPassIntervals={STALE_INTERVALS}")
    stale = INTERVAL_SECONDS * STALE_INTERVALS
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == ALERT]
    assert len(exprs) == 1 and f"> {stale}" in exprs[0], f"the helm values did not reach the rule: {exprs}"
    (work / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / "rules.yaml")],
        "scrape_configs": [{
            "job_name": RELEASE,
            "static_configs": [{
                "targets": [f"127.0.0.1:{bridge_port}"],
                # What the ServiceMonitor gives the series in a cluster; the rules select on both.
                "labels": {"job": RELEASE, "namespace": NAMESPACE},
            }],
        }],
    }
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path, stale


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    prometheus_bin = tool("prometheus")
    work = tmp_path_factory.mktemp("prom-e2e")
    (work / "openbao").mkdir()
    (work / "tsdb").mkdir()
    bao = DevOpenBao("dev", workdir=work / "openbao")
    sim = Simulator()
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []
    try:
        bao.start()
        pat = "cdpat_" + secrets.token_hex(20)
        sim.add_organization(ORG)
        sim.add_pat(pat, {ORG: "manage"})
        sim.start()
        tokens, users, paths = [], [], []
        for _ in range(2):
            project = str(uuid.uuid4())
            sim.add_project(ORG, project)
            user = "user" + secrets.token_hex(6)
            tok = "dckr_pat_" + secrets.token_hex(14)[:27]
            path = "dockerhub/app-" + secrets.token_hex(4)
            bao.kv_put("secret", path, {"dockerhubUsername": user, "accessToken": tok},
                       {"cybedefend-project-id": project})
            tokens.append(tok)
            users.append(user)
            paths += [path, "secret/" + path, "secret/data/" + path]

        bridge_port = free_port()
        config = _write_bridge_config(work, bao, sim, bridge_port, pat)
        prom_config, stale = _write_prometheus_config(work, bridge_port)
        prom_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}

        bridge_log = work / "bridge.log"
        logs.append(open(bridge_log, "wb"))  # noqa: SIM115 - closed in finally
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "--config", str(config)],
            stdin=subprocess.DEVNULL, stdout=logs[-1], stderr=subprocess.STDOUT, env=env, start_new_session=True,
        ))
        prom_log = work / "prometheus.log"
        logs.append(open(prom_log, "wb"))  # noqa: SIM115 - closed in finally
        procs.append(subprocess.Popen(
            [prometheus_bin, f"--config.file={prom_config}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}", "--storage.tsdb.retention.time=1h"],
            stdin=subprocess.DEVNULL, stdout=logs[-1], stderr=subprocess.STDOUT, env=env, start_new_session=True,
        ))
        rig = Rig(bao, procs[0], procs[1], f"http://127.0.0.1:{bridge_port}", f"http://127.0.0.1:{prom_port}",
                  bridge_log, prom_log, stale, secrets=[pat, bao.root_token, *tokens, *users], paths=paths)
        for proc, name in ((rig.bridge, "the bridge"), (rig.prometheus, "Prometheus")):
            assert proc.poll() is None, f"{name} exited at once\n{rig.logs()}"
        _wait_for("the bridge's /healthz", lambda: _get(f"{rig.bridge_url}/healthz") is not None, 30, rig.logs)
        _wait_for("Prometheus to be ready", lambda: "Ready" in _get(f"{rig.prom_url}/-/ready"), 30, rig.logs)
        yield rig
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for f in logs:
            f.close()
        sim.stop()
        bao.stop()


def _type_families(text: str) -> set[str]:
    """Sample names the `# TYPE` lines promise: counters as *_total, histograms as _bucket/_sum/_count."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "counter":
            names.add(name if name.endswith("_total") else name + "_total")
        elif kind == "histogram":
            names.update(name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
    return names


def _rule_exprs() -> list[str]:
    return [r["expr"] for g in rules_spec()["groups"] for r in g["rules"]]


def test_live_metrics_expose_every_metric_the_rules_and_dashboard_use(rig: Rig) -> None:
    live = _type_families(rig.metrics_text())
    used: set[str] = set()
    for expr in _rule_exprs() + dashboard_exprs(dashboard()):
        used |= metrics_in(expr)
    assert len(used) >= 10, sorted(used)  # the extraction found the metrics, not nothing
    assert used - live == set(), f"used by the rules or dashboard but not exported: {sorted(used - live)}"
    # And Prometheus stores them under the labels the rules select on.
    up = _wait_for("a scrape of the bridge", lambda: rig.query(f'up{{job="{RELEASE}",namespace="{NAMESPACE}"}} == 1'),
                   30, rig.logs)
    assert len(up) == 1


def test_live_exposition_parses_and_has_no_secret_label_values(rig: Rig) -> None:
    # After a successful pass the per-secret code paths have run, so their labels are present.
    _wait_for("a successful pass", lambda: rig.query(
        f'cybedefend_bridge_last_successful_pass_timestamp_seconds{{job="{RELEASE}",namespace="{NAMESPACE}"}} > 0'),
        40, rig.logs)
    text = rig.metrics_text()
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 20
    values = {v for fam in families for s in fam.samples for v in s.labels.values()}
    assert {"ok", "startup", "create"} <= values, f"expected the passes' and actions' label values, got {sorted(values)}"
    forbidden = rig.secrets + rig.paths
    assert values & set(forbidden) == set(), "a secret, username or Vault path is a label value"
    for value in rig.secrets:
        for form in forms(value):
            assert form not in text, "a secret or username appears in /metrics"
            assert form not in rig.bridge_log.read_text(encoding="utf-8", errors="replace"), "a secret leaked into the log"
    for path in rig.paths:
        assert path not in text, "a Vault path appears in /metrics"


def test_no_successful_pass_alert_goes_pending_when_vault_stops(rig: Rig) -> None:
    sel = f'job="{RELEASE}",namespace="{NAMESPACE}"'
    rules = json.loads(_get(f"{rig.prom_url}/api/v1/rules"))["data"]["groups"]
    loaded = {r["name"]: r for g in rules for r in g["rules"]}
    assert ALERT in loaded and loaded[ALERT]["health"] in ("ok", "unknown"), loaded.get(ALERT)

    _wait_for("a successful pass", lambda: rig.query(f"cybedefend_bridge_last_successful_pass_timestamp_seconds{{{sel}}} > 0"),
              40, rig.logs)
    # While passes succeed every 5 s the alert stays silent for longer than its 10 s window.
    quiet_until = time.monotonic() + rig.stale_seconds + 3
    while time.monotonic() < quiet_until:
        active = [a for a in rig.alerts() if a["labels"]["alertname"] == ALERT]
        assert active == [], f"{ALERT} is active while Vault is up: {active}\n{rig.logs()}"
        time.sleep(1)

    rig.bao.stop()
    stopped = time.monotonic()

    def pending() -> dict[str, Any] | None:
        for a in rig.alerts():
            if a["labels"]["alertname"] == ALERT:
                return a
        return None

    alert = _wait_for(f"{ALERT} to go pending", pending, rig.stale_seconds + 30, rig.logs)
    took = time.monotonic() - stopped
    assert alert["state"] == "pending", alert  # `for: 2m` has not passed, so not firing yet
    assert alert["labels"]["job"] == RELEASE and alert["labels"]["namespace"] == NAMESPACE
    assert alert["labels"]["severity"] == "critical"
    # The last success was at most one interval before the stop (2 s of slack for the pass itself).
    assert took >= rig.stale_seconds - INTERVAL_SECONDS - 2, f"pending {took:.1f} s after the stop: too early"
    # The bridge is still up and scraped: the alert is about passes failing, not the target vanishing.
    assert rig.bridge.poll() is None, rig.logs()
    assert rig.query(f"up{{{sel}}} == 1"), f"the bridge is not scraped any more\n{rig.logs()}"
    failed = rig.query(f'cybedefend_bridge_passes_total{{{sel},result!="ok"}}')
    assert failed, "no failed pass is counted after Vault stopped"
