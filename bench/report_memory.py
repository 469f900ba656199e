"""The memory (4, 5) and Vault-load (6) parts of the generated report; `bench.report` places them.

Kept apart from `bench.report` so that the sections other benchmarks own there stay untouched.
"""

from __future__ import annotations

from bench.load import load_rows, render_load
from bench.stats import linear_fit
from bench.steady import Resources, SizeResult
from bridge.config import ScheduleSettings

MIB = 1024
DAEMON_TARGET_MIB = 64
ONESHOT_TARGET_MIB = 80


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def memory_slope(sizes: list[SizeResult]) -> tuple[float, float, float] | None:
    """(KiB per secret, intercept MiB, R²) of the daemons' peak RSS against N; None without two sizes."""
    points = [(s.n, s.daemon_peak_rss_kib) for s in sizes if s.daemon_peak_rss_kib]
    if len(points) < 2:
        return None
    slope, intercept, r2 = linear_fit([n for n, _ in points], [kib for _, kib in points])
    return slope, intercept / MIB, r2


def summary_rows(sizes: list[SizeResult], res: Resources) -> list[str]:
    """Summary-table rows for targets 4 and 5 (memory)."""
    rows = [
        f"| 4 | Peak RSS of the daemon, {res.n:,} tracked | {res.peak_rss_kib / MIB:.1f} MiB | "
        f"{res.floor_kib / MIB:.1f} MiB (imports) | {res.peak_rss_kib / max(res.floor_kib, 1):.2f}x | "
        f"<= {DAEMON_TARGET_MIB} MiB | {_ok(res.peak_rss_kib <= DAEMON_TARGET_MIB * MIB)} |",
    ]
    if res.oneshot is not None:
        o = res.oneshot
        rows.append(f"| 4 | Peak RSS of `sync --once` registering {o.n:,} | {o.peak_rss_kib / MIB:.1f} MiB | "
                    f"{res.floor_kib / MIB:.1f} MiB (imports) | {o.peak_rss_kib / max(res.floor_kib, 1):.2f}x | "
                    f"<= {ONESHOT_TARGET_MIB} MiB | {_ok(o.peak_rss_kib <= ONESHOT_TARGET_MIB * MIB)} |")
    fit = memory_slope(sizes)
    if fit is not None:
        slope, intercept, r2 = fit
        rows.append(f"| 5 | Slope of the daemon's peak RSS | {slope * 1000 / MIB:.2f} MiB per 1k ({slope * 1024:.0f} B a secret) | "
                    f"intercept {intercept:.1f} MiB | | linear (report the slope) | R² {r2:.3f} |")
    return rows


def render_memory(sizes: list[SizeResult], res: Resources) -> list[str]:
    lines = [
        "", "## 4 and 5. Memory against N", "",
        f"Measured in {res.environment or 'the current virtualenv'}.", "",
        f"Floor: a bare `python` peaks at {res.bare_python_kib / MIB:.1f} MiB; importing the third-party libraries the "
        f"daemon imports and nothing of the bridge (`bench.memory.FLOOR_IMPORTS`) at {res.floor_kib / MIB:.1f} MiB"
        + (f" (with hvac and requests, shipped for rare operations only: {res.floor_with_hvac_kib / MIB:.1f} MiB)"
           if res.floor_with_hvac_kib else "")
        + ", in the same environment. Each N: a daemon (`python -m bridge run`) started on the ledger of exactly N "
        "registered secrets, its VmHWM once /metrics shows its start-up pass done (the bench polls /metrics, not "
        "/v1/status).", "",
        "| N | Daemon peak RSS | above the import floor | per secret above the floor |", "|---|---|---|---|",
    ]
    for s in sizes:
        if not s.daemon_peak_rss_kib:
            continue
        above = s.daemon_peak_rss_kib - res.floor_kib
        lines.append(f"| {s.n:,} | {s.daemon_peak_rss_kib / MIB:.1f} MiB | {above / MIB:.1f} MiB | {above * 1024 / s.n:,.0f} B |")
    fit = memory_slope(sizes)
    if fit is not None:
        slope, intercept, r2 = fit
        per = [(s.daemon_peak_rss_kib - intercept * MIB) / s.n for s in sizes if s.daemon_peak_rss_kib]
        lines += ["", f"Least squares: {slope * 1024:.0f} B per tracked secret, intercept {intercept:.1f} MiB, R² = {r2:.3f}; "
                  f"per-secret cost above the intercept at the largest N is {per[-1] / per[0]:.2f}x that at the smallest."]
    lines += ["", f"After idling, one `GET /v1/status` ({res.status_bytes / 1024:,.0f} KiB: every tracked secret) raised the "
              f"{res.n:,}-secret daemon's peak from {res.peak_rss_kib / MIB:.1f} to {res.peak_after_status_kib / MIB:.1f} MiB."]
    if res.oneshot is not None:
        o = res.oneshot
        lines.append(f"`cybedefend-bridge sync --once` registering {o.n:,} new tokens (fresh ledger, fresh double) took "
                     f"{o.seconds:.1f} s and peaked at {o.peak_rss_kib / MIB:.1f} MiB (its own VmHWM, read at exit; "
                     "not `wait4`'s `ru_maxrss`, which counts the bench's pages at the fork: `bench.memory`).")
    return lines


def render_vault_load(sizes: list[SizeResult], freshness_s: float) -> list[str]:
    steady = {s.n: sum(s.vault_requests.values()) for s in sizes}
    per_write = next((sum(s.targeted_vault_requests.values()) for s in sizes if s.targeted_vault_requests), 0)
    interval = float(ScheduleSettings().interval_seconds)
    return render_load(load_rows(steady, per_write, interval, freshness_s))
