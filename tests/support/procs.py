"""The one process wrapper, for the end-to-end tests, the chaos rig and the benchmarks.

`ChildProcess` is one command in its own process, its stdout and stderr appended to files in a
directory, the environment cleaned of `VAULT_*`, `BAO_*` and `BRIDGE_*` (so the operator's shell
cannot steer a test) and the repository on `PYTHONPATH`. `close()` always kills it; `stop()` asks
with SIGTERM first. `free_port`, `wait_for` (returns the value, raises on timeout), `eventually`
(returns a bool) and a loopback `http` come with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy and return that; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value: T | None
        error = ""
        try:
            value = check()
        except (OSError, ValueError, KeyError) as exc:  # the process is not answering yet
            value, error = None, f" (last error: {type(exc).__name__})"
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s{error}")
        time.sleep(interval)


def eventually(cond: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """True as soon as `cond()` is truthy, False if it is not within `timeout` (for `assert eventually(...)`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of one plain HTTP request to a loopback address; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without Vault/OpenBao/bridge variables, the repository first on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "BRIDGE_"))}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def bridge_command() -> list[str]:
    """The `cybedefend-bridge` console script beside this interpreter, or `python -m bridge`."""
    script = Path(sys.executable).parent / "cybedefend-bridge"
    return [str(script)] if os.access(script, os.X_OK) else [sys.executable, "-m", "bridge"]


class ChildProcess:
    """One command in its own process, output in `<dir>/stdout.log` and `<dir>/stderr.log`."""

    def __init__(self, argv: Sequence[str], logdir: Path, *, merge_stderr: bool = False) -> None:
        self.argv = list(argv)
        self.dir = logdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.merge_stderr = merge_stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None

    def start(self) -> ChildProcess:
        self.close()
        self.starts += 1
        self._out = (self.dir / "stdout.log").open("ab")
        err: IO[bytes] | int = subprocess.STDOUT
        if not self.merge_stderr:
            self._err = (self.dir / "stderr.log").open("ab")
            err = self._err
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=self._out, stderr=err,
                                     env=child_env())
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None, "not started"
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None, "not started"
        return self.proc.wait(timeout)

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM, up to `grace` seconds to exit, then SIGKILL; closes the log files."""
        if self.alive():
            self.signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wait(grace)
        self.close()

    def close(self) -> None:
        """Kill the process if it still runs and close the log files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for fh in (self._out, self._err):
            if fh is not None:
                fh.close()
        self._out = self._err = None

    def stdout(self) -> str:
        path = self.dir / "stdout.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stderr(self) -> str:
        path = self.dir / "stderr.log"
        return path.read_text(errors="replace") if path.exists() else ""
