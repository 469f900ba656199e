"""The real daemon under test: `python -m bridge run --config FILE` in its own process.

Started with the scheduler's first pass due at once and the next one an hour later, so after
/v1/status shows a finished full pass the daemon sits idle between passes; that idle
stretch is what benchmark 4 measures, and the audit trigger is what benchmark 3 measures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.procs import proc_cpu_seconds
from tests.support.procs import ChildProcess, free_port, http, wait_for

IDLE_INTERVAL = 3600.0
LAST_PASS_GAUGE = "cybedefend_bridge_last_pass_timestamp_seconds"


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmHWM and VmRSS of another process, KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(rest.split()[0])
    return out


class DaemonProcess:
    """`cybedefend-bridge run`; `__enter__` returns once /v1/status shows a finished full pass."""

    def __init__(self, raw_settings: dict[str, Any], workdir: Path, tag: str, ready_timeout: float = 600.0,
                 python: str = sys.executable) -> None:
        self.port = free_port()
        raw = {**raw_settings}
        raw["server"] = {**raw.get("server", {}), "bind": "127.0.0.1", "port": self.port}
        raw["schedule"] = {**raw.get("schedule", {}), "interval_seconds": IDLE_INTERVAL, "jitter_fraction": 0,
                           "first_run_max_delay_seconds": 0}
        self.config = workdir / f"daemon-{tag}.yaml"
        self.config.write_text(json.dumps(raw))
        self._child = ChildProcess([python, "-m", "bridge", "run", "--config", str(self.config)],
                                   workdir / f"daemon-{tag}", merge_stderr=True)
        self._ready_timeout = ready_timeout

    @property
    def pid(self) -> int:
        return self._child.pid

    def __enter__(self) -> DaemonProcess:
        self._child.start()
        try:
            wait_for(self._ready, self._ready_timeout, interval=0.2)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        if not self._child.alive():
            raise RuntimeError(f"the daemon exited with {self._child.exit_code()}; see {self._child.dir}")
        # /readyz answers 200 once the daemon accepts work; the first full pass sets the
        # last-pass gauge. Asked of /metrics, not /v1/status: the status document lists every
        # tracked secret, and polling it during the start-up pass made the bench's own probe part
        # of the peak RSS being measured (`status_once` measures what one status request costs).
        try:
            status, body = http("GET", f"http://127.0.0.1:{self.port}/metrics", timeout=2)
        except OSError:
            return False
        if status != 200:
            return False
        for line in body.decode().splitlines():
            if line.startswith(LAST_PASS_GAUGE + " "):
                return float(line.split()[1]) > 0
        return False

    def status_once(self) -> int:
        """GET /v1/status once (every tracked secret in one document); returns its size in bytes."""
        status, body = http("GET", f"http://127.0.0.1:{self.port}/v1/status", timeout=60)
        if status != 200:
            raise RuntimeError(f"/v1/status answered {status}")
        return len(body)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def status_kib(self) -> dict[str, int]:
        return proc_status_kib(self.pid)

    def __exit__(self, *exc: object) -> None:
        self._child.stop(grace=60)
