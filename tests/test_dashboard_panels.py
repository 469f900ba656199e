"""The Grafana dashboard's content: process panels, runbook links that resolve, one unit per panel.

(Schema, PromQL and exported-metric checks are in tests/deploy/test_deploy_dashboard.py.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "helm" / "cybedefend-bridge" / "files" / "dashboard.json"
RUNBOOK_BASE = "https://github.com/cybedefend/cybedefend-bridge/blob/main/docs/runbooks"


def panels() -> list[dict[str, Any]]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [p for p in doc["panels"] if p["type"] != "row"]


def exprs(panel: dict[str, Any]) -> list[str]:
    return [str(t["expr"]) for t in panel.get("targets", [])]


@pytest.mark.parametrize(
    ("metric", "unit"),
    [("process_cpu_seconds_total", "percentunit"), ("process_resident_memory_bytes", "bytes"), ("process_start_time_seconds", "short")],
)
def test_cpu_memory_and_restarts_have_a_panel_with_their_unit(metric: str, unit: str) -> None:
    found = [p for p in panels() if any(metric in e for e in exprs(p))]
    assert found, f"no panel shows {metric}"
    assert all(p["fieldConfig"]["defaults"]["unit"] == unit for p in found)


def test_restarts_count_changes_of_the_start_time() -> None:
    (restarts,) = [p for p in panels() if p["title"] == "Restarts"]
    assert exprs(restarts) == [e for e in exprs(restarts) if "changes(process_start_time_seconds" in e]


def test_every_runbook_link_names_a_runbook_that_exists() -> None:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    links = [link for p in doc["panels"] for link in p.get("links", [])]
    assert len(links) >= 8
    for link in links:
        assert link["url"].startswith(RUNBOOK_BASE + "/")
        assert (ROOT / "docs" / "runbooks" / link["url"].rsplit("/", 1)[1]).is_file(), link["url"]
    assert any(link["url"] == RUNBOOK_BASE for link in doc["links"])  # the index, above the panels


def test_one_axis_per_unit() -> None:
    """No panel mixes units on one axis: one default unit and no override changing it."""
    for p in panels():
        overrides = p.get("fieldConfig", {}).get("overrides", [])
        units = [prop for o in overrides for prop in o.get("properties", []) if prop.get("id") == "unit"]
        assert units == [], f"panel {p['title']!r} overrides the unit of some series"
    (waiting,) = [p for p in panels() if p["title"] == "Rate limiting: time waiting"]
    assert len(waiting["targets"]) == 1 and "wait_seconds_total" in waiting["targets"][0]["expr"]
