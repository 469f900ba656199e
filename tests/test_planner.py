"""The pure planner, validation, fingerprints and markers."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.keyring import Keyring
from bridge.model import ActionKind, Marker, SecretRef, Sensitive, State, VaultEntry
from bridge.planner import Scope, count_deletions, needs_value, plan, source_of
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
    acts = one([], records=[record(f"g{i}", cred=f"c{i}") for i in range(3)])
    assert count_deletions(acts, S) == 0
    assert count_deletions(acts, settings(sync={"deletion_policy": "delete"})) == 3


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
