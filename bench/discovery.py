"""`python -m bench.discovery`: benchmark 1 (target 2 of issue 14) alone, for before/after work on discovery.

    python -m bench.discovery                          # N = 1,000 and 10,000, 3 repeats
    python -m bench.discovery --sizes 2000 --repeats 5

The same measurement as `python -m bench` (bench.steady.measure_size with an empty bridge: the
marginal and whole-process ratios, CPU beside wall time), without the cold, latency and idle
benchmarks, so a change to the steady path can be measured in a minute or two. Prints Markdown;
writes nothing.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

from bench.procs import BridgeProcess
from bench.report import steady_detail, steady_summary
from bench.rig import Lab, new_simulator
from bench.runtime_env import runtime_env
from bench.steady import EMPTY_PREFIX, SizeResult, measure_size
from bridge.logs import configure


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.discovery", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated N (default 1000,10000)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = sorted(int(x) for x in args.sizes.split(","))
    configure("warning", "json", stream=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="bench-discovery-"))
    results: list[SizeResult] = []
    try:
        with Lab(workdir) as lab:
            sim = new_simulator()
            try:
                with BridgeProcess(lab.raw_settings(sim.url, "steady"), workdir, "steady") as bridge, \
                        BridgeProcess(lab.raw_settings(sim.url, "steady-empty", EMPTY_PREFIX), workdir, "steady-empty") as empty:
                    for n in sizes:
                        results.append(measure_size(lab, sim, bridge, n, args.repeats, 10, random.Random(7), empty,
                                                    runtime_env().python))
                        print("\n".join(steady_summary(results[-1])), file=sys.stderr, flush=True)
            finally:
                sim.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("| # | Benchmark | Bridge | Floor | Ratio | Target | Met |\n|---|---|---|---|---|---|---|")
    for s in results:
        print("\n".join(steady_summary(s)))
    print("\n" + "\n".join(steady_detail(results)))
    print("\n| N | Vault requests (steady pass) | k = 10 rotated: Vault requests |\n|---|---|---|")
    for s in results:
        print(f"| {s.n:,} | {', '.join(f'{k} {v}' for k, v in sorted(s.vault_requests.items()))} | "
              f"{', '.join(f'{k} {v}' for k, v in sorted(s.k_vault_requests.items()))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
