"""Pure planning: (what Vault has, what the ledger believes) -> one action per secret.

No I/O here, so `plan` is exactly what the dry run prints, and the property tests can run it
against any sequence of Vault states. Planning happens in two steps because values are read
only when needed: `needs_value` says which secrets' values to read (KV v2 versions new to the
ledger, retries, moves), then `plan` decides with those values in hand.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bridge.config import Settings, SourceSettings
from bridge.keyring import Keyring
from bridge.model import Action, ActionKind, Candidate, State, VaultEntry
from bridge.ports import LedgerRecord
from bridge.validation import Rejection, Tags, is_tagged, read_payload, read_tags

# Rejections decided from tags alone: tags can change without a new KV version, so these are
# re-checked every pass; rejections of a value stand until the version changes.
TAG_REJECT_CODES = frozenset(
    {"invalid_project_id", "invalid_organization_id", "missing_organization_id", "invalid_description"}
)
# ...and a duplicate stops being one when its twin is deleted or rotated away, also without a
# new version of this secret: re-examined every pass too (one value read each).
RECHECKED_REJECT_CODES = TAG_REJECT_CODES | {"duplicate_token"}
# CybeDefend refused the create (400): re-examined after a backoff, or at once when a write
# to the secret (its tags, say) triggers a targeted sync.
REMOTE_REJECT_CODE = "remote_rejected"
_GONE_STATES = frozenset({State.RETIRED, State.ORPHANED})


@dataclass(frozen=True, slots=True)
class Scope:
    """What a pass looked at, so that absence means deletion only where we actually looked.

    `sources` are the indexes of sources whose discovery completed (full pass); `keys` are the
    secrets a targeted pass was asked about. A source whose listing failed is in neither, and
    none of its ledger rows is retired because of that failure.
    """

    sources: frozenset[int] = frozenset()
    keys: frozenset[str] = frozenset()


def source_of(key: str, sources: Sequence[SourceSettings]) -> int | None:
    """The index of the configured source a `mount/path` key belongs to (longest prefix wins)."""
    best: tuple[int, int] | None = None
    for i, src in enumerate(sources):
        prefix = f"{src.mount}/{src.path}".rstrip("/") + "/"
        if key.startswith(prefix) and (best is None or len(prefix) > best[1]):
            best = (i, len(prefix))
    return None if best is None else best[0]


def _tags(entry: VaultEntry, settings: Settings) -> Tags | Rejection:
    src = settings.sources[entry.source_index]
    return read_tags(entry, src, settings.tags, settings.cybedefend.organization_id, settings.sync)


def _seen_same(entry: VaultEntry, record: LedgerRecord) -> bool:
    """The ledger already evaluated this very version (number and, where known, creation time)."""
    if record.seen_version != entry.version:
        return False
    return entry.stamp is None or record.seen_stamp is None or record.seen_stamp == entry.stamp


def _waiting(entry: VaultEntry, record: LedgerRecord | None, now: float, retry_now: bool) -> bool:
    """A failed secret whose backoff has not elapsed, and nothing new to try."""
    return (
        not retry_now
        and record is not None
        and record.state in (State.PENDING, State.FAILED)
        and _seen_same(entry, record)
        and record.next_attempt_at is not None
        and now < record.next_attempt_at
    )


def needs_value(
    entry: VaultEntry, record: LedgerRecord | None, settings: Settings, now: float, *, retry_now: bool = False
) -> bool:
    """Whether the secret's value must be read to decide (KV v1 values come with discovery).

    `retry_now` skips a pending backoff: a targeted sync follows a fresh write, which may be the fix.
    """
    if entry.payload is not None or entry.deleted or not is_tagged(entry, settings.tags):
        return False
    return _needs_value(entry, record, _tags(entry, settings), now, retry_now)


def _needs_value(entry: VaultEntry, record: LedgerRecord | None, tags: Tags | Rejection, now: float, retry_now: bool) -> bool:
    if entry.payload is not None or entry.deleted or isinstance(tags, Rejection):
        return False
    if record is None or record.state in (State.MISSING, *_GONE_STATES):
        return True
    seen_same = _seen_same(entry, record)
    if record.state in (State.PENDING, State.FAILED):
        return not _waiting(entry, record, now, retry_now)
    if record.state == State.REJECTED:
        if record.last_result in RECHECKED_REJECT_CODES or not seen_same or retry_now:
            return True
        if record.last_result == REMOTE_REJECT_CODE:
            retry_due = record.next_attempt_at is None or now >= record.next_attempt_at
            return retry_due or record.tags_digest != tags.digest
        return False
    # registered: a new version, or a new place for the same one
    return record.version != entry.version or not seen_same or (tags.project_id, tags.organization_id) != (
        record.project_id,
        record.organization_id,
    )


def values_to_read(
    entries: Iterable[VaultEntry],
    records: Mapping[str, LedgerRecord],
    settings: Settings,
    now: float,
    retry_now: Collection[str] = (),
) -> list[VaultEntry]:
    return [e for e in entries if needs_value(e, records.get(e.ref.key), settings, now, retry_now=e.ref.key in retry_now)]


def _retire(record: LedgerRecord, reason: str) -> Action:
    return Action(
        ActionKind.RETIRE,
        record.ref,
        reason,
        version=record.version,
        organization_id=record.organization_id,
        project_id=record.project_id,
        old_credential_id=record.credential_id,
        old_organization_id=record.organization_id,
    )


def _decide(
    entry: VaultEntry,
    record: LedgerRecord | None,
    payload: Mapping[str, Any] | None,
    settings: Settings,
    keyring: Keyring,
    now: float,
    claimed: dict[tuple[str, str, str], str],
    retry_now: bool,
) -> Action | None:
    ref = entry.ref
    if entry.deleted or not is_tagged(entry, settings.tags):
        if record is None or record.state in _GONE_STATES:
            return None  # never ours, or already handled: untagged secrets are not even listed in a plan
        why = (
            "the current version is deleted or destroyed"
            if entry.deleted
            else "the secret is no longer tagged"
        )
        return _retire(record, why)
    tags = _tags(entry, settings)
    if isinstance(tags, Rejection):
        return Action(ActionKind.REJECT, ref, tags.reason, version=entry.version, reject_code=tags.code)

    def act(
        kind: ActionKind,
        reason: str,
        cand: Candidate | None = None,
        old: LedgerRecord | None = None,
        code: str | None = None,
    ) -> Action:
        return Action(
            kind,
            ref,
            reason,
            candidate=cand,
            version=entry.version,
            organization_id=tags.organization_id,
            project_id=tags.project_id,
            old_credential_id=old.credential_id if old else None,
            old_organization_id=old.organization_id if old else None,
            reject_code=code,
            tags_digest=tags.digest,
            stamp=entry.stamp,
        )

    if _waiting(entry, record, now, retry_now):  # KV v1 too, whose value always comes with discovery
        return act(ActionKind.SKIP, "waiting before the next attempt (backoff)")
    if not _needs_value(entry, record, tags, now, retry_now) and entry.payload is None:
        assert record is not None  # needs_value is True for every unknown secret
        if record.state == State.REJECTED:
            return act(ActionKind.REJECT, record.reason or "rejected", code=record.last_result)
        if record.state in (State.PENDING, State.FAILED):
            return act(ActionKind.SKIP, "waiting before the next attempt (backoff)")
        return act(ActionKind.SKIP, "up to date")
    data = entry.payload if entry.payload is not None else payload
    if data is None:
        return act(ActionKind.SKIP, "the value could not be read this pass")
    src = settings.sources[entry.source_index]
    parsed = read_payload(data, src, settings.sync)
    if isinstance(parsed, Rejection):
        return act(ActionKind.REJECT, parsed.reason, code=parsed.code)
    fp = keyring.fingerprint(parsed.token)
    twin = claimed.get((fp, tags.organization_id, tags.project_id))
    if twin is not None and twin != ref.key:
        return Action(
            ActionKind.REJECT,
            ref,
            f"the same token is already registered for this project from {twin}",
            version=entry.version,
            reject_code="duplicate_token",
        )
    claimed[(fp, tags.organization_id, tags.project_id)] = ref.key
    cand = Candidate(
        ref,
        entry.version,
        tags.organization_id,
        tags.project_id,
        parsed.username,
        parsed.token,
        fp,
        tags.description,
        entry.stamp,
    )
    has_cred = record is not None and record.credential_id is not None and record.state != State.MISSING
    if record is None or not has_cred:
        reason = "new tagged secret"
        if record is not None and record.state == State.MISSING:
            reason = "the credential disappeared from CybeDefend (drift): registering again"
        elif record is not None and record.state in _GONE_STATES:
            reason = "tagged again"
        elif record is not None and record.state in (State.FAILED, State.PENDING):
            reason = f"retrying ({record.reason or 'earlier attempt failed'})"
        return act(ActionKind.CREATE, reason, cand)
    if (record.organization_id, record.project_id) != (tags.organization_id, tags.project_id):
        return act(ActionKind.MOVE, "the project or organization tag changed", cand, record)
    if record.fingerprint != fp:
        what = f"version {entry.version}" if entry.version is not None else "the secret"
        return act(ActionKind.ROTATE, f"new token in {what}", cand, record)
    if record.state != State.REGISTERED or record.version != entry.version or not _seen_same(entry, record):
        return act(ActionKind.REFRESH, "metadata-only change (same token)", cand, record)
    return act(ActionKind.SKIP, "up to date")


def plan(
    entries: Sequence[VaultEntry],
    payloads: Mapping[str, Mapping[str, Any] | None],
    records: Mapping[str, LedgerRecord],
    scope: Scope,
    settings: Settings,
    keyring: Keyring,
    now: float,
    retry_now: Collection[str] = (),
) -> list[Action]:
    """One action per secret in scope, in a stable order (by path).

    `retry_now`: keys whose backoff is skipped (the secrets a targeted sync was asked about).
    """
    claimed: dict[tuple[str, str, str], str] = {}
    # Tokens already registered elsewhere claim their (token, project) first, so a copy of a
    # registered token under a second path is the one rejected, whatever the listing order.
    for rec in records.values():
        if rec.state == State.REGISTERED and rec.fingerprint and rec.organization_id and rec.project_id:
            claimed.setdefault((rec.fingerprint, rec.organization_id, rec.project_id), rec.key)
    actions: list[Action] = []
    seen: set[str] = set()
    for entry in sorted(entries, key=lambda e: e.ref.key):
        key = entry.ref.key
        if key in seen:
            continue
        seen.add(key)
        action = _decide(entry, records.get(key), payloads.get(key), settings, keyring, now, claimed, key in retry_now)
        if action is not None:
            actions.append(action)
    for key in sorted(records):
        rec = records[key]
        if key in seen or rec.state in _GONE_STATES:
            continue
        idx = source_of(key, settings.sources)
        looked = key in scope.keys or (idx is not None and idx in scope.sources)
        # A row no configured source covers any more is left alone: a changed path setting
        # must not retire credentials wholesale (the delete guard rail is the second net).
        if looked:
            actions.append(_retire(rec, "the secret was deleted from Vault"))
    return actions


def count_deletions(actions: Collection[Action], settings: Settings) -> int:
    """Deletions a plan asks for by retirement (rotations replace, and are not counted)."""
    if settings.sync.deletion_policy != "delete":
        return 0
    return sum(1 for a in actions if a.kind == ActionKind.RETIRE and a.old_credential_id)
