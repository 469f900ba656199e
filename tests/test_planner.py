"""The pure planner, validation, fingerprints and markers."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from bridge.keyring import Keyring
from bridge.model import ActionKind, Doomed, Marker, RemoteCredential, SecretRef, Sensitive, State, VaultEntry
from bridge.planner import RemoteView, Scope, count_deletions, needs_value, plan, reconcile, source_of, with_evidence
from bridge.ports import LedgerRecord
from bridge.validation import Payload, Tags, read_payload, read_tags
from tests.support.config import settings
from tests.support.data import ORG, ORG2, PROJECTS, tagged, token

KEYS = Keyring(b"k" * 32)
S = settings()
NOW = 1_000_000.0
FULL = Scope(sources=frozenset({0}))


def entry(path: str, version: int | None = 1, tags: dict[str, str] | None = None, deleted: bool = False,
          payload: dict[str, Any] | None = None) -> VaultEntry:
    kv = 1 if payload is not None else 2
    return VaultEntry(SecretRef("secret", f"dockerhub/{path}", kv), version, tags or {}, deleted=deleted, payload=payload)


def data(i: int, user: str = "alice") -> dict[str, Any]:
    return {"accessToken": token(i), "dockerhubUsername": user}


def record(path: str, *, state: State = State.REGISTERED, version: int | None = 1, tok: int = 1, project: str = PROJECTS[0],
           org: str = ORG, cred: str | None = "cred-1", **kw: Any) -> LedgerRecord:
    kw.setdefault("seen_version", version)
    return LedgerRecord(key=f"secret/dockerhub/{path}", mount="secret", path=f"dockerhub/{path}", kv_version=2, state=state,
                        version=version, fingerprint=KEYS.fingerprint(Sensitive(token(tok))), organization_id=org,
                        project_id=project, credential_id=cred, **kw)


def one(entries: list[VaultEntry], values: dict[str, Any] | None = None, records: list[LedgerRecord] | None = None,
        scope: Scope = FULL, **kw: Any) -> list[Any]:
    recs = {r.key: r for r in records or []}
    return plan(entries, values or {}, recs, scope, kw.pop("s", S), KEYS, NOW, **kw)


def cred(cid: str, path: str, version: int, tok: int, *, instance: str = "default", created: str = "2026-01-01T00:00:00Z",
         org_note: str = "") -> RemoteCredential:
    """A credential as CybeDefend lists it, carrying the marker the bridge would write."""
    m = KEYS.marker(instance, SecretRef("secret", f"dockerhub/{path}"), version, KEYS.fingerprint(Sensitive(token(tok))))
    return RemoteCredential(cid, "alice", f"{m.render()}{org_note}", created)


def listing(*creds: RemoteCredential, org: str = ORG, links: dict[str, frozenset[str]] | None = None,
            more: dict[str, list[RemoteCredential]] | None = None) -> RemoteView:
    return RemoteView(listings={org: list(creds), **(more or {})}, links=links or {})


def settle(intents: list[Any], entries: list[VaultEntry], records: list[LedgerRecord], view: RemoteView,
           s: Any = S) -> tuple[list[Any], set[tuple[str, str]]]:
    recs = {r.key: r for r in records}
    return reconcile(intents, entries, recs, view, FULL, s, KEYS)


def test_new_tagged_secret_is_created_after_reading_its_value() -> None:
    e = entry("a", tags=tagged(PROJECTS[0], description="team A"))
    assert needs_value(e, None, S, NOW)
    [a] = one([e], {e.ref.key: data(1)})
    assert a.kind == ActionKind.CREATE
    assert a.candidate.project_id == PROJECTS[0] and a.candidate.organization_id == ORG
    assert a.candidate.description == "team A" and a.candidate.username == "alice"
    assert a.candidate.fingerprint == KEYS.fingerprint(Sensitive(token(1)))


def test_untagged_secret_is_neither_read_nor_planned() -> None:
    e = entry("plain", tags={"owner": "x"})
    assert not needs_value(e, None, S, NOW)
    assert one([e]) == []


def test_unchanged_registered_secret_needs_no_value_and_is_skipped() -> None:
    e = entry("a", version=3, tags=tagged(PROJECTS[0]))
    r = record("a", version=3)
    assert not needs_value(e, r, S, NOW)
    [a] = one([e], records=[r])
    assert (a.kind, a.reason) == (ActionKind.SKIP, "up to date")


def test_new_version_with_the_same_token_is_a_metadata_only_refresh() -> None:
    e = entry("a", version=2, tags=tagged(PROJECTS[0]))
    r = record("a", version=1, tok=1)
    assert needs_value(e, r, S, NOW)
    [a] = one([e], {e.ref.key: data(1)}, [r])
    assert a.kind == ActionKind.REFRESH


def test_new_version_with_a_new_token_is_a_rotation_of_the_old_credential() -> None:
    e = entry("a", version=2, tags=tagged(PROJECTS[0]))
    [a] = one([e], {e.ref.key: data(2)}, [record("a", version=1, tok=1, cred="old")])
    assert a.kind == ActionKind.ROTATE and a.old_credential_id == "old" and a.old_organization_id == ORG


def test_project_change_is_a_move_even_without_a_new_version() -> None:
    e = entry("a", version=1, tags=tagged(PROJECTS[1]))
    r = record("a", version=1, project=PROJECTS[0])
    assert needs_value(e, r, S, NOW)
    [a] = one([e], {e.ref.key: data(1)}, [r])
    assert a.kind == ActionKind.MOVE and a.project_id == PROJECTS[1]


def test_organization_from_tag_overrides_defaults() -> None:
    e = entry("a", tags=tagged(PROJECTS[0], org=ORG2))
    [a] = one([e], {e.ref.key: data(1)})
    assert a.candidate.organization_id == ORG2


@pytest.mark.parametrize(
    ("e", "why"),
    [
        (entry("a", tags={"owner": "x"}), "no longer tagged"),
        (entry("a", tags=tagged(PROJECTS[0]), deleted=True), "deleted or destroyed"),
    ],
)
def test_untagged_or_deleted_registered_secret_is_retired(e: VaultEntry, why: str) -> None:
    [a] = one([e], records=[record("a", cred="c9")])
    assert a.kind == ActionKind.RETIRE and why in a.reason and a.old_credential_id == "c9"


def test_secret_gone_from_listing_is_retired_only_where_the_pass_looked() -> None:
    r = record("gone")
    [a] = one([], records=[r])
    assert a.kind == ActionKind.RETIRE
    assert one([], records=[r], scope=Scope()) == []  # the source's listing failed: no retirement
    assert one([], records=[r], scope=Scope(keys=frozenset({r.key})))[0].kind == ActionKind.RETIRE


def test_row_outside_every_configured_source_is_left_alone() -> None:
    r = LedgerRecord(key="other/x", mount="other", path="x", kv_version=2, state=State.REGISTERED, credential_id="c")
    assert one([], records=[r]) == []


@pytest.mark.parametrize(
    ("tags", "code"),
    [
        ({"cybedefend-project-id": "not-a-uuid"}, "invalid_project_id"),
        ({"cybedefend-project-id": PROJECTS[0], "cybedefend-organization-id": "nope"}, "invalid_organization_id"),
    ],
)
def test_bad_tags_are_rejected_without_reading_the_value(tags: dict[str, str], code: str) -> None:
    e = entry("a", tags=tags)
    assert not needs_value(e, None, S, NOW)
    [a] = one([e])
    assert (a.kind, a.reject_code) == (ActionKind.REJECT, code)


def test_missing_organization_everywhere_is_rejected() -> None:
    s = settings(cybedefend={"organization_id": None})
    [a] = one([entry("a", tags=tagged(PROJECTS[0]))], s=s)
    assert a.reject_code == "missing_organization_id"


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ({"dockerhubUsername": "u"}, "missing_token"),
        ({"accessToken": 42, "dockerhubUsername": "u"}, "token_not_string"),
        ({"accessToken": "hunter2hunter2", "dockerhubUsername": "u"}, "token_shape"),
        ({"accessToken": "dckr_pat_" + "a" * 2000, "dockerhubUsername": "u"}, "token_too_long"),
        ({"accessToken": token(1)}, "missing_username"),
        ({"accessToken": token(1), "dockerhubUsername": ["u"]}, "username_not_string"),
        ({"accessToken": token(1), "dockerhubUsername": "u" * 300}, "username_too_long"),
        ({"accessToken": token(1), "dockerhubUsername": "al\x00ice"}, "username_control_chars"),
        ({"accessToken": token(1), "dockerhubUsername": "al\u202eice"}, "username_control_chars"),
    ],
)
def test_bad_values_are_rejected_with_a_specific_code_and_no_value_in_the_reason(value: dict[str, Any], code: str) -> None:
    e = entry("a", tags=tagged(PROJECTS[0]))
    [a] = one([e], {e.ref.key: value})
    assert (a.kind, a.reject_code) == (ActionKind.REJECT, code)
    tok = value.get("accessToken")
    if isinstance(tok, str):
        assert tok not in a.reason and tok[:20] not in a.reason


def test_other_token_shapes_are_accepted_when_allowed() -> None:
    s = settings(sync={"allow_any_token_shape": True})
    e = entry("a", tags=tagged(PROJECTS[0]))
    [a] = one([e], {e.ref.key: {"accessToken": "ghp_abcdef123456", "dockerhubUsername": "u"}}, s=s)
    assert a.kind == ActionKind.CREATE


def test_per_source_key_names_are_honoured() -> None:
    s = settings(sources=[{"mount": "secret", "path": "dockerhub", "token_key": "token", "username_key": "username"}])
    e = entry("a", tags=tagged(PROJECTS[0]))
    [a] = one([e], {e.ref.key: {"token": token(1), "username": "bob"}}, s=s)
    assert a.kind == ActionKind.CREATE and a.candidate.username == "bob"


def test_description_is_cleaned_bounded_and_cannot_forge_a_marker() -> None:
    raw = "line1\nline2 [cybedefend-bridge:default:0123456789ab:v1]" + "x" * 500
    e = entry("a", tags=tagged(PROJECTS[0], description=raw))
    tags = read_tags(e, S.sources[0], S.tags, ORG, S.sync)
    assert isinstance(tags, Tags) and tags.description is not None
    assert "\n" not in tags.description and len(tags.description) <= S.sync.description_max_length
    assert Marker.parse(tags.description) is None


def test_same_token_twice_for_one_project_is_rejected_once() -> None:
    a1 = entry("a", tags=tagged(PROJECTS[0]))
    a2 = entry("b", tags=tagged(PROJECTS[0]))
    acts = one([a2, a1], {a1.ref.key: data(7), a2.ref.key: data(7)})
    assert [x.kind for x in acts] == [ActionKind.CREATE, ActionKind.REJECT]
    assert acts[1].reject_code == "duplicate_token" and "secret/dockerhub/a" in acts[1].reason


def test_copy_of_an_already_registered_token_is_the_one_rejected() -> None:
    new = entry("a-copy", tags=tagged(PROJECTS[0]))
    [a, skip] = one([new, entry("z", tags=tagged(PROJECTS[0]))], {new.ref.key: data(1)}, [record("z", tok=1)])
    assert a.reject_code == "duplicate_token" and skip.kind == ActionKind.SKIP


def test_rejection_of_a_value_stands_until_a_new_version() -> None:
    e = entry("a", version=4, tags=tagged(PROJECTS[0]))
    r = record("a", state=State.REJECTED, version=None, cred=None, last_result="token_shape", seen_version=4)
    assert not needs_value(e, r, S, NOW)
    [a] = one([e], records=[r])
    assert a.kind == ActionKind.REJECT
    assert needs_value(entry("a", version=5, tags=tagged(PROJECTS[0])), r, S, NOW)


def test_tag_rejections_are_rechecked_every_pass() -> None:
    r = record("a", state=State.REJECTED, version=None, cred=None, last_result="invalid_project_id")
    assert needs_value(entry("a", version=1, tags=tagged(PROJECTS[0])), r, S, NOW)


def test_failed_secret_waits_for_its_backoff_unless_a_write_triggered_it() -> None:
    r = record("a", state=State.FAILED, version=None, cred=None, next_attempt_at=NOW + 60, seen_version=1)
    e = entry("a", version=1, tags=tagged(PROJECTS[0]))
    assert not needs_value(e, r, S, NOW)
    assert needs_value(e, r, S, NOW + 61)
    assert needs_value(e, r, S, NOW, retry_now=True)
    [a] = one([e], records=[r])
    assert a.kind == ActionKind.SKIP and "backoff" in a.reason


def test_missing_credential_after_drift_is_created_again() -> None:
    e = entry("a", version=1, tags=tagged(PROJECTS[0]))
    [a] = one([e], {e.ref.key: data(1)}, [record("a", state=State.MISSING)])
    assert a.kind == ActionKind.CREATE and "drift" in a.reason


def test_kv1_secret_rotates_on_a_new_fingerprint() -> None:
    tags = {**tagged(PROJECTS[0]), **data(2)}
    e = entry("v1", version=None, tags=tags, payload=tags)
    r = record("v1", version=None, tok=1)
    assert not needs_value(e, r, S, NOW)  # the value came with discovery
    [a] = one([e], records=[r])
    assert a.kind == ActionKind.ROTATE and a.candidate.version is None


def test_deletions_are_counted_only_under_the_delete_policy() -> None:
    recs = [record(f"g{i}", cred=f"c{i}") for i in range(3)]
    view = listing(*(cred(f"c{i}", f"g{i}", 1, 1) for i in range(3)))
    for policy, want in (("retain", 0), ("delete", 3)):
        s = settings(sync={"deletion_policy": policy})
        acts, _ = settle(one([], records=recs, s=s), [], recs, view, s)
        assert count_deletions(acts, s) == want


def test_source_of_prefers_the_longest_prefix() -> None:
    s = settings(sources=[{"mount": "secret", "path": "dockerhub"}, {"mount": "secret", "path": "dockerhub/team"}])
    assert source_of("secret/dockerhub/team/x", s.sources) == 1
    assert source_of("secret/dockerhub/x", s.sources) == 0
    assert source_of("secret/dockerhubx/y", s.sources) is None


def test_fingerprints_are_keyed_and_markers_round_trip() -> None:
    ref = SecretRef("secret", "dockerhub/a")
    other = Keyring(b"z" * 32)
    assert KEYS.fingerprint(Sensitive("t")) != other.fingerprint(Sensitive("t"))
    m = KEYS.marker("default", ref, 12, "ab" * 32)
    text = f"ops team {m.render()}"
    assert Marker.parse(text) == m and m.revision == "v12.abababab" and len(m.path_digest) == 12
    assert "dockerhub" not in m.render()
    assert KEYS.marker("default", ref, None, "ab" * 32).revision == "fabababab"
    assert repr(KEYS) == "Keyring(***)"


def test_validation_of_payload_accepts_organisation_tokens() -> None:
    p = read_payload({"accessToken": "dckr_oat_" + "A" * 20, "dockerhubUsername": "org"}, S.sources[0], S.sync)
    assert isinstance(p, Payload)
    assert p.username == "org" and p.token.reveal().startswith("dckr_oat_")


# -- reconcile: decided from what CybeDefend holds now -------------------------------------------
DELETE = settings(sync={"deletion_policy": "delete"})


def test_a_credential_carrying_the_current_token_is_never_deleted_whatever_the_ledger_says() -> None:
    """Scenario 1 in pure form: a stale ledger names C1; CybeDefend holds C2 for the same token."""
    e = entry("a", tags=tagged(PROJECTS[0]))
    stale = record("a", cred="C1")
    view = listing(cred("C2", "a", 1, 1))
    believed = with_evidence({stale.key: stale}, view)
    assert believed[stale.key].state == State.MISSING  # C1 is not in the listing: drift
    intents = plan([e], {e.ref.key: data(1)}, believed, FULL, DELETE, KEYS, NOW)
    acts, need = reconcile(intents, [e], believed, view, FULL, DELETE, KEYS)
    assert need == {(ORG, "C2")}
    acts, _ = reconcile(intents, [e], believed, replace_links(view, {"C2": frozenset({PROJECTS[0]})}), FULL, DELETE, KEYS)
    [a] = acts
    assert a.kind == ActionKind.ADOPT and a.credential_id == "C2" and a.deletes == () and a.links is None
    assert not a.writes


def replace_links(view: RemoteView, links: dict[str, frozenset[str]]) -> RemoteView:
    return RemoteView(listings=view.listings, unlisted=view.unlisted, links=links)


def test_a_second_credential_for_the_same_token_is_deleted_under_either_policy() -> None:
    e = entry("a", tags=tagged(PROJECTS[0]))
    rec = record("a", cred="C1")
    view = listing(cred("C1", "a", 1, 1, created="2026-01-01T00:00:00Z"), cred("C9", "a", 1, 1, created="2026-01-02T00:00:00Z"))
    for s in (S, DELETE):
        [a], _ = settle(one([e], records=[rec], s=s), [e], [rec], view, s)
        assert a.kind == ActionKind.DELETE and a.credential_id == "C1"
        assert a.deletes == (Doomed("C9", ORG, "duplicate"),) and a.writes


def test_retire_deletes_what_the_listing_shows_by_marker_never_what_only_the_ledger_names() -> None:
    gone = entry("a", tags={})  # untagged now
    rec = record("a", cred="C-ledger-only")
    view = listing(cred("C7", "a", 1, 1), cred("C8", "a", 2, 2))
    [a], _ = settle(one([gone], records=[rec], s=DELETE), [gone], [rec], view, DELETE)
    assert a.kind == ActionKind.RETIRE
    assert {d.credential_id for d in a.deletes} == {"C7", "C8"}  # C-ledger-only is not in CybeDefend
    [kept], _ = settle(one([gone], records=[rec]), [gone], [rec], view)
    assert kept.deletes == () and set(kept.keeps) >= {"C7", "C8"}


def test_a_retire_whose_organization_could_not_be_listed_is_blocked_not_guessed() -> None:
    gone = entry("a", tags={})
    rec = record("a", cred="C1")
    view = RemoteView(unlisted={ORG: "503 from CybeDefend"})
    [a], _ = settle(one([gone], records=[rec], s=DELETE), [gone], [rec], view, DELETE)
    assert a.blocked is not None and "503" in a.blocked and a.deletes == () and not a.writes


def test_a_create_is_never_sent_blind() -> None:
    e = entry("a", tags=tagged(PROJECTS[0]))
    view = RemoteView(unlisted={ORG: "timeout"})
    [a], _ = settle(one([e], {e.ref.key: data(1)}), [e], [], view)
    assert a.kind == ActionKind.CREATE and a.blocked is not None and not a.writes


def test_a_lost_ledger_adopts_instead_of_creating() -> None:
    e = entry("a", tags=tagged(PROJECTS[0]))
    view = listing(cred("C1", "a", 1, 1), links={"C1": frozenset({PROJECTS[0]})})
    [a], _ = settle(one([e], {e.ref.key: data(1)}), [e], [], view)
    assert a.kind == ActionKind.ADOPT and a.credential_id == "C1" and not a.writes


def test_a_rotation_names_the_credential_it_replaces_and_keeps_every_link() -> None:
    e = entry("a", version=2, tags=tagged(PROJECTS[0]))
    rec = record("a", cred="C1")
    view = listing(cred("C1", "a", 1, 1), links={"C1": frozenset({PROJECTS[0], PROJECTS[2]})})
    [a], _ = settle(one([e], {e.ref.key: data(2)}, records=[rec]), [e], [rec], view)
    assert a.kind == ActionKind.ROTATE and a.credential_id is None
    assert a.deletes == (Doomed("C1", ORG, "superseded"),)
    assert a.links == tuple(sorted({PROJECTS[0], PROJECTS[2]}))


@pytest.mark.parametrize(("policy", "old_kept"), [("delete", False), ("retain", True)])
def test_a_move_within_the_organization_relinks_and_keeps_hand_made_links(policy: str, old_kept: bool) -> None:
    """Scenario 6 in pure form: P0 -> P1, an operator had linked P2 by hand."""
    s = settings(sync={"deletion_policy": policy})
    e = entry("a", tags=tagged(PROJECTS[1]))
    rec = record("a", cred="C1", project=PROJECTS[0])
    view = listing(cred("C1", "a", 1, 1), links={"C1": frozenset({PROJECTS[0], PROJECTS[2]})})
    [a], _ = settle(one([e], {e.ref.key: data(1)}, records=[rec], s=s), [e], [rec], view, s)
    assert a.kind == ActionKind.MOVE and a.credential_id == "C1" and a.deletes == ()
    want = {PROJECTS[1], PROJECTS[2]} | ({PROJECTS[0]} if old_kept else set())
    assert a.links == tuple(sorted(want))


def test_a_move_to_another_organization_creates_there_and_retires_the_old_by_policy() -> None:
    e = entry("a", tags=tagged(PROJECTS[0], org=ORG2))
    rec = record("a", cred="C1")
    view = listing(cred("C1", "a", 1, 1), more={ORG2: []})
    [a], _ = settle(one([e], {e.ref.key: data(1)}, records=[rec], s=DELETE), [e], [rec], view, DELETE)
    assert a.kind == ActionKind.MOVE and a.credential_id is None and a.organization_id == ORG2
    assert a.deletes == (Doomed("C1", ORG, "moved"),)
    [b], _ = settle(one([e], {e.ref.key: data(1)}, records=[rec]), [e], [rec], view)
    assert b.deletes == () and b.keeps == ("C1",)


def test_credentials_of_unknown_secrets_and_other_instances_are_left_alone() -> None:
    e = entry("a", tags=tagged(PROJECTS[0]))
    rec = record("a", cred="C1")
    view = listing(cred("C1", "a", 1, 1), cred("X1", "never-seen", 1, 5), cred("X2", "a", 1, 9, instance="other"),
                   RemoteCredential("X3", "bob", "made by hand", None))
    acts, _ = settle(one([e], records=[rec], s=DELETE), [e], [rec], view, DELETE)
    assert all(d.credential_id.startswith("C") for a in acts for d in a.deletes)
    assert [a.kind for a in acts] == [ActionKind.SKIP]


def test_a_secret_deleted_from_a_fully_listed_source_loses_its_credential_only_under_delete() -> None:
    rec = record("gone", cred="C1")
    view = listing(cred("C1", "gone", 1, 1))
    [a], _ = settle(one([], records=[rec], s=DELETE), [], [rec], view, DELETE)
    assert a.kind == ActionKind.RETIRE and a.deletes == (Doomed("C1", ORG, "retired"),)
    # Not looked at (the source's discovery failed): no scope, no judgement, no deletion.
    acts = plan([], {}, {rec.key: rec}, Scope(), DELETE, KEYS, NOW)
    settled, _ = reconcile(acts, [], {rec.key: rec}, view, Scope(), DELETE, KEYS)
    assert settled == []


def test_the_guard_rail_pauses_retiring_deletions_and_says_so() -> None:
    s = settings(sync={"deletion_policy": "delete", "max_deletes_per_pass": 2})
    recs = [record(f"g{i}", cred=f"c{i}") for i in range(3)]
    view = listing(*(cred(f"c{i}", f"g{i}", 1, 1) for i in range(3)))
    acts, _ = settle(one([], records=recs, s=s), [], recs, view, s)
    assert len(acts) == 3 and all(a.paused and not a.writes for a in acts)


# ---- the pipeline's pieces (ADR 11): one secret at a time gives the whole plan ------------------


def test_planning_refuses_entries_out_of_key_order() -> None:
    """`Planning` keeps the keys it was fed as a sorted list (memory: ADR 12), so out-of-order
    input is refused loudly rather than misread; the same key twice is decided once."""
    from bridge.planner import Planning

    planning = Planning({}, FULL, S, KEYS, NOW)
    here = tagged(PROJECTS[0])
    assert planning.decide(entry("b", tags=here), data(1)) is not None
    assert planning.decide(entry("b", tags=here), data(1)) is None
    with pytest.raises(ValueError, match="ascending key order"):
        planning.decide(entry("a", tags=here), data(2))


def test_with_evidence_without_listings_is_the_ledger_itself() -> None:
    recs = {r.key: r for r in [record("a"), record("b")]}
    assert with_evidence(recs, RemoteView()) is recs  # no copy of every row in a steady pass


def test_planning_one_secret_at_a_time_is_plan_and_settle_is_reconcile() -> None:
    from bridge.planner import Planning, may_write_to, owned_credentials, writing_organizations
    from bridge.planner import settle as settle_one

    here, other = tagged(PROJECTS[0]), tagged(PROJECTS[1], org=ORG2)
    entries = [
        entry("new", tags=here), entry("twin", tags=here),  # the same token twice for one project: one is rejected
        entry("rot", version=2, tags=here), entry("same", version=1, tags=here), entry("moved", version=1, tags=other),
        entry("adopt", tags=here), entry("bad", tags=here), entry("new", version=1, tags=here),  # a duplicate: decided once
    ]
    values = {"secret/dockerhub/new": data(1), "secret/dockerhub/twin": data(1), "secret/dockerhub/rot": data(3),
              "secret/dockerhub/moved": data(4), "secret/dockerhub/adopt": data(5), "secret/dockerhub/bad": {"x": 1}}
    records = [record("rot", tok=2, cred="c-rot"), record("same", tok=9, cred="c-same"),
               record("moved", tok=4, cred="c-moved"), record("gone", tok=6, cred="c-gone")]
    recs = {r.key: r for r in records}
    whole = plan(entries, values, recs, FULL, S, KEYS, NOW)
    planning = Planning(recs, FULL, S, KEYS, NOW)
    stepwise = [a for e in sorted(entries, key=lambda e: e.ref.key)
                if (a := planning.decide(e, values.get(e.ref.key))) is not None] + planning.rest()
    assert stepwise == whole
    kinds = {a.ref.path.rsplit("/", 1)[1]: a.kind for a in whole}
    assert kinds["twin"] == ActionKind.REJECT and kinds["rot"] == ActionKind.ROTATE and kinds["gone"] == ActionKind.RETIRE
    # may_write_to, known before the value, covers every organization the intent writes to
    for a in whole:
        e = next((x for x in entries if x.ref.key == a.ref.key), None)
        if e is not None:
            assert writing_organizations([a]) <= may_write_to(e, recs.get(e.ref.key), S), a
    # settle, one action at a time, is what reconcile makes of it in the same (complete) view
    view = listing(cred("c-rot", "rot", 1, 2), cred("c-same", "same", 1, 9), cred("c-moved", "moved", 1, 4),
                   cred("c-adopt", "adopt", 1, 5), cred("c-gone", "gone", 1, 6),
                   more={ORG2: []}, links={"c-rot": frozenset({PROJECTS[0]}), "c-moved": frozenset({PROJECTS[0]}),
                                                   "c-adopt": frozenset({PROJECTS[0]})})
    final, need = reconcile(whole, entries, recs, view, FULL, S, KEYS)
    assert not need
    owned = owned_credentials(view.listings, S.sync.instance)
    by_key = {a.ref.key: a for a in final}
    for a in whole:
        one_at_a_time, needed = settle_one(a, recs.get(a.ref.key), owned, view, S, KEYS)
        assert not needed and one_at_a_time == by_key[a.ref.key], a.ref.key
    assert by_key["secret/dockerhub/adopt"].kind == ActionKind.ADOPT


def test_a_targeted_plan_needs_only_its_rows_and_those_holding_its_tokens() -> None:
    """What lets a targeted pass read O(k) ledger rows (`Ledger.some` + `Ledger.holding`) instead
    of `all()`: for every targeted scope, planning and reconciling over the rows of the scope's
    keys plus the rows holding one of its tokens gives exactly the actions of the whole ledger."""
    from bridge.planner import fingerprints

    here, other = tagged(PROJECTS[0]), tagged(PROJECTS[1], org=ORG2)
    entries = [
        entry("new", tags=here), entry("copy", tags=here), entry("rot", version=2, tags=here),
        entry("same", version=1, tags=here), entry("moved", version=1, tags=other), entry("adopt", tags=here),
        entry("bad", tags=here), entry("untagged", version=3), entry("elsewhere", tags=other),
    ]
    values = {"secret/dockerhub/new": data(1), "secret/dockerhub/copy": data(7), "secret/dockerhub/rot": data(3),
              "secret/dockerhub/moved": data(4), "secret/dockerhub/adopt": data(5), "secret/dockerhub/bad": {"x": 1},
              "secret/dockerhub/elsewhere": data(7)}
    records = [
        record("rot", tok=2, cred="c-rot"), record("same", tok=9, cred="c-same"), record("moved", tok=4, cred="c-moved"),
        record("gone", tok=6, cred="c-gone"), record("untagged", version=3, tok=8, cred="c-untagged"),
        record("holder", tok=7, cred="c-holder"),  # registered with the token "copy" now holds: copy is a duplicate
        record("failed-twin", tok=1, state=State.FAILED, cred=None),  # same token as "new", but no claim
        record("vanished-twin", tok=3, cred="c-vanished"),  # holds rot's new token; its credential is gone (drift)
        record("unrelated", tok=11, cred="c-unrelated"),
    ]
    recs = {r.key: r for r in records}
    view = listing(cred("c-rot", "rot", 1, 2), cred("c-same", "same", 1, 9), cred("c-moved", "moved", 1, 4),
                   cred("c-adopt", "adopt", 1, 5), cred("c-gone", "gone", 1, 6), cred("c-holder", "holder", 1, 7),
                   cred("c-untagged", "untagged", 1, 8), cred("c-unrelated", "unrelated", 1, 11),
                   more={ORG2: []}, links={"c-rot": frozenset({PROJECTS[0]}), "c-moved": frozenset({PROJECTS[0]}),
                                           "c-adopt": frozenset({PROJECTS[0]})})
    delete = settings(sync={"deletion_policy": "delete"})
    keys = sorted({e.ref.key for e in entries} | set(recs))
    scopes = [frozenset({k}) for k in keys] + [frozenset({a, b}) for a, b in itertools.pairwise(keys)]
    judged = 0
    for s in (S, delete):
        for paths in scopes:
            scope = Scope(keys=paths)
            mine = [e for e in entries if e.ref.key in paths]
            held = set(fingerprints(mine, values, s, KEYS).values())
            subset = {k: r for k, r in recs.items() if k in paths or r.fingerprint in held}
            for rows in (recs, subset):
                assert with_evidence(rows, view).keys() == rows.keys()
            whole = plan(mine, values, with_evidence(recs, view), scope, s, KEYS, NOW, retry_now=paths)
            part = plan(mine, values, with_evidence(subset, view), scope, s, KEYS, NOW, retry_now=paths)
            assert part == whole, sorted(paths)
            final = reconcile(whole, mine, with_evidence(recs, view), view, scope, s, KEYS)
            # What the engine hands over: the owned map of the whole listing, or (a targeted
            # pass) only the scope's own secrets' credentials.
            refs = {e.ref.key: e.ref for e in mine} | {k: r.ref for k, r in recs.items() if k in paths}
            only = {KEYS.path_digest(ref) for ref in refs.values()}
            for owned in (owned_credentials_of(view, s), owned_credentials_of(view, s, only)):
                assert reconcile(part, mine, with_evidence(subset, view), view, scope, s, KEYS, owned=owned) == final
            judged += len(whole)
    # the fixture exercises what the subset must get right
    kinds = {a.ref.key.rsplit("/", 1)[1]: a for a in plan(entries, values, with_evidence(recs, view), FULL, S, KEYS, NOW)}
    assert kinds["copy"].kind == ActionKind.REJECT and kinds["copy"].reject_code == "duplicate_token"
    assert kinds["new"].kind == ActionKind.CREATE and kinds["rot"].kind == ActionKind.ROTATE
    assert judged > len(scopes)


def owned_credentials_of(view: RemoteView, s: Any, only: set[str] | None = None) -> Any:
    from bridge.planner import owned_credentials

    return owned_credentials(view.listings, s.sync.instance, only)


def test_owned_credentials_restricted_to_digests_is_the_whole_map_cut_down() -> None:
    """The substring prefilter of `owned_credentials(..., only=)` drops nothing it should keep,
    with few digests (prefiltered) and many (parsed, then filtered)."""
    from bridge.planner import owned_credentials

    creds = [cred(f"c{i}", f"p{i % 40}", 1 + i // 40, i) for i in range(120)]
    creds += [cred("other", "p1", 1, 1, instance="other"), RemoteCredential("hand", "bob", "made by hand", None)]
    whole = owned_credentials({ORG: creds}, S.sync.instance)
    assert len(whole) == 40 and "other" not in {c.id for by in whole.values() for c, _ in by[ORG]}
    digests = sorted(whole)
    for only in (set(digests[:1]), set(digests[:5]), set(digests[:30]), set(digests), {"0" * 12}):
        got = owned_credentials({ORG: creds}, S.sync.instance, only)
        assert got == {d: whole[d] for d in only if d in whole}, len(only)
