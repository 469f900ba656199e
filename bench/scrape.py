"""`/metrics` under scraping: the shipped server (waitress) against the stdlib one it replaced.

Each server runs alone in its own process (`bench.scrape_server`) serving the same `Metrics`; the
load is one `curl` process, so no Python client shares a GIL with either. Two loads:

- `serial`: one client, scrape after scrape (a Prometheus replica; curl reuses its connection
  wherever the server keeps it alive, as Prometheus does);
- `parallel`: eight at once (several Prometheus replicas, a federation, an impatient dashboard).

Per load, the servers alternate `repeats` times and the medians are kept: wall time and the
server process's CPU (utime + stime) per 1,000 scrapes. The ratio is new / old; "costs no more"
means <= 1.0 on CPU per scrape, the resource a scrape takes from the bridge.

    python -m bench.scrape            # 2,000 scrapes per run, 5 alternations
    python -m bench.scrape --quick    # 300 scrapes, 3 alternations
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass

from bench.floors import curl_fetch
from bench.procs import ROOT, proc_cpu_seconds
from bench.stats import median

LOADS = {"serial": 1, "parallel": 8}


@dataclass(frozen=True)
class ScrapeRow:
    load: str
    scrapes: int
    new_wall_ms_per_1k: float
    old_wall_ms_per_1k: float
    new_cpu_ms_per_1k: float
    old_cpu_ms_per_1k: float
    body_bytes: int

    @property
    def cpu_ratio(self) -> float:
        return self.new_cpu_ms_per_1k / self.old_cpu_ms_per_1k

    @property
    def wall_ratio(self) -> float:
        return self.new_wall_ms_per_1k / self.old_wall_ms_per_1k


class _Server:
    def __init__(self, kind: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.scrape_server", kind], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}/metrics"

    def run(self, scrapes: int, parallel: int) -> tuple[float, float]:
        """(wall seconds, server CPU seconds) for `scrapes` GET /metrics at `parallel`."""
        cpu0 = proc_cpu_seconds(self.proc.pid)
        wall = curl_fetch([self.url] * scrapes, vault_token="unused", parallel=parallel)
        return wall, proc_cpu_seconds(self.proc.pid) - cpu0

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _body_bytes(url: str) -> int:
    out = subprocess.run(["curl", "--silent", "--fail", url], capture_output=True, check=True).stdout
    if b"cybedefend_bridge_passes_total" not in out:
        raise RuntimeError("the scrape did not return the bridge's metrics")
    return len(out)


def run_scrape(scrapes: int = 2000, repeats: int = 5) -> list[ScrapeRow]:
    servers = {kind: _Server(kind) for kind in ("new", "old")}
    try:
        sizes = {kind: _body_bytes(s.url) for kind, s in servers.items()}
        for s in servers.values():  # warm both (imports, first render) before anything counts
            s.run(50, 1)
        rows = []
        for load, parallel in LOADS.items():
            samples: dict[str, list[tuple[float, float]]] = {"new": [], "old": []}
            for i in range(repeats):
                order = ("new", "old") if i % 2 == 0 else ("old", "new")  # drifting load hits both alike
                for kind in order:
                    samples[kind].append(servers[kind].run(scrapes, parallel))
            per_1k = 1000.0 / scrapes * 1000.0  # seconds per run -> ms per 1,000 scrapes
            rows.append(ScrapeRow(
                load=load, scrapes=scrapes,
                new_wall_ms_per_1k=median([w for w, _ in samples["new"]]) * per_1k,
                old_wall_ms_per_1k=median([w for w, _ in samples["old"]]) * per_1k,
                new_cpu_ms_per_1k=median([c for _, c in samples["new"]]) * per_1k,
                old_cpu_ms_per_1k=median([c for _, c in samples["old"]]) * per_1k,
                body_bytes=sizes["new"],
            ))
        # The same document both ways, within the few bytes the counters' own digits can move by.
        if abs(sizes["new"] - sizes["old"]) > 64:
            raise RuntimeError(f"the servers rendered different documents ({sizes})")
        return rows
    finally:
        for s in servers.values():
            s.close()


def render_rows(rows: list[ScrapeRow]) -> list[str]:
    out = [
        "| Load | Scrapes per run | waitress (new) CPU / 1k | http.server (old) CPU / 1k | CPU ratio | "
        "new wall / 1k | old wall / 1k | Wall ratio | Costs no more (CPU <= 1.0x) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r.load} ({LOADS[r.load]} at once) | {r.scrapes:,} | {r.new_cpu_ms_per_1k:.0f} ms | {r.old_cpu_ms_per_1k:.0f} ms | "
            f"{r.cpu_ratio:.2f}x | {r.new_wall_ms_per_1k:.0f} ms | {r.old_wall_ms_per_1k:.0f} ms | {r.wall_ratio:.2f}x | "
            f"{'yes' if r.cpu_ratio <= 1.0 else '**no**'} |"
        )
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 scrapes per run, 3 alternations")
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = run_scrape(300, 3) if args.quick else run_scrape()
    print("\n".join(render_rows(rows)))
    print(f"\n({time.monotonic() - started:.0f} s; /metrics body {rows[0].body_bytes:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
