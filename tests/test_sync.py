"""The sync engine in this process: the fake registrar, an in-memory SQLite ledger, and Vault.

The Vault-side scenarios (discovery, rotation, retirement, rejection, a lost ledger, KV v1) run
twice, against the in-memory fake and against a real OpenBao read through `VaultSource`
(`vw`, `make_vw`; the OpenBao runs are marked `integration`): one suite, two sides, like
tests/test_registrar_contract.py for CybeDefend. The CybeDefend-side scenarios (faults, crashes,
rate limits) need the fake Vault's hooks only and run once (`w`). That the fake answers as the
real adapter does is tests/test_source_contract.py.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from bridge.engine.sync import LINKS_AHEAD_MAX
from bridge.errors import AmbiguousWrite, AuthenticationError, InvalidRequest, LegacyApiKeyGone, RateLimited, TransientError
from bridge.ledger import SqliteLedger
from bridge.model import Sensitive, State
from bridge.ports import PassRequest
from tests.support.data import ORG, PROJECTS, assert_no_leak, tagged, token, unix
from tests.support.openbao import OpenBao
from tests.support.vault_side import FakeVault, OpenBaoVault, VaultSide
from tests.support.world import FULL, World

__all__ = ["FULL", "World"]

SIDES = [pytest.param("fake", id="fake"), pytest.param("openbao", id="openbao", marks=pytest.mark.integration)]


@pytest.fixture
def w() -> World:
    """A world on the fake Vault: for scenarios about CybeDefend, the ledger or the engine."""
    return World()


@pytest.fixture(params=SIDES)
def make_vw(request: pytest.FixtureRequest) -> Iterator[Callable[..., World]]:
    """`make_vw(kv=2, **sections)`: a world on the fake Vault, then on a fresh mount of a real OpenBao."""
    made: list[World] = []

    def make(kv: int = 2, **sections: Any) -> World:
        side: VaultSide
        if request.param == "fake":
            side = FakeVault(kv=kv)
        else:
            bao: OpenBao = request.getfixturevalue("openbao")
            side = OpenBaoVault(bao, kv)
        world = World(side, **sections)
        made.append(world)
        return world

    try:
        yield make
    finally:
        for world in made:
            world.close()


@pytest.fixture
def vw(make_vw: Callable[..., World]) -> World:
    """A world on each Vault side in turn (fake, then real OpenBao)."""
    return make_vw()


def test_first_pass_registers_every_tagged_token_once(vw: World) -> None:
    for i in range(12):
        vw.put(f"s{i:02d}", i, PROJECTS[i % 3])
    vw.side.put("dockerhub/untagged", {"accessToken": token(99), "dockerhubUsername": "x"})
    report = vw.run()
    assert report.result == "ok" and report.counts["created"] == 12
    assert len(vw.creds()) == 12
    vw.assert_exactly_once()
    # the untagged secret's value was never read, and the second pass reads no value at all
    assert report.vault_requests.get("read") == 12
    again = vw.run()
    assert again.counts["skipped"] == 12 and "read" not in again.vault_requests
    assert vw.api.calls["create"] == 12


def test_rotation_creates_copies_links_then_deletes_the_old(vw: World) -> None:
    vw.put("a", 1)
    vw.run()
    [old] = vw.creds()
    vw.api.set_linked_projects(ORG, old.id, [PROJECTS[0], PROJECTS[5]])
    vw.put("a", 2)
    report = vw.run()
    assert report.counts["rotated"] == 1
    [new] = vw.creds()
    assert new.id != old.id and set(new.links) == {PROJECTS[0], PROJECTS[5]}
    assert ":v2." in (new.description or "")
    vw.assert_exactly_once()


def test_metadata_only_change_makes_no_api_call(vw: World) -> None:
    vw.put("a", 1)
    vw.run()
    vw.api.reset_calls()
    vw.side.put("dockerhub/a", vw.side.peek("dockerhub/a"), tagged(PROJECTS[0]))  # same value, new version
    report = vw.run()
    assert report.counts["refreshed"] == 1 and sum(vw.api.calls.values()) == 0
    assert vw.ledger.all()[0].version == 2


@pytest.mark.parametrize("how", ["untag", "delete_version", "delete_all"])
def test_retire_under_retain_keeps_the_credential(vw: World, how: str) -> None:
    vw.put("a", 1)
    vw.run()
    {"untag": lambda: vw.side.set_tags("dockerhub/a", {}),
     "delete_version": lambda: vw.side.delete_current("dockerhub/a"),
     "delete_all": lambda: vw.side.delete_all("dockerhub/a")}[how]()
    report = vw.run()
    assert report.counts["retired"] == 1 and len(vw.creds()) == 1
    assert vw.ledger.all()[0].state == State.ORPHANED
    assert vw.run().counts["retired"] == 0  # handled once


def test_retire_under_delete_policy_deletes(make_vw: Callable[..., World]) -> None:
    vw = make_vw(sync={"deletion_policy": "delete"})
    vw.put("a", 1)
    vw.put("b", 2)
    vw.run()
    vw.side.set_tags("dockerhub/a", {})
    report = vw.run()
    assert report.counts["retired"] == 1 and len(vw.creds()) == 1
    assert vw.row(vw.key("a")).state == State.RETIRED


def test_delete_guard_rail_pauses_deletions_and_says_so(make_vw: Callable[..., World], caplog: pytest.LogCaptureFixture) -> None:
    vw = make_vw(sync={"deletion_policy": "delete", "max_deletes_per_pass": 2})
    for i in range(5):
        vw.put(f"s{i}", i)
    vw.run()
    for i in range(5):
        vw.side.delete_all(f"dockerhub/s{i}")
    with caplog.at_level(logging.INFO, logger="bridge"):
        report = vw.run()
    assert report.delete_guard_tripped and report.counts["deferred"] == 5
    assert len(vw.creds()) == 5
    assert "delete_guard_tripped" in caplog.text
    assert vw.engine.status()["delete_guard_tripped"] is True
    assert vw.metrics.registry.get_sample_value("cybedefend_bridge_delete_guard_tripped") == 1


def test_crash_between_post_and_ledger_write_is_adopted_not_duplicated(w: World) -> None:
    w.put("a", 1)
    # The POST lands but the answer is lost (connection dropped after the write).
    w.api.inject("create", AmbiguousWrite("dropped", status=None), after=True)
    report = w.run()
    assert report.counts["adopted"] == 1 and len(w.creds()) == 1
    w.assert_exactly_once()


def test_crash_after_create_before_record_is_adopted_on_the_next_pass(w: World) -> None:
    w.put("a", 1)
    w.run()
    w.put("a", 2)
    real_put = w.ledger.put

    def crash(record: Any, **kw: Any) -> None:
        if record.version == 2:
            raise SystemExit("crash")  # the process dies right after the POST
        real_put(record, **kw)

    w.ledger.put = crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        w.run()
    w.ledger.put = real_put  # type: ignore[method-assign]
    assert len(w.creds()) == 2  # old and new both exist right now
    report = w.new_engine().run(FULL)
    assert report.counts["adopted"] == 1
    w.assert_exactly_once()
    assert len(w.creds()) == 1


def test_lost_ledger_is_rebuilt_without_duplicates(vw: World) -> None:
    for i in range(6):
        vw.put(f"s{i}", i)
    vw.run()
    vw.put("s0", 100)  # rotated while the bridge was away
    vw.ledger = SqliteLedger(":memory:")
    vw.engine = vw.new_engine()
    report = vw.run()
    # five adopted as they are; the rotated one registered anew, its superseded credential deleted
    assert report.counts["adopted"] == 5 and report.counts["created"] == 1
    assert len(vw.creds()) == 6
    assert vw.api.calls["create"] == 6 + 1  # the rotation needed one new credential, nothing else
    vw.assert_exactly_once()


def test_twenty_malformed_secrets_do_not_hurt_the_good_ones(vw: World, caplog: pytest.LogCaptureFixture) -> None:
    bad: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({"accessToken": "nope", "dockerhubUsername": "u"}, tagged(PROJECTS[0])),
        ({"accessToken": token(1, "x"), "dockerhubUsername": ""}, tagged(PROJECTS[0])),
        ({"dockerhubUsername": "u"}, tagged(PROJECTS[0])),
        ({"accessToken": token(2, "x"), "dockerhubUsername": "u"}, {"cybedefend-project-id": "xyz"}),
        ({"accessToken": 5, "dockerhubUsername": "u"}, tagged(PROJECTS[0])),
    ] * 4
    for i, (value, tags) in enumerate(bad):
        vw.side.put(f"dockerhub/bad{i:02d}", value, tags)
    for i in range(5):
        vw.put(f"good{i}", i)
    with caplog.at_level(logging.INFO, logger="bridge"):
        report = vw.run()
    assert report.counts["created"] == 5 and report.counts["rejected"] == 20
    assert len(vw.creds()) == 5
    rejected = [r for r in vw.ledger.all() if r.state == State.REJECTED]
    assert len(rejected) == 20 and all(r.reason for r in rejected)
    assert vw.metrics.registry.get_sample_value("cybedefend_bridge_rejects_total", {"reason": "token_shape"}) == 4
    again = vw.run()  # rejections are not counted twice
    assert again.counts["rejected"] == 20
    assert vw.metrics.registry.get_sample_value("cybedefend_bridge_rejects_total", {"reason": "token_shape"}) == 4
    assert_no_leak([caplog.text], vw.tokens)


def test_transient_failure_backs_off_then_succeeds(w: World) -> None:
    w.put("a", 1)
    w.put("b", 2)
    w.api.inject("create", TransientError("HTTP 503", status=503))
    report = w.run()
    assert report.result == "partial" and report.counts["failed"] == 1 and report.counts["created"] == 1
    failed = [r for r in w.ledger.all() if r.state == State.FAILED]
    assert len(failed) == 1 and failed[0].next_attempt_at is not None
    assert w.run().counts["skipped"] == 2  # still waiting for the backoff
    w.clock.t = failed[0].next_attempt_at + 1
    assert w.run().counts["created"] == 1
    w.assert_exactly_once()


def test_rate_limit_beyond_the_cap_defers_until_retry_after(w: World) -> None:
    w.put("a", 1)
    w.api.inject("create", RateLimited("slow down", retry_after=600))
    report = w.run()
    assert report.counts["failed"] == 1
    [rec] = w.ledger.all()
    assert rec.next_attempt_at == pytest.approx(w.clock.t + 600)
    w.clock.t += 599
    assert w.run().counts["created"] == 0
    w.clock.t += 2
    assert w.run().counts["created"] == 1


def test_legacy_api_key_aborts_the_pass_with_one_clear_error(w: World) -> None:
    for i in range(5):
        w.put(f"s{i}", i)
    w.api.inject("all_credentials", LegacyApiKeyGone("API keys were removed; switch to a PAT", status=410), times=99)
    report = w.run()
    assert report.result == "failed" and "PAT" in (report.error or "")
    assert w.api.calls["list_project"] <= w.s.cybedefend.max_concurrency  # it stopped, not 5 identical errors
    assert not w.creds()


def test_remote_400_rejects_the_secret_until_it_changes(w: World) -> None:
    w.put("a", 1)
    w.api.inject("create", InvalidRequest("accessToken rejected", status=400))
    report = w.run()
    assert report.counts["failed"] == 1
    rec = w.row("secret/dockerhub/a")
    assert rec.state == State.REJECTED and rec.last_result == "remote_rejected"
    assert w.run().counts["created"] == 0
    w.put("a", 2)
    assert w.run().counts["created"] == 1


def test_forbidden_project_fails_alone(w: World) -> None:
    w.api.forbid_project(PROJECTS[1])
    w.put("a", 1, PROJECTS[0])
    w.put("b", 2, PROJECTS[1])
    report = w.run()
    assert report.counts == {**report.counts, "created": 1, "failed": 1}
    assert "403" in (w.row("secret/dockerhub/b").reason or "") or "permission" in (
        w.row("secret/dockerhub/b").reason or "").lower()


def test_move_to_another_project(make_vw: Callable[..., World]) -> None:
    vw = make_vw(sync={"deletion_policy": "delete"})
    vw.put("a", 1, PROJECTS[0])
    vw.run()
    vw.side.set_tags("dockerhub/a", tagged(PROJECTS[2]))
    report = vw.run()
    assert report.counts["moved"] == 1
    [cred] = vw.creds()
    assert cred.links == [PROJECTS[2]]


def test_drift_recreates_a_credential_deleted_behind_our_back(w: World) -> None:
    w.put("a", 1)
    w.run()
    [cred] = w.creds()
    w.api.delete(ORG, cred.id)
    w.clock.t += w.s.sync.drift_check_interval_seconds + 1
    report = w.run()
    assert report.counts["created"] == 1
    w.assert_exactly_once()


def test_targeted_pass_touches_only_the_named_secret(vw: World) -> None:
    vw.put("a", 1)
    vw.put("b", 2)
    vw.run()
    vw.put("a", 3)
    vw.put("b", 4)
    report = vw.run(PassRequest(trigger="webhook", paths=frozenset({vw.key("a")})))
    assert report.counts["rotated"] == 1 and not report.full
    assert vw.row(vw.key("b")).version == 1


def test_targeted_pass_reads_only_its_rows_yet_sees_the_same_token_elsewhere(vw: World,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """O(k) ledger reads in a targeted pass (`some` + `holding`, never `all`), and the duplicate
    check still sees a row outside the scope that holds the same token."""
    for i in range(20):
        vw.put(f"s{i:02d}", i)
    vw.run()

    def whole_ledger() -> list[Any]:
        raise AssertionError("a targeted pass read the whole ledger")

    monkeypatch.setattr(vw.ledger, "all", whole_ledger)
    vw.side.put(vw.path("copy"), vw.side.peek(vw.path("s07")), tagged(PROJECTS[0]))  # s07's token, same project
    vw.put("s03", 33)
    report = vw.run(PassRequest(trigger="audit", paths=frozenset({vw.key("copy"), vw.key("s03")})))
    assert report.counts["rejected"] == 1 and report.counts["rotated"] == 1 and report.counts["created"] == 0
    assert vw.row(vw.key("copy")).last_result == "duplicate_token"
    monkeypatch.undo()
    vw.assert_exactly_once()


def test_targeted_pass_lists_its_organization_ahead_once_and_fails_as_before(w: World) -> None:
    """The listing a targeted pass starts before reading Vault (`_list_ahead`) replaces the one it
    would make: one listing per rotation; its failure blocks the write like a direct one; a
    pass with nothing to write spends that one GET and nothing else."""
    from bridge.errors import TransientError as Transient

    for i in range(3):
        w.put(f"s{i}", i)
    w.run()
    w.api.reset_calls()
    w.put("s1", 11)
    report = w.run(PassRequest(trigger="audit", paths=frozenset({w.key("s1")})))
    assert report.counts["rotated"] == 1 and w.api.calls["all_credentials"] == 1
    w.api.reset_calls()
    w.api.inject("all_credentials", Transient("CybeDefend is down"), times=1)
    w.put("s2", 12)
    report = w.run(PassRequest(trigger="audit", paths=frozenset({w.key("s2")})))
    assert report.result == "partial" and report.counts["rotated"] == 0 and w.api.calls["create"] == 0
    assert ORG in (report.error or "") and w.api.calls["all_credentials"] == 1
    w.api.reset_calls()
    w.side.put(w.path("s0"), w.side.peek(w.path("s0")), tagged(PROJECTS[0]))  # same token, new version
    report = w.run(PassRequest(trigger="audit", paths=frozenset({w.key("s0")})))
    assert report.counts["refreshed"] == 1
    assert dict(w.api.calls) == {"all_credentials": 1}
    report = w.run(PassRequest(trigger="audit", paths=frozenset({w.key("s2")})))  # the retry after the outage
    assert report.counts["rotated"] == 1
    assert len(w.creds()) == 3  # one credential per secret: nothing lost, nothing twice


def test_targeted_rotation_reads_the_old_links_beside_the_listing(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A targeted rotation reads its ledger credential's links while the listing is still in
    flight (`_links_ahead`, ADR 19), once, and uses them only for the credential the listing
    names: the links come out as without it, a same-token write reads none, and links read for
    a credential the listing no longer holds are dropped."""
    for name, i in (("a", 1), ("b", 2), ("c", 3)):
        w.put(name, i)
    w.run()
    old = {c.id: c for c in w.creds()}
    a_old = w.row(w.key("a")).credential_id
    assert a_old is not None
    w.api.set_linked_projects(ORG, a_old, [PROJECTS[0], PROJECTS[5]])
    links_read = threading.Event()
    listed_after_links: list[bool] = []
    wait = [5.0]
    real_links, real_listing = w.api.linked_projects, w.api.all_credentials

    def linked_projects(org: str, cred_id: str) -> list[str]:
        links_read.set()
        return real_links(org, cred_id)

    def all_credentials(org: str) -> list[Any]:
        # The listing answers only once the links were asked for (or the wait ran out): a links GET
        # made after the listing, as before ADR 19, shows here as False.
        listed_after_links.append(links_read.wait(wait[0]))
        return real_listing(org)

    monkeypatch.setattr(w.api, "linked_projects", linked_projects)
    monkeypatch.setattr(w.api, "all_credentials", all_credentials)
    w.api.reset_calls()
    w.put("a", 11)
    report = w.run(PassRequest(trigger="audit", paths=frozenset({w.key("a")})))
    assert report.counts["rotated"] == 1 and listed_after_links == [True]
    assert w.api.calls["linked_projects"] == 1
    [new] = [c for c in w.creds() if c.id not in old]
    assert set(new.links) == {PROJECTS[0], PROJECTS[5]} and a_old not in {c.id for c in w.creds()}

    # Same token, new version: nothing rotates, so no links are read ahead.
    wait[0] = 0.3
    links_read.clear()
    listed_after_links.clear()
    w.api.reset_calls()
    w.side.put(w.path("b"), w.side.peek(w.path("b")), tagged(PROJECTS[0]))
    report = w.run(PassRequest(trigger="audit", paths=frozenset({w.key("b")})))
    assert report.counts["refreshed"] == 1 and listed_after_links == [False]
    assert dict(w.api.calls) == {"all_credentials": 1}

    # The ledger's credential was deleted behind our back: its links are read ahead (a 404, an
    # empty set), the listing holds no credential of c's, so c is registered anew with its own
    # project only and nothing is deleted.
    c_old = w.row(w.key("c")).credential_id
    assert c_old is not None
    w.api.delete(ORG, c_old)
    w.api.reset_calls()
    w.put("c", 13)
    report = w.run(PassRequest(trigger="audit", paths=frozenset({w.key("c")})))
    assert report.result == "ok" and w.api.calls["linked_projects"] == 1 and w.api.calls["delete"] == 0
    [c_new] = [c for c in w.creds() if c.id not in old and c.id != new.id]
    assert c_new.links == [PROJECTS[0]]
    # One credential per secret, holding its latest token (b's still carries its v1 marker: a
    # refresh writes nothing, so assert_exactly_once's marker check does not apply here).
    assert len(w.creds()) == 3
    for name in ("a", "b", "c"):
        cred_id = w.row(w.key(name)).credential_id
        assert cred_id is not None
        assert w.api.token_of(cred_id).reveal() == w.side.peek(w.path(name))["accessToken"]


def test_links_read_ahead_for_the_wrong_credential_are_dropped_without_holding_up_the_write(
    w: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ledger names credential X (say, a ledger restored from an older backup) and the
    listing holds our Y with the old token: the rotation copies Y's links, read when `reconcile`
    asks for them, never X's early answer; the create does not wait for X's slow GET, and the
    pass does not return before that GET is over (passes never overlap)."""
    w.put("a", 1)
    w.run()
    rec = w.row(w.key("a"))
    y = rec.credential_id
    assert y is not None
    w.api.set_linked_projects(ORG, y, [PROJECTS[0], PROJECTS[3]])
    w.ledger.put(replace(rec, credential_id="gone-x"))
    real_links, real_create, real_listing = w.api.linked_projects, w.api.create, w.api.all_credentials
    t: dict[str, float] = {}
    x_started = threading.Event()

    def linked_projects(org: str, cred_id: str) -> list[str]:
        if cred_id == "gone-x":
            x_started.set()
            time.sleep(1.0)  # slow, as a GET retrying a 5xx would be
            t["x_done"] = time.monotonic()
        return real_links(org, cred_id)

    def all_credentials(org: str) -> list[Any]:
        # X's GET is under way before the plan can end (one not yet started would be cancelled,
        # which is right, but would leave nothing slow to wait for).
        assert x_started.wait(5)
        return real_listing(org)

    def create(*args: Any, **kwargs: Any) -> Any:
        t["create"] = time.monotonic()
        return real_create(*args, **kwargs)

    monkeypatch.setattr(w.api, "linked_projects", linked_projects)
    monkeypatch.setattr(w.api, "create", create)
    monkeypatch.setattr(w.api, "all_credentials", all_credentials)
    w.put("a", 2)
    report = w.run(PassRequest(trigger="audit", paths=frozenset({w.key("a")})))
    returned = time.monotonic()
    assert report.counts["rotated"] == 1
    assert t["create"] < t["x_done"] <= returned  # the write did not wait for X; the pass did
    [new] = w.creds()
    assert new.id != y and set(new.links) == {PROJECTS[0], PROJECTS[3]}
    w.assert_exactly_once()


def test_links_read_ahead_never_outlive_their_pass_nor_exceed_the_cap(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """An aborted targeted pass leaves no early links answer for the next pass to take (that one
    copies the links CybeDefend holds then), and a targeted pass rotating more credentials than
    `LINKS_AHEAD_MAX` reads none of their links ahead."""
    for i in range(LINKS_AHEAD_MAX + 2):
        w.put(f"s{i}", i)
    w.run()
    s0 = w.row(w.key("s0")).credential_id
    assert s0 is not None
    w.api.inject("all_credentials", AuthenticationError("the PAT was revoked"), times=1)
    w.put("s0", 100)
    report = w.run(PassRequest(trigger="audit", paths=frozenset({w.key("s0")})))
    assert report.result == "failed" and "revoked" in (report.error or "")
    w.api.set_linked_projects(ORG, s0, [PROJECTS[0], PROJECTS[4]])  # after the aborted pass read them
    report = w.run()  # a full pass reads no links ahead: a left-over answer would be taken here
    assert report.counts["rotated"] == 1
    [new] = [c for c in w.creds() if c.id == w.row(w.key("s0")).credential_id]
    assert set(new.links) == {PROJECTS[0], PROJECTS[4]}

    w.api.reset_calls()
    many = frozenset(w.key(f"s{i}") for i in range(1, LINKS_AHEAD_MAX + 2))
    for i in range(1, LINKS_AHEAD_MAX + 2):
        w.put(f"s{i}", 200 + i)
    before = w.api.calls["linked_projects"]
    real_listing = w.api.all_credentials
    links_before_listing: list[int] = []

    def all_credentials(org: str) -> list[Any]:
        time.sleep(0.3)  # time enough for links read ahead (there is a free worker) to be made
        links_before_listing.append(w.api.calls["linked_projects"] - before)
        return real_listing(org)

    monkeypatch.setattr(w.api, "all_credentials", all_credentials)
    report = w.run(PassRequest(trigger="audit", paths=many))
    assert report.counts["rotated"] == LINKS_AHEAD_MAX + 1 and links_before_listing == [0]
    assert w.api.calls["linked_projects"] == LINKS_AHEAD_MAX + 1  # read when asked, once each
    w.assert_exactly_once()


def test_stop_request_defers_what_has_not_started(w: World) -> None:
    for i in range(10):
        w.put(f"s{i}", i)
    w.stop.set()
    report = w.run()
    assert report.result == "aborted" and report.counts["created"] == 0


def test_kv1_source(make_vw: Callable[..., World]) -> None:
    vw = make_vw(kv=1)
    vw.put("a", 1)
    assert vw.run().counts["created"] == 1
    assert vw.run().counts["skipped"] == 1
    vw.put("a", 2)
    assert vw.run().counts["rotated"] == 1
    assert len(vw.creds()) == 1
    vw.assert_exactly_once()


def test_credentials_without_our_marker_are_never_touched(vw: World) -> None:
    foreign = vw.api.create(ORG, PROJECTS[0], "someone", Sensitive(token(5, "foreign")), "hand-made")
    vw.put("a", 1)
    vw.run()
    vw.put("a", 2)
    vw.run()
    vw.side.delete_all("dockerhub/a")
    vw.run()
    ids = {c.id for c in vw.creds()}
    assert foreign.id in ids


def test_status_never_contains_values(vw: World) -> None:
    vw.put("a", 1)
    vw.run()
    text = json.dumps(vw.engine.status())
    assert vw.key("a") in text
    assert_no_leak([text, repr(vw.ledger.all())], vw.tokens)


def test_status_times_are_iso_8601_utc(w: World) -> None:
    w.put("a", 1)
    report = w.run()
    doc = w.engine.status()
    # Every timestamp a reader of /v1/status sees is ISO 8601 with its UTC offset, and the same instant.
    assert unix(doc["last_pass"]["started_at"]) == pytest.approx(report.started_at, abs=1e-3)
    assert unix(doc["last_full_pass"]["finished_at"]) == pytest.approx(report.finished_at, abs=1e-3)
    assert unix(doc["secrets"][0]["updated_at"]) == pytest.approx(w.ledger.all()[0].updated_at, abs=1e-3)
    assert doc["secrets"][0]["next_attempt_at"] is None
    json.dumps(doc)  # plain JSON, no `default=str` needed


def test_rejected_new_version_keeps_the_old_credential(vw: World) -> None:
    vw.put("a", 1)
    vw.run()
    vw.side.put("dockerhub/a", {"accessToken": "garbage", "dockerhubUsername": "u"}, tagged(PROJECTS[0]))
    report = vw.run()
    assert report.counts["rejected"] == 1 and len(vw.creds()) == 1
    rec = vw.row(vw.key("a"))
    assert rec.credential_id == vw.creds()[0].id and rec.seen_version == 2
    vw.put("a", 3)
    assert vw.run().counts["rotated"] == 1
    vw.assert_exactly_once()
