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
import enum
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
from bridge.cybedefend import CybeDefendClient
from bridge.fingerprint import Keyring
from bridge.ledger import SqliteLedger
from bridge.metrics import Metrics
from bridge.model import Marker, SecretRef, Sensitive, State
from bridge.ports import PassReport, PassRequest
from bridge.simulator import Simulator, StoredCredential
from tests.helpers import ORG, PROJECTS, assert_no_leak, tagged, token
from tests.openbao import OpenBao

PAT = "cdp_" + hashlib.sha256(b"chaos-pat").hexdigest()
ROOT = Path(__file__).resolve().parents[2]
FULL = PassRequest(trigger="manual")
PREFIX = "dockerhub"


class Expect(enum.Enum):
    LIVE = "live"  # tagged and valid: registered exactly once, latest version
    GONE = "gone"  # untagged, deleted or destroyed: handled by the deletion policy
    REJECTED = "rejected"  # tagged but invalid: never registered


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


def foreign_snapshot(cred: StoredCredential) -> tuple[Any, ...]:
    return (cred.id, cred.description, cred.username, cred.linked_projects, cred.token.reveal())


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
            "ledger": {"path": str(tmp / "ledger.sqlite3")},
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
        self.foreign: dict[str, tuple[Any, ...]] = {}
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
                reject_code: str | None = None, project: str | None = None) -> int:
        """Write anything (the bad-input corpus); the caller says what the bridge should do with it."""
        for v in data.values():
            if isinstance(v, str) and len(v) >= 12:
                self.tokens.append(v)
        version = self.bao.write_secret(self.mount, self.path(name), data, tags)
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
        self.foreign = {c.id: foreign_snapshot(c) for c in self.sim.credentials(ORG) if c.id in made}

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

    def ours(self) -> list[tuple[StoredCredential, Marker]]:
        instance = self.settings.sync.instance
        out = []
        for c in self.sim.credentials(ORG):
            m = Marker.parse(c.description)
            if m is not None and m.instance == instance and c.id not in self.foreign:
                out.append((c, m))
        return out

    def assert_no_duplicates(self, context: str = "") -> None:
        """At any moment, even between two crashes: no marker revision is held twice in a project.

        (A move creates the credential in the new project before deleting the one in the old
        project: both carry the same revision for a moment, in different projects, by design.)
        """
        held: dict[tuple[str, str], list[frozenset[str]]] = {}
        for cred, m in self.ours():
            held.setdefault((m.path_digest, m.revision), []).append(cred.linked_projects)
        dups = {
            k: [sorted(PROJECTS.index(p) if p in PROJECTS else p for p in links) for links in v]
            for k, v in held.items()
            if len(v) > 1 and any(a & b for i, a in enumerate(v) for b in v[i + 1:])
        }
        assert not dups, f"{context}: duplicated credentials (project indexes) {dups}"
        self.assert_foreign_untouched(context)

    def assert_foreign_untouched(self, context: str = "") -> None:
        now = {c.id: foreign_snapshot(c) for c in self.sim.credentials(ORG) if c.id in self.foreign}
        assert now == self.foreign, f"{context}: a credential without the bridge's marker was changed or deleted"

    # -- the invariant ------------------------------------------------------------------------
    def assert_invariant(self, context: str = "", *, texts: Iterable[str] = (), cli_outputs: bool = False) -> None:
        """The one invariant every chaos scenario ends with (see the module docstring)."""
        ctx = context or "invariant"
        keys = self.keyring()
        by_digest: dict[str, list[tuple[StoredCredential, Marker]]] = {}
        for cred, marker in self.ours():
            by_digest.setdefault(marker.path_digest, []).append((cred, marker))
        digests = {keys.path_digest(SecretRef(self.mount, self.path(n))): n for n in self.secrets}
        strays = [d for d in by_digest if d not in digests]
        assert not strays, f"{ctx}: {len(strays)} credentials carry our marker for no known secret"
        self.assert_no_duplicates(ctx)
        ledger = self._ledger_rows()
        for digest, name in sorted(digests.items(), key=lambda kv: kv[1]):
            sec = self.secrets[name]
            held = by_digest.get(digest, [])
            key = f"{self.mount}/{self.path(name)}"
            if sec.expect is Expect.LIVE:
                version, data = self.latest(name)
                current = [(c, m) for c, m in held if m.revision == f"v{version}"]
                assert len(current) == 1, f"{ctx}: {name} v{version} is registered {len(current)} times"
                cred = current[0][0]
                assert cred.token.reveal() == data["accessToken"], f"{ctx}: {name}: the registered token is not Vault's latest"
                assert sec.project in cred.linked_projects, f"{ctx}: {name}: not linked to its project"
                others = [c for c, m in held if c.id != cred.id]
                if self.policy == "delete":
                    assert not others, f"{ctx}: {name}: {len(others)} stale credentials left: " + self._explain(name, held)
                else:  # retain keeps what a move left in the old project, never a stale one beside the live one
                    assert all(sec.project not in c.linked_projects for c in others), f"{ctx}: {name}: stale credential in its project"
                if ledger is not None:
                    row = ledger.get(key)
                    assert row is not None and row.state == State.REGISTERED and row.credential_id == cred.id, \
                        f"{ctx}: {name}: ledger row {row.state if row else None} does not name the live credential"
            elif sec.expect is Expect.GONE:
                if self.policy == "delete":
                    assert not held, f"{ctx}: {name} is gone from Vault but {len(held)} credentials remain"
                if ledger is not None and key in ledger:
                    assert ledger[key].state in (State.ORPHANED, State.RETIRED), \
                        f"{ctx}: {name}: ledger state {ledger[key].state} for a gone secret"
            else:
                assert not held, f"{ctx}: rejected secret {name} was registered"
                if ledger is not None and sec.reject_code is not None:
                    row = ledger.get(key)
                    assert row is not None and row.state == State.REJECTED and row.last_result == sec.reject_code, \
                        f"{ctx}: {name}: expected rejected/{sec.reject_code}, ledger has {row.state if row else None}/{row.last_result if row else None}"
        self.assert_no_leak(ctx, texts=texts, cli_outputs=cli_outputs)

    def _explain(self, name: str, held: list[tuple[StoredCredential, Marker]]) -> str:
        """Ids, revisions, links and ledger facts (never a token) for a failing assertion."""
        rows = self._ledger_rows() or {}
        row = rows.get(f"{self.mount}/{self.path(name)}")
        pending: list[str] = []
        if self.ledger_path.exists():
            led = SqliteLedger(self.ledger_path)
            try:
                pending = [f"{p.credential_id}:{p.reason}:{p.key == (row.key if row else None)}" for p in led.pending_deletes()]
            finally:
                led.close()
        creds = [(c.id, m.revision, sorted(PROJECTS.index(p) for p in c.linked_projects if p in PROJECTS)) for c, m in held]
        facts = None if row is None else (row.state, row.version, row.seen_version, row.credential_id, row.project_id,
                                         row.last_action, row.reason)
        return f"credentials={creds} ledger={facts} pending_deletes={pending}"

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
        assert_no_leak(collected, self.all_secrets())
        assert collected, "nothing was scanned"
