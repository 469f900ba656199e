"""The one invariant every chaos scenario ends with, as a pure function.

`check_invariant` knows nothing about OpenBao, the double or the fakes: the real rig
(`tests/chaos/rig.py`) and the property tests on in-memory fakes (`test_properties.py`) each
gather what CybeDefend holds (`Cred`), what Vault says each secret should be (`Want`) and the
ledger rows, then call it. It asserts:

1. each tagged, valid secret (LIVE) has exactly one credential carrying its marker at its
   latest version, holding exactly Vault's latest token, linked to its project, named by its
   ledger row; under `delete` no other credential carries its marker; under `retain` only what
   a move left in a project it no longer names;
2. each untagged/deleted secret (GONE) is handled by the policy: `delete` leaves no credential
   with its marker; the ledger row (if any) is orphaned or retired;
3. each tagged-but-invalid secret (REJECTED) has no credential, and the ledger row says
   rejected with the expected code; a non-candidate (SKIPPED) has neither credential nor ledger
   row; a secret CybeDefend refuses (FAILED, e.g. 403) has no credential and a failed row;
4. no marker revision is held twice within a project (no duplicate), no credential carries our
   instance's marker for a secret nobody knows;
5. the hand-made credentials (no marker, someone else's marker, a forged one) are unchanged;
6. no secret appears in any of the texts given, as is, base64 or URL-encoded.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.model import Marker, State
from tests.support.data import PROJECTS, assert_no_leak


class Expect(enum.Enum):
    LIVE = "live"  # tagged and valid: registered exactly once, latest version
    GONE = "gone"  # untagged, deleted or destroyed: handled by the deletion policy
    REJECTED = "rejected"  # tagged but invalid: never registered
    SKIPPED = "skipped"  # not a candidate (untagged, outside the source): never touched, never tracked
    FAILED = "failed"  # valid, but CybeDefend refuses it (403): not registered, the ledger says failed


@dataclass(frozen=True)
class Cred:
    """One credential as CybeDefend (or a fake of it) holds it. `token` stays in test memory."""

    id: str
    description: str | None
    username: str
    links: frozenset[str]
    token: str = ""

    def __repr__(self) -> str:  # never print the token, even in a failing assertion
        return f"Cred({self.id[:8]}, {self.description!r}, links={_idx(self.links)})"


@dataclass(frozen=True)
class Want:
    """What Vault says about one secret: expectation, marker digest, project, latest version and token."""

    key: str  # mount/path, the ledger key
    digest: str
    expect: Expect
    project: str | None = None
    version: int | None = None
    token: str | None = None
    reject_code: str | None = None


def _idx(links: Iterable[str]) -> list[Any]:
    return sorted((PROJECTS.index(p) if p in PROJECTS else p for p in links), key=str)


def snapshot(creds: Iterable[Cred]) -> dict[str, Cred]:
    return {c.id: c for c in creds}


def check_no_duplicates(creds: Sequence[Cred], instance: str, foreign: Mapping[str, Cred], context: str) -> None:
    """No marker revision held twice within a project (a move holds it in two projects for a moment)."""
    held: dict[tuple[str, str], list[frozenset[str]]] = {}
    for c in creds:
        m = Marker.parse(c.description)
        if m is not None and m.instance == instance and c.id not in foreign:
            held.setdefault((m.path_digest, m.revision), []).append(c.links)
    dups = {
        k: [_idx(links) for links in v]
        for k, v in held.items()
        if len(v) > 1 and any(a & b for i, a in enumerate(v) for b in v[i + 1 :])
    }
    assert not dups, f"{context}: duplicated credentials (project indexes) {dups}"
    now = {c.id: c for c in creds if c.id in foreign}
    for cid, before in foreign.items():
        after = now.get(cid)
        assert after is not None, f"{context}: hand-made credential {cid[:8]} was deleted"
        assert (after.description, after.username, after.links, after.token) == (
            before.description, before.username, before.links, before.token
        ), f"{context}: hand-made credential {cid[:8]} was changed"


def check_invariant(
    creds: Sequence[Cred],
    wants: Iterable[Want],
    *,
    instance: str,
    policy: str,
    ledger: Mapping[str, Any] | None,
    foreign: Mapping[str, Cred],
    texts: Iterable[str] = (),
    secrets: Iterable[str] = (),
    context: str = "invariant",
    pending: Sequence[str] = (),
) -> None:
    """Assert the invariant (see the module docstring). `pending`: pending-delete facts, for messages."""
    ctx = context
    check_no_duplicates(creds, instance, foreign, ctx)
    by_digest: dict[str, list[tuple[Cred, Marker]]] = {}
    for c in creds:
        m = Marker.parse(c.description)
        if m is not None and m.instance == instance and c.id not in foreign:
            by_digest.setdefault(m.path_digest, []).append((c, m))
    wants = list(wants)
    known = {w.digest for w in wants}
    strays = [d for d in by_digest if d not in known]
    assert not strays, f"{ctx}: {len(strays)} credentials carry our marker for no known secret"
    for w in sorted(wants, key=lambda w: w.key):
        held = by_digest.get(w.digest, [])
        row = ledger.get(w.key) if ledger is not None else None

        def explain(w: Want = w, held: list[tuple[Cred, Marker]] = held, row: Any = row) -> str:
            facts = None if row is None else (row.state, row.version, row.seen_version, row.credential_id and row.credential_id[:8],
                                             _idx([row.project_id or ""]), row.last_action, row.reason)
            return f"; credentials={[(c.id[:8], m.revision, _idx(c.links)) for c, m in held]} ledger={facts} pending={list(pending)}"

        if w.expect is Expect.LIVE:
            current = [c for c, m in held if m.revision.startswith(f"v{w.version}.")]
            if policy == "retain":  # a move keeps the old project's credential (same revision) by policy
                current = [c for c in current if w.project in c.links]
            assert len(current) == 1, f"{ctx}: {w.key} v{w.version} is registered {len(current)} times" + explain()
            cred = current[0]
            assert cred.token == w.token, f"{ctx}: {w.key}: the registered token is not Vault's latest" + explain()
            assert w.project in cred.links, f"{ctx}: {w.key}: not linked to its project" + explain()
            others = [c for c, _ in held if c.id != cred.id]
            if policy == "delete":
                assert not others, f"{ctx}: {w.key}: {len(others)} stale credentials left" + explain()
            else:
                assert all(w.project not in c.links for c in others), f"{ctx}: {w.key}: a stale credential in its project" + explain()
            if ledger is not None:
                assert row is not None and row.state == State.REGISTERED and row.credential_id == cred.id, \
                    f"{ctx}: {w.key}: the ledger does not name the live credential" + explain()
        elif w.expect is Expect.GONE:
            if policy == "delete":
                assert not held, f"{ctx}: {w.key} is gone from Vault but {len(held)} credentials remain" + explain()
            if row is not None:
                assert row.state in (State.ORPHANED, State.RETIRED), f"{ctx}: {w.key}: ledger state {row.state} for a gone secret"
        elif w.expect is Expect.SKIPPED:
            assert not held, f"{ctx}: {w.key} is not a candidate but was registered" + explain()
            assert row is None, f"{ctx}: {w.key} is not a candidate but the ledger tracks it ({row.state})"
        elif w.expect is Expect.FAILED:
            assert not held, f"{ctx}: {w.key} was refused by CybeDefend but is registered" + explain()
            if ledger is not None:
                assert row is not None and row.state == State.FAILED, f"{ctx}: {w.key}: expected failed" + explain()
        else:
            assert not held, f"{ctx}: rejected secret {w.key} was registered" + explain()
            if ledger is not None and w.reject_code is not None:
                assert row is not None and row.state == State.REJECTED and row.last_result == w.reject_code, \
                    f"{ctx}: {w.key}: expected rejected/{w.reject_code}" + explain()
    texts = list(texts)
    if texts:
        assert_no_leak(texts, secrets)
