"""Benchmark 4 (memory): the floor of the process, a one-shot registration, and RSS against N.

- `import_floor_kib`: peak RSS of a bare `python` that imports the third-party libraries the
  daemon imports (httpx, httptools, apscheduler, prometheus-client, waitress, pydantic, structlog,
  PyYAML, sqlite3, inotify_simple) and nothing of the bridge: what any Python daemon built on
  them costs before it holds a single secret. hvac (with requests) is shipped but imported only by
  rare operations (docs/adr/0015-no-hvac-on-the-routine-path.md), so it is not in the floor;
  `HVAC_IMPORTS` measures what it would add. Measured in the same run and the same interpreter
  as the bridge: the runtime-only virtualenv of `bench.runtime_env` when it can be built.
- `oneshot_peak_kib`: `cybedefend-bridge sync --once` registering N new tokens into a fresh
  double with a fresh ledger, in its own process; its peak RSS is the kernel's high-water mark
  of that process's own memory (`VmHWM` of /proc/self/status), read at interpreter exit by a
  three-line wrapper around `python -m bridge`. Not `wait4()`'s `ru_maxrss`: Linux keeps a
  process's max RSS across `execve`, and a child forked from the bench process starts with the
  bench's resident pages counted, so `ru_maxrss` reported max(the bench's RSS at the fork, the
  child's peak): 81.9 MiB for a `sync --once` over 50 secrets whose own VmHWM was 55.3 MiB.

`python -m bench.memory [N ...]` measures only this (floor, one-shot over N, then a daemon on
the ledger the one-shot filled), for iterating on memory without the whole bench.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import ROOT
from tests.support.procs import child_env

FLOOR_IMPORTS = ("httpx", "httptools", "apscheduler.schedulers.background", "prometheus_client", "waitress.server",
                 "pydantic", "structlog", "yaml", "sqlite3", "inotify_simple")
HVAC_IMPORTS = ("hvac",)
_FLOOR_CODE = (
    "import importlib, sys\n"
    "for m in sys.argv[1:]: importlib.import_module(m)\n"
    "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
)


def import_floor_kib(python: str = sys.executable, extra: tuple[str, ...] = ()) -> int:
    """VmHWM (KiB) of `python` after importing the daemon's third-party libraries (and `extra`), nothing else."""
    done = subprocess.run([python, "-c", _FLOOR_CODE, *FLOOR_IMPORTS, *extra], capture_output=True, text=True,
                          cwd=ROOT, env=child_env(), check=True, timeout=120)
    return int(done.stdout.split()[-1])


def bare_python_kib(python: str = sys.executable) -> int:
    done = subprocess.run([python, "-c", _FLOOR_CODE], capture_output=True, text=True, cwd=ROOT,
                          env=child_env(), check=True, timeout=60)
    return int(done.stdout.split()[-1])


@dataclass
class OneShot:
    n: int
    peak_rss_kib: int
    seconds: float
    exit_code: int


# `python -m bridge ARGS`, then, at exit, the process's own VmHWM written to the file named first.
_HWM_WRAPPER = (
    "import atexit, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "def hwm():\n"
    "    kib = next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
    "    open(out, 'w').write(kib)\n"
    "atexit.register(hwm)\n"
    "runpy.run_module('bridge', run_name='__main__', alter_sys=True)\n"
)


def oneshot_peak_kib(raw_settings: dict[str, Any], workdir: Path, n: int, python: str = sys.executable) -> OneShot:
    """`python -m bridge sync --once` over `raw_settings` (a fresh ledger and double); its own VmHWM."""
    config = workdir / f"oneshot-{n}.yaml"
    config.write_text(json.dumps(raw_settings))  # JSON is YAML
    log = workdir / f"oneshot-{n}.log"
    hwm = workdir / f"oneshot-{n}.vmhwm"
    hwm.unlink(missing_ok=True)
    with open(log, "wb") as out:
        started = time.monotonic()
        done = subprocess.run([python, "-c", _HWM_WRAPPER, str(hwm), "sync", "--once", "--config", str(config)],
                              stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(), check=False)
        seconds = time.monotonic() - started
    if done.returncode != 0 or not hwm.exists():
        raise RuntimeError(f"sync --once over {n} exited {done.returncode}; see {log}")
    return OneShot(n=n, peak_rss_kib=int(hwm.read_text()), seconds=seconds, exit_code=done.returncode)


def main(argv: list[str]) -> int:
    import argparse
    import tempfile

    from bench.daemon_proc import DaemonProcess
    from bench.rig import Lab, new_simulator
    from bench.runtime_env import current_env, runtime_env
    from bridge.logs import configure

    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", type=int, nargs="*", default=[10_000])
    parser.add_argument("--current", action="store_true", help="measure in this interpreter, not the runtime-only virtualenv")
    args = parser.parse_args(argv)
    configure("warning", "json", stream=sys.stderr)
    env = current_env() if args.current else runtime_env()
    mib = 1024
    print(f"environment: {env.label}")
    floor = import_floor_kib(env.python)
    print(f"bare python {bare_python_kib(env.python) / mib:.1f} MiB; import floor {floor / mib:.1f} MiB; "
          f"with hvac {import_floor_kib(env.python, HVAC_IMPORTS) / mib:.1f} MiB")
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp, Lab(Path(tmp)) as lab:
        sim = new_simulator()
        try:
            for n in sorted(args.sizes):
                lab.seed(n)
                raw = lab.raw_settings(sim.url, f"mem-{n}")
                one = oneshot_peak_kib(raw, lab.workdir, n, env.python)
                # The daemon starts on the ledger the one-shot just filled, against the same double.
                with DaemonProcess(raw, lab.workdir, f"mem-{n}", python=env.python) as daemon:
                    peak = daemon.status_kib()["VmHWM"]
                print(f"N={n:,}: sync --once registering {n:,}: {one.peak_rss_kib / mib:.1f} MiB ({one.seconds:.1f} s); "
                      f"daemon on {n:,} tracked: {peak / mib:.1f} MiB", flush=True)
        finally:
            sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
