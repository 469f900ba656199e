"""The Grafana dashboard: Grafana's schema, PromQL that parses, and only metrics the bridge exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.deploy_tools import (
    CHART,
    GRAFANA_SCHEMA,
    PROMETHEUS_SERIES,
    ROOT,
    dashboard,
    dashboard_exprs,
    exported_series,
    grafana_to_promql,
    metrics_in,
    run,
    tool,
)

DASHBOARD = CHART / "files" / "dashboard.json"


def _schema() -> Path:
    # In the repository, always: a missing schema is a broken clone, not a reason to skip.
    assert GRAFANA_SCHEMA.is_file(), f"the vendored Grafana schema is missing: {GRAFANA_SCHEMA}"
    assert GRAFANA_SCHEMA.resolve().is_relative_to(ROOT.resolve())
    return GRAFANA_SCHEMA


def test_dashboard_matches_grafana_schema() -> None:
    proc = run([tool("check-jsonschema"), "--schemafile", str(_schema()), str(DASHBOARD)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_schema_check_rejects_a_broken_dashboard(tmp_path: Path) -> None:
    broken = dashboard()
    del broken["schemaVersion"]
    broken["panels"][1]["gridPos"] = {"h": "tall"}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(broken), encoding="utf-8")
    proc = run([tool("check-jsonschema"), "--schemafile", str(_schema()), str(bad)], check=False)
    assert proc.returncode != 0


def test_every_expression_parses(tmp_path: Path) -> None:
    exprs = dashboard_exprs(dashboard())
    assert len(exprs) >= 20
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": grafana_to_promql(e)} for i, e in enumerate(exprs)
    ]}]}
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    proc = run([tool("promtool"), "check", "rules", str(path)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_broken_expression_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "bad-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [{"record": "r", "expr": "sum(rate(x[5m])"}]}]}))
    assert run([tool("promtool"), "check", "rules", str(path)], check=False).returncode != 0


def test_dashboard_uses_only_exported_metrics() -> None:
    allowed = exported_series()
    for expr in dashboard_exprs(dashboard()):
        used = metrics_in(expr)
        # Besides the bridge's metrics only Prometheus' own `up` may appear.
        assert used or set(re.findall(r"\b([a-z_]+)\{", expr)) <= PROMETHEUS_SERIES, f"no bridge metric in {expr!r}"
        assert used <= allowed, f"unknown {sorted(used - allowed)} in {expr!r}"


@pytest.mark.parametrize(
    "needle",
    [
        "cybedefend_bridge_passes_total",
        "cybedefend_bridge_actions_total",
        "cybedefend_bridge_rejects_total",
        "cybedefend_bridge_write_to_registered_seconds_bucket",
        "cybedefend_bridge_vault_requests_total",
        "cybedefend_bridge_cybedefend_requests_total",
        "cybedefend_bridge_vault_token_ttl_seconds",
        "cybedefend_bridge_leader",
        "cybedefend_bridge_rate_limited_wait_seconds_total",
    ],
)
def test_dashboard_shows(needle: str) -> None:
    assert any(needle in metrics_in(e) for e in dashboard_exprs(dashboard()))


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
