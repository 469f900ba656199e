"""Benchmark 4 (memory): the floor of the process, a one-shot registration, and RSS against N.

- `import_floor_kib`: peak RSS of a bare `python` that imports the third-party libraries the
  bridge ships with (hvac, httpx, apscheduler, prometheus-client, waitress, pydantic, structlog,
  PyYAML, sqlite3) and nothing of the bridge: what any Python daemon built on them costs before
  it holds a single secret. Measured in the same run and the same virtualenv as the bridge.
- `oneshot_peak_kib`: `cybedefend-bridge sync --once` registering N new tokens into a fresh
  double with a fresh ledger, in its own process; its peak RSS from `wait4()`'s `ru_maxrss`
  (the kernel's own high-water mark for the child, nothing sampled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import ROOT
from tests.support.procs import child_env

FLOOR_IMPORTS = ("hvac", "httpx", "apscheduler.schedulers.background", "prometheus_client", "waitress.server",
                 "pydantic", "structlog", "yaml", "sqlite3")
_FLOOR_CODE = (
    "import importlib, sys\n"
    "for m in sys.argv[1:]: importlib.import_module(m)\n"
    "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
)


def import_floor_kib() -> int:
    """VmHWM (KiB) of `python` after importing the bridge's third-party libraries, nothing else."""
    done = subprocess.run([sys.executable, "-c", _FLOOR_CODE, *FLOOR_IMPORTS], capture_output=True, text=True,
                          cwd=ROOT, env=child_env(), check=True, timeout=120)
    return int(done.stdout.split()[-1])


def bare_python_kib() -> int:
    done = subprocess.run([sys.executable, "-c", _FLOOR_CODE], capture_output=True, text=True, cwd=ROOT,
                          env=child_env(), check=True, timeout=60)
    return int(done.stdout.split()[-1])


@dataclass
class OneShot:
    n: int
    peak_rss_kib: int
    seconds: float
    exit_code: int


def oneshot_peak_kib(raw_settings: dict[str, Any], workdir: Path, n: int) -> OneShot:
    """`python -m bridge sync --once` over `raw_settings` (a fresh ledger and double); its ru_maxrss."""
    config = workdir / f"oneshot-{n}.yaml"
    config.write_text(json.dumps(raw_settings))  # JSON is YAML
    log = workdir / f"oneshot-{n}.log"
    with open(log, "wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "bridge", "sync", "--once", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
        seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"sync --once over {n} exited {proc.returncode}; see {log}")
    return OneShot(n=n, peak_rss_kib=int(usage.ru_maxrss), seconds=seconds, exit_code=proc.returncode)
