"""Edge cases of the sync core, each one a bug found in review (F1-F9) and fixed since.

Each test reproduces the scenario that used to duplicate, lose, leak or wrongly delete; the
harness is `World` (tests/support/world.py) (fake Vault, fake CybeDefend, real in-memory SQLite
ledger), except F7, which needs a real OpenBao to answer for a vanished mount.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.errors import AmbiguousWrite, InvalidRequest, TransientError
from bridge.ledger import SqliteLedger
from bridge.model import Marker, SecretRef, State
from bridge.ports import LedgerRecord
from cybedefend_double.simulator import Simulator
from tests.support.data import PROJECTS, seeded_simulator, tagged, token
from tests.support.openbao import OpenBao
from tests.support.world import FULL, World

KEY_A = "secret/dockerhub/a"
KEY_B = "secret/dockerhub/b"


def _rec(w: World, key: str) -> LedgerRecord:
    rec = w.ledger.get(key)
    assert rec is not None, f"no ledger row for {key}"
    return rec


def _ours(w: World, key: str) -> list[Any]:
    """The credentials carrying the marker of the secret `key` (KV v2)."""
    mount, _, path = key.partition("/")
    digest = w.keys.path_digest(SecretRef(mount, path, 2))
    return [c for c in w.creds() if (m := Marker.parse(c.description)) is not None and m.path_digest == digest]


def _past_backoff(w: World) -> None:
    """Move the clock past every backoff (records and pending deletes)."""
    w.clock.t += 10_000


# --- 1. a stale "retire" pending delete deletes the credential just adopted --------------------


def test_retag_after_failed_retire_delete_keeps_the_adopted_credential() -> None:
    w = World(sync={"deletion_policy": "delete"})
    w.put("a", 1)
    w.run()
    [cred] = w.creds()
    # Untag: the retire queues the deletion, but CybeDefend answers 503 to the DELETE.
    w.vault.set_tags("secret", "dockerhub/a", {})
    w.api.inject("delete", TransientError("HTTP 503", status=503))
    w.run()
    assert len(w.creds()) == 1 and w.ledger.pending_deletes()
    # The operator re-tags the same version: the bridge adopts the still-existing credential...
    w.vault.set_tags("secret", "dockerhub/a", tagged(PROJECTS[0]))
    _past_backoff(w)
    report = w.run()
    assert report.counts["adopted"] == 1
    rec = _rec(w, KEY_A)
    assert rec.state == State.REGISTERED and rec.credential_id == cred.id
    # ...and then the same pass's flush of pending deletes removes it: the ledger believes in a
    # credential that no longer exists (until the hourly drift check).
    assert [c.id for c in w.creds()] == [cred.id]
    w.assert_exactly_once()


# --- 2. duplicate_token rejections are never re-examined -----------------------------------


def test_duplicate_rejection_is_lifted_when_the_twin_is_deleted() -> None:
    w = World(sync={"deletion_policy": "delete"})
    w.put("a", 1)
    # b holds the same token for the same project: rejected as a duplicate (correct).
    w.vault.put("secret", "dockerhub/b", w.vault.peek("secret", "dockerhub/a"), tagged(PROJECTS[0]))
    first = w.run()
    assert first.counts["created"] == 1 and first.counts["rejected"] == 1
    assert _rec(w, KEY_B).last_result == "duplicate_token"
    # a is deleted from Vault: its credential is deleted (policy delete). b, still tagged, holds
    # the token and should now be registered.
    w.vault.delete_all("secret", "dockerhub/a")
    w.run()
    w.run()
    rec = _rec(w, KEY_B)
    assert rec.state == State.REGISTERED, f"b is {rec.state.value}: {rec.reason}"
    assert len(w.creds()) == 1


def test_copy_of_a_token_that_its_first_owner_rotates_away_from_is_registered() -> None:
    w = World()
    w.put("a", 1)
    w.run()
    old_value = w.vault.peek("secret", "dockerhub/a")
    # a is rotated to a new token; the old token is moved to b (same project).
    w.put("a", 2)
    w.vault.put("secret", "dockerhub/b", old_value, tagged(PROJECTS[0]))
    w.run()
    w.run()
    rec = _rec(w, KEY_B)
    assert rec.state == State.REGISTERED, f"b is {rec.state.value}: {rec.reason}"
    w.assert_exactly_once()


# --- 3. restarted KV v2 version numbers + no ledger row: the old token is adopted ------------


def test_recreated_secret_is_not_satisfied_by_the_orphan_of_its_predecessor() -> None:
    w = World()  # deletion_policy: retain (the default)
    w.put("a", 1)
    w.run()
    w.vault.delete_all("secret", "dockerhub/a")
    w.run()
    assert _rec(w, KEY_A).state == State.ORPHANED and len(w.creds()) == 1
    # The ledger is lost (pod rescheduled on an empty volume, or failover to a replica whose
    # ledger never saw this secret); meanwhile the secret was written anew with a new token.
    w.ledger = SqliteLedger(":memory:")
    w.engine = w.new_engine()
    assert w.put("a", 2) == 1  # KV v2 numbers the new secret's versions from 1 again
    w.run()
    rec = _rec(w, KEY_A)
    assert rec.state == State.REGISTERED and rec.credential_id is not None
    # The registered credential must hold the token Vault has now (compared without printing either).
    holds_current = w.api.token_of(rec.credential_id).reveal() == w.vault.peek("secret", "dockerhub/a")["accessToken"]
    assert holds_current, "the adopted credential holds the previous secret's token"


# --- 4. a remote 400 is never re-examined when the tags (not the value) are fixed --------------


def test_remote_rejection_is_retried_after_the_tags_are_fixed() -> None:
    w = World()
    w.put("a", 1, description="x" * 200)
    # CybeDefend refuses the description (the contract declares no length; a 400 is plausible).
    w.api.inject("create", InvalidRequest("description must be shorter than or equal to 100 characters", status=400))
    w.run()
    assert _rec(w, KEY_A).last_result == "remote_rejected"
    # The operator shortens the description tag: a metadata-only change, no new version.
    w.vault.set_tags("secret", "dockerhub/a", tagged(PROJECTS[0], description="short"))
    report = w.run()
    assert report.counts["created"] == 1
    w.assert_exactly_once()


# --- 5. a 400 after the create succeeded is recorded as a sticky rejection ---------------------


def test_400_while_copying_links_does_not_leave_two_credentials() -> None:
    w = World()
    w.put("a", 1)
    w.run()
    [old] = w.creds()
    w.api.set_linked_projects(w.s.cybedefend.organization_id or "", old.id, [PROJECTS[0], PROJECTS[5]])
    w.put("a", 2)
    w.api.inject("set_linked_projects", InvalidRequest("projectIds: invalid", status=400))
    w.run()
    _past_backoff(w)
    w.run()
    rec = _rec(w, KEY_A)
    assert rec.state == State.REGISTERED and rec.version == 2, f"{rec.state.value}: {rec.reason}"
    assert len(w.creds()) == 1
    w.assert_exactly_once()


# --- 6. ambiguous create during a rotation after a recreate loops on the stale credential ------


def test_ambiguous_create_in_a_rotation_is_not_retried_in_the_same_pass() -> None:
    w = World()  # retain: the deleted secret's credential stays, as ORPHANED
    w.put("a", 1)
    w.run()
    w.vault.delete_all("secret", "dockerhub/a")
    w.run()
    w.put("a", 2)  # written anew: version 1 again, new token -> ROTATE with a stale same-revision marker
    w.api.reset_calls()
    w.api.inject("create", AmbiguousWrite("HTTP 502 while creating", status=502), times=5)
    report = w.run()
    # ADR 4: after an ambiguous create, list once; if our credential is not there, fail and retry later.
    assert w.api.calls["create"] == 1, f"{w.api.calls['create']} POSTs in one pass"
    assert report.counts["failed"] == 1
    assert len(w.creds()) == 1


@pytest.fixture
def review_sim() -> Iterator[Simulator]:
    """The CybeDefend double with one organization and its projects (as in tests/support/bridge_rig.py)."""
    from tests.support.bridge_rig import PAT

    with seeded_simulator(PAT) as s:
        yield s


# --- 7. a vanished KV mount reads as "no secrets": everything is retired (and deleted) ---------


@pytest.mark.integration
def test_vanished_mount_does_not_retire_the_sources_secrets(openbao: OpenBao, review_sim: Simulator,
                                                            tmp_path: Path) -> None:
    import secrets as _secrets

    from tests.support.bridge_rig import Rig

    sim = review_sim

    mount = f"kvr-{_secrets.token_hex(4)}"
    openbao.enable_kv(mount, 2)
    r = Rig(openbao, mount, sim, tmp_path, sync={"deletion_policy": "delete"})
    r.start()
    try:
        r.put("a", 1)
        r.put("b", 2)
        assert r.run().counts["created"] == 2
        # The mount disappears (disabled, `secrets move`d, a restore in progress): not a deletion of secrets.
        openbao.disable_mount(mount)
        report = r.run()
        assert r.bridge is not None
        assert len(sim.credentials()) == 2, f"{report.counts['retired']} retired, credentials deleted"
        assert all(rec.state == State.REGISTERED for rec in r.bridge.ledger.all())
    finally:
        if r.bridge is not None:
            r.bridge.close(revoke=False)


# --- 8. retire deletes only the ledger's credential, not one an interrupted rotation made ------


def test_retire_after_an_interrupted_rotation_deletes_every_credential_of_the_secret() -> None:
    w = World(sync={"deletion_policy": "delete"})
    w.put("a", 1)
    w.run()
    [old] = w.creds()
    w.api.set_linked_projects(w.s.cybedefend.organization_id or "", old.id, [PROJECTS[0], PROJECTS[5]])
    w.put("a", 2)
    # The create lands; copying the links then fails transiently: the row stays FAILED on the old one.
    w.api.inject("set_linked_projects", TransientError("HTTP 503", status=503))
    assert w.run().counts["failed"] == 1
    assert len(w.creds()) == 2
    # Before the retry, the secret is untagged: deletion policy says its credential goes.
    w.vault.set_tags("secret", "dockerhub/a", {})
    _past_backoff(w)
    w.run()
    assert _rec(w, KEY_A).state == State.RETIRED
    assert w.creds() == [], f"{len(w.creds())} credential(s) of a retired secret left in CybeDefend"


# --- 9. KV v1: the per-secret backoff (and Retry-After) is ignored -----------------------------


def test_kv1_failed_secret_waits_for_its_backoff() -> None:
    from bridge.errors import RateLimited
    from tests.support.fake_source import FakeSecretSource

    w = World(sources=[{"mount": "kv1", "path": "dockerhub", "kv_version": 1}])
    w.vault = FakeSecretSource({"kv1": 1})
    w.engine = w.new_engine()
    w.vault.put("kv1", "dockerhub/a", {"accessToken": token(1), "dockerhubUsername": "u", **tagged(PROJECTS[0])})
    w.api.inject("create", RateLimited("slow down", retry_after=600))
    assert w.run().counts["failed"] == 1
    w.api.reset_calls()
    w.clock.t += 5  # well within the 600 s CybeDefend asked for
    report = w.run()
    assert sum(w.api.calls.values()) == 0, f"calls during the Retry-After window: {dict(w.api.calls)}"
    assert report.counts["created"] == 0


def test_harness_sanity_normal_rotation_is_exactly_once() -> None:
    """Not a finding: guards the helpers above against silently testing nothing."""
    w = World()
    w.put("a", 1)
    w.run(FULL)
    w.put("a", 2)
    w.run(FULL)
    assert len(_ours(w, KEY_A)) == 1
    w.assert_exactly_once()
    assert token(1, "a") != token(2, "a")
