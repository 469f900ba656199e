"""The command line as an operator uses it: real processes, a real OpenBao, the CybeDefend double."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cybedefend_double.records import Fault
from cybedefend_double.simulator import Simulator
from tests.support.data import ORG, PROJECTS, assert_no_leak, tagged, token
from tests.support.openbao import OpenBao
from tests.support.procs import child_env

PAT = "cdp_cli_test_pat_0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = child_env()
    return subprocess.run([sys.executable, "-m", "bridge", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False, cwd=cwd)


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


@pytest.mark.integration
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


@pytest.mark.integration
def test_plan_is_a_dry_run_with_reasons_and_no_values(setup: tuple[Path, Simulator, list[str]]) -> None:
    config, sim, secrets = setup
    table = cli("plan", "--config", str(config))
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("create") >= 3 and "new tagged secret" in table.stdout
    as_json = json.loads(cli("plan", "--config", str(config), "--output", "json").stdout)
    assert {a["action"] for a in as_json["actions"]} == {"create"} and len(as_json["actions"]) == 3
    assert [r for r in sim.requests if r.endpoint == "create"] == []
    assert_no_leak([table.stdout, table.stderr, json.dumps(as_json)], secrets)


@pytest.mark.integration
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


@pytest.mark.integration
def test_unreachable_vault_fails_with_what_to_do(setup: tuple[Path, Simulator, list[str]], tmp_path: Path) -> None:
    config, _, _ = setup
    raw = yaml.safe_load(config.read_text())
    raw["vault"]["address"] = "http://127.0.0.1:1"
    config.write_text(yaml.safe_dump(raw))
    out = cli("sync", "--once", "--config", str(config), timeout=120)
    assert out.returncode == 1 and "cybedefend-bridge check" in out.stderr


@pytest.mark.integration
def test_progress_bar_on_a_terminal_only(setup: tuple[Path, Simulator, list[str]], openbao: OpenBao,
                                         kv_mount: str) -> None:

    config, _, secrets = setup
    for i in range(25):
        tok = token(i, "bar")
        secrets.append(tok)
        openbao.write_secret(kv_mount, f"dockerhub/bar{i}", {"accessToken": tok, "dockerhubUsername": "u"},
                             tagged(PROJECTS[i % 3]))
    code, terminal, stdout = _on_a_terminal(["sync", "--once", "--config", str(config)], child_env())
    assert code == 0, stdout
    assert "\r[" in terminal and "/28 secrets" in terminal  # 3 from the fixture + 25
    piped = cli("plan", "--config", str(config))
    assert "\r[" not in piped.stderr
    assert_no_leak([terminal, stdout, piped.stdout, piped.stderr], secrets)


# ---- failures are never silent ---------------------------------------------------------------


def _edit(config: Path, **sections: Any) -> None:
    raw = yaml.safe_load(config.read_text())
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value}
    config.write_text(yaml.safe_dump(raw))


def _log_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


@pytest.mark.integration
def test_a_refused_registration_is_red_named_and_retried_by_the_next_one_shot_run(
        setup: tuple[Path, Simulator, list[str]]) -> None:
    config, sim, secrets = setup
    _edit(config, logging={"level": "warning"})
    sim.add_pat(PAT, {ORG: "read"})  # the PAT's user may list but not manage: creates answer 403
    first = cli("sync", "--once", "--config", str(config))
    assert first.returncode == 1, first.stdout + first.stderr
    # The table ends with the failing path and its reason, with the organization filled in.
    tail = first.stdout.split("not registered as they should be:")[1]
    failing_lines = [line for line in tail.splitlines() if line.strip()]
    assert len(failing_lines) == 3 and all("  (create, next attempt 20" in line for line in failing_lines), tail
    assert f"organization/{ORG}/credentials" in tail and "{organizationId}" not in tail
    assert f"the PAT's user needs manage_integration on organization {ORG}" in tail
    # At logging.level warning the failed action still prints a line: permanent (403), so error.
    lines = [r for r in _log_lines(first.stderr) if r["event"] == "action"]
    assert sorted((r["level"], r["path"].rsplit("/", 1)[1], r["action"], r["status"]) for r in lines) == [
        ("error", f"t{i}", "create", 403) for i in range(3)]
    assert "403" in lines[0]["reason"] and "manage_integration" in lines[0]["reason"]

    # Immediately again: inside the backoff window, but an explicit run tries now, and stays red.
    second = cli("sync", "--once", "--config", str(config), "--output", "json")
    assert second.returncode == 1, second.stderr
    report = json.loads(second.stdout)
    assert [f["path"].rsplit("/", 1)[1] for f in report["failing"]] == ["t0", "t1", "t2"]
    failing = report["failing"][0]
    assert failing["action"] == "create" and "manage_integration" in failing["reason"]
    assert datetime.datetime.fromisoformat(failing["next_attempt"]).tzinfo is not None  # ISO 8601, UTC
    datetime.datetime.fromisoformat(report["started_at"])
    refused = [r for r in sim.requests if r.endpoint == "create" and r.status == 403]
    assert len(refused) == 6, "the second one-shot run did not retry the secrets in backoff"

    sim.add_pat(PAT, {ORG: "manage"})  # the fix the message asked for
    third = cli("sync", "--once", "--config", str(config), "--output", "json")
    assert third.returncode == 0, third.stdout
    assert json.loads(third.stdout)["failing"] == [] and len(sim.credentials(ORG)) == 3
    assert_no_leak([first.stdout, first.stderr, second.stdout, second.stderr, third.stdout], secrets)


@pytest.mark.integration
def test_a_pass_that_could_not_see_cybedefend_is_not_ok(setup: tuple[Path, Simulator, list[str]]) -> None:
    config, sim, _ = setup
    assert cli("sync", "--once", "--config", str(config)).returncode == 0
    sim.inject("all_credentials", Fault.status(503), times=50)  # the drift check cannot list the organization
    out = cli("sync", "--once", "--check-drift", "--config", str(config), "--output", "json")
    assert out.returncode == 1, out.stdout
    report = json.loads(out.stdout)
    assert report["result"] == "partial"
    assert "could not see CybeDefend organization" in report["error"] and ORG in report["error"], report["error"]
    sim.clear_faults()
    again = cli("sync", "--once", "--check-drift", "--config", str(config), "--output", "json")
    assert again.returncode == 0 and json.loads(again.stdout)["result"] == "ok", again.stdout


@pytest.mark.integration
def test_a_rejected_reason_stays_readable_in_status(setup: tuple[Path, Simulator, list[str]], openbao: OpenBao,
                                                    kv_mount: str) -> None:
    config, _, secrets = setup
    openbao.write_secret(kv_mount, "dockerhub/odd", {"accessToken": "not-a-dockerhub-token", "dockerhubUsername": "u"},
                         tagged(PROJECTS[0]))
    out = cli("sync", "--once", "--config", str(config))
    assert out.returncode == 1 and "dockerhub/odd" in out.stdout.split("should be:")[1]
    rows = {r["path"]: r for r in json.loads(cli("status", "--config", str(config), "-o", "json").stdout)["secrets"]}
    reason = rows[f"{kv_mount}/dockerhub/odd"]["reason"]
    assert "dckr_pat_… or dckr_oat_…" in reason and "***" not in reason, reason
    assert_no_leak([out.stdout, out.stderr, reason], [*secrets, "not-a-dockerhub-token"])


def _vault_state_keys(openbao: OpenBao, mount: str) -> list[str]:
    try:
        listed = openbao.client().secrets.kv.v2.list_secrets(path="cybedefend-bridge/default", mount_point=mount)
    except Exception:  # hvac's InvalidPath: nothing there yet
        return []
    return list(listed["data"]["keys"])


@pytest.mark.integration
def test_check_is_read_only_runs_everything_and_names_addresses(
        setup: tuple[Path, Simulator, list[str]], openbao: OpenBao, kv_mount: str, tmp_path: Path) -> None:
    config, sim, secrets = setup
    out = cli("check", "--config", str(config))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"OK     vault login: {openbao.addr}" in out.stdout
    assert f"OK     vault source {kv_mount}/dockerhub: 3 secret(s) listed" in out.stdout
    assert f"OK     cybedefend organization {ORG}: 0 DockerHub credential(s) listed" in out.stdout
    assert out.stdout.count("would be created on first sync") == 2  # the key in Vault, the ledger file
    assert not (tmp_path / "ledger.sqlite3").exists() and _vault_state_keys(openbao, kv_mount) == []
    as_json = json.loads(cli("check", "--config", str(config), "-o", "json").stdout)
    assert as_json["ok"] is True and {c["name"] for c in as_json["checks"]} >= {"vault login", "ledger"}

    # Vault unreachable and a PAT without access to the organization: every check still runs.
    other = "cdp_cli_other_pat_fedcba9876543210"
    sim.add_pat(other, {})
    (tmp_path / "pat").write_text(other)
    _edit(config, vault={"address": "http://127.0.0.1:1"})
    bad = cli("check", "--config", str(config), "-o", "json", timeout=120)
    assert bad.returncode == 1, bad.stderr
    checks = {c["name"]: c for c in json.loads(bad.stdout)["checks"]}
    assert not checks["vault login"]["ok"] and "http://127.0.0.1:1" in checks["vault login"]["detail"]
    assert checks["cybedefend authentication"]["ok"]
    org = checks[f"cybedefend organization {ORG}"]
    assert not org["ok"] and "403" in org["detail"] and f"manage_integration on organization {ORG}" in org["detail"]
    assert checks["ledger"]["ok"]
    assert_no_leak([out.stdout, out.stderr, bad.stdout, bad.stderr], [*secrets, other])


def test_every_configuration_error_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("sources: [{mount: secret, organization_id: nope}]\n"
                    "cybedefend: {auth: {credential_file: /x}, regoin: eu}\nsync: {deletion_policy: purge}\n")
    out = cli("plan", "--config", str(path))
    assert out.returncode == 2
    for key in ("sources.0.organization_id", "cybedefend.regoin", "sync.deletion_policy"):
        assert f"cybedefend-bridge: configuration error at {key}" in out.stderr, out.stderr


@pytest.mark.integration
def test_a_missing_named_file_is_exit_2_in_every_command(setup: tuple[Path, Simulator, list[str]],
                                                         tmp_path: Path) -> None:
    config, _, _ = setup
    (tmp_path / "pat").unlink()
    (tmp_path / "vault-token").unlink()
    for command in (["check"], ["sync", "--once"], ["plan"], ["status"]):
        out = cli(*command, "--config", str(config))
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert "configuration error at cybedefend.auth.credential_file" in out.stderr
        assert "configuration error at vault.auth.token_file" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.integration
def test_port_in_use_is_a_clear_configuration_error(setup: tuple[Path, Simulator, list[str]]) -> None:
    config, _, _ = setup
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        _edit(config, server={"bind": "127.0.0.1", "port": port})
        for args in (["run", "--config", str(config)], ["demo", "--port", str(port)]):
            out = cli(*args, timeout=60)
            assert out.returncode == 2, (args, out.stdout, out.stderr)
            assert f"configuration error at server.port: port {port} on 127.0.0.1 is already in use" in out.stderr
            assert "Traceback" not in out.stderr


@pytest.mark.integration
def test_a_reader_that_goes_away_ends_the_command_quietly(setup: tuple[Path, Simulator, list[str]]) -> None:
    config, _, _ = setup
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` that already exited: the first write gets EPIPE
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    try:
        proc = subprocess.run([sys.executable, "-m", "bridge", "plan", "--config", str(config), "-o", "json"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60, env=env, check=False)
    finally:
        os.close(write_end)
    assert proc.returncode == 141, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def _on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal: (exit code, what the terminal showed, stdout)."""
    import pty

    main_fd, tty_fd = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "bridge", *args], stdout=subprocess.PIPE, stderr=tty_fd,
                              text=True, timeout=120, env=env, check=False)
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
    return proc.returncode, b"".join(chunks).decode(errors="replace"), proc.stdout


@pytest.mark.integration
def test_no_color_is_honoured_on_a_terminal(setup: tuple[Path, Simulator, list[str]]) -> None:
    config, _, secrets = setup
    _edit(config, logging={"format": "auto", "level": "info"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_", "NO_COLOR"))}
    code, coloured, _ = _on_a_terminal(["sync", "--once", "--config", str(config)], env)
    assert code == 0 and "pass_finished" in coloured and "\x1b[" in coloured  # colours by default on a tty
    code, plain, _ = _on_a_terminal(["sync", "--once", "--config", str(config)], {**env, "NO_COLOR": "1"})
    assert code == 0 and "pass_finished" in plain and "\x1b[" not in plain, plain[:500]
    assert_no_leak([coloured, plain], secrets)


@pytest.mark.timeout(240)
def test_demo_keep_keeps_its_work_dir_and_prints_where_things_are(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["TMPDIR"] = str(tmp_path)  # the demo's temporary work dir lands here
    proc = subprocess.run([sys.executable, "-m", "bridge", "demo", "--keep", "--exit-after-rotation",
                           "--port", str(port)], capture_output=True, text=True, timeout=200, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("cybedefend-bridge-demo-")]
    assert len(kept) == 1 and (kept[0] / "config.yaml").is_file()
    assert f"kept the work directory {kept[0]}" in proc.stdout
    assert f"config:   {kept[0] / 'config.yaml'}" in proc.stdout
    assert "Vault:    http://127.0.0.1:" in proc.stdout and f"$(cat {kept[0] / 'vault-token'})" in proc.stdout
    token = (kept[0] / "vault-token").read_text().strip()
    assert_no_leak([proc.stdout, proc.stderr], [token, (kept[0] / "cybedefend-pat").read_text().strip()])


@pytest.mark.integration
def test_a_transient_failure_logs_a_warning_naming_the_path(setup: tuple[Path, Simulator, list[str]]) -> None:
    config, sim, secrets = setup
    _edit(config, logging={"level": "warning"}, cybedefend={"retry": {"max_attempts": 1}})
    sim.inject("create", Fault.status(503), times=1)  # one secret's create fails, once
    out = cli("sync", "--once", "--config", str(config), "-o", "json")
    assert out.returncode == 1, out.stdout
    actions = [r for r in _log_lines(out.stderr) if r["event"] == "action"]
    assert [(r["level"], r["result"], r["status"]) for r in actions] == [("warning", "failed", 503)], out.stderr
    assert actions[0]["path"] in {f["path"] for f in json.loads(out.stdout)["failing"]}
    assert_no_leak([out.stdout, out.stderr], secrets)


@pytest.mark.integration
def test_the_local_config_works_against_a_real_vault_as_the_getting_started_guide_says(
        setup: tuple[Path, Simulator, list[str]], openbao: OpenBao, kv_mount: str, tmp_path: Path) -> None:
    _, sim, secrets = setup
    raw = yaml.safe_load((ROOT / "config" / "local.yaml").read_text())
    assert raw["vault"]["auth"]["token_file"] and raw["ledger"]["key_source"] == "vault" and raw["triggers"]["audit_file"]
    # Only what docs/getting-started.md tells the reader to change: addresses, the mount, the organization.
    raw["vault"]["address"] = openbao.addr
    raw["sources"][0]["mount"] = kv_mount
    raw["cybedefend"].pop("region")
    raw["cybedefend"].update(api_url=sim.url, auth_url=sim.url, organization_id=ORG)
    work = tmp_path / "workstation"
    (work / "local").mkdir(parents=True)
    (work / "local" / "vault-token").write_text(openbao.root_token)
    (work / "local" / "cybedefend-pat").write_text(PAT)
    (work / "config.yaml").write_text(yaml.safe_dump(raw))
    check = cli("check", "--config", "config.yaml", cwd=work)
    assert check.returncode == 0, check.stdout + check.stderr
    sync = cli("sync", "--once", "--config", "config.yaml", cwd=work)
    assert sync.returncode == 0 and len(sim.credentials(ORG)) == 3, sync.stdout + sync.stderr
    assert (work / "local" / "ledger.sqlite3").exists()
    assert_no_leak([check.stdout, check.stderr, sync.stdout, sync.stderr], secrets)


def test_the_seed_example_in_the_getting_started_guide_builds_a_double(tmp_path: Path) -> None:
    from cybedefend_double.cli import build

    text = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    example = text.split("```json\n", 1)[1].split("```", 1)[0]
    (tmp_path / "seed.json").write_text(example)
    (tmp_path / "pat.txt").write_text("cdp_seed_example_pat_0011223344\n")
    seed = json.loads(example)
    sim = build(tmp_path / "seed.json")
    org = seed["organizations"][0]
    assert set(sim.projects_by_org[org["id"]]) == set(org["projects"])
    assert len(sim.pats) == 1 and sim.token_ttl_seconds == seed["token_ttl_seconds"]


@pytest.mark.integration
def test_a_pass_that_could_not_list_a_source_is_not_ok(setup: tuple[Path, Simulator, list[str]]) -> None:
    config, sim, _ = setup
    raw = yaml.safe_load(config.read_text())
    raw["sources"].append({"mount": "no-such-mount", "path": "dockerhub", "kv_version": 2})
    config.write_text(yaml.safe_dump(raw))
    out = cli("sync", "--once", "--config", str(config), "-o", "json")
    assert out.returncode == 1, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["result"] == "partial" and report["counts"]["created"] == 3  # the readable source still synced
    assert "could not see Vault source no-such-mount/dockerhub" in report["error"], report["error"]
    assert len(sim.credentials(ORG)) == 3
