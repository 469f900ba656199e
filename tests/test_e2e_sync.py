"""The whole bridge, built by the composition root, against a real OpenBao and the CybeDefend double.

Every scenario ends with `assert_invariant`: each tagged, live token is registered exactly once
for its latest version, nothing without our marker was touched, and no secret leaked into the
logs, the ledger file or the plan.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.app import Bridge, build
from bridge.config import Settings, parse_settings
from bridge.errors import LegacyApiKeyGone
from bridge.model import Marker, Sensitive, State
from bridge.ports import PassRequest
from cybedefend_double.simulator import Fault, Simulator
from tests.helpers import ORG, PROJECTS, assert_no_leak, seeded_simulator, tagged, token
from tests.openbao import OpenBao

pytestmark = pytest.mark.integration
PAT = "cdp_" + hashlib.sha256(b"e2e-pat").hexdigest()
FULL = PassRequest(trigger="manual")
ROOT = Path(__file__).resolve().parent.parent


class Rig:
    """A real OpenBao mount, the double, and a bridge built from settings like the CLI does."""

    def __init__(self, bao: OpenBao, mount: str, sim: Simulator, tmp: Path, **overrides: Any) -> None:
        self.bao, self.mount, self.sim, self.tmp = bao, mount, sim, tmp
        (tmp / "pat").write_text(PAT + "\n")
        (tmp / "vault-token").write_text(overrides.pop("vault_token", bao.root_token))
        self.raw: dict[str, Any] = {
            "vault": {"address": bao.addr, "auth": {"method": "token", "token_file": str(tmp / "vault-token")}},
            "sources": [{"mount": mount, "path": "dockerhub"}],
            "cybedefend": {"api_url": sim.url, "auth_url": sim.url, "organization_id": ORG,
                           "auth": {"credential_file": str(tmp / "pat")},
                           "retry": {"base_seconds": 0.01, "cap_seconds": 0.2}},
            "sync": {"retry_base_seconds": 0.01, "retry_cap_seconds": 0.05},
            "ledger": {"path": str(tmp / "ledger.sqlite3"), "state_mount": mount},  # per-test key
        }
        for section, values in overrides.items():
            self.raw.setdefault(section, {}).update(values)
        self.tokens: list[str] = []
        self.bridge: Bridge | None = None

    @property
    def settings(self) -> Settings:
        return parse_settings(self.raw, env={})

    def start(self) -> Bridge:
        if self.bridge is not None:
            self.bridge.close(revoke=False)
        self.bridge = build(self.settings)
        return self.bridge

    def put(self, name: str, i: int, project: str = PROJECTS[0], **kw: Any) -> int:
        tok = token(i, name)
        self.tokens.append(tok)
        return self.bao.write_secret(self.mount, f"dockerhub/{name}", {"accessToken": tok, "dockerhubUsername": f"u-{name}"},
                                     tagged(project, **kw))

    def run(self, request: PassRequest = FULL) -> Any:
        assert self.bridge is not None
        return self.bridge.engine.run(request)

    def creates(self) -> list[Any]:
        return [r for r in self.sim.requests if r.endpoint == "create" and r.status == 201]

    def assert_invariant(self, caplog: pytest.LogCaptureFixture | None = None) -> None:
        assert self.bridge is not None
        ledger = {r.key: r for r in self.bridge.ledger.all()}
        seen: dict[str, int] = {}
        for cred in self.sim.credentials(ORG):
            marker = Marker.parse(cred.description)
            if marker is None or marker.instance != "default":  # another instance's are not ours
                continue
            seen[marker.path_digest] = seen.get(marker.path_digest, 0) + 1
        for key, rec in ledger.items():
            if rec.state != State.REGISTERED:
                continue
            digest = self.bridge.keyring.path_digest(rec.ref)
            assert seen.get(digest) == 1, f"{key}: {seen.get(digest)} credentials carry its marker"
            latest = self.bao.client().secrets.kv.v2.read_secret_version(path=rec.path, mount_point=self.mount,
                                                                         raise_on_deleted_version=False)
            cred = next(c for c in self.sim.credentials(ORG) if c.id == rec.credential_id)
            assert cred.token.reveal() == latest["data"]["data"]["accessToken"], f"{key}: stale token registered"
            assert latest["data"]["metadata"]["version"] == rec.version
        texts = [caplog.text] if caplog is not None else []
        db = Path(self.raw["ledger"]["path"])
        for side in (db, db.with_name(db.name + "-wal")):
            if side.exists():
                texts.append(side.read_bytes().decode("latin-1"))
        texts.append(repr(self.sim.requests))
        assert_no_leak(texts, [*self.tokens, PAT, self.bao.root_token])


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


def test_first_registration_of_many_tokens_then_a_quiet_pass(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    for i in range(30):
        rig.put(f"team-{i:02d}", i, PROJECTS[i % 4], description=f"team {i}")
    rig.bao.write_secret(rig.mount, "dockerhub/untagged", {"accessToken": token(999), "dockerhubUsername": "x"})
    report = rig.run()
    assert report.result == "ok" and report.counts["created"] == 30
    assert len(rig.creates()) == 30
    assert report.vault_requests.get("read", 0) == 30  # values of tagged secrets only
    rig.sim.reset_requests()
    again = rig.run()
    assert again.counts["skipped"] == 30 and again.vault_requests.get("read", 0) == 0
    assert [r for r in rig.sim.requests if r.endpoint not in ("client_apps", "token_exchange")] == []
    rig.assert_invariant(caplog)


def test_rotation_copies_links_and_deletes_the_old(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.put("a", 1)
    rig.run()
    [old] = rig.sim.credentials(ORG)
    assert rig.bridge is not None
    rig.bridge.client.set_linked_projects(ORG, old.id, [PROJECTS[0], PROJECTS[3]])
    rig.put("a", 2)
    report = rig.run()
    assert report.counts["rotated"] == 1
    [new] = rig.sim.credentials(ORG)
    assert new.id != old.id and new.linked_projects == {PROJECTS[0], PROJECTS[3]}
    rig.assert_invariant(caplog)


def test_metadata_only_change_sends_nothing(rig: Rig) -> None:
    rig.put("a", 1)
    rig.run()
    rig.sim.reset_requests()
    data = rig.bao.client().secrets.kv.v2.read_secret_version(path="dockerhub/a", mount_point=rig.mount, raise_on_deleted_version=True)["data"]["data"]
    rig.bao.write_secret(rig.mount, "dockerhub/a", data)
    rig.bao.set_metadata(rig.mount, "dockerhub/a", {**tagged(PROJECTS[0]), "owner": "ops"})
    report = rig.run()
    assert report.counts["refreshed"] == 1
    assert [r.endpoint for r in rig.sim.requests if r.endpoint not in ("client_apps", "token_exchange")] == []
    rig.assert_invariant()


@pytest.mark.parametrize("policy", ["retain", "delete"])
def test_untag_and_delete_follow_the_deletion_policy(openbao: OpenBao, kv_mount: str, sim: Simulator, tmp_path: Path,
                                                     policy: str) -> None:
    rig = Rig(openbao, kv_mount, sim, tmp_path, sync={"deletion_policy": policy})
    rig.start()
    try:
        rig.put("untag-me", 1)
        rig.put("delete-me", 2)
        rig.put("keep", 3)
        rig.run()
        openbao.set_metadata(kv_mount, "dockerhub/untag-me", {"owner": "x"})
        openbao.client().secrets.kv.v2.delete_metadata_and_all_versions(path="dockerhub/delete-me", mount_point=kv_mount)
        report = rig.run()
        assert report.counts["retired"] == 2
        left = len(sim.credentials(ORG))
        assert left == (3 if policy == "retain" else 1)
        states = {r.key.rsplit("/", 1)[1]: r.state for r in rig.bridge.ledger.all()}  # type: ignore[union-attr]
        gone = State.ORPHANED if policy == "retain" else State.RETIRED
        assert states == {"untag-me": gone, "delete-me": gone, "keep": State.REGISTERED}
        rig.assert_invariant()
    finally:
        rig.bridge.close(revoke=False)  # type: ignore[union-attr]


def test_kv_version_1_source(openbao: OpenBao, kv1_mount: str, sim: Simulator, tmp_path: Path) -> None:
    rig = Rig(openbao, kv1_mount, sim, tmp_path, ledger={"key_source": "file", "key_file": str(tmp_path / "key")})
    rig.start()
    client = openbao.client()
    try:
        def put(i: int) -> None:
            client.secrets.kv.v1.create_or_update_secret(
                path="dockerhub/v1", mount_point=kv1_mount,
                secret={"accessToken": token(i, "v1"), "dockerhubUsername": "u", **tagged(PROJECTS[1])})
            rig.tokens.append(token(i, "v1"))
        put(1)
        assert rig.run().counts["created"] == 1
        assert rig.run().counts["skipped"] == 1
        put(2)
        assert rig.run().counts["rotated"] == 1
        [cred] = sim.credentials(ORG)
        assert cred.token.reveal() == token(2, "v1")
        assert Marker.parse(cred.description).revision.startswith("f")  # type: ignore[union-attr]
        assert_no_leak([(tmp_path / "ledger.sqlite3").read_bytes().decode("latin-1")], rig.tokens)
    finally:
        rig.bridge.close(revoke=False)  # type: ignore[union-attr]


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


def test_lost_ledger_is_rebuilt_without_registering_twice(rig: Rig) -> None:
    for i in range(5):
        rig.put(f"s{i}", i)
    rig.run()
    assert rig.bridge is not None
    rig.bridge.close(revoke=False)
    for side in Path(rig.raw["ledger"]["path"]).parent.glob("ledger.sqlite3*"):
        side.unlink()
    rig.bridge = None
    rig.put("s0", 50)  # and one rotated while the bridge was away
    rig.start()
    rig.sim.reset_requests()
    report = rig.run()
    assert report.counts["adopted"] == 4 and report.counts["created"] == 1
    assert len(rig.creates()) == 1 and len(rig.sim.credentials(ORG)) == 5
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


def test_twenty_malformed_secrets_beside_good_ones(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bridge")
    bad_values: list[dict[str, Any]] = [
        {"accessToken": "not-a-docker-token", "dockerhubUsername": "u"},
        {"accessToken": token(1, "bad"), "dockerhubUsername": "bad\x07user"},
        {"dockerhubUsername": "no-token"},
        {"accessToken": ["list"], "dockerhubUsername": "u"},
        {"accessToken": "dckr_pat_" + "x" * 5000, "dockerhubUsername": "u"},
    ]
    for i in range(20):
        rig.bao.write_secret(rig.mount, f"dockerhub/bad-{i:02d}", bad_values[i % 5],
                             tagged(PROJECTS[0]) if i % 7 else {"cybedefend-project-id": "nope"})
        rig.tokens.extend(v for v in bad_values[i % 5].values() if isinstance(v, str) and v.startswith("dckr_"))
    for i in range(5):
        rig.put(f"good-{i}", i)
    report = rig.run()
    assert report.counts["created"] == 5 and report.counts["rejected"] == 20
    assert len(rig.sim.credentials(ORG)) == 5
    assert all(r.body is None or "accessToken_sha256" in r.body for r in rig.creates())
    rig.assert_invariant(caplog)


def test_delete_guard_rail(openbao: OpenBao, kv_mount: str, sim: Simulator, tmp_path: Path) -> None:
    rig = Rig(openbao, kv_mount, sim, tmp_path, sync={"deletion_policy": "delete", "max_deletes_per_pass": 3})
    rig.start()
    try:
        for i in range(6):
            rig.put(f"s{i}", i)
        rig.run()
        for i in range(6):
            openbao.set_metadata(kv_mount, f"dockerhub/s{i}", {})
        report = rig.run()
        assert report.delete_guard_tripped and len(sim.credentials(ORG)) == 6
        assert not [r for r in sim.requests if r.endpoint == "delete"]
    finally:
        rig.bridge.close(revoke=False)  # type: ignore[union-attr]


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
    """What a crash right after a POST leaves when the secret then moves away: a credential with
    our marker in a project no later action lists. The organization-wide sweep removes it; a
    hand-made credential and another instance's stay."""
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
        report = rig.run()
        ids = {c.id for c in sim.credentials(ORG)}
        assert stray.id not in ids and {hand.id, other.id} <= ids
        assert report.counts["retired"] == 1
        rig.assert_invariant()
    finally:
        rig.bridge.close(revoke=False)
