"""Scenario 5a, bad input: the corpus in tests/chaos/data/ (secrets and configuration files).

Every case of `data/secrets/*.yaml` is written to one real OpenBao mount beside good secrets;
two `cybedefend-bridge sync --once` passes run as subprocesses; then each case must have reached
its declared outcome (registered / rejected with its code / skipped / gone / failed), the plan
must show the same reject codes, one bad secret must not have affected any other, and the shared
invariant must hold (nothing duplicated, hand-made credentials intact, no secret in any output).

Every file of `data/configs/` must make `check` and `sync --once` exit with the declared code
and a message naming the declared key.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.model import Marker, SecretRef
from cybedefend_double.simulator import Simulator
from tests.chaos.invariant import Expect
from tests.chaos.rig import ROOT, ChaosRig
from tests.support.data import ORG, ORG2, PROJECTS, token
from tests.support.openbao import OpenBao
from tests.support.procs import child_env

pytestmark = pytest.mark.integration
DATA = Path(__file__).parent / "data"
# A token of (almost) 1 MiB: OpenBao's raft storage refuses entries over 1 MiB including the
# envelope, so 32 KiB are left for it.
HUGE_TOKEN = "dckr_pat_" + "A" * ((1 << 20) - (32 << 10))
EXPECT = {"registered": Expect.LIVE, "rejected": Expect.REJECTED, "skipped": Expect.SKIPPED, "gone": Expect.GONE,
          "failed": Expect.FAILED}


def load_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for f in sorted((DATA / "secrets").glob("*.yaml")):
        for case in yaml.safe_load(f.read_text(encoding="utf-8")):
            case["file"] = f.name
            cases.append(case)
    return cases


class Filler:
    """Replaces the corpus placeholders; `{TOKEN}` is fresh each time, `{TOKEN:x}` stable per label."""

    def __init__(self) -> None:
        self.n = 0
        self.labels: dict[str, str] = {}
        self.fixed = {f"{{P{i}}}": p for i, p in enumerate(PROJECTS)}
        self.fixed |= {"{ORG}": ORG, "{ORG2}": ORG2, "{P2_UPPER}": PROJECTS[2].upper(),
                       "{HUGE_TOKEN}": HUGE_TOKEN, "{TOKEN_513}": "dckr_pat_" + "a" * 504,
                       "{USERNAME_256}": "u" * 256, "{LONG_DESCRIPTION}": "long " * 100}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if not isinstance(value, str):
            return value
        for k, v in self.fixed.items():
            value = value.replace(k, v)
        while "{TOKEN}" in value:
            self.n += 1
            value = value.replace("{TOKEN}", token(self.n, "corpus"), 1)
        for label in re.findall(r"\{TOKEN:([a-z0-9-]+)\}", value):
            tok = self.labels.setdefault(label, token(label, "corpus-label"))
            value = value.replace(f"{{TOKEN:{label}}}", tok)
        return value


def write_case(rig: ChaosRig, secret: dict[str, Any], fill: Filler) -> str:
    data = fill(secret.get("data", {}))
    for k, b64 in (secret.get("data_b64") or {}).items():
        data[k] = base64.b64decode(b64).decode("latin-1")  # bytes as Vault's JSON can carry them
    tags = fill(secret.get("tags"))
    name = secret.get("vault_path") or secret["path"]
    for earlier in secret.get("versions", []):
        rig.put_raw(name, fill(earlier), None, Expect.SKIPPED, write_path=secret["path"])
    project = fill(secret.get("project")) or (tags or {}).get("cybedefend-project-id", "").strip().lower() or None
    rig.put_raw(name, data, tags, EXPECT[secret["expect"]], secret.get("code"), project, write_path=secret["path"])
    after = secret.get("after")
    if after == "soft_delete":
        rig.soft_delete(name)
    elif after == "destroy_latest":
        version, _ = rig.latest(name)
        rig.client().secrets.kv.v2.destroy_secret_versions(path=rig.path(name), versions=[version], mount_point=rig.mount)
        rig.secrets[name].expect = Expect.GONE
    return str(name)


def test_the_corpus_has_at_least_forty_cases_each_with_an_outcome() -> None:
    cases = load_cases()
    assert len(cases) >= 40
    assert len({c["id"] for c in cases}) == len(cases), "duplicate case ids"
    for c in cases:
        for s in c.get("secrets", [c]):
            assert s["expect"] in EXPECT, c["id"]
            assert (s["expect"] == "rejected") == ("code" in s), f"{c['id']}: a rejection needs its code, only it"
    assert len(list((DATA / "configs").glob("*.yaml"))) >= 10


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_secrets_reach_their_declared_outcome(make_rig: Any) -> None:
    rig: ChaosRig = make_rig(policy="delete")
    fill = Filler()
    checks: dict[str, dict[str, Any]] = {}
    for case in load_cases():
        for secret in case.get("secrets", [case]):
            name = write_case(rig, secret, fill)
            if "check" in case:
                checks[name] = case["check"]
    for i in range(5):
        rig.put(f"good/{i}", i, PROJECTS[i])
    first = rig.sync_once()
    assert first == 1, "rejections must make `sync --once` exit 1"
    assert rig.sync_once() == 1
    code, out, _ = rig.cli("plan", "-o", "json")
    assert code == 0
    plan = {row["path"]: row for row in json.loads(out)["actions"]}
    for name, sec in rig.secrets.items():
        key = f"{rig.mount}/{rig.path(name)}"
        if sec.expect is Expect.REJECTED:
            assert plan[key]["action"] == "reject" and plan[key]["reject_code"] == sec.reject_code, (name, plan.get(key))
        elif sec.expect is Expect.SKIPPED:
            assert key not in plan, f"{name}: a non-candidate appears in the plan"
        elif sec.expect is Expect.LIVE:
            assert plan[key]["action"] == "skip", (name, plan[key])
    keys = rig.keyring()
    by_digest = {m.path_digest: c for c in rig.sim.credentials(ORG) if (m := Marker.parse(c.description))}
    for name, want in checks.items():
        cred = by_digest[keys.path_digest(SecretRef(rig.mount, rig.path(name)))]
        desc = cred.description or ""
        if want.get("no_control_in_description"):
            assert not any(unicodedata.category(ch) in ("Cc", "Cf") for ch in desc), f"{name}: control characters sent"
        if "description_max" in want:
            assert len(desc) <= want["description_max"], f"{name}: a {len(desc)}-character description was sent"
    forged = next(c for c in rig.sim.credentials(ORG) if "mine now" in (c.description or ""))
    parsed = Marker.parse(forged.description)
    assert parsed is not None and parsed.path_digest == keys.path_digest(SecretRef(rig.mount, rig.path("tags/desc-forged")))
    assert "[cybedefend-bridge:default:000000000000" not in (forged.description or ""), "a forged marker went out"
    rig.assert_invariant("bad-input corpus", cli_outputs=True)


def config_cases() -> list[tuple[str, dict[str, str]]]:
    out = []
    for f in sorted((DATA / "configs").glob("*.yaml")):
        first = f.read_text(encoding="utf-8").splitlines()[0]
        m = re.match(r"# expect: key=(.+) check=(\d) sync=(\d)$", first)
        assert m, f"{f.name}: first line must be `# expect: key=… check=N sync=N`"
        out.append((f.name, {"key": m.group(1), "check": m.group(2), "sync": m.group(3)}))
    return out


@pytest.mark.timeout(300)
def test_bad_configuration_files_exit_with_a_message_naming_the_key(
    chaos_bao: OpenBao, sim: Simulator, tmp_path: Path
) -> None:
    (tmp_path / "pat").write_text("cdp_" + "0" * 40)
    (tmp_path / "vault-token").write_text(chaos_bao.root_token)
    (tmp_path / "garbage-key").write_text("this is not base64 !!!")
    env = child_env()
    runs: list[tuple[str, dict[str, str], str, Path]] = []
    for name, want in config_cases():
        text = (DATA / "configs" / name).read_text(encoding="utf-8")
        text = text.replace("{VAULT_ADDR}", chaos_bao.addr).replace("{TMP}", str(tmp_path)).replace("{SIM}", sim.url)
        cfg = tmp_path / name
        cfg.write_text(text, encoding="utf-8")
        runs.extend((name, want, cmd, cfg) for cmd in ("check", "sync"))

    def run(cmd: str, cfg: Path) -> subprocess.CompletedProcess[str]:
        args = ["check"] if cmd == "check" else ["sync", "--once"]
        return subprocess.run([sys.executable, "-m", "bridge", *args, "--config", str(cfg)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    # A few at a time, not all ~30 at once: on a 2-core machine already under load, thirty
    # interpreters importing the bridge together took longer than any per-process timeout.
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(lambda r: run(r[2], r[3]), runs))
    failures = []
    for (name, want, cmd, _), p in zip(runs, done, strict=True):
        out, err = p.stdout, p.stderr
        expected = int(want[cmd])
        if p.returncode != expected or want["key"] not in out + err:
            failures.append(f"{name} `{cmd}`: exit {p.returncode} (want {expected}), key {want['key']!r} "
                            f"{'named' if want['key'] in out + err else 'NOT named'}: {(err or out).strip()[-300:]}")
        assert "Traceback" not in err, f"{name} `{cmd}` crashed: {err[-1500:]}"
    assert not failures, "\n".join(failures)
