"""The chaos rig: a real OpenBao, the CybeDefend double, the bridge, and the one invariant.

Every chaos scenario builds a `ChaosRig`, changes Vault through it (so the rig knows what each
secret should end as), runs the bridge either in-process (`build(settings)`, like the CLI) or
as a real `cybedefend-bridge` subprocess that can be killed with SIGKILL, and ends with
`assert_invariant`:

1. each tagged, valid secret has exactly one credential carrying its marker for its latest
   Vault version, holding exactly Vault's latest token, linked to its project;
2. each untagged or deleted secret is handled by the deletion policy (`delete`: no credential
   left; `retain`: the ledger says orphaned/retired), each rejected one has no credential;
3. no two credentials carry the same marker revision (no duplicate, ever), and no credential
   carries our marker for a secret the rig does not know;
4. the hand-made credentials seeded at the start (no marker, another instance's marker, a
   forged marker of ours) are unchanged: same id, description, username, token and links;
5. no secret (DockerHub tokens, the PAT, Vault tokens, AppRole secret_ids, the fingerprint key)
   appears in any output: subprocess stdout/stderr, metrics exposition, status JSON, `plan`
   output, ledger file bytes — as is, base64 or URL-encoded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bridge.app import Bridge, build
from bridge.config import Settings, parse_settings
from bridge.cybedefend.client import CybeDefendClient
from bridge.keyring import Keyring
from bridge.ledger import SqliteLedger
from bridge.metrics import Metrics
from bridge.model import SecretRef, Sensitive
from bridge.ports import PassReport, PassRequest
from cybedefend_double.simulator import Simulator
from tests.chaos.invariant import Cred, Expect, Want, check_invariant, check_no_duplicates
from tests.helpers import ORG, PROJECTS, assert_no_leak, tagged, token
from tests.openbao import OpenBao

PAT = "cdp_" + hashlib.sha256(b"chaos-pat").hexdigest()
ROOT = Path(__file__).resolve().parents[2]
FULL = PassRequest(trigger="manual")
PREFIX = "dockerhub"


@dataclass
class Secret:
    name: str
    expect: Expect
    project: str | None = None
    reject_code: str | None = None


@dataclass
class Run:
    """One `cybedefend-bridge` subprocess and what it printed."""

    args: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    out_path: Path
    err_path: Path
    started: float = field(default_factory=time.monotonic)
    killed: bool = False

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill9(self) -> bool:
        """SIGKILL the bridge; True if it was still running (a real crash, not a late kill)."""
        alive = self.proc.poll() is None
        if alive:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.killed = True
        self.proc.wait(10)
        return alive

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")


class ChaosRig:
    """A KV v2 mount on a real OpenBao, the double, and the bridge's config (file + dict)."""

    def __init__(
        self,
        bao: OpenBao,
        mount: str,
        sim: Simulator,
        tmp: Path,
        *,
        policy: str = "delete",
        vault_token: str | None = None,
        **overrides: dict[str, Any],
    ) -> None:
        self.bao, self.mount, self.sim, self.tmp = bao, mount, sim, tmp
        self.policy = policy
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "pat").write_text(PAT + "\n")
        (tmp / "vault-token").write_text(vault_token or bao.root_token)
        self.raw: dict[str, Any] = {
            "vault": {"address": bao.addr, "timeout_seconds": 5,
                      "auth": {"method": "token", "token_file": str(tmp / "vault-token")}},
            "sources": [{"mount": mount, "path": PREFIX}],
            "cybedefend": {"api_url": sim.url, "auth_url": sim.url, "organization_id": ORG,
                           "auth": {"credential_file": str(tmp / "pat")}, "timeout_seconds": 5,
                           "max_requests_per_second": 2000, "max_concurrency": 4,
                           "retry": {"base_seconds": 0.01, "cap_seconds": 0.5, "max_attempts": 5}},
            "sync": {"retry_base_seconds": 0.01, "retry_cap_seconds": 0.05, "deletion_policy": policy,
                     "max_deletes_per_pass": 1000},
            "ledger": {"path": str(tmp / "ledger.sqlite3"), "state_mount": mount},  # per-test key and lease
            "logging": {"level": "info", "format": "json"},
        }
        for section, values in overrides.items():
            self.raw.setdefault(section, {}).update(values)
        self.secrets: dict[str, Secret] = {}
        self.tokens: list[str] = []  # every DockerHub token ever written, for the leak scan
        self.extra_secrets: list[str] = [PAT, bao.root_token]
        if vault_token:
            self.extra_secrets.append(vault_token)
        self.texts: list[str] = []  # every output collected so far, for the leak scan
        self.runs: list[Run] = []
        self.bridge: Bridge | None = None
        self.metrics: Metrics | None = None
        self.foreign: dict[str, Cred] = {}
        self._n = 0

    # -- configuration ----------------------------------------------------------------------
    @property
    def settings(self) -> Settings:
        return parse_settings(self.raw, env={})

    @property
    def config_path(self) -> Path:
        path = self.tmp / "config.yaml"
        path.write_text(yaml.safe_dump(self.raw), encoding="utf-8")
        return path

    @property
    def ledger_path(self) -> Path:
        return Path(self.raw["ledger"]["path"])

    # -- Vault, as an operator changes it -----------------------------------------------------
    def path(self, name: str) -> str:
        return f"{PREFIX}/{name}"

    def client(self) -> Any:
        return self.bao.client()

    def put(self, name: str, i: int | str, project: str = PROJECTS[0], *, tags: dict[str, str] | None = None,
            username: str | None = None) -> int:
        """Write a valid tagged token (a new version if the secret exists)."""
        tok = token(i, name)
        self.tokens.append(tok)
        version = self.bao.write_secret(self.mount, self.path(name),
                                        {"accessToken": tok, "dockerhubUsername": username or f"u-{name}"},
                                        tags if tags is not None else tagged(project))
        self.secrets[name] = Secret(name, Expect.LIVE, project)
        return version

    def put_raw(self, name: str, data: dict[str, Any], tags: dict[str, str] | None, expect: Expect,
                reject_code: str | None = None, project: str | None = None, *, write_path: str | None = None) -> int:
        """Write anything (the bad-input corpus); the caller says what the bridge should do with it.

        Every string under a token-like key joins the leak scan, malformed or not: a malformed
        token must not reach a log line because it was malformed."""
        for k, v in data.items():
            if isinstance(v, str) and k in ("accessToken", "token", "password") and len(v) >= 8:
                self.tokens.append(v)
        version = self.bao.write_secret(self.mount, self.path(write_path or name), data, tags)
        self.secrets[name] = Secret(name, expect, project, reject_code)
        return version

    def retag(self, name: str, project: str) -> None:
        self.bao.set_metadata(self.mount, self.path(name), tagged(project))
        self.secrets[name].project = project

    def untag(self, name: str) -> None:
        self.bao.set_metadata(self.mount, self.path(name), {"owner": "someone"})
        self.secrets[name].expect = Expect.GONE

    def delete(self, name: str) -> None:
        self.client().secrets.kv.v2.delete_metadata_and_all_versions(path=self.path(name), mount_point=self.mount)
        self.secrets[name].expect = Expect.GONE

    def soft_delete(self, name: str) -> None:
        """Delete the latest version without destroying it (KV v2 `delete`)."""
        self.client().secrets.kv.v2.delete_latest_version_of_secret(path=self.path(name), mount_point=self.mount)
        self.secrets[name].expect = Expect.GONE

    def latest(self, name: str) -> tuple[int, dict[str, Any]]:
        doc = self.client().secrets.kv.v2.read_secret_version(path=self.path(name), mount_point=self.mount,
                                                             raise_on_deleted_version=True)
        return int(doc["data"]["metadata"]["version"]), doc["data"]["data"]

    # -- the double --------------------------------------------------------------------------
    def seed_foreign(self) -> None:
        """Hand-made credentials the bridge must never touch: no marker, another instance's
        marker, and a marker of our instance for a path digest no secret has."""
        settings = self.settings
        client = CybeDefendClient(settings.cybedefend, Sensitive(PAT), Metrics())
        made: set[str] = set()
        try:
            for i, desc in enumerate([
                "registry pull secret, made by hand",
                "[cybedefend-bridge:other-team:0123456789ab:v1] another bridge's credential",
                "[cybedefend-bridge:default:ffffffffffff:v3]",
                "",
            ]):
                tok = token(i, "hand-made")
                self.tokens.append(tok)
                cred = client.create(ORG, PROJECTS[i % 2], f"human-{i}", Sensitive(tok), desc)
                made.add(cred.id)
                if i == 0:
                    client.set_linked_projects(ORG, cred.id, [PROJECTS[0], PROJECTS[1], PROJECTS[5]])
        finally:
            client.close()
        self.foreign = {c.id: c for c in self.creds() if c.id in made}

    # -- the bridge, in-process ---------------------------------------------------------------
    def start(self) -> Bridge:
        self.close()
        self.metrics = Metrics()
        self.bridge = build(self.settings, metrics=self.metrics)
        return self.bridge

    def run(self, request: PassRequest = FULL) -> PassReport:
        bridge = self.bridge or self.start()
        return bridge.engine.run(request)

    def close(self) -> None:
        if self.bridge is not None:
            self.collect_inprocess()
            self.bridge.close(revoke=False)
            self.bridge = None

    def collect_inprocess(self) -> None:
        """Metrics exposition and status JSON of the in-process bridge, for the leak scan."""
        if self.bridge is not None and self.metrics is not None:
            self.texts.append(self.metrics.exposition().decode())
            self.texts.append(json.dumps(self.bridge.engine.status(), default=str))

    # -- the bridge, as a subprocess ----------------------------------------------------------
    def spawn(self, *args: str) -> Run:
        """Start `cybedefend-bridge <args> --config <file>`; output goes to files in tmp."""
        self._n += 1
        out, err = self.tmp / f"run{self._n}.out", self.tmp / f"run{self._n}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        full = (sys.executable, "-m", "bridge", *args, "--config", str(self.config_path))
        with out.open("wb") as o, err.open("wb") as e:
            proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=o, stderr=e, env=env, cwd=ROOT)
        run = Run(tuple(args), proc, out, err)
        self.runs.append(run)
        return run

    def cli(self, *args: str, timeout: float = 120) -> tuple[int, str, str]:
        run = self.spawn(*args)
        try:
            code = run.wait(timeout)
        except subprocess.TimeoutExpired:
            run.kill9()
            raise AssertionError(f"`cybedefend-bridge {' '.join(args)}` did not finish in {timeout}s") from None
        return code, run.stdout, run.stderr

    def sync_once(self, timeout: float = 120) -> int:
        code, _, err = self.cli("sync", "--once", "-o", "json", timeout=timeout)
        assert code in (0, 1), f"sync --once exited {code}: {err[-2000:]}"
        return code

    # -- what the double holds ----------------------------------------------------------------
    def keyring(self) -> Keyring:
        s = self.settings
        doc = self.client().secrets.kv.v2.read_secret_version(
            path=f"{s.state_path}/fingerprint-key", mount_point=s.state_mount, raise_on_deleted_version=True)
        key = base64.b64decode(doc["data"]["data"]["key"])
        if doc["data"]["data"]["key"] not in self.extra_secrets:
            self.extra_secrets.append(doc["data"]["data"]["key"])
        return Keyring(key)

    def creds(self) -> list[Cred]:
        return [Cred(c.id, c.description, c.username, c.linked_projects, c.token.reveal()) for c in self.sim.credentials(ORG)]

    def assert_no_duplicates(self, context: str = "") -> None:
        """At any moment, even between two crashes: no duplicate, hand-made credentials intact."""
        check_no_duplicates(self.creds(), self.settings.sync.instance, self.foreign, context)

    def wants(self) -> list[Want]:
        keys = self.keyring()
        out = []
        for name, sec in self.secrets.items():
            digest = keys.path_digest(SecretRef(self.mount, self.path(name)))
            key = f"{self.mount}/{self.path(name)}"
            if sec.expect is Expect.LIVE:
                version, data = self.latest(name)
                out.append(Want(key, digest, sec.expect, sec.project, version, data["accessToken"]))
            else:
                out.append(Want(key, digest, sec.expect, sec.project, reject_code=sec.reject_code))
        return out

    # -- the invariant ------------------------------------------------------------------------
    def assert_invariant(self, context: str = "", *, texts: Iterable[str] = (), cli_outputs: bool = False) -> None:
        """The one invariant every chaos scenario ends with (tests/chaos/invariant.py)."""
        ctx = context or "invariant"
        pending: list[str] = []
        if self.ledger_path.exists():
            led = SqliteLedger(self.ledger_path)
            try:
                pending = [f"{p.credential_id[:8]}:{p.reason}" for p in led.pending_deletes()]
            finally:
                led.close()
        check_invariant(
            self.creds(), self.wants(), instance=self.settings.sync.instance, policy=self.policy,
            ledger=self._ledger_rows(), foreign=self.foreign, context=ctx, pending=pending,
            texts=self.outputs(ctx, texts=texts, cli_outputs=cli_outputs), secrets=self.all_secrets(),
        )

    def _ledger_rows(self) -> dict[str, Any] | None:
        if not self.ledger_path.exists():
            return None
        if self.bridge is not None:
            return {r.key: r for r in self.bridge.ledger.all()}
        led = SqliteLedger(self.ledger_path)
        try:
            return {r.key: r for r in led.all()}
        finally:
            led.close()

    def all_secrets(self) -> list[str]:
        return [*self.tokens, *self.extra_secrets]

    def assert_no_leak(self, context: str = "", *, texts: Iterable[str] = (), cli_outputs: bool = False) -> None:
        assert_no_leak(self.outputs(context, texts=texts, cli_outputs=cli_outputs), self.all_secrets())

    def outputs(self, context: str = "", *, texts: Iterable[str] = (), cli_outputs: bool = False) -> list[str]:
        """Everything the bridge printed or wrote so far (plus `plan`/`status` when cli_outputs)."""
        collected = [*self.texts, *texts]
        if cli_outputs:
            for args in (("plan",), ("plan", "-o", "json"), ("status", "-o", "json"), ("status",)):
                code, out, err = self.cli(*args)
                assert code in (0, 1), f"{context}: `{' '.join(args)}` exited {code}"
                collected += [out, err]
        self.collect_inprocess()
        for run in self.runs:
            if run.proc.poll() is not None:
                collected += [run.stdout, run.stderr]
        for side in (self.ledger_path, self.ledger_path.with_name(self.ledger_path.name + "-wal")):
            if side.exists():
                collected.append(side.read_bytes().decode("latin-1"))
        collected.append(repr(self.sim.requests))
        return collected
