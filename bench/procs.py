"""The parent side of `bench.worker`: start a bridge (or a floor client) in its own process.

The bench process hosts the CybeDefend double (its request records are read in-process);
the bridge under test and the floor clients each get a process of their own, as the daemon
has in production, so neither is slowed by sharing a GIL with the double.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from bench.floors import Curl
from tests.support.procs import REPO, child_env

ROOT = REPO
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


class BridgeProcess:
    """`python -m bench.worker bridge CONFIG`, driven line by line."""

    def __init__(self, raw_settings: dict[str, Any], workdir: Path, tag: str) -> None:
        self.config = workdir / f"config-{tag}.yaml"
        self.config.write_text(json.dumps(raw_settings))  # JSON is YAML
        self._log: IO[bytes] = open(workdir / f"bridge-{tag}.log", "ab")  # noqa: SIM115 - closed in close()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.worker", "bridge", str(self.config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT, env=child_env(),
        )
        self.ready = self._read()
        self.pid = int(self.ready["pid"])

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the bridge worker exited ({self._proc.wait()}); see {self._log.name}")
        doc: dict[str, Any] = json.loads(line)
        if "error" in doc:
            raise RuntimeError(doc["error"])
        return doc

    def ask(self, command: str) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._read()

    def full_pass(self) -> dict[str, Any]:
        doc = self.ask("pass")
        if doc["result"] != "ok":
            raise RuntimeError(f"a bridge pass ended {doc['result']}: {doc['counts']}")
        return doc

    def targeted(self, keys: Sequence[str]) -> dict[str, Any]:
        return self.ask("targeted " + " ".join(keys))

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(RuntimeError, BrokenPipeError):
                self.ask("quit")
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()
        self._log.close()

    def __enter__(self) -> BridgeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def posts_floor(url: str, pat_file: Path, bodies: list[dict[str, Any]], concurrency: int, org: str, workdir: Path) -> float:
    """Seconds for a bare httpx client, in its own process, to send `bodies` as creates."""
    path = workdir / "floor-bodies.json"
    path.write_text(json.dumps(bodies))
    path.chmod(0o600)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.worker", "posts", url, str(pat_file), str(path), str(concurrency), org],
            capture_output=True, text=True, cwd=ROOT, env=child_env(), check=False, timeout=600,
        )
    finally:
        path.unlink()
    if done.returncode != 0:
        raise RuntimeError(f"the floor client failed: {done.stderr.strip()[-500:]}")
    return float(json.loads(done.stdout.splitlines()[-1])["seconds"])


def same_work_floor(url: str, pat_file: Path, bodies: list[dict[str, Any]], concurrency: int, org: str, workdir: Path,
                    curl: Curl) -> tuple[float, float, float]:
    """The cold-registration floor: the POSTs (bare httpx, `concurrency` threads, own process)
    and the 2N Vault reads (`curl`, already configured) started at the same moment.

    Returns (wall seconds until both finished, the POSTs' own seconds, curl's own seconds).
    """
    path = workdir / "floor-bodies.json"
    path.write_text(json.dumps(bodies))
    path.chmod(0o600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.worker", "posts", url, str(pat_file), str(path), str(concurrency), org, "--on-go"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=child_env(),
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        if "ready" not in json.loads(proc.stdout.readline() or '{"error": "no answer"}'):
            raise RuntimeError("the floor client did not log in")
        started = time.perf_counter()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        curl.start()
        curl_s = curl.wait()
        line = proc.stdout.readline()
        posts_end = time.perf_counter()
        if proc.wait(600) != 0 or not line:
            raise RuntimeError(f"the floor client failed: {(proc.stderr.read() if proc.stderr else '')[-500:]}")
        posts_s = float(json.loads(line)["seconds"])
        return max(posts_end - started, curl_s), posts_s, curl_s
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        path.unlink()


def sync_once(config: Path, workdir: Path, python: str = sys.executable) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one whole `python -m bridge sync --once` process: interpreter
    start, imports, configuration, login, the pass, exit. What a cron job pays. `python`: the
    interpreter (the runtime-only virtualenv of `bench.runtime_env`: the image's libraries, none
    of the dev tools a dev virtualenv makes httpx and structlog import at start-up)."""
    with open(workdir / "sync-once.log", "ab") as log:
        started = time.perf_counter()
        proc = subprocess.Popen([python, "-m", "bridge", "sync", "--once", "--config", str(config)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT, env=child_env())
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if proc.returncode != 0:
        raise RuntimeError(f"sync --once exited {proc.returncode}; see {workdir / 'sync-once.log'}")
    return elapsed, usage.ru_utime + usage.ru_stime
