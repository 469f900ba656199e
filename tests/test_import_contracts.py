"""The import contracts bite: a forbidden import planted in a scratch copy makes `lint-imports` fail.

pyproject.toml's contracts (docs/adr/0006-layout.md) are only worth something if they fail when the
layout is broken. Each case copies `bridge/`, `cybedefend_double/` and pyproject.toml into a
temporary directory, plants one import there, and expects `lint-imports` to exit non-zero and to
name the contract that caught it; the untouched copy must pass. The copy is what is checked
(`PYTHONPATH` points at it), never the working tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.procs import REPO

LINT = Path(sys.executable).parent / "lint-imports"
PURE = "the core is pure"
LAYERS = "bridge is layered"


def _scratch(tmp: Path) -> Path:
    root = tmp / "repo"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    shutil.copytree(REPO / "bridge", root / "bridge", ignore=ignore)
    shutil.copytree(REPO / "cybedefend_double", root / "cybedefend_double", ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _lint(root: Path) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(root), COLUMNS="400")  # the copy, not the working tree; one line per contract
    command = [str(LINT)] if os.access(LINT, os.X_OK) else [sys.executable, "-m", "importlinter.cli"]
    done = subprocess.run([*command, "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    return done.returncode, done.stdout + done.stderr


def _broken(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.search(r"\bBROKEN$", line.strip())]


def _plant(path: Path, line: str) -> None:
    """Add `line` after the `from __future__` import (or at the top), as a person would."""
    text = path.read_text(encoding="utf-8")
    marker = "from __future__ import annotations\n"
    path.write_text(text.replace(marker, marker + line + "\n", 1) if marker in text else line + "\n" + text,
                    encoding="utf-8")


def _planner_imports_the_vault_transport_and_socket(root: Path) -> None:
    _plant(root / "bridge/planner.py", "import bridge.vault.transport, socket  # noqa")


def _engine_imports_sqlite3(root: Path) -> None:
    _plant(root / "bridge/engine/sync.py", "import sqlite3  # noqa")


def _app_imports_the_double(root: Path) -> None:
    _plant(root / "bridge/app.py", "import cybedefend_double  # noqa")


def _planner_reaches_httpx_through_a_new_module(root: Path) -> None:
    (root / "bridge/shortcut.py").write_text('"""Looks harmless."""\n\nimport httpx  # noqa\n', encoding="utf-8")
    _plant(root / "bridge/planner.py", "import bridge.shortcut  # noqa")


def _source_imports_hvac(root: Path) -> None:
    _plant(root / "bridge/vault/source.py", "import hvac  # noqa")


def _source_reaches_hvac_through_its_client_module(root: Path) -> None:
    _plant(root / "bridge/vault/source.py", "import bridge.vault.hvac_client  # noqa")


CASES: list[tuple[Callable[[Path], None], list[str]]] = [
    (_planner_imports_the_vault_transport_and_socket, [PURE, LAYERS]),
    (_engine_imports_sqlite3, ["sqlite3 is confined to bridge.ledger"]),
    (_app_imports_the_double, ["the product never imports the CybeDefend double"]),
    # Only the indirect path can catch this one: planner.py itself imports nothing outside bridge.
    (_planner_reaches_httpx_through_a_new_module, [PURE, "httpx is confined"]),
    # hvac stays off the routine paths (ADR 15): only its own module imports it, and only the
    # transport and the session (lazily, for rare calls) import that module.
    (_source_imports_hvac, ["hvac and requests are confined to bridge.vault.hvac_client"]),
    (_source_reaches_hvac_through_its_client_module, ["bridge.vault.hvac_client is imported only"]),
]


def test_the_clean_copy_passes(tmp_path: Path) -> None:
    code, output = _lint(_scratch(tmp_path))
    assert code == 0, output[-3000:]
    assert not _broken(output)


@pytest.mark.parametrize(("plant", "contracts"), CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_a_planted_import_breaks_the_contract_that_forbids_it(tmp_path: Path, plant: Callable[[Path], None],
                                                              contracts: list[str]) -> None:
    root = _scratch(tmp_path)
    plant(root)
    code, output = _lint(root)
    assert code != 0, f"lint-imports accepted {plant.__name__}:\n{output[-3000:]}"
    broken = _broken(output)
    for name in contracts:
        assert any(line.startswith(name) for line in broken), f"{name!r} not among the broken contracts: {broken}"
    if plant is _planner_reaches_httpx_through_a_new_module:
        assert "bridge.planner -> bridge.shortcut" in output  # the chain is reported, not just the last hop
