"""Benchmark 2: cold registration of N new tokens, the bridge's first pass against bare POSTs.

Each repeat uses a fresh double and a fresh ledger, so every secret is a plain create. The
floor sends the same N create bodies from a bare httpx client with the same concurrency
(`cybedefend.max_concurrency`), in its own process, to its own fresh double. A second floor
adds what any client must also do first: read the N metadata and N value documents from Vault
(curl, 8 in parallel), so the ratio against it compares the same work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench.floors import curl_fetch
from bench.procs import BridgeProcess, posts_floor
from bench.rig import API_CONCURRENCY, API_RATE, Lab, name, new_simulator, token
from bench.stats import median
from tests.support.data import ORG, PROJECTS

COLD = "cold"


@dataclass
class ColdResult:
    n: int
    concurrency: int = API_CONCURRENCY
    rate_cap: float = API_RATE
    pass_s: list[float] = field(default_factory=list)
    posts_s: list[float] = field(default_factory=list)
    vault_s: list[float] = field(default_factory=list)
    api_requests: dict[str, int] = field(default_factory=dict)

    @property
    def ratio_posts(self) -> float:
        return median(self.pass_s) / median(self.posts_s)

    @property
    def ratio_same_work(self) -> float:
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
                doc = bridge.full_pass()
            if doc["counts"]["created"] != n:
                raise RuntimeError(f"cold pass created {doc['counts']['created']} of {n}")
            out.pass_s.append(float(doc["seconds"]))
            out.api_requests = {}
            for r in sim.requests:
                out.api_requests[r.endpoint] = out.api_requests.get(r.endpoint, 0) + 1
        finally:
            sim.stop()
        floor_sim = new_simulator()
        try:
            out.posts_s.append(posts_floor(floor_sim.url, lab.workdir / "pat", _bodies(n), API_CONCURRENCY, ORG, workdir))
        finally:
            floor_sim.stop()
        out.vault_s.append(curl_fetch(urls, lab.bao.root_token))
    return out
