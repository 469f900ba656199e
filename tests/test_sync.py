"""The sync engine against in-memory fakes of Vault and CybeDefend and a real (in-memory) SQLite ledger.

The same scenarios run against a real OpenBao and the CybeDefend double in test_e2e_sync.py.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import pytest

from bridge.engine.sync import SyncEngine
from bridge.errors import AmbiguousWrite, InvalidRequest, LegacyApiKeyGone, RateLimited, TransientError
from bridge.keyring import Keyring
from bridge.ledger import SqliteLedger
from bridge.metrics import Metrics
from bridge.model import Marker, Sensitive, State
from bridge.ports import LedgerRecord, PassRequest
from tests.support.config import settings
from tests.support.data import ORG, PROJECTS, assert_no_leak, tagged, token
from tests.support.fake_source import FakeSecretSource
from tests.support.fakes import FakeRegistrar

FULL = PassRequest(trigger="manual")


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


class World:
    """Vault, CybeDefend, the ledger and an engine, rebuilt on demand like a restarted bridge."""

    def __init__(self, **sections: Any) -> None:
        self.s = settings(**sections)
        self.vault = FakeSecretSource()
        self.api = FakeRegistrar()
        self.ledger = SqliteLedger(":memory:")
        self.keys = Keyring(b"s" * 32)
        self.clock = Clock()
        self.metrics = Metrics()
        self.stop = threading.Event()
        self.tokens: list[str] = []
        self.engine = self.new_engine()

    def new_engine(self) -> SyncEngine:
        return SyncEngine(self.s, self.vault, self.api, self.ledger, self.keys, self.metrics, stop=self.stop,
                          clock=self.clock)

    def put(self, name: str, i: int, project: str = PROJECTS[0], **tag_kw: Any) -> int:
        tok = token(i, name)
        self.tokens.append(tok)
        return self.vault.put("secret", f"dockerhub/{name}", {"accessToken": tok, "dockerhubUsername": f"user-{name}"},
                              tagged(project, **tag_kw))

    def row(self, key: str) -> LedgerRecord:
        """The ledger's row for `key`, which must exist."""
        rec = self.ledger.get(key)
        assert rec is not None, f"no ledger row for {key}"
        return rec

    def run(self, request: PassRequest = FULL) -> Any:
        return self.engine.run(request)

    def creds(self) -> list[Any]:
        return self.api.credentials()

    def assert_exactly_once(self) -> None:
        """Each tagged, live secret has exactly one credential, for its latest version's token."""
        by_marker: dict[str, list[Any]] = {}
        for c in self.creds():
            m = Marker.parse(c.description)
            assert m is not None, "a credential without the bridge's marker appeared"
            by_marker.setdefault(m.path_digest, []).append((c, m))
        for rec in self.ledger.all():
            if rec.state != State.REGISTERED:
                continue
            digest = self.keys.path_digest(rec.ref)
            found = by_marker.get(digest, [])
            assert len(found) == 1, f"{rec.key}: {len(found)} credentials"
            cred, marker = found[0]
            assert rec.fingerprint is not None
            assert cred.id == rec.credential_id and marker.revision == f"v{rec.version}.{rec.fingerprint[:8]}"
            latest = self.vault.peek(rec.mount, rec.path)
            assert self.api.token_of(cred.id).reveal() == latest["accessToken"]


@pytest.fixture
def w() -> World:
    return World()


def test_first_pass_registers_every_tagged_token_once(w: World) -> None:
    for i in range(12):
        w.put(f"s{i:02d}", i, PROJECTS[i % 3])
    w.vault.put("secret", "dockerhub/untagged", {"accessToken": token(99), "dockerhubUsername": "x"})
    report = w.run()
    assert report.result == "ok" and report.counts["created"] == 12
    assert len(w.creds()) == 12
    w.assert_exactly_once()
    # the untagged secret's value was never read, and the second pass reads no value at all
    assert report.vault_requests.get("read") == 12
    again = w.run()
    assert again.counts["skipped"] == 12 and "read" not in again.vault_requests
    assert w.api.calls["create"] == 12


def test_rotation_creates_copies_links_then_deletes_the_old(w: World) -> None:
    w.put("a", 1)
    w.run()
    [old] = w.creds()
    w.api.set_linked_projects(ORG, old.id, [PROJECTS[0], PROJECTS[5]])
    w.put("a", 2)
    report = w.run()
    assert report.counts["rotated"] == 1
    [new] = w.creds()
    assert new.id != old.id and set(new.links) == {PROJECTS[0], PROJECTS[5]}
    assert ":v2." in (new.description or "")
    w.assert_exactly_once()


def test_metadata_only_change_makes_no_api_call(w: World) -> None:
    w.put("a", 1)
    w.run()
    w.api.reset_calls()
    w.vault.put("secret", "dockerhub/a", w.vault.read_value(w.ledger.all()[0].ref, None), tagged(PROJECTS[0]))
    report = w.run()
    assert report.counts["refreshed"] == 1 and sum(w.api.calls.values()) == 0
    assert w.ledger.all()[0].version == 2


@pytest.mark.parametrize("how", ["untag", "delete_version", "delete_all"])
def test_retire_under_retain_keeps_the_credential(w: World, how: str) -> None:
    w.put("a", 1)
    w.run()
    {"untag": lambda: w.vault.set_tags("secret", "dockerhub/a", {}),
     "delete_version": lambda: w.vault.delete_current("secret", "dockerhub/a"),
     "delete_all": lambda: w.vault.delete_all("secret", "dockerhub/a")}[how]()
    report = w.run()
    assert report.counts["retired"] == 1 and len(w.creds()) == 1
    assert w.ledger.all()[0].state == State.ORPHANED
    assert w.run().counts["retired"] == 0  # handled once


def test_retire_under_delete_policy_deletes(w: World) -> None:
    w = World(sync={"deletion_policy": "delete"})
    w.put("a", 1)
    w.put("b", 2)
    w.run()
    w.vault.set_tags("secret", "dockerhub/a", {})
    report = w.run()
    assert report.counts["retired"] == 1 and len(w.creds()) == 1
    assert w.row("secret/dockerhub/a").state == State.RETIRED


def test_delete_guard_rail_pauses_deletions_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    w = World(sync={"deletion_policy": "delete", "max_deletes_per_pass": 2})
    for i in range(5):
        w.put(f"s{i}", i)
    w.run()
    for i in range(5):
        w.vault.delete_all("secret", f"dockerhub/s{i}")
    with caplog.at_level(logging.INFO, logger="bridge"):
        report = w.run()
    assert report.delete_guard_tripped and report.counts["deferred"] == 5
    assert len(w.creds()) == 5
    assert "delete_guard_tripped" in caplog.text
    assert w.engine.status()["delete_guard_tripped"] is True
    assert w.metrics.registry.get_sample_value("cybedefend_bridge_delete_guard_tripped") == 1


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

    def crash(record: Any) -> None:
        if record.version == 2:
            raise SystemExit("crash")  # the process dies right after the POST
        real_put(record)

    w.ledger.put = crash  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        w.run()
    w.ledger.put = real_put  # type: ignore[method-assign]
    assert len(w.creds()) == 2  # old and new both exist right now
    report = w.new_engine().run(FULL)
    assert report.counts["adopted"] == 1
    w.assert_exactly_once()
    assert len(w.creds()) == 1


def test_lost_ledger_is_rebuilt_without_duplicates(w: World) -> None:
    for i in range(6):
        w.put(f"s{i}", i)
    w.run()
    w.put("s0", 100)  # rotated while the bridge was away
    w.ledger = SqliteLedger(":memory:")
    w.engine = w.new_engine()
    report = w.run()
    # five adopted as they are; the rotated one registered anew, its superseded credential deleted
    assert report.counts["adopted"] == 5 and report.counts["created"] == 1
    assert len(w.creds()) == 6
    assert w.api.calls["create"] == 6 + 1  # the rotation needed one new credential, nothing else
    w.assert_exactly_once()


def test_twenty_malformed_secrets_do_not_hurt_the_good_ones(w: World, caplog: pytest.LogCaptureFixture) -> None:
    bad: list[tuple[dict[str, Any], dict[str, str]]] = [
        ({"accessToken": "nope", "dockerhubUsername": "u"}, tagged(PROJECTS[0])),
        ({"accessToken": token(1, "x"), "dockerhubUsername": ""}, tagged(PROJECTS[0])),
        ({"dockerhubUsername": "u"}, tagged(PROJECTS[0])),
        ({"accessToken": token(2, "x"), "dockerhubUsername": "u"}, {"cybedefend-project-id": "xyz"}),
        ({"accessToken": 5, "dockerhubUsername": "u"}, tagged(PROJECTS[0])),
    ] * 4
    for i, (value, tags) in enumerate(bad):
        w.vault.put("secret", f"dockerhub/bad{i:02d}", value, tags)
    for i in range(5):
        w.put(f"good{i}", i)
    with caplog.at_level(logging.INFO, logger="bridge"):
        report = w.run()
    assert report.counts["created"] == 5 and report.counts["rejected"] == 20
    assert len(w.creds()) == 5
    rejected = [r for r in w.ledger.all() if r.state == State.REJECTED]
    assert len(rejected) == 20 and all(r.reason for r in rejected)
    assert w.metrics.registry.get_sample_value("cybedefend_bridge_rejects_total", {"reason": "token_shape"}) == 4
    again = w.run()  # rejections are not counted twice
    assert again.counts["rejected"] == 20
    assert w.metrics.registry.get_sample_value("cybedefend_bridge_rejects_total", {"reason": "token_shape"}) == 4
    assert_no_leak([caplog.text], w.tokens)


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
    w.api.inject("list_project", LegacyApiKeyGone("API keys were removed; switch to a PAT", status=410), times=99)
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


def test_move_to_another_project(w: World) -> None:
    w = World(sync={"deletion_policy": "delete"})
    w.put("a", 1, PROJECTS[0])
    w.run()
    w.vault.set_tags("secret", "dockerhub/a", tagged(PROJECTS[2]))
    report = w.run()
    assert report.counts["moved"] == 1
    [cred] = w.creds()
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


def test_targeted_pass_touches_only_the_named_secret(w: World) -> None:
    w.put("a", 1)
    w.put("b", 2)
    w.run()
    w.put("a", 3)
    w.put("b", 4)
    report = w.run(PassRequest(trigger="webhook", paths=frozenset({"secret/dockerhub/a"})))
    assert report.counts["rotated"] == 1 and not report.full
    assert w.row("secret/dockerhub/b").version == 1


def test_stop_request_defers_what_has_not_started(w: World) -> None:
    for i in range(10):
        w.put(f"s{i}", i)
    w.stop.set()
    report = w.run()
    assert report.result == "aborted" and report.counts["created"] == 0


def test_kv1_source(w: World) -> None:
    w = World(sources=[{"mount": "kv1", "path": "dockerhub", "kv_version": 1}])
    w.vault = FakeSecretSource({"kv1": 1})
    w.engine = w.new_engine()
    w.vault.put("kv1", "dockerhub/a", {"accessToken": token(1), "dockerhubUsername": "u", **tagged(PROJECTS[0])})
    assert w.run().counts["created"] == 1
    assert w.run().counts["skipped"] == 1
    w.vault.put("kv1", "dockerhub/a", {"accessToken": token(2), "dockerhubUsername": "u", **tagged(PROJECTS[0])})
    assert w.run().counts["rotated"] == 1
    assert len(w.creds()) == 1


def test_credentials_without_our_marker_are_never_touched(w: World) -> None:
    foreign = w.api.create(ORG, PROJECTS[0], "someone", Sensitive(token(5, "foreign")), "hand-made")
    w.put("a", 1)
    w.run()
    w.put("a", 2)
    w.run()
    w.vault.delete_all("secret", "dockerhub/a")
    w.run()
    ids = {c.id for c in w.creds()}
    assert foreign.id in ids


def test_status_never_contains_values(w: World) -> None:
    w.put("a", 1)
    w.run()
    text = json.dumps(w.engine.status())
    assert "secret/dockerhub/a" in text
    assert_no_leak([text, repr(w.ledger.all())], w.tokens)


def test_rejected_new_version_keeps_the_old_credential(w: World) -> None:
    w.put("a", 1)
    w.run()
    w.vault.put("secret", "dockerhub/a", {"accessToken": "garbage", "dockerhubUsername": "u"}, tagged(PROJECTS[0]))
    report = w.run()
    assert report.counts["rejected"] == 1 and len(w.creds()) == 1
    rec = w.row("secret/dockerhub/a")
    assert rec.credential_id == w.creds()[0].id and rec.seen_version == 2
    w.put("a", 3)
    assert w.run().counts["rotated"] == 1
    w.assert_exactly_once()
