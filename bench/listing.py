"""What one listing of a source costs OpenBao: SCAN against LIST, on a flat folder of N secrets.

Why discovery lists before it scans (docs/adr/0018-discovery-lists-before-it-scans.md): a SCAN
of one large folder costs OpenBao far more CPU than a LIST that returns the same keys, and
the gap grows faster than N. This measures it, on both storage backends the test launcher
knows (`dev`: in-memory; `file`: single-node raft, what a production server uses): each
request by one `curl` process (the token in a 0600 config file), OpenBao's CPU from
/proc/<pid>/stat around it, the better of `--repeats` tries.

    python -m bench.listing [--sizes 3000 10000 30000] [--repeats 2] [--storage dev file]

Not part of the full `python -m bench` run (seeding a raft server with 30,000 secrets takes a
while); its effect on a steady pass shows in that run's N = 30,000 row.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

from bench.procs import proc_cpu_seconds
from bench.rig import PREFIX, Lab
from tests.support.openbao import OpenBao


class _Lab(Lab):
    def __init__(self, workdir: Path, storage: Literal["dev", "file"]) -> None:
        super().__init__(workdir)
        self.bao = OpenBao(storage, workdir=workdir / "bao")


def _one(lab: Lab, method: str, url: str) -> tuple[float, float]:
    """(wall seconds, OpenBao CPU seconds) of one request."""
    assert lab.bao.pid is not None
    fd, cfg = tempfile.mkstemp(prefix="bench-listing-", suffix=".cfg")
    with os.fdopen(fd, "w") as fh:
        fh.write(f'header = "X-Vault-Token: {lab.bao.root_token}"\nrequest = "{method}"\nurl = "{url}"\n'
                 'output = "/dev/null"\nsilent\n')
    try:
        cpu, t = proc_cpu_seconds(lab.bao.pid), time.perf_counter()
        subprocess.run(["curl", "-K", cfg], check=True, timeout=300)
        return time.perf_counter() - t, proc_cpu_seconds(lab.bao.pid) - cpu
    finally:
        os.unlink(cfg)


def measure(storage: Literal["dev", "file"], sizes: list[int], repeats: int) -> list[tuple[int, str, float, float]]:
    rows: list[tuple[int, str, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-listing-") as tmp, _Lab(Path(tmp), storage) as lab:
        url = f"{lab.bao.addr}/v1/{lab.mount}/metadata/{PREFIX}/"
        for n in sorted(sizes):
            lab.seed(n)
            time.sleep(1)  # let the storage settle after the writes
            for method in ("SCAN", "LIST"):
                best = min((_one(lab, method, url) for _ in range(repeats)), key=lambda r: r[1])
                rows.append((n, method, *best))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[3000, 10000, 30000])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--storage", nargs="+", default=["dev", "file"], choices=["dev", "file"])
    args = ap.parse_args()
    print("| storage | N | request | wall | OpenBao CPU |\n|---|---|---|---|---|")
    for storage in args.storage:
        assert storage in ("dev", "file")
        for n, method, wall, cpu in measure(storage, args.sizes, args.repeats):
            label = "in-memory (dev)" if storage == "dev" else "raft (file)"
            print(f"| {label} | {n:,} | {method} | {wall * 1000:.0f} ms | {cpu * 1000:.0f} ms |", flush=True)


if __name__ == "__main__":
    main()
