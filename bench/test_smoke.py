"""The benchmarks at CI size: request COUNTS only, never times (shared CI machines are too noisy).

Runs the same code as `python -m bench` (a real OpenBao, the double, the bridge in its own
process) with N = 50: a steady pass reads no value and makes at most N + listing requests to
Vault; k rotated tokens cost k value reads and k creates (plus the old credentials' deletes),
never O(N); a cold pass creates each token exactly once.

It lives in bench/ because it imports bench/: nothing under tests/ may (tests/test_layout.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.cold import run_cold
from bench.load import load_rows, render_load
from bench.procs import BridgeProcess
from bench.report import BEGIN, END, write
from bench.report_memory import memory_slope
from bench.rig import Lab, new_simulator
from bench.stats import linear_fit, percentile
from bench.steady import SizeResult, measure_size
from tests.support.data import PROJECTS

N, K = 50, 5


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with Lab(tmp_path_factory.mktemp("bench")) as lab:
        yield lab


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_steady_pass_and_k_changed_request_counts(lab: Lab) -> None:
    sim = new_simulator()
    try:
        with BridgeProcess(lab.raw_settings(sim.url, "smoke"), lab.workdir, "smoke") as bridge:
            result = measure_size(lab, sim, bridge, N, repeats=2, k=K, rng=random.Random(3))
    finally:
        sim.stop()
    steady = result.vault_requests
    assert steady.get("read", 0) == 0, steady  # nothing changed: no value is read
    assert steady.get("metadata") == N
    assert result.listing >= 1 and result.total_vault <= N + result.listing, steady
    assert result.api_requests == 0  # and nothing is sent to CybeDefend
    changed = result.k_vault_requests
    assert changed.get("read") == K and changed.get("metadata") == N, changed
    assert sum(changed.values()) <= N + K + result.listing
    assert result.k_counts == {"rotated": K}
    api = result.k_api
    assert api.get("create") == K and api.get("delete") == K, api
    assert api.get("list", 0) <= len(PROJECTS)  # one listing per project touched, not per secret
    assert sum(api.values()) <= 4 * K + len(PROJECTS)
    # One write heard by a trigger: its metadata and its value, nothing else (benchmark 6 uses this).
    assert result.targeted_vault_requests == {"metadata": 1, "read": 1}, result.targeted_vault_requests


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_cold_pass_creates_each_token_once_and_the_floor_runs(lab: Lab) -> None:
    result = run_cold(lab, lab.workdir, 30, repeats=1)
    assert result.api_requests.get("create") == 30, result.api_requests
    assert result.api_requests.get("list", 0) <= len(PROJECTS)
    assert result.api_requests.get("token_exchange") == 1
    assert len(result.posts_s) == len(result.vault_s) == len(result.pass_s) == len(result.floor_s) == 1
    assert result.floor_s[0] > 0 and result.cpu_s[0] > 0
    # Group commit: the pass commits its ledger rows in batches, far fewer than one per row.
    assert 0 < result.ledger_commits < 30, result.ledger_commits


def test_report_keeps_what_people_wrote_around_the_generated_part(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nintro\n\n{BEGIN}\nold figures\n{END}\n\n## Profiling notes\nkept\n")
    write(doc, "new figures\n")
    text = doc.read_text()
    assert "old figures" not in text and "new figures" in text
    assert text.startswith("# Benchmarks\n\nintro") and text.endswith("## Profiling notes\nkept\n")


def test_statistics() -> None:
    slope, intercept, r2 = linear_fit([1, 3, 10], [0.5, 1.5, 5.0])
    assert slope == pytest.approx(0.5) and intercept == pytest.approx(0.0, abs=1e-12) and r2 == pytest.approx(1.0)
    assert linear_fit([1, 2, 3], [1, 3, 2])[2] < 0.5
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 99) == pytest.approx(99)


def test_vault_load_is_computed_from_the_measured_counts() -> None:
    rows = load_rows({1000: 1001, 3000: 3001, 10000: 10001}, per_write=2, interval_s=300, freshness_s=0.5)
    assert [r.n for r in rows] == [1000, 10000]
    r = rows[1]
    assert r.bridge_per_hour == pytest.approx(12 * 10001 + 2 * 10000 / 720)
    assert r.eso_per_hour == pytest.approx(7200 * 10000)
    text = "\n".join(render_load(rows))
    assert "10,000" in text and "500 ms" in text


def test_memory_slope_fits_the_daemon_peaks() -> None:
    sizes = [SizeResult(n, daemon_peak_rss_kib=60 * 1024 + n) for n in (100, 300, 1000)]
    fit = memory_slope(sizes)
    assert fit is not None
    slope, intercept, r2 = fit
    assert slope == pytest.approx(1.0) and intercept == pytest.approx(60.0) and r2 == pytest.approx(1.0)
    assert memory_slope(sizes[:1]) is None


def test_scrape_bench_serves_the_same_metrics_on_both_servers() -> None:
    from bench.scrape import LOADS, render_rows, run_scrape

    rows = run_scrape(scrapes=20, repeats=1)  # raises if either server fails a scrape or they differ
    assert [r.load for r in rows] == list(LOADS)
    assert all(r.body_bytes > 10_000 and r.new_wall_ms_per_1k > 0 and r.old_wall_ms_per_1k > 0 for r in rows)
    assert len(render_rows(rows)) == 2 + len(rows)
