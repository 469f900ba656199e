"""Subprocesses of the bench, so nothing measured shares a GIL with the CybeDefend double.

`python -m bench.worker bridge CONFIG`: builds the bridge with `bridge.app.build` and answers
commands on stdin, one JSON line each on stdout (the daemon itself has no such control channel,
and a pass must be timed exactly):
  pass                  -> a full pass: {"seconds", "cpu_seconds", "result", "counts", "vault_requests"}
  targeted KEY [KEY...] -> a targeted pass over `mount/path` keys (what an audit trigger runs)
  resources             -> {"vm_hwm_kib", "vm_rss_kib", "cpu_seconds"} of this process
  quit                  -> close the bridge and exit
`python -m bench.worker posts URL PAT_FILE BODIES_FILE CONCURRENCY ORG [--on-go]`: the create floor;
prints {"seconds": ...}. With --on-go it prints {"ready": true} once logged in and starts the
POSTs when a line arrives on stdin (so a parent can start other floor work at the same moment).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench.floors import ApiFloor, httpx_posts
from bridge.app import build
from bridge.config import load_settings
from bridge.logs import configure
from bridge.metrics import Metrics
from bridge.ports import PassRequest


def proc_status() -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of this process, KiB."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(rest.split()[0])
    return out


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _say(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def serve_bridge(config: Path) -> int:
    settings = load_settings(config, env={})
    configure(settings.logging.level, settings.logging.format, stream=sys.stderr)
    metrics = Metrics()
    bridge = build(settings, metrics=metrics)
    _say({"ready": True, "pid": os.getpid()})
    try:
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "quit":
                break
            if cmd in ("pass", "targeted"):
                request = PassRequest(trigger="manual") if cmd == "pass" else PassRequest(
                    trigger="audit_file", paths=frozenset(args), received_at={k: time.monotonic() for k in args})
                started, cpu = time.perf_counter(), cpu_seconds()
                report = bridge.engine.run(request)
                _say({"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu, "result": report.result,
                      "counts": dict(report.counts), "vault_requests": dict(report.vault_requests),
                      # getattr: the same bench also measures bridges from before group commit
                      "ledger_commits": getattr(bridge.ledger, "commits", None)})
            elif cmd == "resources":
                status = proc_status()
                _say({"vm_hwm_kib": status["VmHWM"], "vm_rss_kib": status["VmRSS"], "cpu_seconds": cpu_seconds()})
            else:
                _say({"error": f"unknown command {cmd!r}"})
    finally:
        bridge.close(revoke=False)
    return 0


def serve_posts(url: str, pat_file: Path, bodies_file: Path, concurrency: int, org: str, on_go: bool = False) -> int:
    bodies = json.loads(bodies_file.read_text())
    floor = ApiFloor(url, pat_file.read_text().strip(), concurrency)
    try:
        if on_go:
            _say({"ready": True})
            sys.stdin.readline()
        seconds = httpx_posts(floor, org, bodies)
    finally:
        floor.close()
    _say({"seconds": seconds})
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["bridge"] and len(argv) == 2:
        return serve_bridge(Path(argv[1]))
    if argv[:1] == ["posts"] and len(argv) in (6, 7) and argv[6:] in ([], ["--on-go"]):
        return serve_posts(argv[1], Path(argv[2]), Path(argv[3]), int(argv[4]), argv[5], on_go=len(argv) == 7)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
