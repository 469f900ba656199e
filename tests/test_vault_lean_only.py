"""The daemon's routine Vault calls never load hvac or requests (docs/adr/0015-no-hvac-on-the-routine-path.md).

hvac with requests, urllib3 and charset-normalizer costs ~6-7 MiB of resident memory; the daemon's
routine calls (an AppRole login, token lookup and renewal, the key in Vault, a pass, the HA
lease's check-and-set writes, /readyz's lookup, revocation at shutdown) go through the lean
transport. A fresh interpreter does all of that against a real OpenBao and the double, then
reports which of those libraries it holds: `sys.modules` of this test process would prove
nothing, since the suite itself imports hvac.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cybedefend_double.simulator import Simulator
from tests.support.config import raw_config
from tests.support.data import ORG, PROJECTS, credential, seeded_simulator, tagged, token
from tests.support.openbao import OpenBao
from tests.support.procs import REPO, child_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
PAT = credential("cdp", "lean-pat")
HEAVY = ("hvac", "requests", "urllib3", "charset_normalizer")

CHILD = r"""
import json, sys
from bridge.app import build
from bridge.config import parse_settings
from bridge.daemon.ha import Lease
from bridge.ports import PassRequest

settings = parse_settings(json.loads(sys.argv[1]), env={})
bridge = build(settings)  # logs in (AppRole), mints the key in Vault (check-and-set)
first = bridge.engine.run(PassRequest(trigger="manual"))
second = bridge.engine.run(PassRequest(trigger="manual"))
session = bridge.vault.session
session._token.renew_at = 0.0  # due now: the next maintenance renews the token
bridge.vault.maintain()
renewals = session._metrics.registry.get_sample_value("cybedefend_bridge_vault_token_renewals_total", {"result": "ok"})
lease = Lease(bridge.vault, settings.ha, identity="lean", address=None)  # what the daemon's lease keeper runs
leader = lease.acquire_or_renew() and lease.acquire_or_renew()  # take it, then renew it: two CAS writes
lease.release()
healthy = bridge.vault.healthy()
bridge.close()  # revokes the token the bridge logged in with
print(json.dumps({
    "loaded": sorted(m for m in sys.argv[2:] if m in sys.modules),
    "results": [first.result, second.result], "created": first.counts.get("created", 0),
    "skipped": second.counts.get("skipped", 0), "renewals": renewals, "leader": leader, "healthy": healthy,
}))
"""


@pytest.fixture
def sim() -> Iterator[Simulator]:
    s = seeded_simulator(PAT, org=ORG, projects=PROJECTS)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_routine_calls_never_import_hvac_or_requests(openbao: OpenBao, kv_mount: str, sim: Simulator,
                                                      tmp_path: Path) -> None:
    policy = 'path "*" {\n  capabilities = ["create", "read", "update", "delete", "list", "scan"]\n}\n'
    openbao.put_policy("lean-all", policy)
    role_id, secret_id = openbao.enable_approle("bridge-lean", ["lean-all"])
    (tmp_path / "role").write_text(role_id)
    (tmp_path / "secret").write_text(secret_id)
    (tmp_path / "pat").write_text(PAT + "\n")
    for i in range(3):
        openbao.write_secret(kv_mount, f"dockerhub/lean-{i}", {"accessToken": token(i, "lean"), "dockerhubUsername": f"u-{i}"}, tagged(PROJECTS[0]))
    raw: dict[str, Any] = raw_config(tmp_path, vault_addr=openbao.addr, cybedefend_url=sim.url, mount=kv_mount)
    raw["vault"]["auth"] = {"method": "approle", "role_id_file": str(tmp_path / "role"),
                            "secret_id_file": str(tmp_path / "secret")}
    raw["ledger"]["key_source"] = "vault"
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw), *HEAVY], capture_output=True, text=True,
                          cwd=REPO, env=child_env(), timeout=100, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["results"] == ["ok", "ok"] and out["created"] == 3 and out["skipped"] == 3, out  # a real pass each
    assert out["renewals"] == 1 and out["leader"] is True and out["healthy"] is True, out
    assert out["loaded"] == [], f"a routine path imported {out['loaded']}"
