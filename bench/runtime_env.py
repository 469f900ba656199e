"""The environment the memory benchmark measures in: what the shipped image installs, when possible.

The image installs `requirements.lock` and the project, nothing else (Dockerfile). A dev
virtualenv has more: dev tools (`rich`, `click`, `pygments`, pulled in by import-linter) that
httpx (`httpx._main`) and structlog (`structlog.dev`) import whenever they are installed, ~5 MiB
of peak RSS no user pays. So the memory benchmark (bench.memory, bench.steady) runs the floor and
the bridge in a *runtime-only* virtualenv built from the lock:

    python -m venv DIR
    DIR/bin/pip install --require-hashes --no-deps -r requirements.lock
    DIR/bin/pip install --no-deps <repository>

built once per lock (its directory is named by a digest of requirements.lock and pyproject.toml)
under `$BENCH_RUNTIME_CACHE`, else `$XDG_CACHE_HOME/cybedefend-bridge-bench`, else
`~/.cache/cybedefend-bridge-bench`. When it cannot be built (no network, no index), the
current interpreter is measured instead and `RuntimeEnv.label` says so; the report prints it.
The child processes still get the repository first on PYTHONPATH (`tests.support.procs.child_env`),
so the code measured is the working tree's, with the lock's libraries. Its bytecode is compiled
first (`compile_sources`), as the image compiles its own at build time: with
PYTHONDONTWRITEBYTECODE set (as on the bench machines) every child would otherwise compile each
bridge module from source at start, ~0.25 s of CPU and some peak RSS no installed bridge pays.
CI's smoke test never calls this: it must stay fast and work offline.
"""

from __future__ import annotations

import compileall
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.procs import ROOT

_READY = ".bench-runtime-ready"  # written last: a half-built virtualenv is never used


@dataclass(frozen=True)
class RuntimeEnv:
    python: str  # the interpreter that runs the floor and the bridge
    runtime_only: bool  # True: the virtualenv built from requirements.lock
    label: str  # for the report: which environment was measured, and why


def cache_root() -> Path:
    if os.environ.get("BENCH_RUNTIME_CACHE"):
        return Path(os.environ["BENCH_RUNTIME_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "cybedefend-bridge-bench"


def _digest() -> str:
    h = hashlib.sha256()
    for name in ("requirements.lock", "pyproject.toml"):
        h.update((ROOT / name).read_bytes())
    h.update(sys.version.encode())
    return h.hexdigest()[:12]


def _run(cmd: list[str], timeout: float) -> None:
    # No PYTHONPATH and no VIRTUAL_ENV of ours: pip must install into DIR and see only DIR.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def build(target: Path) -> Path:
    """Build the runtime-only virtualenv at `target` (removed first); returns its python."""
    shutil.rmtree(target, ignore_errors=True)
    base = getattr(sys, "_base_executable", sys.executable)  # the interpreter under our own venv
    _run([base, "-m", "venv", str(target)], 300)
    python = target / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
    _run([*pip, "--require-hashes", "-r", str(ROOT / "requirements.lock")], 900)
    # The project from a copy of what its wheel is built from: setuptools writes build/ and an
    # *.egg-info into the source tree, and an egg-info on PYTHONPATH would shadow the dev
    # virtualenv's own metadata of the project.
    with tempfile.TemporaryDirectory(prefix="bench-runtime-src-") as src:
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, Path(src) / name)
        shutil.copytree(ROOT / "bridge", Path(src) / "bridge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _run([*pip, src], 900)
    (target / _READY).write_text("ok\n")
    return python


def compile_sources() -> None:
    """The working tree's `bridge` bytecode in its __pycache__ (gitignored), written explicitly
    (PYTHONDONTWRITEBYTECODE only stops implicit writes); up-to-date files are left alone."""
    compileall.compile_dir(ROOT / "bridge", quiet=1)


@functools.cache
def runtime_env() -> RuntimeEnv:
    """The runtime-only virtualenv (built on first use), or the current interpreter if it cannot be;
    the working tree's bytecode compiled either way."""
    compile_sources()
    target = cache_root() / f"runtime-{_digest()}"
    python = target / "bin" / "python"
    if not (target / _READY).exists():
        try:
            build(target)
        except (OSError, subprocess.SubprocessError) as exc:
            detail = exc.stderr.strip().splitlines()[-1] if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else type(exc).__name__
            return RuntimeEnv(sys.executable, False,
                              f"the current virtualenv ({sys.prefix}): the runtime-only one from requirements.lock "
                              f"could not be built ({detail[:160]})")
    return RuntimeEnv(str(python), True, "a runtime-only virtualenv: requirements.lock with `--require-hashes --no-deps` "
                      "and the project with `--no-deps`, as the image installs them")


def current_env() -> RuntimeEnv:
    compile_sources()
    return RuntimeEnv(sys.executable, False, f"the current virtualenv ({sys.prefix}), on request")
