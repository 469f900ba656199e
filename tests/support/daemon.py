"""The real daemon as a subprocess, for the end-to-end daemon tests: config, start, probe, stop.

`Stack` is one OpenBao (real, with an audit device when asked), the CybeDefend double in this
process, and a work directory; `DaemonProc` is `cybedefend-bridge run --config FILE` (the
console script, or `python -m bridge`) with its stdout and stderr in files. Helpers check the
invariants every test ends with: each secret registered exactly once with its latest token, no
secret in the process's output, /metrics or /v1/status, and no metric label naming a secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.model import Sensitive
from cybedefend_double.simulator import Simulator, StoredCredential
from tests.support.config import merged, raw_config
from tests.support.data import ORG, PROJECTS, assert_no_leak, credential, seeded_simulator, tagged, token
from tests.support.openbao import OpenBao
from tests.support.procs import REPO, ChildProcess, bridge_command, free_port, http, wait_for

__all__ = ["PAT", "REPO", "WEBHOOK_TOKEN", "DaemonProc", "Stack", "bearer", "digest", "free_port", "http",
           "new_simulator", "send_signal", "wait_for"]

PAT = credential("cdp", "e2e-daemon-pat")
WEBHOOK_TOKEN = credential("whk", "e2e-daemon-webhook")


def digest(value: str) -> str:
    """What assertions compare instead of tokens: pytest prints both sides of a failed comparison."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


def bearer(value: str = WEBHOOK_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}", "Content-Type": "application/json"}


class DaemonProc(ChildProcess):
    """One `cybedefend-bridge run --config FILE` process. `close()` always kills it."""

    def __init__(self, workdir: Path, raw: dict[str, Any], name: str = "bridge") -> None:
        self.config = workdir / name / "config.yaml"
        super().__init__([*bridge_command(), "run", "--config", str(self.config)], workdir / name)
        self.raw = raw
        self.port = int(raw["server"]["port"])
        self.base = f"http://127.0.0.1:{self.port}"
        self.write_config(raw)

    def write_config(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.config.write_text(yaml.safe_dump(raw, sort_keys=False))

    def start(self) -> DaemonProc:
        super().start()
        return self

    # -- what it says ---------------------------------------------------------------------

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in (self.stdout() + "\n" + self.stderr()).splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict) and (name is None or doc.get("event") == name):
                    out.append(doc)
        return out

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return http("GET", self.base + path, headers=headers, timeout=3)

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return http("POST", self.base + path, body, headers, timeout=5)

    def code(self, path: str) -> int | None:
        try:
            return self.get(path)[0]
        except OSError:
            return None

    def status(self) -> dict[str, Any]:
        code, body = self.get("/v1/status")
        assert code == 200, body
        doc: dict[str, Any] = json.loads(body)
        return doc

    def metrics_text(self) -> str:
        code, body = self.get("/metrics")
        assert code == 200
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """One sample's value from a parse of /metrics (0.0 when absent)."""
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.alive():
                # Its log is not quoted here: if it ever leaked a secret, the test output would too.
                raise AssertionError(f"the daemon exited with {self.proc.returncode if self.proc else None}; see {self.dir}")
            if self.code("/readyz") != 200:
                return False
            # /readyz says "accepts work", not "has synced": wait for the first full pass as well.
            code, body = self.get("/v1/status")
            daemon = json.loads(body).get("daemon") if code == 200 else None
            return isinstance(daemon, dict) and daemon.get("last_full_pass_age_seconds") is not None

        wait_for(ready, timeout)

    def rows(self) -> dict[str, dict[str, Any]]:
        return {r["path"]: r for r in self.status()["secrets"]}


class Stack:
    """A real OpenBao, the CybeDefend double and a work directory; builds daemon configs."""

    def __init__(self, bao: OpenBao, sim: Simulator, tmp: Path, mount: str = "secret") -> None:
        self.bao, self.sim, self.tmp, self.mount = bao, sim, tmp, mount
        self.tokens: list[str] = []
        self.names: set[str] = set()
        (tmp / "pat").write_text(PAT + "\n")
        (tmp / "webhook-token").write_text(WEBHOOK_TOKEN + "\n")
        self.write_vault_token()
        for name in ("pat", "webhook-token", "vault-token"):
            (tmp / name).chmod(0o600)
        self.daemons: list[DaemonProc] = []

    def write_vault_token(self) -> None:
        (self.tmp / "vault-token").write_text(self.bao.root_token)

    def raw(self, name: str = "bridge", port: int | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
        return merged(raw_config(
            self.tmp, vault_addr=self.bao.addr, vault_token_file=self.tmp / "vault-token", cybedefend_url=self.sim.url,
            mount=self.mount, ledger_name=f"{name}/ledger.sqlite3",
            cybedefend={"max_requests_per_second": 1000, "retry": {"base_seconds": 0.01, "cap_seconds": 0.2}},
            sync={"retry_base_seconds": 0.05, "retry_cap_seconds": 0.5, "shutdown_grace_seconds": 10},
            schedule={"interval_seconds": 600, "jitter_fraction": 0, "first_run_max_delay_seconds": 0},
            server={"bind": "127.0.0.1", "port": port or free_port(), "webhook_token_file": str(self.tmp / "webhook-token")},
            triggers={"debounce_seconds": 0.1},
            logging={"level": "info", "format": "json"},
        ), sections)

    def daemon(self, name: str = "bridge", port: int | None = None, **sections: dict[str, Any]) -> DaemonProc:
        d = DaemonProc(self.tmp, self.raw(name, port, **sections), name)
        self.daemons.append(d)
        return d

    def close(self) -> None:
        for d in self.daemons:
            d.close()

    # -- Vault side -----------------------------------------------------------------------

    def put(self, name: str, i: int, project: str = PROJECTS[0], *, tag: bool = True) -> Sensitive:
        """Write version `i` of `<mount>/dockerhub/<name>` (tagged); returns the token written."""
        tok = token(i, name)
        self.tokens.append(tok)
        self.names.add(name)
        self.bao.kv_put(self.mount, f"dockerhub/{name}", {"accessToken": tok, "dockerhubUsername": f"user-{name}"},
                        tagged(project) if tag else None)
        return Sensitive(tok)

    def key(self, name: str) -> str:
        return f"{self.mount}/dockerhub/{name}"

    def latest(self, name: str) -> tuple[int, str]:
        """(version, digest of the token) of the secret's latest version in Vault."""
        doc = self.bao.api("GET", f"{self.mount}/data/dockerhub/{name}", token=self.bao.root_token)
        return int(doc["data"]["metadata"]["version"]), digest(doc["data"]["data"]["accessToken"])

    # -- CybeDefend side ------------------------------------------------------------------

    def creds(self) -> list[StoredCredential]:
        return self.sim.credentials(ORG)

    def cred_digests(self) -> list[str]:
        return [digest(c.token.reveal()) for c in self.creds()]

    def registered(self, tok: Sensitive) -> StoredCredential | None:
        found = [c for c in self.creds() if c.token == tok]
        assert len(found) <= 1, "a token was registered twice"
        return found[0] if found else None

    def settled(self, d: DaemonProc, names: Iterable[str]) -> bool:
        """True once the daemon's ledger shows every name registered at Vault's latest version."""
        rows = d.rows()
        for n in names:
            row = rows.get(self.key(n))
            if row is None or row["state"] != "registered" or row["version"] != self.latest(n)[0]:
                return False
        return True

    def assert_registered_once(self, names: Iterable[str], rows: dict[str, dict[str, Any]] | None = None) -> None:
        """Every name's latest token is registered exactly once; nothing else is; the ledger agrees."""
        names = sorted(names)
        creds = self.creds()
        got = self.cred_digests()
        assert len(got) == len(set(got)), "duplicate credentials in CybeDefend"
        latest = {n: self.latest(n) for n in names}
        assert sorted(got) == sorted(t for _, t in latest.values()), "registered tokens differ from Vault's latest"
        if rows is not None:
            by_token = {digest(c.token.reveal()): c.id for c in creds}
            for n, (version, tok) in latest.items():
                row = rows[self.key(n)]
                assert row["state"] == "registered" and row["version"] == version, (n, row["state"], row["version"])
                assert row["credential_id"] == by_token[tok], f"{n}: the ledger names another credential"

    # -- invariants on what the daemons expose --------------------------------------------

    def secrets(self) -> list[str]:
        return [*self.tokens, PAT, WEBHOOK_TOKEN, self.bao.root_token]

    def assert_no_leaks(self, *daemons: DaemonProc) -> None:
        texts: list[str] = []
        for d in daemons:
            texts += [d.stdout(), d.stderr()]
            if d.alive():
                texts += [d.metrics_text(), json.dumps(d.status())]
        assert texts and any(texts), "nothing to check"
        assert_no_leak(texts, self.secrets())

    def assert_labels_clean(self, *daemons: DaemonProc) -> None:
        """No label value in /metrics equals a secret, a path or a username the test used."""
        forbidden = set(self.secrets())
        for n in self.names:
            forbidden |= {n, f"dockerhub/{n}", self.key(n), f"user-{n}"}
        for d in daemons:
            values = [v for fam in text_string_to_metric_families(d.metrics_text()) for s in fam.samples
                      for v in s.labels.values()]
            assert values, "the exposition has no labelled samples"
            bad = sorted(v for v in set(values) if v in forbidden or any(f in v for f in self.secrets()))
            assert not bad, f"{len(bad)} metric label values name a secret, path or username"

    def check_exposure(self, *daemons: DaemonProc) -> None:
        self.assert_no_leaks(*daemons)
        self.assert_labels_clean(*daemons)


def new_simulator() -> Simulator:
    sim = seeded_simulator(PAT)
    sim.start()
    return sim


def send_signal(pid: int, sig: signal.Signals) -> None:
    os.kill(pid, sig)

