"""Benchmark 2: cold registration of N new tokens, the bridge's first pass against the same work.

Each repeat uses a fresh double and a fresh ledger, so every secret is a plain create. The
floor (target 3 of issue 14) is the same work done by minimal clients at the bridge's
concurrency, in their own processes: the 2N Vault reads (N metadata + N value documents) by one
`curl --parallel --parallel-max <vault.concurrency>` and the N create POSTs by a bare httpx client
on `cybedefend.max_concurrency` threads, both started at the same moment, timed until both are
done (`bench.procs.same_work_floor`). It ignores that a POST needs its value first, which costs a
pipelined client only the first read's latency: a lower bound for any client at that
concurrency. For information the POSTs alone and the reads alone are also timed, each on its own
(their sum is the floor of a client that reads everything first and POSTs after).

    python -m bench.cold [--n 1000] [--repeats 3]    # this benchmark alone, printed
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.floors import Curl, curl_fetch
from bench.procs import BridgeProcess, posts_floor, same_work_floor
from bench.rig import API_CONCURRENCY, API_RATE, Lab, name, new_simulator, token
from bench.stats import median
from bridge.config import VaultSettings
from bridge.logs import configure
from tests.support.data import ORG, PROJECTS

COLD = "cold"
VAULT_CONCURRENCY = int(VaultSettings.model_fields["concurrency"].default)  # vault.concurrency: the default


@dataclass
class ColdResult:
    n: int
    concurrency: int = API_CONCURRENCY
    vault_concurrency: int = VAULT_CONCURRENCY
    rate_cap: float = API_RATE
    pass_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # the bridge process's utime + stime during the pass
    floor_s: list[float] = field(default_factory=list)  # same work, reads and POSTs at once
    posts_s: list[float] = field(default_factory=list)  # the POSTs alone
    vault_s: list[float] = field(default_factory=list)  # the 2N reads alone
    api_requests: dict[str, int] = field(default_factory=dict)
    ledger_commits: int = 0

    @property
    def ratio(self) -> float:
        """Target 3: the bridge against the same work by minimal clients at the same concurrency."""
        return median(self.pass_s) / median(self.floor_s)

    @property
    def ratio_posts(self) -> float:
        return median(self.pass_s) / median(self.posts_s)

    @property
    def ratio_same_work(self) -> float:
        """Against the reads, then the POSTs (a client without a pipeline)."""
        return median(self.pass_s) / (median(self.posts_s) + median(self.vault_s))


def _bodies(n: int) -> list[dict[str, str]]:
    # The shape of the bridge's own creates, including a marker-sized description.
    return [{"projectId": PROJECTS[i % len(PROJECTS)], "dockerhubUsername": f"u-{name(i)}", "accessToken": token(i),
             "description": f"[cybedefend-bridge:default:{i:012x}:v1]"} for i in range(n)]


def run_cold(lab: Lab, workdir: Path, n: int, repeats: int) -> ColdResult:
    lab.seed(n, COLD)
    out = ColdResult(n)
    urls = lab.metadata_urls(n, COLD) + lab.data_urls(n, COLD)
    for rep in range(repeats):
        sim = new_simulator()
        try:
            with BridgeProcess(lab.raw_settings(sim.url, f"cold{rep}", COLD), workdir, f"cold{rep}") as bridge:
                cpu = bridge.cpu_seconds()
                doc = bridge.full_pass()
                out.cpu_s.append(bridge.cpu_seconds() - cpu)
            if doc["counts"]["created"] != n:
                raise RuntimeError(f"cold pass created {doc['counts']['created']} of {n}")
            out.pass_s.append(float(doc["seconds"]))
            out.ledger_commits = int(doc.get("ledger_commits") or 0)
            out.api_requests = {}
            for r in sim.requests:
                out.api_requests[r.endpoint] = out.api_requests.get(r.endpoint, 0) + 1
        finally:
            sim.stop()
        floor_sim = new_simulator()
        try:
            with Curl(urls, lab.bao.root_token, VAULT_CONCURRENCY) as curl:
                wall, _, _ = same_work_floor(floor_sim.url, lab.workdir / "pat", _bodies(n), API_CONCURRENCY, ORG,
                                             workdir, curl)
            out.floor_s.append(wall)
        finally:
            floor_sim.stop()
        posts_sim = new_simulator()
        try:
            out.posts_s.append(posts_floor(posts_sim.url, lab.workdir / "pat", _bodies(n), API_CONCURRENCY, ORG, workdir))
        finally:
            posts_sim.stop()
        out.vault_s.append(curl_fetch(urls, lab.bao.root_token, VAULT_CONCURRENCY))
    return out


def summary(c: ColdResult) -> str:
    def ms(xs: list[float]) -> str:
        return ", ".join(f"{x * 1000:.0f}" for x in xs) + " ms"
    return "\n".join([
        f"cold registration of {c.n:,}: bridge {median(c.pass_s) * 1000:.0f} ms (CPU {median(c.cpu_s):.2f} s, "
        f"{median(c.cpu_s) / c.n * 1000:.2f} s per 1,000), same-work floor {median(c.floor_s) * 1000:.0f} ms: "
        f"{c.ratio:.2f}x (target <= 1.5x)",
        f"  bridge runs {ms(c.pass_s)}; floor {ms(c.floor_s)}; POSTs alone {ms(c.posts_s)} ({c.ratio_posts:.2f}x); "
        f"reads alone {ms(c.vault_s)}; reads then POSTs {c.ratio_same_work:.2f}x",
        f"  ledger commits in the pass: {c.ledger_commits}; CybeDefend requests: "
        + ", ".join(f"{k} {v}" for k, v in sorted(c.api_requests.items())),
    ])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cold", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="new tokens to register (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="bridge/floor alternations (default 3)")
    args = parser.parse_args(argv)
    configure("warning", "json", stream=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    try:
        with Lab(workdir / "main") as lab:
            result = run_cold(lab, workdir, args.n, args.repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
