"""Docs that must tell the truth: every setting and every metric is documented, the example config is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import load_settings
from bridge.metrics import METRIC_NAMES
from tests.gen_docs import TARGETS, config_rows, splice

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted(TARGETS), ids=lambda p: p.name)
def test_generated_reference_is_up_to_date(path: Path) -> None:
    expected = splice(path, TARGETS[path]())
    assert path.read_text(encoding="utf-8") == expected, f"run `python -m tests.gen_docs` to update {path.name}"


def test_every_setting_has_a_description() -> None:
    missing = [key for key, _, _, meaning in config_rows() if not meaning.strip()]
    assert missing == []


def test_every_metric_is_in_the_metrics_doc() -> None:
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert [n for n in METRIC_NAMES if n not in text] == []


def test_example_configuration_is_valid(tmp_path: Path) -> None:
    settings = load_settings(ROOT / "config" / "example.yaml", env={})
    assert settings.sources and settings.cybedefend.auth.mode == "pat"


def test_every_adr_has_a_status() -> None:
    adrs = sorted((ROOT / "docs" / "adr").glob("*.md"))
    assert len(adrs) >= 5
    for adr in adrs:
        assert "Status:" in adr.read_text(encoding="utf-8"), adr.name


def test_the_architecture_doc_shows_every_module_of_the_tree() -> None:
    """docs/architecture.md's layout names each package and module, so the tree there cannot go stale."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for package in ("bridge", "cybedefend_double"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__init__.py":
                if f"{path.parent.name}/" not in text:
                    missing.append(str(path.parent.relative_to(ROOT)))
            elif path.name not in text:
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []
