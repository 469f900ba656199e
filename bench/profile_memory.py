"""`python -m bench.profile_memory [N]`: what a steady pass over N tracked secrets holds, step by step.

A profiling aid behind the memory notes of docs/benchmarks.md, not a benchmark (it prints, never
writes the report). It seeds N tagged secrets into its own OpenBao, registers them with a
bridge built in this process (the double runs here too), makes one warm pass, then starts
`tracemalloc` (so what the double and the registration allocated is not counted) and runs one
steady pass with the planner functions the engine calls wrapped, printing what is alive after
each step and the largest allocation sites at the chosen one (`--at`, default `reconcile`, when
entries, ledger records and actions are all alive), then the largest sites still alive when
the pass returns (its report kept). Then it measures building one /v1/status
document.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bridge.engine.sync as engine_sync
from bench.rig import Lab, new_simulator
from bridge.logs import configure
from bridge.ports import PassRequest

# The planner functions the engine calls by name (bridge.engine.sync), in pass order. `Planning`
# decides one secret at a time between values_to_read and reconcile (ADR 11), so reconcile is
# where entries, records and every decision are alive together.
STEPS = ("touched_organizations", "with_evidence", "values_to_read", "reconcile", "failing_rows")
MIB = 2**20


def _wrap(name: str, at: str, top: int) -> None:
    original: Callable[..., Any] = getattr(engine_sync, name)

    def step(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        current, peak = tracemalloc.get_traced_memory()
        print(f"after {name}: {current / MIB:.1f} MiB alive (peak so far {peak / MIB:.1f} MiB)")
        if name == at:
            for stat in tracemalloc.take_snapshot().statistics("lineno")[:top]:
                print(f"    {stat}")
        return out

    setattr(engine_sync, name, step)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, nargs="?", default=10_000, help="tracked secrets (default 10,000)")
    parser.add_argument("--at", choices=STEPS, default="reconcile", help="step whose allocation sites are listed")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--cold", action="store_true",
                        help="trace the registering pass (N new tokens, what `sync --once` does) instead of a steady one")
    args = parser.parse_args(argv)
    configure("warning", "json", stream=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp, Lab(Path(tmp)) as lab:
        lab.seed(args.n)
        sim = new_simulator()
        try:
            bridge = lab.bridge(sim.url, "profile")
            try:
                for _ in range(0 if args.cold else 2):  # registers them, then warms caches and connections
                    bridge.engine.run(PassRequest(trigger="manual"))
                for name in STEPS:
                    _wrap(name, args.at, args.top)
                tracemalloc.start(10)
                report = bridge.engine.run(PassRequest(trigger="manual"))
                _, peak = tracemalloc.get_traced_memory()
                what = f"{report.counts['created']:,} created" if args.cold else f"{report.counts['skipped']:,} skipped"
                print(f"{'registering' if args.cold else 'steady'} pass over {args.n:,} ({what}): traced peak "
                      f"{peak / MIB:.1f} MiB, {peak / args.n:,.0f} B a secret")
                tracemalloc.reset_peak()
                size = len(json.dumps(bridge.engine.status(), default=str).encode())
                _, peak = tracemalloc.get_traced_memory()
                print(f"one /v1/status document ({size / 1024:,.0f} KiB): traced peak {peak / MIB:.1f} MiB")
                tracemalloc.stop()
            finally:
                bridge.close(revoke=False)
        finally:
            sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
