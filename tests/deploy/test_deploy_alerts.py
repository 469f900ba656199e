"""The chart's alert rules: promtool check and unit tests, runbooks, and metric names."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.deploy_tools import PROMETHEUS_SERIES, ROOT, exported_series, metrics_in, rules_spec, run, tool

TEST_FILE = Path(__file__).with_name("alerts_test.yaml")
REQUIRED_ALERTS = {
    "CybeDefendBridgeDown",
    "CybeDefendBridgeNoSuccessfulPass",
    "CybeDefendBridgeRegistrationsFailing",
    "CybeDefendBridgeRejects",
    "CybeDefendBridgeVaultAuthFailing",
    "CybeDefendBridgeVaultTokenTTLLow",
    "CybeDefendBridgeRateLimited",
    "CybeDefendBridgeDeleteGuardTripped",
}


def _alerts() -> list[dict[str, Any]]:
    return [r for g in rules_spec()["groups"] for r in g["rules"] if "alert" in r]


def _write_rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules_spec(), sort_keys=False), encoding="utf-8")
    return path


def test_promtool_check_rules(tmp_path: Path) -> None:
    proc = run([tool("promtool"), "check", "rules", str(_write_rules(tmp_path))])
    assert f"SUCCESS: {len(_alerts())} rules found" in proc.stdout


def test_promtool_unit_tests(tmp_path: Path) -> None:
    _write_rules(tmp_path)
    shutil.copy(TEST_FILE, tmp_path / TEST_FILE.name)
    proc = run([tool("promtool"), "test", "rules", str(tmp_path / TEST_FILE.name)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    # A rules file whose delete-guard alert never fires must fail the suite: the cases assert something.
    spec = rules_spec()
    for group in spec["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "CybeDefendBridgeDeleteGuardTripped":
                rule["expr"] = "vector(1) == 2"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    shutil.copy(TEST_FILE, tmp_path / TEST_FILE.name)
    proc = run([tool("promtool"), "test", "rules", str(tmp_path / TEST_FILE.name)], check=False)
    assert proc.returncode != 0


def test_every_required_alert_exists() -> None:
    assert {a["alert"] for a in _alerts()} >= REQUIRED_ALERTS


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases = yaml.safe_load(TEST_FILE.read_text(encoding="utf-8"))["tests"]
    fires: set[str] = set()
    silent: set[str] = set()
    for case in cases:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - fires == set(), "alerts without a case where they fire"
    assert names - silent == set(), "alerts without a case where they stay silent"


def test_every_alert_links_an_existing_runbook() -> None:
    for alert in _alerts():
        name = alert["alert"]
        url = alert["annotations"]["runbook_url"]
        assert url.endswith(f"/docs/runbooks/{name}.md"), url
        runbook = ROOT / "docs" / "runbooks" / f"{name}.md"
        assert runbook.is_file(), f"missing {runbook.relative_to(ROOT)}"
        text = runbook.read_text(encoding="utf-8")
        for section in ("## Meaning", "## Impact", "## Diagnosis", "## Fix"):
            assert section in text, f"{runbook.name} lacks {section}"
        assert alert["labels"]["severity"] in ("critical", "warning")


def test_rules_use_only_exported_metrics() -> None:
    allowed = exported_series()
    for alert in _alerts():
        used = metrics_in(alert["expr"])
        assert used or "up{" in alert["expr"], f"{alert['alert']} uses no bridge metric"
        assert used <= allowed, f"{alert['alert']}: unknown {sorted(used - allowed)}"


def test_down_alert_uses_only_prometheus_up() -> None:
    down = next(a for a in _alerts() if a["alert"] == "CybeDefendBridgeDown")
    assert set(re.findall(r"\b([a-z_]+)\{", down["expr"])) <= PROMETHEUS_SERIES


def test_thresholds_follow_the_schedule_interval() -> None:
    spec = rules_spec("--set", "config.schedule.interval_seconds=60", "--set", "metrics.prometheusRule.noSuccessfulPassIntervals=4")
    rule = next(r for g in spec["groups"] for r in g["rules"] if r.get("alert") == "CybeDefendBridgeNoSuccessfulPass")
    assert "> 240" in rule["expr"] and "[240s]" in rule["expr"]
