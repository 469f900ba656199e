"""The whole bridge, built by the composition root, against a real OpenBao and the CybeDefend double.

What only the real pair can show: the CybeDefend client's retries and ambiguity handling over
real HTTP to the double, the legacy API key's single clear error, the documented least-privilege
Vault policy, and the organization-wide sweep. The Vault-side scenarios (first registration,
rotation, retirement, KV v1, a lost ledger, malformed secrets, the delete guard rail) are one
suite in tests/test_sync.py, run against the fake and a real OpenBao. Every scenario here ends
with `assert_invariant` (tests/support/bridge_rig.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.errors import LegacyApiKeyGone
from bridge.model import Sensitive
from bridge.ports import PassRequest
from cybedefend_double.simulator import Fault, Simulator
from tests.support.bridge_rig import PAT, Rig
from tests.support.data import ORG, PROJECTS, seeded_simulator, token
from tests.support.openbao import OpenBao
from tests.support.procs import REPO

pytestmark = pytest.mark.integration
ROOT = REPO


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with seeded_simulator(PAT) as s:
        yield s


@pytest.fixture
def rig(openbao: OpenBao, kv_mount: str, sim: Simulator, tmp_path: Path) -> Iterator[Rig]:
    r = Rig(openbao, kv_mount, sim, tmp_path)
    r.start()
    yield r
    if r.bridge is not None:
        r.bridge.close(revoke=False)


def test_rate_limits_and_server_errors_are_retried_to_success(rig: Rig) -> None:
    for i in range(4):
        rig.put(f"s{i}", i)
    rig.sim.inject("create", Fault.status(429, retry_after="0"), times=1)
    rig.sim.inject("create", Fault.status(429), times=1)
    rig.sim.inject("list", Fault.status(503), times=2)
    rig.sim.inject("list", Fault.status(500), times=1)
    report = rig.run()
    assert report.result == "ok" and report.counts["created"] == 4
    rig.assert_invariant()


def test_5xx_on_create_is_ambiguous_then_adopted_or_created_once(rig: Rig) -> None:
    rig.put("a", 1)
    rig.sim.inject("create", Fault.status(502))
    first = rig.run()
    assert first.counts["failed"] == 1 and not rig.sim.credentials(ORG)
    second = rig.run(PassRequest(trigger="webhook", paths=frozenset({f"{rig.mount}/dockerhub/a"})))
    assert second.counts["created"] == 1
    rig.assert_invariant()


def test_response_lost_after_the_post_is_adopted_not_duplicated(rig: Rig) -> None:
    for i in range(3):
        rig.put(f"s{i}", i)
    rig.sim.inject("create", Fault.drop_after(), times=2)
    report = rig.run()
    assert report.counts["adopted"] == 2 and report.counts["created"] == 1
    assert len(rig.sim.credentials(ORG)) == 3
    rig.assert_invariant()


def test_legacy_api_key_gets_one_clear_error(openbao: OpenBao, kv_mount: str, sim: Simulator, tmp_path: Path) -> None:
    sim.add_api_key("legacy-key-0123456789", {ORG: "manage"})
    rig = Rig(openbao, kv_mount, sim, tmp_path)
    (tmp_path / "pat").write_text("legacy-key-0123456789")
    rig.raw["cybedefend"]["auth"]["mode"] = "api_key"
    rig.put("a", 1)
    # Start-up already asks CybeDefend (no key yet: are there credentials of ours before minting
    # one?), so the 410 ends the start, once, with the hint.
    with pytest.raises(LegacyApiKeyGone) as info:
        rig.start()
    error = str(info.value)
    assert "pat" in error.lower()
    gone = [r for r in sim.requests if r.status == 410]
    assert len(gone) == 1, "a 410 must not be retried"
    assert "legacy-key-0123456789" not in error


def test_least_privilege_policy_is_enough(openbao: OpenBao, sim: Simulator, tmp_path: Path) -> None:
    """The documented policy (config/vault-policy.hcl) on the `secret` mount, nothing more."""
    openbao.put_policy("cybedefend-bridge", (ROOT / "config" / "vault-policy.hcl").read_text())
    limited = openbao.create_token(["cybedefend-bridge"], no_default_policy=True)
    rig = Rig(openbao, "secret", sim, tmp_path, vault_token=limited)
    for i in range(3):
        rig.put(f"lp-{i}", i)
    rig.start()
    try:
        report = rig.run()
        assert report.result == "ok" and report.counts["created"] == 3
        rig.assert_invariant()
    finally:
        rig.bridge.close(revoke=False)  # type: ignore[union-attr]
        for i in range(3):
            openbao.client().secrets.kv.v2.delete_metadata_and_all_versions(path=f"dockerhub/lp-{i}", mount_point="secret")


def test_stray_credential_of_a_known_secret_is_swept_under_the_delete_policy(
    openbao: OpenBao, kv_mount: str, sim: Simulator, tmp_path: Path
) -> None:
    """What a crash right after a POST leaves when the secret then moves away: a second credential
    carrying the secret's current marker. A steady pass lists nothing (zero CybeDefend calls);
    the drift check lists the organization and deletes it as a duplicate; a hand-made credential
    and another instance's stay."""
    rig = Rig(openbao, kv_mount, sim, tmp_path, sync={"deletion_policy": "delete"})
    rig.start()
    assert rig.bridge is not None
    try:
        rig.put("a", 1)
        rig.put("b", 2)
        rig.run()
        rec = rig.bridge.ledger.get(f"{kv_mount}/dockerhub/a")
        assert rec is not None and rec.fingerprint is not None
        marker = rig.bridge.keyring.marker("default", rec.ref, rec.version, rec.fingerprint)
        stray = rig.bridge.client.create(ORG, PROJECTS[5], "u-a", Sensitive(token(1, "a")), marker.render())
        hand = rig.bridge.client.create(ORG, PROJECTS[5], "human", Sensitive(token(7, "hand")), "made by hand")
        other = rig.bridge.client.create(ORG, PROJECTS[5], "x", Sensitive(token(8, "other")),
                                         marker.render().replace(":default:", ":other-bridge:"))
        rig.tokens += [token(7, "hand"), token(8, "other")]
        sim.reset_requests()
        rig.run()
        assert sim.requests == [] and stray.id in {c.id for c in sim.credentials(ORG)}
        report = rig.run(PassRequest(trigger="schedule", force_drift_check=True))
        ids = {c.id for c in sim.credentials(ORG)}
        assert stray.id not in ids and {hand.id, other.id} <= ids
        assert report.counts["deleted"] == 1 and report.counts["retired"] == 0
        rig.assert_invariant()
    finally:
        rig.bridge.close(revoke=False)
