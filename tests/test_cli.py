"""The command line as an operator uses it: real processes, a real OpenBao, the CybeDefend double."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cybedefend_double.simulator import Simulator
from tests.helpers import ORG, PROJECTS, assert_no_leak, tagged, token
from tests.openbao import OpenBao

PAT = "cdp_cli_test_pat_0123456789abcdef"


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


@pytest.fixture
def setup(openbao: OpenBao, kv_mount: str, tmp_path: Path) -> Iterator[tuple[Path, Simulator, list[str]]]:
    with Simulator() as sim:
        sim.add_organization(ORG)
        for p in PROJECTS:
            sim.add_project(ORG, p)
        sim.add_pat(PAT, {ORG: "manage"})
        (tmp_path / "pat").write_text(PAT)
        (tmp_path / "vault-token").write_text(openbao.root_token)
        config: dict[str, Any] = {
            "vault": {"address": openbao.addr, "auth": {"method": "token", "token_file": str(tmp_path / "vault-token")}},
            "sources": [{"mount": kv_mount, "path": "dockerhub"}],
            "cybedefend": {"api_url": sim.url, "auth_url": sim.url, "organization_id": ORG,
                           "auth": {"credential_file": str(tmp_path / "pat")}},
            "ledger": {"path": str(tmp_path / "ledger.sqlite3"), "state_mount": kv_mount},
            "logging": {"format": "json"},
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        tokens = []
        for i in range(3):
            tok = token(i, "cli")
            tokens.append(tok)
            openbao.write_secret(kv_mount, f"dockerhub/t{i}", {"accessToken": tok, "dockerhubUsername": f"u{i}"},
                                 tagged(PROJECTS[i]))
        yield path, sim, [*tokens, PAT, openbao.root_token]


def test_version_and_help_are_complete() -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("cybedefend-bridge ")
    top = cli("--help").stdout
    for command in ("run", "sync", "plan", "check", "status", "demo"):
        assert command in top
        sub = cli(command, "--help")
        assert sub.returncode == 0 and "exit codes" in sub.stdout, command


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("sources: []\ncybedefend: {auth: {credential_file: /x}}\n", "sources"),
        ("sources: [{mount: secret}]\ncybedefend: {auth: {credential_file: /x}, regoin: eu}\n", "cybedefend.regoin"),
        ("sources: [{mount: secret}]\ncybedefend: {auth: {credential_file: /x}}\nsync: {deletion_policy: purge}\n",
         "sync.deletion_policy"),
        ("sources: [{mount: secret}]\ncybedefend: {auth: {}}\n", "cybedefend.auth"),
        ("sources: [{mount: secret}\n", "--config"),
        ("sources: [{mount: secret, organization_id: nope}]\ncybedefend: {auth: {credential_file: /x}}\n",
         "sources.0.organization_id"),
    ],
)
def test_bad_configuration_exits_2_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for command in (["check"], ["sync", "--once"], ["plan"]):
        out = cli(*command, "--config", str(path))
        assert out.returncode == 2, (command, out.stderr)
        assert f"configuration error at {key}" in out.stderr, out.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    out = cli("sync", "--once", "--config", str(tmp_path / "absent.yaml"))
    assert out.returncode == 2 and "--config" in out.stderr and "cannot read" in out.stderr


def test_check_reports_each_check(setup: tuple[Path, Simulator, list[str]], tmp_path: Path) -> None:
    config, _, secrets = setup
    out = cli("check", "--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("configuration", "vault login", "cybedefend authentication", "ledger"):
        assert f"OK     {name}" in out.stdout
    (tmp_path / "pat").write_text("cdp_wrong_pat_value_000000")
    bad = cli("check", "--config", str(config))
    assert bad.returncode == 1 and "FAILED cybedefend authentication" in bad.stdout
    assert_no_leak([out.stdout, out.stderr, bad.stdout, bad.stderr], [*secrets, "cdp_wrong_pat_value_000000"])


def test_plan_is_a_dry_run_with_reasons_and_no_values(setup: tuple[Path, Simulator, list[str]]) -> None:
    config, sim, secrets = setup
    table = cli("plan", "--config", str(config))
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("create") >= 3 and "new tagged secret" in table.stdout
    as_json = json.loads(cli("plan", "--config", str(config), "--output", "json").stdout)
    assert {a["action"] for a in as_json["actions"]} == {"create"} and len(as_json["actions"]) == 3
    assert [r for r in sim.requests if r.endpoint == "create"] == []
    assert_no_leak([table.stdout, table.stderr, json.dumps(as_json)], secrets)


def test_sync_once_summary_and_exit_codes(setup: tuple[Path, Simulator, list[str]], openbao: OpenBao,
                                          kv_mount: str) -> None:
    config, sim, secrets = setup
    first = cli("sync", "--once", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert "created" in first.stdout and "     3" in first.stdout
    assert len(sim.credentials(ORG)) == 3
    openbao.write_secret(kv_mount, "dockerhub/broken", {"accessToken": "nope", "dockerhubUsername": "u"},
                         tagged(PROJECTS[0]))
    second = cli("sync", "--once", "--config", str(config), "--output", "json")
    assert second.returncode == 1
    report = json.loads(second.stdout)
    assert report["counts"]["rejected"] == 1 and report["counts"]["skipped"] == 3 and report["result"] == "ok"
    status = cli("status", "--config", str(config))
    assert status.returncode == 0 and "rejected" in status.stdout and "registered" in status.stdout
    logs = first.stderr + second.stderr
    assert all(json.loads(line) for line in logs.splitlines() if line.strip())  # JSON lines only
    assert_no_leak([first.stdout, first.stderr, second.stdout, second.stderr, status.stdout], secrets)


def test_unreachable_vault_fails_with_what_to_do(setup: tuple[Path, Simulator, list[str]], tmp_path: Path) -> None:
    config, _, _ = setup
    raw = yaml.safe_load(config.read_text())
    raw["vault"]["address"] = "http://127.0.0.1:1"
    config.write_text(yaml.safe_dump(raw))
    out = cli("sync", "--once", "--config", str(config), timeout=120)
    assert out.returncode == 1 and "cybedefend-bridge check" in out.stderr


def test_progress_bar_on_a_terminal_only(setup: tuple[Path, Simulator, list[str]], openbao: OpenBao,
                                         kv_mount: str) -> None:
    import pty

    config, _, secrets = setup
    for i in range(25):
        tok = token(i, "bar")
        secrets.append(tok)
        openbao.write_secret(kv_mount, f"dockerhub/bar{i}", {"accessToken": tok, "dockerhubUsername": "u"},
                             tagged(PROJECTS[i % 3]))
    main_fd, tty_fd = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    try:
        proc = subprocess.run([sys.executable, "-m", "bridge", "sync", "--once", "--config", str(config)],
                              stdout=subprocess.PIPE, stderr=tty_fd, text=True, timeout=120, env=env, check=False)
        os.close(tty_fd)
        chunks = []
        while True:
            try:
                data = os.read(main_fd, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(main_fd)
    terminal = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, proc.stdout
    assert "\r[" in terminal and "/28 secrets" in terminal  # 3 from the fixture + 25
    piped = cli("plan", "--config", str(config))
    assert "\r[" not in piped.stderr
    assert_no_leak([terminal, proc.stdout, piped.stdout, piped.stderr], secrets)
