"""`cybedefend-bridge demo`: the bridge's main job on a laptop, with nothing but Python installed.

It starts a local OpenBao dev server (with a file audit device the bridge follows) and the
CybeDefend double, seeds three tagged DockerHub tokens, runs the daemon, says in plain words what
happened, rotates one token and shows the rotation arriving through the audit stream. Ctrl-C
stops everything; the OpenBao child dies with us even on a crash (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import yaml

from cybedefend_double.openbao import DevOpenBao
from cybedefend_double.simulator import Simulator

ORG = "550e8400-e29b-41d4-a716-446655440000"
TEAMS = {
    "team-a": "097bbbf4-d1eb-4512-9950-684445279808",
    "team-b": "1f6e2a4c-8b3d-4c5e-9f7a-2b3c4d5e6f70",
    "team-c": "2a7f3b5d-9c4e-4d6f-8a8b-3c4d5e6f7081",
}
WAIT_SECONDS = 60.0


def _token(team: str, version: int) -> str:
    # Demo tokens: DockerHub-shaped, random per run, never real.
    return "dckr_pat_" + hashlib.sha256(f"{team}:{version}:{secrets.token_hex(8)}".encode()).hexdigest()[:27]


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - the demo's own loopback server
        return json.loads(resp.read())


def _wait(what: str, check: Callable[[], Any], timeout: float = WAIT_SECONDS) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def write_config(workdir: Path, bao: DevOpenBao, sim: Simulator, port: int, pat: str, *, org: str = ORG,
                 **sections: dict[str, Any] | None) -> Path:
    """The demo's config file (secrets in 0600 files beside it); `sections` replace or (None) drop sections."""
    (workdir / "vault-token").write_text(bao.root_token)
    (workdir / "cybedefend-pat").write_text(pat)
    for name in ("vault-token", "cybedefend-pat"):
        (workdir / name).chmod(0o600)
    config = {
        "vault": {"address": bao.addr, "auth": {"method": "token", "token_file": str(workdir / "vault-token")}},
        "sources": [{"mount": "secret", "path": "dockerhub"}],
        "cybedefend": {"api_url": sim.url, "auth_url": sim.url, "organization_id": org,
                       "auth": {"mode": "pat", "credential_file": str(workdir / "cybedefend-pat")}},
        "ledger": {"path": str(workdir / "ledger.sqlite3")},
        "schedule": {"interval_seconds": 300, "first_run_max_delay_seconds": 0},
        "server": {"bind": "127.0.0.1", "port": port},
        "triggers": {"audit_file": {"path": str(workdir / "audit.log"), "poll_seconds": 0.1}, "debounce_seconds": 0.1},
        "logging": {"level": "warning", "format": "console"},
    }
    for name, value in sections.items():
        if value is None:
            config.pop(name, None)
        else:
            config[name] = value
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _narrate(out: TextIO, base: str, bao: DevOpenBao, sim: Simulator, exit_after: bool, failed: list[str]) -> None:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    try:
        status = _wait("the first pass to register 3 tokens", lambda: _registered(base, 3))
        say(f"registered 3 tokens in CybeDefend (organization {ORG}):")
        for row in status:
            say(f"  {row['path']:<24s} v{row['version']}  -> project {row['project_id']}  credential {row['credential_id']}")
        say("\nrotating secret/dockerhub/team-a in Vault (a new token, version 2) …")
        before = {c.id for c in sim.credentials(ORG)}
        written, wall = time.monotonic(), time.time()
        bao.kv_put("secret", "dockerhub/team-a", {"dockerhubUsername": "team-a", "accessToken": _token("team-a", 2)})
        row = _wait("the rotation", lambda: _row(base, "secret/dockerhub/team-a", version=2), timeout=30)
        took = time.monotonic() - written
        # The row is written mid-pass; the pass's report (and the old credential's deletion) come at its end.
        done = _wait("the rotation pass to finish", lambda: _pass_since(base, wall), timeout=30)
        trigger = str(done.get("trigger", "?"))
        gone = before - {c.id for c in sim.credentials(ORG)}
        say(f"rotated secret/dockerhub/team-a: version 2 registered {took:.2f} s after the write, "
            f"heard through the {'audit stream' if trigger.startswith('audit') else trigger} "
            f"(the next scheduled pass is minutes away); old credential deleted: {len(gone) == 1}")
        say(f"  new credential {row['credential_id']}")
        say(f"\nmetrics:  {base}/metrics\nstatus:   {base}/v1/status\nPress Ctrl-C to stop everything.")
    except TimeoutError as exc:
        failed.append(str(exc))
        say(f"demo: {exc}; see the bridge's log lines above")
    except Exception as exc:  # a bug in the narration must end the demo red, not leave it hanging
        failed.append(f"{type(exc).__name__}: {exc}")
        say(f"demo: the narration failed ({type(exc).__name__}); see the bridge's log lines above")
    if exit_after or failed:
        os.kill(os.getpid(), signal.SIGTERM)


def _rows(base: str) -> list[dict[str, Any]]:
    return list(_get_json(f"{base}/v1/status").get("secrets", []))


def _registered(base: str, n: int) -> list[dict[str, Any]] | None:
    rows = [r for r in _rows(base) if r["state"] == "registered"]
    return rows if len(rows) >= n else None


def _pass_since(base: str, wall: float) -> dict[str, Any] | None:
    last = _get_json(f"{base}/v1/status").get("last_pass")
    # /v1/status gives ISO 8601 UTC times (with their offset).
    return last if last and datetime.datetime.fromisoformat(last["started_at"]).timestamp() >= wall else None


def _row(base: str, path: str, version: int) -> dict[str, Any] | None:
    for r in _rows(base):
        if r["path"] == path and r["state"] == "registered" and r["version"] == version:
            return r
    return None


def run_demo(*, workdir: Path | None = None, port: int = 8080, exit_after_rotation: bool = False,
             out: TextIO | None = None, keep: bool = False) -> int:
    """Run the demo; a temporary work directory is removed at the end unless `keep` (or `workdir` given)."""
    from bridge.app import run_daemon

    out = out or sys.stdout
    own = workdir is None and not keep
    workdir = Path(tempfile.mkdtemp(prefix="cybedefend-bridge-demo-")) if workdir is None else workdir
    workdir.mkdir(parents=True, exist_ok=True)
    pat = "cdp_demo_" + secrets.token_hex(16)
    bao = DevOpenBao("dev", workdir=workdir / "openbao", audit_log=workdir / "audit.log")
    (workdir / "openbao").mkdir(exist_ok=True)
    sim = Simulator()
    failed: list[str] = []
    try:
        print(f"starting OpenBao dev server and the CybeDefend double (files in {workdir}) …", file=out, flush=True)
        bao.start()
        sim.add_organization(ORG)
        for project in TEAMS.values():
            sim.add_project(ORG, project)
        sim.add_pat(pat, {ORG: "manage"})
        sim.start()
        for team, project in TEAMS.items():
            bao.kv_put("secret", f"dockerhub/{team}", {"dockerhubUsername": team, "accessToken": _token(team, 1)},
                       {"cybedefend-project-id": project, "cybedefend-description": f"{team} image scans"})
        print(f"seeded 3 tagged DockerHub tokens under secret/dockerhub/ in {bao.addr}", file=out, flush=True)
        config = write_config(workdir, bao, sim, port, pat)
        # What a user needs to look around while the demo runs, or to copy into their own setup.
        # The token is named by its file, never printed: output ends up in terminals and CI logs.
        print(f"Vault:    {bao.addr}  (token: export VAULT_ADDR={bao.addr} VAULT_TOKEN=$(cat {workdir / 'vault-token'}))\n"
              f"config:   {config}\n"
              f"next:     docs/getting-started.md goes from this demo to your own Vault", file=out, flush=True)
        base = f"http://127.0.0.1:{port}"
        threading.Thread(target=_narrate, args=(out, base, bao, sim, exit_after_rotation, failed),
                         name="demo", daemon=True).start()
        code = run_daemon(config)
    finally:
        sim.stop()
        bao.stop()
        if own:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    print("stopped: the bridge, OpenBao and the CybeDefend double are down.", file=out, flush=True)
    if not own:
        print(f"kept the work directory {workdir} (config.yaml, ledger, OpenBao files)", file=out, flush=True)
    return 1 if failed else code
