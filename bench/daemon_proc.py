"""The real daemon under test: `python -m bridge run --config FILE` in its own process.

Started with the scheduler's first pass due at once and the next one an hour later, so after
/v1/status shows a finished full pass the daemon sits idle between passes; that idle
stretch is what benchmark 4 measures, and the audit trigger is what benchmark 3 measures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from bench.procs import ROOT, _env, proc_cpu_seconds

IDLE_INTERVAL = 3600.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    def __init__(self, raw_settings: dict[str, Any], workdir: Path, tag: str, ready_timeout: float = 600.0) -> None:
        self.port = _free_port()
        raw = {**raw_settings}
        raw["server"] = {**raw.get("server", {}), "bind": "127.0.0.1", "port": self.port}
        raw["schedule"] = {**raw.get("schedule", {}), "interval_seconds": IDLE_INTERVAL, "jitter_fraction": 0,
                           "first_run_max_delay_seconds": 0}
        self.config = workdir / f"daemon-{tag}.yaml"
        self.config.write_text(json.dumps(raw))
        self._log_path = workdir / f"daemon-{tag}.log"
        self._ready_timeout = ready_timeout
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def __enter__(self) -> DaemonProcess:
        self._log = open(self._log_path, "ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(),
        )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {self._proc.returncode}; see {self._log_path}")
            try:
                # /readyz answers 200 once the daemon accepts work; the first full pass is in /v1/status.
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/status", timeout=2) as resp:
                    daemon = json.loads(resp.read()).get("daemon") or {}
                    if resp.status == 200 and daemon.get("last_full_pass_age_seconds") is not None:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the daemon was not ready within {self._ready_timeout:.0f} s; see {self._log_path}")

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def status_kib(self) -> dict[str, int]:
        return proc_status_kib(self.pid)

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
