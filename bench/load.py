"""Benchmark 6: requests per hour to Vault, the bridge against External Secrets Operator at equal freshness.

Computed from counts measured in the same run, never typed in:
- the bridge: a full pass every `schedule.interval_seconds` (the shipped default) costs what a
  measured steady pass cost (`PassReport.vault_requests`: N metadata GETs + the listing), and each
  write heard by a trigger costs what a measured targeted pass cost (metadata GET + value GET);
- ESO: every ExternalSecret re-reads its Vault KV v2 secret every `refreshInterval`, at least one
  `GET <mount>/data/<path>` per refresh (external-secrets `providers/v1/vault/client_get.go`,
  `readSecret`: one `ReadWithDataWithContext` per remote ref; auth and token renewals not
  counted), with `refreshInterval` set to the bridge's measured write-to-registered p99, so both
  deliver a write within the same time.
"""

from __future__ import annotations

from dataclasses import dataclass

HOUR = 3600.0
ESO_GETS_PER_REFRESH = 1  # a lower bound: one data GET per ExternalSecret, nothing for auth
# The stated write rate: every token rotated once every 30 days, spread evenly.
ROTATION_DAYS = 30


@dataclass(frozen=True)
class LoadRow:
    n: int
    interval_s: float
    pass_requests: int  # measured Vault requests of one steady pass at this N
    per_write: int  # measured Vault requests of one targeted pass after one write
    writes_per_hour: float
    freshness_s: float  # the bridge's measured write-to-registered p99 = ESO's refreshInterval

    @property
    def bridge_per_hour(self) -> float:
        return HOUR / self.interval_s * self.pass_requests + self.writes_per_hour * self.per_write

    @property
    def eso_per_hour(self) -> float:
        return HOUR / self.freshness_s * self.n * ESO_GETS_PER_REFRESH


def load_rows(steady: dict[int, int], per_write: int, interval_s: float, freshness_s: float,
              sizes: tuple[int, ...] = (1000, 10000)) -> list[LoadRow]:
    """One row per N in `sizes` that was measured (`steady`: N -> requests of one steady pass)."""
    return [LoadRow(n, interval_s, steady[n], per_write, n / (ROTATION_DAYS * 24), freshness_s)
            for n in sizes if n in steady]


def render_load(rows: list[LoadRow]) -> list[str]:
    if not rows:
        return []
    r0 = rows[0]
    lines = [
        "", "## 6. Vault load at equal freshness", "",
        f"Requests per hour to Vault. The bridge: a full pass every {r0.interval_s:.0f} s (`schedule.interval_seconds`, "
        f"the shipped default) at the measured cost of a steady pass, plus {r0.per_write} requests per write (a measured "
        f"targeted pass: metadata GET + value GET) for every token rotated once every {ROTATION_DAYS} days. "
        f"External Secrets Operator: every ExternalSecret refreshed every {r0.freshness_s * 1000:.0f} ms (the bridge's "
        f"measured write-to-registered p99 with the shipped defaults, so both are equally fresh), at least "
        f"{ESO_GETS_PER_REFRESH} `GET <mount>/data/<path>` per refresh (its Vault provider's `readSecret`), auth not counted.",
        "", "| N | Bridge: per pass | per write | writes/h | Bridge req/h | ESO refreshInterval | ESO req/h | ESO / bridge |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r.n:,} | {r.pass_requests:,} | {r.per_write} | {r.writes_per_hour:.1f} | {r.bridge_per_hour:,.0f} | "
                     f"{r.freshness_s * 1000:.0f} ms | {r.eso_per_hour:,.0f} | {r.eso_per_hour / r.bridge_per_hour:,.0f}x |")
    return lines
